//! The benchmark's traffic: `lb-bench serve` (backends) and `lb-bench load` (clients), both run inside
//! the benchmark's namespaces. One tiny protocol serves every workload: a request is echoed
//! back (TCP and UDP on every address), and a TCP request starting with `B` makes the server
//! stream data until the client closes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod short;

const REQUEST: &[u8] = b"ping";
const CHUNK: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a UDP client waits for its answer before counting an error and sending the next
/// request (a lost datagram must not stop a closed loop).
const UDP_TIMEOUT: Duration = Duration::from_millis(200);
/// The latency distribution a report carries: the latency at quantile `i / CDF_STEPS` for
/// `i` in `0..=CDF_STEPS`.
pub const CDF_STEPS: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// connect, one request, close: connections per second and their latency.
    Short,
    /// requests over one connection per client: requests per second and their latency.
    Persistent,
    /// one connection per client streaming data: bytes per second.
    Bulk,
    /// UDP request/response with `sendto()` on an unconnected socket per client (each
    /// request to the next target in turn): requests per second and their latency.
    Udp,
    /// UDP request/response on a socket per client connected once to its target.
    UdpConnected,
}

/// Serves until stdin closes, from one event-driven thread for every listener (no thread or
/// process per connection), pinned to the last core when there are several, away from the
/// clients of the longer-lived workloads (`load` takes the other cores for them).
pub fn serve(listen: &[SocketAddr]) -> Result<()> {
    let cores = cores();
    if cores > 1 {
        pin_to(&[cores - 1]);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (listeners, datagrams) = runtime.block_on(async {
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        for addr in listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind tcp {addr}"))?;
            tcp.push(l);
            let u = tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("bind udp {addr}"))?;
            udp.push(u);
        }
        anyhow::Ok((tcp, udp))
    })?;
    for l in listeners {
        runtime.spawn(async move {
            while let Ok((conn, _)) = l.accept().await {
                tokio::spawn(answer(conn));
            }
        });
    }
    // One task per UDP socket echoes every datagram from that socket (so the answer leaves
    // from the address it was sent to): nothing is spawned per request.
    for u in datagrams {
        runtime.spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match u.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        let _ = u.send_to(&buf[..n], from).await;
                    }
                    // An error queued on the socket (none is expected): do not spin on it.
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        });
    }
    println!("ready");
    // stdin is read on this thread while the runtime's tasks run on... this thread too, so the
    // runtime is driven from a helper thread that blocks on stdin and then stops it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = stop.send(());
    });
    runtime.block_on(async {
        let _ = stopped.await;
    });
    Ok(())
}

async fn answer(mut conn: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 512];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if buf[0] == b'B' {
            let data = vec![0u8; CHUNK];
            while conn.write_all(&data).await.is_ok() {}
            return;
        }
        if conn.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Restricts this process (every thread it starts afterwards) to `cpus`.
pub fn pin_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only read
    // and write that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(*cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
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
    /// Latency (µs) at quantile `i / CDF_STEPS`, `i` in `0..=CDF_STEPS`; empty without
    /// answers.
    #[serde(default)]
    pub cdf_us: Vec<u32>,
}

/// The latency at quantiles `0, 1/steps, ..., 1` of `sorted`.
pub fn cdf(sorted: &[u32], steps: usize) -> Vec<u32> {
    if sorted.is_empty() || steps == 0 {
        return Vec::new();
    }
    let last = sorted.len() - 1;
    (0..=steps)
        .map(|i| sorted[(last as f64 * i as f64 / steps as f64).round() as usize])
        .collect()
}

