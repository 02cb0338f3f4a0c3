//! Privileged end-to-end test of the agent's HTTP listener under a connection flood: the real
//! agent with `--http-listen` in the test's namespace, 500 idle connections held against it.

use lb_testkit::procs::{HeldConnections, Proto};
use lb_testkit::{http_status, require_privileged, wait_for, Scenario};
use lb_userspace::observe::http::MAX_CONNECTIONS;
use std::time::Duration;

const HTTP: &str = "127.0.0.1:9901";
const B1: &str = "127.0.0.11:8080";
const CONFIG: &str = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                      backends = [\"127.0.0.11:8080\"]\n";
/// Idle connections opened against the listener: more than it may hold.
const IDLE: u64 = 500;

/// Sockets the process holds (listeners, connections, netlink), from /proc.
fn sockets_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn healthz_answers_while_idle_connections_flood_the_listener() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[B1], Proto::Tcp);
    s.write_config(CONFIG);
    s.agent_args = vec!["--http-listen".into(), HTTP.into()];
    s.start_agent();
    let pid = s.agent().pid();
    let before = sockets_of(pid);
    let idle = HeldConnections::open(&s.net, &s.cgroup, HTTP, IDLE);
    assert_eq!(
        idle.held, IDLE,
        "the client could not open its idle connections"
    );
    std::thread::sleep(Duration::from_millis(300));
    let during = sockets_of(pid);
    // Idle connections are closed after the header timeout, and new ones are taken as slots
    // free up, so /healthz may need a retry or two, but it must be answered while the flood
    // is still held open.
    let answered = wait_for(Duration::from_secs(10), || {
        http_status(&s.net, HTTP, "/healthz") == Some(200)
    });
    idle.close();
    assert!(
        during <= before + MAX_CONNECTIONS + 4,
        "the agent held {during} sockets under {IDLE} idle connections (had {before}; the cap \
         is {MAX_CONNECTIONS})"
    );
    assert!(answered, "/healthz did not answer during the flood");
    assert!(s.agent().is_running(), "the agent died under the flood");
}
