//! Processes a test runs inside its namespace: backends, clients and the real agent.

use crate::{paths::agent_bin, PinDir, TestCgroup, TestNet};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What one `lb-testkit connect` run saw.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ClientReport {
    pub attempts: u64,
    pub ok: u64,
    /// Successful exchanges per answering backend (the backend names itself in its reply).
    pub by_backend: HashMap<String, u64>,
    /// Failures per errno name (ECONNREFUSED, ENETUNREACH, …).
    pub errors: HashMap<String, u64>,
    /// Successful exchanges per peer address the client saw (getpeername, or the source of
    /// a reply to an unconnected UDP socket).
    #[serde(default)]
    pub peers: HashMap<String, u64>,
}

impl ClientReport {
    pub fn from(&self, backend: &str) -> u64 {
        self.by_backend.get(backend).copied().unwrap_or(0)
    }

    pub fn failed(&self, errno: &str) -> u64 {
        self.errors.get(errno).copied().unwrap_or(0)
    }

    /// Every connect of a steady load answered: no failure of any kind (ENETUNREACH would be a VIP
    /// connect left untranslated, ECONNREFUSED an empty or missing table, ETIMEDOUT a lost one).
    pub fn assert_lost_nothing(&self, min_attempts: u64, when: &str) {
        assert!(
            self.attempts >= min_attempts,
            "too little load to prove anything ({} < {min_attempts}): {self:?}",
            self.attempts
        );
        assert_eq!(
            self.failed("ENETUNREACH"),
            0,
            "untranslated VIP connects {when}: {self:?}"
        );
        assert_eq!(
            self.failed("ECONNREFUSED"),
            0,
            "refused connects {when}: {self:?}"
        );
        assert!(self.errors.is_empty(), "connects failed {when}: {self:?}");
        assert_eq!(self.ok, self.attempts, "connects failed {when}: {self:?}");
    }
}

/// These fields of a process's `/proc/<pid>/status` (`VmHWM`, `RssFile`, ...), in KiB, from
/// one read; `None` if the process is gone or one of them is missing.
pub fn status_kib(pid: i32, fields: &[&str]) -> Option<Vec<u64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    };
    fields.iter().map(|name| field(name)).collect()
}

/// Waits up to 3 s for a child to exit on its own, then kills it: only our own children.
pub fn wait_or_kill(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Closes the child's stdin (its signal to stop), then parses the JSON line it prints.
pub(crate) fn finish<T: for<'a> Deserialize<'a>>(mut child: Child, what: &str) -> T {
    drop(child.stdin.take());
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read output");
    wait_or_kill(&mut child);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{what} printed {out:?}: {e}"))
}

fn spawn_ready(mut cmd: Command, what: &str) -> Child {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).ok();
    assert_eq!(line.trim(), "ready", "{what} did not start");
    child.stdout = Some(reader.into_inner());
    child
}

/// How a TCP backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// Its own address, then close (what balanced clients expect).
    Answer,
    /// An HTTP response with this status (for HTTP health checks).
    Http(u16),
    /// Accept and never answer (a hung backend).
    Hang,
    /// HTTP/1.1 keep-alive, answering every request with 200 and its own address.
    KeepAlive,
}

/// CLOCK_MONOTONIC in microseconds: the clock `lb-testkit serve --accept-log` stamps accepts
/// with. One clock for all processes of the host, and it never steps.
pub fn monotonic_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// One line of an accept log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub unix_micros: u64,
    pub monotonic_micros: u64,
    /// The listen address that accepted.
    pub listener: String,
}

/// Reads an accept log written by `Backends::start_logged` (after the backends stopped, it is
/// complete). Panics on a malformed line: a log the test cannot trust must fail the test.
pub fn read_accept_log(path: &Path) -> Vec<Accept> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut f = line.split(' ');
            let mut num = || -> u64 {
                f.next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("malformed accept log line {line:?}"))
            };
            let (unix_micros, monotonic_micros) = (num(), num());
            let listener = f
                .next()
                .unwrap_or_else(|| panic!("malformed accept log line {line:?}"))
                .to_string();
            Accept {
                unix_micros,
                monotonic_micros,
                listener,
            }
        })
        .collect()
}

