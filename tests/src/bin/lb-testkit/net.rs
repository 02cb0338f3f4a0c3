//! Backends and clients speaking the tiny test protocol: the backend answers each connection or
//! datagram with its own listen address and a newline.

use anyhow::{Context, Result};
use lb_testkit::procs::monotonic_micros;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

/// How a TCP backend treats a connection.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Reply with the listen address (the balancing tests' protocol).
    Answer,
    /// Read an HTTP request, reply with this status and the listen address as body.
    Http(u16),
    /// Accept and never answer (a hung backend).
    Hang,
    /// HTTP/1.1 keep-alive: every request on a connection is answered with 200 and the listen
    /// address, until the client closes it (what pooled clients talk to). A request for
    /// `/slow/<ms>` is answered that long after it arrived (at most 10 s).
    KeepAlive,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Where each accepted connection (or received datagram) is recorded, if asked for: one line
/// `<unix µs> <CLOCK_MONOTONIC µs> <listen address>`, written right after `accept` returns and
/// before the reply, so a test can compare it with when it saw a map change. CLOCK_MONOTONIC is
/// one clock for every process on the host and never steps, unlike the wall clock.
#[derive(Clone)]
struct AcceptLog(Option<Arc<Mutex<std::fs::File>>>);

impl AcceptLog {
    fn open(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self(None));
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open accept log {}", path.display()))?;
        Ok(Self(Some(Arc::new(Mutex::new(file)))))
    }

    fn record(&self, addr: &str) {
        let Some(file) = &self.0 else {
            return;
        };
        let mono = monotonic_micros();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        // One write per line: lines of concurrent listeners never interleave.
        let line = format!("{unix} {mono} {addr}\n");
        if let Ok(mut f) = file.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// `accept_log`: see `AcceptLog`.
pub fn serve(
    listen: &[SocketAddr],
    proto: Proto,
    mode: Mode,
    accept_log: Option<&Path>,
) -> Result<()> {
    let log = AcceptLog::open(accept_log)?;
    let mut counts = Vec::new();
    for addr in listen {
        let count = Arc::new(AtomicU64::new(0));
        let reply = format!("{addr}\n");
        let log = log.clone();
        match proto {
            Proto::Tcp => {
                let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
                let (c, r) = (count.clone(), reply);
                std::thread::spawn(move || serve_tcp(l, &c, &r, mode, &log));
            }
            Proto::Udp => {
                let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
                let (c, r) = (count.clone(), reply);
                std::thread::spawn(move || serve_udp(s, &c, &r, &log));
            }
        }
        counts.push((addr.to_string(), count));
    }
    println!("ready");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let accepted: BTreeMap<_, _> = counts
        .iter()
        .map(|(a, c)| (a.clone(), c.load(Ordering::SeqCst)))
        .collect();
    println!("{}", json!({ "accepted": accepted }));
    Ok(())
}

fn serve_tcp(l: TcpListener, count: &AtomicU64, reply: &str, mode: Mode, log: &AcceptLog) {
    let mut hung = Vec::new();
    let addr = reply.trim_end();
    for conn in l.incoming().flatten() {
        log.record(addr);
        count.fetch_add(1, Ordering::SeqCst);
        let mut conn = conn;
        match mode {
            Mode::Answer => {
                let _ = conn.write_all(reply.as_bytes());
            }
            Mode::Http(status) => {
                let _ = read_request_head(&mut conn);
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = conn.write_all(response.as_bytes());
            }
            // Kept open and silent until the process exits; bounded by the test's lifetime.
            Mode::Hang => hung.push(conn),
            // A thread per connection: the tests hold at most a few dozen.
            Mode::KeepAlive => {
                let addr = addr.to_owned();
                std::thread::spawn(move || keep_alive(conn, &addr));
            }
        }
    }
}

/// Reads until the blank line ending an HTTP request head (bounded in size and time).
fn keep_alive(mut conn: TcpStream, addr: &str) {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{addr}",
        addr.len()
    );
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            if let Some(delay) = slow(&head) {
                std::thread::sleep(delay);
            }
            if conn.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) if pending.len() + n > 64 * 1024 => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// The delay a `GET /slow/<ms>` asks for.
fn slow(head: &[u8]) -> Option<Duration> {
    let line = head.split(|b| *b == b'\r').next()?;
    let path = std::str::from_utf8(line).ok()?.split(' ').nth(1)?;
    let ms: u64 = path.strip_prefix("/slow/")?.parse().ok()?;
    Some(Duration::from_millis(ms.min(10_000)))
}

fn read_request_head(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

fn serve_udp(s: UdpSocket, count: &AtomicU64, reply: &str, log: &AcceptLog) {
    let mut buf = [0u8; 512];
    let addr = reply.trim_end();
    while let Ok((_, from)) = s.recv_from(&mut buf) {
        log.record(addr);
        count.fetch_add(1, Ordering::SeqCst);
        let _ = s.send_to(reply.as_bytes(), from);
    }
}

fn errno_name(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        // A read timeout surfaces as EAGAIN on a socket with SO_RCVTIMEO.
        Some(libc::EAGAIN) => "ETIMEDOUT",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ECONNABORTED) => "ECONNABORTED",
        Some(libc::EINPROGRESS) => "EINPROGRESS",
        Some(n) => return format!("errno {n}"),
        None if e.kind() == std::io::ErrorKind::TimedOut => "ETIMEDOUT",
        None => return format!("{:?}", e.kind()),
    };
    name.into()
}

/// A UDP socket of `to`'s family on an ephemeral port.
fn udp_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    Ok(s)
}

