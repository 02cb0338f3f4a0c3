//! `--http-listen`: `/healthz` (the agent's loop is alive) and `/readyz` (every source has
//! reported and the maps hold it), for Kubernetes probes and load-balancer checks.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
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
            .store(crate::health::runner::now_ms(), Ordering::Relaxed);
    }

    fn alive(&self) -> bool {
        let age =
            crate::health::runner::now_ms().saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        age <= STALL.as_millis() as u64
    }
}

/// Binds now (a bad address fails the start) and serves in the background.
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--http-listen {addr}: cannot listen"))?;
    tracing::info!(%addr, "serving /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer(&req, &readiness);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
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

fn answer(req: &Request<hyper::body::Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
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
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
