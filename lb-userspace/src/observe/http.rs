//! The agent's HTTP endpoints. `--http-listen`: `/healthz` (the agent's loop is alive) and
//! `/readyz` (every source has reported and the maps hold it), for Kubernetes probes and
//! load-balancer checks. `--metrics-listen`: `/metrics` for Prometheus. Both may share one
//! address.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The main loop publishes status at least every second; three missed beats mean it is stuck.
const STALL: Duration = Duration::from_secs(3);

#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    beat_ms: Arc<AtomicU64>,
}

impl Readiness {
    /// Called by the main loop each time it publishes status: a heartbeat and the ready flag.
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.beat_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    fn alive(&self) -> bool {
        let age = crate::clock::now_ms().saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        age <= STALL.as_millis() as u64
    }
}

/// What one listener serves.
#[derive(Clone, Default)]
pub struct Endpoints {
    pub readiness: Option<Readiness>,
    /// The pin folder `/metrics` reads.
    pub metrics: Option<PathBuf>,
}

/// Binds now (a bad address fails the start) and serves in the background.
pub async fn serve(addr: SocketAddr, endpoints: Endpoints) -> Result<()> {
    let flag = if endpoints.readiness.is_some() {
        "--http-listen"
    } else {
        "--metrics-listen"
    };
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("{flag} {addr}: cannot listen (another agent on this host? pass another address or off)")
    })?;
    tracing::info!(
        %addr,
        health = endpoints.readiness.is_some(),
        metrics = endpoints.metrics.is_some(),
        "serving HTTP"
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let endpoints = endpoints.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &endpoints).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                // A slow or stuck client must not hold a task forever.
                let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
            });
        }
    });
    Ok(())
}

async fn answer(
    req: &Request<hyper::body::Incoming>,
    endpoints: &Endpoints,
) -> Response<Full<Bytes>> {
    if let ("/metrics", Some(pin_dir)) = (req.uri().path(), &endpoints.metrics) {
        // Reading every counter is blocking syscalls; keep them off the agent's loop.
        let pin_dir = pin_dir.clone();
        let scraped =
            tokio::task::spawn_blocking(move || crate::observe::prometheus::scrape(&pin_dir)).await;
        return match scraped {
            Ok(Ok(text)) => {
                let mut r = Response::new(Full::new(Bytes::from(text)));
                let kind = "text/plain; version=0.0.4; charset=utf-8";
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(kind),
                );
                r
            }
            Ok(Err(e)) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
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