/// One exchange. Returns the reply, which names the backend, and the peer the client saw:
/// `getpeername()` of the TCP or connected UDP socket, the source `recvfrom()` reported on an
/// unconnected one (`shared`, reused across exchanges).
fn exchange(
    to: SocketAddr,
    proto: Proto,
    shared: Option<&UdpSocket>,
) -> std::io::Result<(String, SocketAddr)> {
    let mut reply = String::new();
    let peer = match (proto, shared) {
        (Proto::Tcp, _) => {
            let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(REPLY_TIMEOUT))?;
            s.read_to_string(&mut reply)?;
            s.peer_addr()?
        }
        (Proto::Udp, Some(s)) => {
            s.send_to(b"hi", to)?;
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf)?;
            reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            from
        }
        (Proto::Udp, None) => {
            let s = udp_socket(to)?;
            s.connect(to)?;
            s.send(b"hi")?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.peer_addr()?
        }
    };
    let reply = reply.trim();
    if reply.is_empty() {
        // Accepted and closed without a word: not an answer from a backend.
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "empty reply",
        ));
    }
    Ok((reply.to_string(), peer))
}

/// An exchange on the one connected socket, made (through `to`) when there is none; a failed
/// exchange drops it, so the next makes a new one.
fn persistent_exchange(
    to: SocketAddr,
    socket: &mut Option<UdpSocket>,
) -> std::io::Result<(String, SocketAddr)> {
    let s = match socket.take() {
        Some(s) => s,
        None => {
            let s = udp_socket(to)?;
            s.connect(to)?;
            s
        }
    };
    s.send(b"hi")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let reply = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let peer = s.peer_addr()?;
    *socket = Some(s);
    Ok((reply, peer))
}

/// Opens `count` TCP connections to `to` and keeps them open until stdin closes, then closes
/// them all: long-lived connections for the `active` gauge. Prints how many were opened, then
/// (after closing) a final line.
/// Prints `{"held", "errors", "peers"}` once the connections are open (or, `pending`, started),
/// and `{"closed", "peers"}` when stdin closes: the peer names (getpeername) just before the
/// close, so a test sees what the programs showed after whatever happened meanwhile.
pub fn hold_connections(to: SocketAddr, count: u64, pending: bool) -> Result<()> {
    let mut open = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..count {
        let started = if pending {
            start_connect(to)
        } else {
            TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map(socket2::Socket::from)
        };
        match started {
            Ok(s) => open.push(s),
            Err(e) => *errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    println!(
        "{}",
        json!({ "held": open.len(), "errors": errors, "peers": peer_names(&open) })
    );
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let peers = peer_names(&open);
    drop(open);
    println!("{}", json!({ "closed": true, "peers": peers }));
    Ok(())
}

/// A non-blocking connect, left in progress.
fn start_connect(to: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_nonblocking(true)?;
    match s.connect(&to.into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

/// Connections per peer name; "connecting" for a connect still in progress, the errno's name
/// for one that failed.
fn peer_names(sockets: &[socket2::Socket]) -> BTreeMap<String, u64> {
    let mut peers = BTreeMap::new();
    for s in sockets {
        let name = match (
            s.peer_addr().ok().and_then(|a| a.as_socket()),
            s.take_error(),
        ) {
            (Some(a), _) => a.to_string(),
            (None, Ok(Some(e)) | Err(e)) => errno_name(&e),
            (None, Ok(None)) => "connecting".to_string(),
        };
        *peers.entry(name).or_default() += 1;
    }
    peers
}

/// Each socket is bound, sends one datagram and is closed at once: what a busy DNS client
/// does to a node's connect-time balancer.
pub fn udp_churn(to: SocketAddr, count: u64) -> Result<()> {
    let (mut sent, mut errors) = (0u64, BTreeMap::<String, u64>::new());
    for _ in 0..count {
        match udp_socket(to).and_then(|s| s.send_to(b"hi", to)) {
            Ok(_) => sent += 1,
            Err(e) => *errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    println!("{}", json!({ "sent": sent, "errors": errors }));
    Ok(())
}

/// How a UDP client's exchanges use sockets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UdpMode {
    /// A fresh connected socket each.
    PerExchange,
    /// One unconnected socket sends every datagram with `sendto()` (as DNS clients do).
    Unconnected,
    /// One connected socket for all, replaced after an exchange fails.
    Persistent,
}

pub fn connect(
    to: SocketAddr,
    count: u64,
    proto: Proto,
    mode: UdpMode,
    interval_ms: u64,
    max_seconds: u64,
) -> Result<()> {
    if proto == Proto::Tcp && mode != UdpMode::PerExchange {
        anyhow::bail!("--unconnected and --persistent are for udp");
    }
    let shared = match mode {
        UdpMode::Unconnected => Some(udp_socket(to)?),
        _ => None,
    };
    let mut persistent: Option<UdpSocket> = None;
    // In steady mode (count 0) the caller stops us by closing stdin.
    let stop = Arc::new(AtomicBool::new(false));
    if count == 0 {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let (mut attempts, mut ok) = (0u64, 0u64);
    let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
    let mut peers: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while (count == 0 || attempts < count)
        && !stop.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        attempts += 1;
        let result = if mode == UdpMode::Persistent {
            persistent_exchange(to, &mut persistent)
        } else {
            exchange(to, proto, shared.as_ref())
        };
        match result {
            Ok((backend, peer)) => {
                ok += 1;
                *by_backend.entry(backend).or_default() += 1;
                *peers.entry(peer.to_string()).or_default() += 1;
            }
            Err(e) => *errors.entry(errno_name(&e)).or_default() += 1,
        }
        if interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
    }
    println!(
        "{}",
        json!({
            "attempts": attempts,
            "ok": ok,
            "by_backend": by_backend,
            "peers": peers,
            "errors": errors,
        })
    );
    Ok(())
}
