//! One probe: a TCP connect, or an HTTP/1.1 GET (hyper) on a fresh connection, bounded by the
//! timeout as a whole. A fresh connection per probe is deliberate: it checks that the backend
//! still accepts connections, which is what balanced clients need. Probes go to the backend's
//! address, which config validation keeps distinct from every VIP, so the connect program never
//! rewrites them even when the agent runs inside the balanced cgroup.

use crate::config::ProbeKind;
use bytes::Bytes;
use http_body_util::Empty;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// `Err` carries a short reason for logs and `stats`.
pub type Outcome = Result<(), String>;

pub async fn probe(addr: SocketAddr, kind: &ProbeKind, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, run(addr, kind)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("timeout after {timeout:?}")),
    }
}

async fn run(addr: SocketAddr, kind: &ProbeKind) -> Outcome {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http {
            path,
            expect_status,
        } => http(stream, addr, path, *expect_status).await,
    }
}

async fn http(stream: TcpStream, addr: SocketAddr, path: &str, expect: Option<u16>) -> Outcome {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    // The connection future drives the socket; it ends with the response or the timeout.
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "lb-agent-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = sender.send_request(request).await;
    driver.abort();
    let status = result.map_err(|e| format!("http: {e}"))?.status().as_u16();
    let ok = match expect {
        Some(want) => status == want,
        None => (200..300).contains(&status),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("http status {status}"))
    }
}
