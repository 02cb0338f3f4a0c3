//! Third-party pooled HTTP clients, run inside a test's namespace and cgroup: Go's net/http
//! (`tests/clients/pooled.go`, built here with Debian's Go) and Python's urllib3
//! (`tests/clients/pooled.py`). They are what the rebalance is for: clients that keep
//! keep-alive connections and reuse them for every request.

use crate::netns::TestNet;
use crate::paths::target_dir;
use crate::procs::finish;
use crate::TestCgroup;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooled {
    Go,
    Python,
}

/// What a client printed when its time was up.
#[derive(Debug, Deserialize)]
pub struct PooledReport {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
}

/// What a client asks, how often and for how long.
#[derive(Clone, Debug)]
pub struct Load {
    /// Concurrent requesters, each with its own pool (so one keep-alive connection each).
    pub workers: u32,
    pub run: Duration,
    /// The pause between one requester's requests.
    pub every: Duration,
    pub path: String,
    /// The library's default retries (false: none, Python only, so every failure counts).
    pub retries: bool,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            workers: 8,
            run: Duration::from_secs(10),
            every: Duration::from_millis(300),
            path: "/".into(),
            retries: true,
        }
    }
}

/// A running client; `wait` returns its report.
pub struct PooledClient {
    child: Option<Child>,
    kind: Pooled,
}

impl PooledClient {
    /// Starts requesting from `to` as `load` says.
    pub fn start(kind: Pooled, net: &TestNet, cgroup: &TestCgroup, to: &str, load: &Load) -> Self {
        let program: Vec<String> = match kind {
            Pooled::Go => vec![go_client().display().to_string()],
            Pooled::Python => vec![
                python().into(),
                clients().join("pooled.py").display().to_string(),
            ],
        };
        let mut cmd = net.testkit(Some(cgroup));
        cmd.args(["exec", "--"])
            .args(program)
            .args([to, &load.workers.to_string()])
            .args([load.run.as_secs_f64(), load.every.as_secs_f64()].map(|s| s.to_string()))
            .arg(&load.path);
        if !load.retries {
            assert_eq!(
                kind,
                Pooled::Python,
                "only the Python client can turn retries off"
            );
            cmd.arg("no-retries");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {kind:?} client: {e}"));
        Self {
            child: Some(child),
            kind,
        }
    }

    /// Waits for the client's time to be up and returns what it counted.
    pub fn wait(mut self) -> PooledReport {
        let child = self.child.take().expect("running");
        finish(child, &format!("the {:?} client", self.kind))
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::procs::wait_or_kill(&mut c);
        }
    }
}

/// The established TCP connections whose local end is one of `addrs`, by address: what the
/// backends hold, from the kernel of the test's namespace (`ss`).
pub fn established_at(net: &TestNet, addrs: &[&str]) -> BTreeMap<String, usize> {
    let out = net
        .testkit(None)
        .args(["exec", "--", "ss", "-Htn", "state", "established"])
        .stderr(Stdio::inherit())
        .output()
        .expect("running ss in the test namespace");
    assert!(out.status.success(), "ss failed: {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut counts: BTreeMap<String, usize> = addrs.iter().map(|a| (a.to_string(), 0)).collect();
    for line in text.lines() {
        // Recv-Q Send-Q Local Peer: the state filter leaves the state column out.
        if let Some(local) = line.split_whitespace().nth(2) {
            if let Some(n) = counts.get_mut(local) {
                *n += 1;
            }
        }
    }
    counts
}

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Debian's Python, which `cargo xtask setup` gives urllib3 (python3-urllib3); another
/// python3 on PATH may lack it.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The Go client, built once per test process into the target folder.
fn go_client() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = target_dir().join("pooled-go");
        std::fs::create_dir_all(&dir).expect("creating the Go client's folder");
        let go = if Path::new("/usr/bin/go").exists() {
            "/usr/bin/go"
        } else {
            "go"
        };
        let partial = dir.join(format!("pooled.{}", std::process::id()));
        let status = Command::new(go)
            .arg("build")
            .arg("-o")
            .arg(&partial)
            .arg(clients().join("pooled.go"))
            .env("GOCACHE", dir.join("cache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!("running {go} (golang-go; `cargo xtask setup` installs it): {e}")
            });
        assert!(status.success(), "building the Go client failed: {status}");
        let binary = dir.join("pooled");
        std::fs::rename(&partial, &binary).expect("moving the Go client into place");
        binary
    })
}
