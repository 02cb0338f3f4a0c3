//! Real (or mock) service-discovery servers inside a test namespace: an etcd 3.4 member, a
//! dnsmasq serving A and SRV records from files, and the `lb-testkit consul-mock` Consul health
//! API. Each owns its processes and a temp folder; Drop kills and waits every child and removes
//! the folder, and shows the server's log if the test is panicking.
//!
//! The servers keep only the namespace's path, not a borrow of the `TestNet`: the namespace
//! lives on while any process is in it, so the drop order does not matter.

use crate::paths::{testkit_bin, unique_name};
use crate::procs::wait_or_kill;
use crate::TestNet;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `lb-testkit --netns <ns> exec -- <prog>`: the program replaces the helper, keeping its pid,
/// so killing the child kills the server itself.
fn exec_in(ns_path: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(testkit_bin());
    cmd.args(["--netns", ns_path])
        .arg("exec")
        .arg("--")
        .arg(prog);
    cmd
}

/// `$var`, else `default` if it exists, else `name` looked up on PATH by exec.
fn tool(var: &str, default: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    if Path::new(default).exists() {
        PathBuf::from(default)
    } else {
        PathBuf::from(name)
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name());
    std::fs::create_dir_all(&dir).expect("create temp folder");
    dir
}

fn log_file(path: &Path) -> std::fs::File {
    // Appended to, so a restart keeps the earlier run's lines.
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .expect("server log file")
}

fn kill_and_wait(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Panics (with a short reason; Drop prints the log) if the server already exited.
fn check_running(child: &mut Option<Child>, what: &str) {
    if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
        child.take();
        panic!("{what} exited during startup: {status}");
    }
}

fn show_log_if_panicking(what: &str, log: &Path) {
    if std::thread::panicking() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Not eprintln!, which panics (aborting, mid-unwind) if stderr is closed.
        let _ = writeln!(std::io::stderr(), "--- {what} log ---\n{text}");
    }
}