/// Listeners that answer every connection (or datagram) with their own address.
pub struct Backends {
    child: Option<Child>,
}

impl Backends {
    pub fn start(net: &TestNet, addrs: &[&str], proto: Proto) -> Self {
        Self::start_mode(net, addrs, proto, ServeMode::Answer)
    }

    pub fn start_mode(net: &TestNet, addrs: &[&str], proto: Proto, mode: ServeMode) -> Self {
        Self::spawn(net, addrs, proto, mode, None)
    }

    fn spawn(
        net: &TestNet,
        addrs: &[&str],
        proto: Proto,
        mode: ServeMode,
        accept_log: Option<&Path>,
    ) -> Self {
        let mut cmd = net.testkit(None);
        cmd.args(["serve", "--proto", proto.as_str()]);
        if let Some(log) = accept_log {
            cmd.arg("--accept-log").arg(log);
        }
        match mode {
            ServeMode::Answer => {}
            ServeMode::Http(status) => {
                cmd.args(["--http", &status.to_string()]);
            }
            ServeMode::Hang => {
                cmd.arg("--hang");
            }
            ServeMode::KeepAlive => {
                cmd.arg("--keep-alive");
            }
        }
        for a in addrs {
            cmd.args(["--listen", a]);
        }
        Self {
            child: Some(spawn_ready(cmd, "backends")),
        }
    }

    /// Like `start`, and each accepted connection (or datagram) is appended to `accept_log` as
    /// it happens; read it with `read_accept_log`.
    pub fn start_logged(net: &TestNet, addrs: &[&str], proto: Proto, accept_log: &Path) -> Self {
        Self::spawn(net, addrs, proto, ServeMode::Answer, Some(accept_log))
    }

    /// `start_logged` of TCP backends that answer as `mode` says.
    pub fn start_logged_mode(
        net: &TestNet,
        addrs: &[&str],
        accept_log: &Path,
        mode: ServeMode,
    ) -> Self {
        Self::spawn(net, addrs, Proto::Tcp, mode, Some(accept_log))
    }

    /// Stops the listeners and returns what each accepted.
    pub fn stop(mut self) -> HashMap<String, u64> {
        #[derive(Deserialize)]
        struct Counts {
            accepted: HashMap<String, u64>,
        }
        finish::<Counts>(self.child.take().expect("running"), "backends").accepted
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            wait_or_kill(&mut c);
        }
    }
}

fn connect_cmd(net: &TestNet, cgroup: Option<&TestCgroup>, to: &str, proto: Proto) -> Command {
    let mut cmd = net.testkit(cgroup);
    cmd.args(["connect", "--to", to, "--proto", proto.as_str()]);
    cmd
}

/// `count` sequential connects (or connected-UDP exchanges) to `to`, from inside `cgroup`.
pub fn run_client(
    net: &TestNet,
    cgroup: Option<&TestCgroup>,
    to: &str,
    count: u64,
    proto: Proto,
) -> ClientReport {
    run_client_with(net, cgroup, to, count, proto, &[])
}

