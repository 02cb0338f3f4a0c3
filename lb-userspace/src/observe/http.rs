//! The agent's HTTP endpoints. `--http-listen`: `/healthz` (the agent's loop is alive) and
//! `/readyz` (every source has reported and the maps hold it), for Kubernetes probes and
//! load-balancer checks. `--metrics-listen`: `/metrics` for Prometheus. Both may share one
//! address.
//!
//! Anyone who can reach a listener can open connections to it, so each listener holds at most
//! `MAX_CONNECTIONS` (more are closed at once), gives a client `HEADER_TIMEOUT` to send its
//! request and `CONNECTION_TIMEOUT` in all, backs off when accepting fails (out of descriptors),
//! and renders `/metrics` at most once a second however often it is scraped.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The main loop publishes status at least every second; three missed beats mean it is stuck.
const STALL: Duration = Duration::from_secs(3);
/// A reconcile may keep the loop from beating that long (a large Maglev swap takes seconds)
/// before `/healthz` calls the agent stuck: a liveness probe must not kill it mid-update.
const LONGEST_RECONCILE: Duration = Duration::from_secs(120);
/// Connections one listener holds at once: probes and scrapes need a handful.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long any one connection may last.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rendered `/metrics` page is served again instead of reading the maps anew.
const SCRAPE_REUSE: Duration = Duration::from_secs(1);
/// The longest pause between failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    beat_ms: Arc<AtomicU64>,
    /// When the reconcile in progress started; 0 when none is.
    reconciling_since_ms: Arc<AtomicU64>,
}

impl Readiness {
    /// Called by the main loop each time it publishes status: a heartbeat and the ready flag.
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.beat_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Called by the main loop around each reconcile, which may keep it from beating.
    pub fn reconciling(&self, busy: bool) {
        let since = if busy { crate::clock::now_ms() } else { 0 };
        self.reconciling_since_ms.store(since, Ordering::Relaxed);
    }

    fn alive(&self) -> bool {
        let now = crate::clock::now_ms();
        let age = now.saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        let since = self.reconciling_since_ms.load(Ordering::Relaxed);
        let busy = since != 0 && now.saturating_sub(since) <= LONGEST_RECONCILE.as_millis() as u64;
        age <= STALL.as_millis() as u64 || busy
    }
}

/// What one listener serves.
#[derive(Clone, Default)]
pub struct Endpoints {
    pub readiness: Option<Readiness>,
    /// The pin folder `/metrics` reads.
    pub metrics: Option<PathBuf>,
    /// The last rendered `/metrics` page; the lock also makes concurrent scrapes wait for one
    /// rendering instead of each reading every map.
    scraped: Arc<tokio::sync::Mutex<Option<Scrape>>>,
}

/// A rendered `/metrics` page (or why it failed) and when it was rendered.
type Scrape = (Instant, Result<String, String>);

impl Endpoints {
    pub fn new(readiness: Option<Readiness>, metrics: Option<PathBuf>) -> Self {
        Self {
            readiness,
            metrics,
            scraped: Arc::default(),
        }
    }

    /// `/metrics`, rendered from the maps at most once per `SCRAPE_REUSE`.
    async fn metrics_page(&self, pin_dir: &Path) -> Result<String, String> {
        let mut last = self.scraped.lock().await;
        if let Some((at, page)) = last.as_ref() {
            if at.elapsed() < SCRAPE_REUSE {
                return page.clone();
            }
        }
        // Reading every counter is blocking syscalls; keep them off the agent's loop.
        let pin_dir = pin_dir.to_path_buf();
        let page =
            tokio::task::spawn_blocking(move || crate::observe::prometheus::scrape(&pin_dir))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| format!("{e:#}")));
        *last = Some((Instant::now(), page.clone()));
        page
    }
}

/// Binds now (a bad address fails the start) and serves from a thread of its own, so that the
/// endpoints answer while the agent's loop is busy (a long reconcile).
pub fn serve(addr: SocketAddr, endpoints: Endpoints) -> Result<()> {
    let flag = if endpoints.readiness.is_some() {
        "--http-listen"
    } else {
        "--metrics-listen"
    };
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("{flag} {addr}: cannot listen (another agent on this host? pass another address or off)")
    })?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        %addr,
        health = endpoints.readiness.is_some(),
        metrics = endpoints.metrics.is_some(),
        "serving HTTP"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("http {addr}"))
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, endpoints).await,
                    Err(e) => tracing::error!(%addr, "cannot serve HTTP: {e}"),
                }
            })
        })?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, endpoints: Endpoints) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: retrying at once would spin a core.
                if backoff.is_zero() {
                    tracing::warn!("accepting a connection failed, backing off: {e}");
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::ZERO;
        // Over the cap the connection is closed at once rather than left to queue.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &endpoints).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

async fn answer(
    req: &Request<hyper::body::Incoming>,
    endpoints: &Endpoints,
) -> Response<Full<Bytes>> {
    if let ("/metrics", Some(pin_dir)) = (req.uri().path(), &endpoints.metrics) {
        return match endpoints.metrics_page(pin_dir).await {
            Ok(text) => {
                let mut r = Response::new(Full::new(Bytes::from(text)));
                let kind = "text/plain; version=0.0.4; charset=utf-8";
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(kind),
                );
                r
            }
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
    }
    let Some(readiness) = &endpoints.readiness else {
        return plain(StatusCode::NOT_FOUND, "not found\n".into());
    };
    let (status, body) = match req.uri().path() {
        "/healthz" if readiness.alive() => (StatusCode::OK, "ok\n"),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "main loop stalled\n"),
        "/readyz" if readiness.alive() && readiness.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "ready\n")
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: sources not synced yet\n",
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    plain(status, body.into())
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reconcile_is_not_a_stall_but_a_silent_loop_is() {
        let r = Readiness::default();
        assert!(!r.alive(), "never beat");
        r.set(true);
        assert!(r.alive());
        // The last beat long ago: stuck, unless a reconcile is under way (and not for ever).
        let long_ago = crate::clock::now_ms() - 10_000;
        r.beat_ms.store(long_ago, Ordering::Relaxed);
        assert!(!r.alive());
        r.reconciling(true);
        assert!(r.alive(), "a reconcile in progress");
        r.reconciling_since_ms.store(
            crate::clock::now_ms() - LONGEST_RECONCILE.as_millis() as u64 - 1,
            Ordering::Relaxed,
        );
        assert!(!r.alive(), "a reconcile that never ends is a stall");
        r.reconciling(false);
        assert!(!r.alive());
    }
}