/// `connections` closed loops at once for `seconds`, spreading over `targets` in turn; prints
/// one JSON report. Short connections run an event loop per core, unpinned; the other
/// workloads an event-driven runtime on every core but the servers' one.
pub fn load(
    targets: &[SocketAddr],
    workload: Workload,
    seconds: f64,
    connections: usize,
) -> Result<()> {
    if targets.is_empty() || connections == 0 || !(0.1..=120.0).contains(&seconds) {
        bail!("need targets, connections > 0 and 0.1 <= seconds <= 120");
    }
    let cores = cores();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let results: Vec<Worker> = if workload == Workload::Short {
        // Most of a short connection's cost is the kernel's, and most of that runs on the
        // connecting core (the handshake is processed in the sender's softirq). Clients pinned
        // to one core saturated it while the servers' core idled at 65%; a loop on each core
        // (the servers' included) measured 28-30k connections/s against 21-22k pinned, on
        // 2 cores.
        short_loops(targets, cores, connections, deadline)
    } else {
        let mine: Vec<usize> = (0..cores.saturating_sub(1).max(1)).collect();
        if cores > 1 {
            pin_to(&mine);
        }
        // One core for the clients (the usual case on 2 cores): a single-threaded runtime,
        // which skips the work-stealing scheduler's cross-thread wakeups and atomics.
        let runtime = if mine.len() == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(mine.len())
                .enable_all()
                .build()?
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        let targets: std::sync::Arc<[SocketAddr]> = targets.into();
        runtime.block_on(async {
            let tasks: Vec<_> = (0..connections)
                .map(|i| tokio::spawn(worker(targets.clone(), i, workload, deadline)))
                .collect();
            let mut done = Vec::with_capacity(tasks.len());
            for t in tasks {
                done.push(t.await.unwrap_or_default());
            }
            done
        })
    };
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
        cdf_us: if workload == Workload::Bulk {
            Vec::new()
        } else {
            cdf(&lat, CDF_STEPS)
        },
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Short connections: one event loop per client thread, the connections split between them.
fn short_loops(
    targets: &[SocketAddr],
    threads: usize,
    connections: usize,
    deadline: Instant,
) -> Vec<Worker> {
    let threads = threads.clamp(1, connections);
    std::thread::scope(|scope| {
        let loops: Vec<_> = (0..threads)
            .map(|t| {
                let share = connections / threads + usize::from(t < connections % threads);
                scope.spawn(move || short::run(targets, t * connections, share, deadline))
            })
            .collect();
        loops
            .into_iter()
            .map(|l| l.join().unwrap_or_default())
            .collect()
    })
}

#[derive(Default)]
struct Worker {
    latencies: Vec<u32>,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Worker {
    fn note_failure(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    async fn failed(&mut self, e: impl std::fmt::Display) {
        self.note_failure(e);
        // Do not spin on a persistent failure.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// Linger 0: the close is an RST, which does not block (tokio's `set_linger` warns about the
/// blocking case, a positive linger).
fn reset_on_close(s: &impl std::os::fd::AsRawFd) {
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

async fn connect(to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn exchange(s: &mut tokio::net::TcpStream, buf: &mut [u8; 4]) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(REQUEST).await?;
    s.read_exact(buf).await.map(|_| ())
}

async fn worker(
    targets: std::sync::Arc<[SocketAddr]>,
    index: usize,
    workload: Workload,
    deadline: tokio::time::Instant,
) -> Worker {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut w = Worker::default();
    let mut turn = index;
    let mut buf = [0u8; 4];
    let mut next = || {
        turn += 1;
        targets[turn % targets.len()]
    };
    let running = || tokio::time::Instant::now() < deadline;
    match workload {
        // Driven by `short_loops`, never by a task.
        Workload::Short => {}
        Workload::Persistent => {
            let mut conn = None;
            while running() {
                if conn.is_none() {
                    match connect(next()).await {
                        Ok(s) => conn = Some(s),
                        Err(e) => {
                            w.failed(e).await;
                            continue;
                        }
                    }
                }
                let s = conn.as_mut().expect("connected");
                let t0 = Instant::now();
                match exchange(s, &mut buf).await {
                    Ok(()) => w.latencies.push(micros(t0.elapsed())),
                    Err(e) => {
                        w.failed(e).await;
                        conn = None;
                    }
                }
            }
        }
        Workload::Bulk => match connect(next()).await {
            Err(e) => w.failed(e).await,
            Ok(mut s) => {
                let mut data = vec![0u8; CHUNK];
                if let Err(e) = s.write_all(b"B").await {
                    w.failed(e).await;
                    return w;
                }
                while running() {
                    match tokio::time::timeout_at(deadline, s.read(&mut data)).await {
                        Err(_) | Ok(Ok(0)) => break,
                        Ok(Ok(n)) => w.bytes += n as u64,
                        Ok(Err(e)) => {
                            w.failed(e).await;
                            break;
                        }
                    }
                }
                w.latencies.push(0);
            }
        },
        Workload::Udp | Workload::UdpConnected => {
            let first = next();
            let connected = workload == Workload::UdpConnected;
            let sock = match udp_socket(first, connected).await {
                Ok(s) => s,
                Err(e) => {
                    w.failed(e).await;
                    return w;
                }
            };
            let mut to = first;
            let mut seq = index as u32 * 1_000_003;
            while running() {
                seq = seq.wrapping_add(1);
                let t0 = Instant::now();
                let asked =
                    tokio::time::timeout(UDP_TIMEOUT, udp_exchange(&sock, to, connected, seq));
                match asked.await {
                    Ok(Ok(())) => w.latencies.push(micros(t0.elapsed())),
                    Ok(Err(e)) => w.failed(e).await,
                    Err(_) => {
                        w.failed(format!("no UDP answer within {UDP_TIMEOUT:?}"))
                            .await
                    }
                }
                if !connected {
                    to = next();
                }
            }
        }
    }
    w
}

async fn udp_socket(to: SocketAddr, connect: bool) -> std::io::Result<tokio::net::UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(any).await?;
    if connect {
        sock.connect(to).await?;
    }
    Ok(sock)
}

/// One request (a sequence number) and its echo. Answers to earlier requests that timed out
/// are skipped; an unconnected socket's answer must come from the address it was sent to
/// (the VIP, for a balancer).
async fn udp_exchange(
    sock: &tokio::net::UdpSocket,
    to: SocketAddr,
    connected: bool,
    seq: u32,
) -> std::io::Result<()> {
    let req = seq.to_be_bytes();
    let mut buf = [0u8; 64];
    if connected {
        sock.send(&req).await?;
    } else {
        sock.send_to(&req, to).await?;
    }
    loop {
        let (n, from) = if connected {
            (sock.recv(&mut buf).await?, to)
        } else {
            sock.recv_from(&mut buf).await?
        };
        if from != to {
            return Err(std::io::Error::other(format!(
                "answer from {from}, sent to {to}"
            )));
        }
        if buf[..n] == req {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_takes_evenly_spaced_quantiles() {
        let sorted: Vec<u32> = (1..=101).collect();
        let c = cdf(&sorted, 4);
        assert_eq!(c, vec![1, 26, 51, 76, 101]);
        assert!(cdf(&[], 4).is_empty());
        assert_eq!(cdf(&[7], 2), vec![7, 7, 7]);
    }
}
