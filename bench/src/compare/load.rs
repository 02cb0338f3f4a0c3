//! The benchmark's traffic: `lb-bench serve` (backends) and `lb-bench load` (clients), both run inside
//! the benchmark's namespaces. One tiny protocol serves every workload: a request is echoed
//! back, and a request starting with `B` makes the server stream data until the client closes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const REQUEST: &[u8] = b"ping";
const CHUNK: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// connect, one request, close: connections per second and their latency.
    Short,
    /// requests over one connection per client: requests per second and their latency.
    Persistent,
    /// one connection per client streaming data: bytes per second.
    Bulk,
}

/// Serves until stdin closes.
pub fn serve(listen: &[SocketAddr]) -> Result<()> {
    for addr in listen {
        let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || answer(conn));
            }
        });
    }
    println!("ready");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn answer(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 512];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if buf[0] == b'B' {
            let data = vec![0u8; CHUNK];
            while conn.write_all(&data).is_ok() {}
            return;
        }
        if conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub workload: Option<Workload>,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub bytes_per_sec: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `clients` threads for `seconds`, spreading over `targets` in turn; prints one JSON report.
pub fn load(
    targets: &[SocketAddr],
    workload: Workload,
    seconds: f64,
    clients: usize,
) -> Result<()> {
    if targets.is_empty() || clients == 0 || !(0.1..=120.0).contains(&seconds) {
        bail!("need targets, clients > 0 and 0.1 <= seconds <= 120");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let results: Vec<Worker> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| s.spawn(move || worker(targets, i, workload, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|w| w.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0) as u64
    };
    let ops = lat.len() as u64;
    let report = LoadReport {
        workload: Some(workload),
        seconds: elapsed,
        ops,
        ops_per_sec: ops as f64 / elapsed,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        bytes_per_sec: results.iter().map(|w| w.bytes).sum::<u64>() as f64 / elapsed,
        errors: results.iter().map(|w| w.errors).sum(),
        first_error: results.iter().find_map(|w| w.first_error.clone()),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(Default)]
struct Worker {
    latencies: Vec<u32>,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Worker {
    fn failed(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
        // Do not spin on a persistent failure.
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// Closing with RST (linger 0) leaves no TIME_WAIT behind, so a few seconds of short
/// connections cannot run out of local ports.
fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn exchange(s: &mut TcpStream, buf: &mut [u8; 4]) -> std::io::Result<()> {
    s.write_all(REQUEST)?;
    s.read_exact(buf)
}

fn worker(targets: &[SocketAddr], index: usize, workload: Workload, deadline: Instant) -> Worker {
    let mut w = Worker::default();
    let mut turn = index;
    let mut buf = [0u8; 4];
    let mut next = || {
        turn += 1;
        targets[turn % targets.len()]
    };
    match workload {
        Workload::Short => {
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let result =
                    TcpStream::connect_timeout(&next(), CONNECT_TIMEOUT).and_then(|mut s| {
                        s.set_nodelay(true)?;
                        reset_on_close(&s);
                        exchange(&mut s, &mut buf)
                    });
                match result {
                    Ok(()) => w.latencies.push(micros(t0.elapsed())),
                    Err(e) => w.failed(e),
                }
            }
        }
        Workload::Persistent => {
            let mut conn = None;
            while Instant::now() < deadline {
                if conn.is_none() {
                    match TcpStream::connect_timeout(&next(), CONNECT_TIMEOUT) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            conn = Some(s);
                        }
                        Err(e) => {
                            w.failed(e);
                            continue;
                        }
                    }
                }
                let s = conn.as_mut().expect("connected");
                let t0 = Instant::now();
                match exchange(s, &mut buf) {
                    Ok(()) => w.latencies.push(micros(t0.elapsed())),
                    Err(e) => {
                        w.failed(e);
                        conn = None;
                    }
                }
            }
        }
        Workload::Bulk => match TcpStream::connect_timeout(&next(), CONNECT_TIMEOUT) {
            Err(e) => w.failed(e),
            Ok(mut s) => {
                let mut data = vec![0u8; CHUNK];
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                if let Err(e) = s.write_all(b"B") {
                    w.failed(e);
                    return w;
                }
                while Instant::now() < deadline {
                    match s.read(&mut data) {
                        Ok(0) => break,
                        Ok(n) => w.bytes += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            w.failed(e);
                            break;
                        }
                    }
                }
                w.latencies.push(0);
            }
        },
    }
    w
}