/// A single-member etcd 3.4 on 127.0.0.1:2379 (client) and :2380 (peer) inside the namespace;
/// fixed ports are fine because every test has its own namespace.
pub struct Etcd {
    /// `http://127.0.0.1:2379`.
    pub endpoint: String,
    ns_path: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd (`LB_ETCD_BIN`, else the toolchain's, else `etcd` on PATH) and waits until
    /// `etcdctl endpoint health` succeeds.
    pub fn start(net: &TestNet) -> Self {
        let dir = temp_dir();
        let mut etcd = Self {
            endpoint: "http://127.0.0.1:2379".into(),
            ns_path: net.ns_path.clone(),
            log: dir.join("etcd.log"),
            dir,
            child: None,
        };
        etcd.launch();
        etcd
    }

    fn launch(&mut self) {
        let bin = tool("LB_ETCD_BIN", "/opt/lb-toolchain/etcd/usr/bin/etcd", "etcd");
        let peer = "http://127.0.0.1:2380";
        let child = exec_in(&self.ns_path, bin)
            .args(["--name", "lbtest"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("lbtest={peer}")])
            // Shorter raft timings: a quicker first election, and a 1 s minimum lease TTL
            // (etcd's floor is 1.5 election timeouts) so lease-expiry tests stay short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log))
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_running(&mut self.child, "etcd");
            let healthy = self
                .etcdctl(&[
                    "endpoint",
                    "health",
                    "--dial-timeout=1s",
                    "--command-timeout=1s",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn etcdctl(&self, args: &[&str]) -> Command {
        let mut cmd = exec_in(
            &self.ns_path,
            tool("LB_ETCDCTL_BIN", "/usr/bin/etcdctl", "etcdctl"),
        );
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// `etcdctl <args>` against this server; its stdout. Panics with stderr on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args).output().expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new lease; its hex id as `put --lease` and `keep-alive` take it.
    pub fn grant(&self, ttl_secs: u64) -> String {
        // "lease 694d7b8b6b3b2a0c granted with TTL(10s)"
        let out = self.ctl(&["lease", "grant", &ttl_secs.to_string()]);
        match out.split_whitespace().collect::<Vec<_>>()[..] {
            ["lease", id, "granted", ..] => id.to_string(),
            _ => panic!("unexpected `etcdctl lease grant` output: {out:?}"),
        }
    }

    pub fn put(&self, key: &str, value: &str, lease: Option<&str>) {
        let lease_arg = lease.map(|l| format!("--lease={l}"));
        let mut args = vec!["put"];
        args.extend(lease_arg.as_deref());
        // `--` so keys and values starting with '-' are not taken for flags.
        args.extend(["--", key, value]);
        self.ctl(&args);
    }

    pub fn del(&self, key: &str) {
        self.ctl(&["del", "--", key]);
    }

    pub fn revoke(&self, lease: &str) {
        self.ctl(&["lease", "revoke", lease]);
    }

    /// Keeps `lease` alive until the returned value is dropped.
    pub fn keep_alive(&self, lease: &str) -> KeepAlive {
        let child = self
            .etcdctl(&["lease", "keep-alive", lease])
            .stdout(Stdio::null())
            .stderr(log_file(&self.log))
            .spawn()
            .expect("spawn etcdctl lease keep-alive");
        KeepAlive { child: Some(child) }
    }

    /// SIGKILL, as a crash: nothing is flushed or handed over.
    pub fn kill(&mut self) {
        kill_and_wait(&mut self.child);
    }

    /// Starts again on the same data folder (killing it first if still running) and waits
    /// until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of etcd's Prometheus samples whose line starts with `series`, e.g.
    /// `etcd_debugging_mvcc_watcher_total` or `grpc_server_started_total{grpc_method="Watch"`
    /// (etcd sorts labels by name). Panics when etcd does not serve /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let addr = self.endpoint.trim_start_matches("http://");
        let (status, body) = http_get_in(&self.ns_path, addr, "/metrics")
            .unwrap_or_else(|| panic!("etcd /metrics on {addr} does not answer"));
        assert_eq!(status, 200, "etcd /metrics: {status}");
        body.lines()
            .filter(|line| {
                line.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with([' ', '{', ',']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
        show_log_if_panicking("etcd", &self.log);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `etcdctl lease keep-alive`; killed and waited on drop.
pub struct KeepAlive {
    child: Option<Child>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

/// What the DNS server answers; names are written without the trailing dot.
#[derive(Clone, Debug, Default)]
pub struct DnsRecords {
    /// TTL of every answer (dnsmasq's `--local-ttl`).
    pub ttl: u32,
    /// A name may appear several times: one A record each.
    pub a: Vec<(String, Ipv4Addr)>,
    pub srv: Vec<SrvRecord>,
}

#[derive(Clone, Debug)]
pub struct SrvRecord {
    /// e.g. `_http._tcp.web.test`.
    pub name: String,
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

/// dnsmasq on 127.0.0.1:5353 (UDP and TCP) inside the namespace, authoritative for nothing but
/// our records: any other name is NXDOMAIN, never forwarded.
pub struct Dns {
    /// `127.0.0.1:5353`.
    pub addr: String,
    ns_path: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Dns {
    pub fn start(net: &TestNet, records: &DnsRecords) -> Self {
        let dir = temp_dir();
        let mut dns = Self {
            addr: "127.0.0.1:5353".into(),
            ns_path: net.ns_path.clone(),
            log: dir.join("dnsmasq.log"),
            dir,
            child: None,
        };
        dns.set(records);
        dns
    }

    /// Serves `records` from now on. dnsmasq does not re-read `srv-host` lines on SIGHUP, so it
    /// is stopped and started again; when this returns the new records are being served.
    pub fn set(&mut self, records: &DnsRecords) {
        self.stop();
        let hosts = self.dir.join("hosts");
        let conf = self.dir.join("dnsmasq.conf");
        let mut host_lines = String::new();
        for (name, ip) in &records.a {
            host_lines += &format!("{ip} {name}\n");
        }
        // Without `local=/#/`, with no upstream, dnsmasq answers other names REFUSED; this
        // makes them NXDOMAIN, as from an authoritative server.
        let mut conf_lines = String::from("local=/#/\n");
        for s in &records.srv {
            conf_lines += &format!(
                "srv-host={},{},{},{},{}\n",
                s.name, s.target, s.port, s.priority, s.weight
            );
        }
        std::fs::write(&hosts, host_lines).expect("write dnsmasq hosts");
        std::fs::write(&conf, conf_lines).expect("write dnsmasq conf");
        let child = exec_in(
            &self.ns_path,
            tool("LB_DNSMASQ_BIN", "/usr/sbin/dnsmasq", "dnsmasq"),
        )
        // Foreground, none of the system's config or resolv.conf, no privilege drop (the
        // Debian default user/group may not exist), no pid file, log to stderr.
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()))
        .args(["--no-resolv", "--no-hosts"])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args([
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=5353",
        ])
        .arg(format!("--local-ttl={}", records.ttl))
        .args([
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
            "--log-queries",
        ])
        .stdin(Stdio::null())
        .stdout(log_file(&self.log))
        .stderr(log_file(&self.log))
        .spawn()
        .expect("spawn dnsmasq");
        self.child = Some(child);
        self.wait_answering();
    }

    /// Readiness: a real DNS query over UDP, from a thread of this process that entered the
    /// namespace, until an answer comes back. The previous dnsmasq was waited for, so any answer
    /// is from the new one, which reads its files before it serves its first query.
    fn wait_answering(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_running(&mut self.child, "dnsmasq");
            if in_netns(&self.ns_path, || udp_query("lbtest-ready.invalid", 1)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq not answering after {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM first: dnsmasq then also ends the children it forks for TCP queries.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the dnsmasq process this harness started (exec kept the pid).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            wait_or_kill(&mut c);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
        show_log_if_panicking("dnsmasq", &self.log);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `lb-testkit <what> --listen <listen> --state <state>` in the namespace and waits for
/// its `ready` line. The mock exits when the returned stdin is closed; what it prints later
/// comes on the returned stdout.
pub(crate) fn spawn_mock(
    net: &TestNet,
    what: &str,
    listen: &str,
    state: &Path,
    log: &Path,
) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let mut child = net
        .testkit(None)
        .args([what, "--listen", listen, "--state"])
        .arg(state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file(log))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} {what}: {e}", testkit_bin().display()));
    let stdin = child.stdin.take().expect("stdin");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdout.read_line(&mut line).ok();
    assert_eq!(line.trim(), "ready", "{what} did not start");
    (child, stdin, stdout)
}

/// Replaces `path` with `text` through a temp file in `dir` and a rename, so that a mock polling
/// the file never reads half of it.
pub(crate) fn replace_file(dir: &Path, path: &Path, text: &str) {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, text).expect("write mock state");
    std::fs::rename(&tmp, path).expect("replace mock state");
}

/// The request log a mock keeps next to its state file, one line per request.
pub(crate) fn request_log(state: &Path) -> Vec<String> {
    mock_log(state, ".requests")
}

/// The lines of `<state><suffix>`, a log a mock keeps next to its state file.
pub(crate) fn mock_log(state: &Path, suffix: &str) -> Vec<String> {
    let mut path = state.to_path_buf().into_os_string();
    path.push(suffix);
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Runs `f` on a new thread that first enters the namespace at `ns_path`. Network namespaces
/// are per thread, so the rest of the test process stays where it was; the thread then ends.
fn in_netns<T: Send>(
    ns_path: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    std::thread::scope(|s| {
        s.spawn(|| {
            let before = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
            let ns = std::fs::File::open(ns_path)?;
            // SAFETY: setns on a namespace fd we opened; it affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // As in `lb-testkit --netns`: a reused holder pid must not mean the host's network.
            if std::fs::metadata("/proc/thread-self/ns/net")?.ino() == before {
                return Err(std::io::Error::other("not a test namespace"));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// The status code of `GET path` on `addr` inside the test's namespace; `None` when nothing
/// answers.
pub fn http_status(net: &TestNet, addr: &str, path: &str) -> Option<u16> {
    http_get(net, addr, path).map(|(status, _)| status)
}

/// Status and body of `GET path` on `addr` inside the test's namespace (a plain HTTP/1.0
/// request, so no client library is needed); `None` when nothing answers.
pub fn http_get(net: &TestNet, addr: &str, path: &str) -> Option<(u16, String)> {
    http_get_in(&net.ns_path, addr, path)
}

fn http_get_in(ns_path: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    in_netns(ns_path, || {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut answer = String::new();
        stream.take(16 << 20).read_to_string(&mut answer)?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
        Ok((status, body.to_string()))
    })
    .ok()
}

/// One DNS query to 127.0.0.1:5353; the response code of the matching answer.
fn udp_query(name: &str, qtype: u16) -> std::io::Result<u8> {
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // Connected, so a port nobody listens on yet fails at once with ECONNREFUSED.
    sock.connect("127.0.0.1:5353")?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    sock.send(&q)?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    let is_answer = n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0;
    if !is_answer {
        return Err(std::io::Error::other("not an answer to our query"));
    }
    Ok(buf[3] & 0x0f)
}

/// `lb-testkit consul-mock` on 127.0.0.1:8500 inside the namespace, answering Consul's
/// `/v1/health/service/<name>` (with blocking queries) from a JSON state file:
/// `{"index": N, "services": {"web": [{"node", "node_address", "address", "port", "weight",
/// "status": "passing"|"warning"|"critical", "tags": [..], "id"?}]}, "raw_body": null|"..",
/// "raw_status": 200}`. A non-null `raw_body` is sent as is, with `raw_status`.
pub struct ConsulMock {
    /// `http://127.0.0.1:8500`.
    pub addr: String,
    dir: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl ConsulMock {
    /// Returns once the mock listens (it says `ready` after binding).
    pub fn start(net: &TestNet, state: &serde_json::Value) -> Self {
        let dir = temp_dir();
        let mut mock = Self {
            addr: "http://127.0.0.1:8500".into(),
            state: dir.join("state.json"),
            log: dir.join("consul-mock.log"),
            dir,
            child: None,
            stdin: None,
        };
        mock.set(state);
        let (child, stdin, _) =
            spawn_mock(net, "consul-mock", "127.0.0.1:8500", &mock.state, &mock.log);
        mock.child = Some(child);
        mock.stdin = Some(stdin);
        mock
    }

    /// Replaces the state atomically (temp file + rename): the mock never reads half a file,
    /// and blocked queries return within ~20 ms if the index changed.
    pub fn set(&self, state: &serde_json::Value) {
        replace_file(&self.dir, &self.state, &state.to_string());
    }

    /// One line per request received so far: `<path?query> token=<X-Consul-Token or ->`.
    pub fn requests(&self) -> Vec<String> {
        request_log(&self.state)
    }
}

/// A `ConsulMock` state: the instances of service "web" at `index`, each `(ip:port, status)`
/// with tag "v1", registered with their node's address only (Consul's usual shape).
pub fn consul_state(index: u64, instances: &[(&str, &str)]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = instances
        .iter()
        .map(|(addr, status)| {
            let (ip, port) = addr.split_once(':').expect("ip:port");
            serde_json::json!({"node": format!("node-{ip}"), "node_address": ip, "address": "",
                   "port": port.parse::<u16>().expect("port"), "weight": 1, "status": status,
                   "tags": ["v1"]})
        })
        .collect();
    serde_json::json!({"index": index, "services": {"web": list}, "raw_body": null, "raw_status": 200})
}

/// A `ConsulMock` state that answers `body` as is (status 200) at `index`.
pub fn consul_raw(index: u64, body: &str) -> serde_json::Value {
    serde_json::json!({"index": index, "services": {}, "raw_body": body, "raw_status": 200})
}

impl Drop for ConsulMock {
    fn drop(&mut self) {
        // Closing stdin tells the mock to exit, even with queries still blocked.
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            wait_or_kill(&mut c);
        }
        show_log_if_panicking("consul-mock", &self.log);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