/// `run_client` with further `lb-testkit connect` flags (e.g. `--unconnected`).
pub fn run_client_with(
    net: &TestNet,
    cgroup: Option<&TestCgroup>,
    to: &str,
    count: u64,
    proto: Proto,
    extra: &[&str],
) -> ClientReport {
    let mut cmd = connect_cmd(net, cgroup, to, proto);
    cmd.args(extra);
    cmd.args(["--count", &count.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let child = cmd.spawn().expect("spawn client");
    finish(child, "client")
}

/// A client connecting every `interval` until stopped (bounded by `max` in time).
pub struct SteadyClient {
    child: Option<Child>,
}

impl SteadyClient {
    pub fn start(
        net: &TestNet,
        cgroup: &TestCgroup,
        to: &str,
        interval: Duration,
        max: Duration,
    ) -> Self {
        Self::start_with(net, cgroup, (to, Proto::Tcp), interval, max, &[])
    }

    /// `start` over `proto`, with further `lb-testkit connect` flags (e.g. `--persistent`).
    pub fn start_with(
        net: &TestNet,
        cgroup: &TestCgroup,
        (to, proto): (&str, Proto),
        interval: Duration,
        max: Duration,
        extra: &[&str],
    ) -> Self {
        let mut cmd = connect_cmd(net, Some(cgroup), to, proto);
        cmd.args(extra)
            .args([
                "--count",
                "0",
                "--interval-ms",
                &interval.as_millis().to_string(),
            ])
            .args(["--max-seconds", &max.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        Self {
            child: Some(cmd.spawn().expect("spawn steady client")),
        }
    }

    pub fn stop(mut self) -> ClientReport {
        finish(self.child.take().expect("running"), "steady client")
    }
}

impl Drop for SteadyClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            wait_or_kill(&mut c);
        }
    }
}

/// The real `lb-agent run`, inside the test namespace but not in the balanced cgroup.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    /// The binary, named with its log when a test fails (an upgrade test runs two).
    bin: PathBuf,
}

impl Agent {
    /// `watch_ms` is the agent's config-file poll interval; 0 means only SIGHUP reloads.
    /// `extra` are further `run` flags.
    pub fn start(
        net: &TestNet,
        cgroup: &TestCgroup,
        pins: &PinDir,
        config: &Path,
        watch_ms: u64,
        extra: &[String],
    ) -> Self {
        Self::start_bin(&agent_bin(), net, cgroup, pins, config, watch_ms, extra)
    }

    /// `start` with another `lb-agent` binary (an earlier release's, for upgrades).
    pub fn start_bin(
        bin: &Path,
        net: &TestNet,
        cgroup: &TestCgroup,
        pins: &PinDir,
        config: &Path,
        watch_ms: u64,
        extra: &[String],
    ) -> Self {
        let log = config.with_extension(format!("agent-{}.log", crate::paths::unique_name()));
        let log_file = std::fs::File::create(&log).expect("agent log file");
        let child = net
            .testkit(None)
            .arg("exec")
            .arg("--")
            .arg(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--pin-dir")
            .arg(&pins.path)
            .arg("--watch-interval-ms")
            .arg(watch_ms.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn lb-agent");
        Self {
            child: Some(child),
            log,
            bin: bin.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The agent's established TCP connections to `port` on any address, read from its own
    /// file descriptors and its network namespace's socket tables.
    pub fn connections_to(&self, port: u16) -> usize {
        let proc = PathBuf::from(format!("/proc/{}", self.pid()));
        let sockets: HashSet<String> = std::fs::read_dir(proc.join("fd"))
            .expect("read the agent's fds")
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|link| {
                let link = link.to_string_lossy().into_owned();
                Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        let remote_port = format!(":{port:04X}");
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(proc.join("net").join(table)).ok())
            .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
            .filter(|line| {
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let fields: Vec<&str> = line.split_whitespace().collect();
                const ESTABLISHED: &str = "01";
                fields.len() > 9
                    && fields[2].ends_with(&remote_port)
                    && fields[3] == ESTABLISHED
                    && sockets.contains(fields[9])
            })
            .count()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of the agent process this harness started.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.take().expect("running").wait();
    }

    /// SIGTERM, then the exit status (true = clean exit).
    pub fn sigterm_and_wait(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resets the agent's peak resident set size (VmHWM) to its current one, which it returns
    /// in KiB: what a later `peak_rss_kib` is compared with.
    pub fn reset_peak_rss(&self) -> u64 {
        let clear_refs = format!("/proc/{}/clear_refs", self.pid());
        // "5": reset the peak RSS (proc(5)).
        std::fs::write(&clear_refs, "5").unwrap_or_else(|e| panic!("{clear_refs}: {e}"));
        self.status_kib("VmRSS")
    }

    /// The agent's peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), &[field])
            .map(|v| v[0])
            .unwrap_or_else(|| panic!("no {field} in the agent's /proc status"))
    }

    /// The lines logged at WARN or ERROR (the level is the second word of a log line). A kernel
    /// that rejects the object's BTF, for one, makes the loader warn.
    pub fn complaints(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.bin.display(), self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Long-lived connections from the balanced cgroup, open until `close` (or drop).
pub struct HeldConnections {
    child: Option<Child>,
    /// How many connections are open (or, pending, started).
    pub held: u64,
    /// Connections per peer name (getpeername) right after opening; "unconnected" for a
    /// connect still in progress.
    pub peers: BTreeMap<String, u64>,
}

impl HeldConnections {
    pub fn open(net: &TestNet, cgroup: &TestCgroup, to: &str, count: u64) -> Self {
        Self::start(net, cgroup, to, count, false)
    }

    /// Connects started and not waited for: to an address that never answers (see
    /// `TestNet::with_blackhole`) they stay in SYN_SENT until closed.
    pub fn open_pending(net: &TestNet, cgroup: &TestCgroup, to: &str, count: u64) -> Self {
        Self::start(net, cgroup, to, count, true)
    }

    fn start(net: &TestNet, cgroup: &TestCgroup, to: &str, count: u64, pending: bool) -> Self {
        let mut cmd = net.testkit(Some(cgroup));
        cmd.args([
            "hold-connections",
            "--to",
            to,
            "--count",
            &count.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if pending {
            cmd.arg("--pending");
        }
        let mut child = cmd.spawn().expect("spawn hold-connections");
        let report = read_json_line(&mut child);
        Self {
            held: report["held"].as_u64().unwrap_or(0),
            peers: peer_counts(&report),
            child: Some(child),
        }
    }

    /// Closes every connection, waits for the process to finish and returns the peer names
    /// the connections had just before the close.
    pub fn close(mut self) -> BTreeMap<String, u64> {
        let Some(mut c) = self.child.take() else {
            return BTreeMap::new();
        };
        drop(c.stdin.take());
        let report = read_json_line(&mut c);
        wait_or_kill(&mut c);
        peer_counts(&report)
    }
}

/// The next line the child prints, as JSON (null if there is none).
fn read_json_line(child: &mut Child) -> serde_json::Value {
    let mut line = String::new();
    if let Some(stdout) = child.stdout.as_mut() {
        // One byte at a time: a buffered reader would swallow a later line with this one.
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
    }
    serde_json::from_str(&line).unwrap_or_default()
}

fn peer_counts(report: &serde_json::Value) -> BTreeMap<String, u64> {
    let peers = report["peers"].as_object().into_iter().flatten();
    peers
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// `count` unconnected UDP sockets from the balanced cgroup, each created, sending one
/// datagram to `to` and closed; returns how many sent.
pub fn udp_churn(net: &TestNet, cgroup: &TestCgroup, to: &str, count: u64) -> u64 {
    let out = net
        .testkit(Some(cgroup))
        .args(["udp-churn", "--to", to, "--count", &count.to_string()])
        .output()
        .expect("run udp-churn");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "udp-churn: {report} {:?}", out.status);
    report["sent"].as_u64().unwrap_or(0)
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            wait_or_kill(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::status_kib;

    #[test]
    fn status_fields_are_read_in_kib() {
        let me = std::process::id() as i32;
        let v = status_kib(me, &["VmHWM", "VmRSS"]).expect("this process's status");
        assert!(v[0] >= v[1] && v[1] > 0, "{v:?}");
        assert_eq!(status_kib(me, &["VmRSS", "NoSuchField"]), None);
        // A prefix of a field's name is not that field.
        assert_eq!(status_kib(me, &["VmRS"]), None);
    }
}
