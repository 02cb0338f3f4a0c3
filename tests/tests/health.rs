//! Privileged end-to-end tests of active health checks: real probes from the real agent to
//! backends in the test's namespace, observed through real connects and `lb-agent stats`.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::Proto;
use lb_testkit::stats::{find_backend, ServiceReport};
use lb_testkit::{require_privileged, wait_backends, wait_for, Scenario, ServeMode};
use lb_userspace::status::BackendHealth;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
const B3: &str = "127.0.0.13:8080";
const INTERVAL_MS: u64 = 200;
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Scheduling slack on top of the protocol's own bound (jitter, reconcile, a loaded CI machine).
const SLACK: Duration = Duration::from_millis(1000);
const WAIT: Duration = Duration::from_secs(10);

/// A service over `backends` probed as `probe` says (kind, port, path) at this file's pace,
/// with the given fail-open choice.
fn config(backends: &[&str], probe: &Table, fail_open: bool) -> Config {
    let health = probe
        .clone()
        .set("interval", format!("{INTERVAL_MS}ms"))
        .set("timeout", "100ms")
        .set("rise", RISE)
        .set("fall", FALL)
        .set("jitter", "20ms");
    Config::new().service(
        Service::tcp("web", VIP)
            .backends(backends)
            .set("fail_open", fail_open)
            .health(health),
    )
}

fn web(s: &Scenario) -> ServiceReport {
    s.service_stats("web")
}

/// `None` until the agent has published a probe state for the backend.
fn health_of(svc: &ServiceReport, addr: &str) -> Option<BackendHealth> {
    find_backend(svc, addr)?.health.clone()
}

/// Waits until every listed backend has passed at least one probe.
fn wait_probed(s: &Scenario, addrs: &[&str]) {
    let ok = wait_for(WAIT, || {
        let svc = web(s);
        addrs
            .iter()
            .all(|a| health_of(&svc, a).is_some_and(|h| h.last_result == "ok"))
    });
    assert!(ok, "backends never probed healthy: {:?}", web(s));
}

fn bound(probes: u32) -> Duration {
    Duration::from_millis(u64::from(probes) * INTERVAL_MS) + SLACK
}

#[test]
fn dead_backend_is_removed_within_fall_probes_and_returns_after_rise() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(
        &[B1, B2, B3],
        Proto::Tcp,
        config(&[B1, B2, B3], &Table::new().set("kind", "tcp"), true),
    );
    wait_probed(&s, &[B1, B2, B3]);
    let load = s.steady_load(VIP, Duration::from_millis(2), Duration::from_secs(60));

    let killed = Instant::now();
    s.stop_backend(B3);
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    let detected = killed.elapsed();
    assert!(
        detected <= bound(FALL + 1),
        "removal took {detected:?}, bound {:?}",
        bound(FALL + 1)
    );
    let h = health_of(&web(&s), B3).expect("B3's probe state");
    assert!(!h.healthy, "{h:?}");
    assert!(h.last_result.contains("connect"), "{h:?}");

    let after = s.client(VIP, 300, Proto::Tcp);
    assert_eq!(after.ok, 300, "connects after removal: {after:?}");
    assert_eq!(after.from(B3), 0);

    let restarted = Instant::now();
    s.start_backend(B3, Proto::Tcp, ServeMode::Answer);
    wait_backends(&s.pins, "web", &[B1, B2, B3], WAIT);
    let back = restarted.elapsed();
    assert!(
        back <= bound(RISE + 1),
        "return took {back:?}, bound {:?}",
        bound(RISE + 1)
    );
    let report = load.stop();
    // Only connects that raced the removal window may have failed, and only by refusal.
    assert_eq!(
        report.ok + report.failed("ECONNREFUSED"),
        report.attempts,
        "{report:?}"
    );
    assert!(
        s.client(VIP, 300, Proto::Tcp).from(B3) > 0,
        "restarted backend gets traffic"
    );
}

#[test]
fn http_check_removes_a_500_backend_and_keeps_a_200_one() {
    if !require_privileged() {
        return;
    }
    let health = Table::new().set("kind", "http").set("path", "/healthz");
    let mut s = Scenario::start(&[], Proto::Tcp, Config::new());
    s.start_backend(B1, Proto::Tcp, ServeMode::Http(200));
    s.start_backend(B2, Proto::Tcp, ServeMode::Http(500));
    s.write_config(config(&[B1, B2], &health, false));
    s.agent().sighup();
    wait_backends(&s.pins, "web", &[B1], WAIT);
    let svc = web(&s);
    assert_eq!(
        health_of(&svc, B2).map(|h| h.last_result).as_deref(),
        Some("http status 500"),
        "{svc:?}"
    );
    assert_eq!(
        health_of(&svc, B1).map(|h| h.healthy),
        Some(true),
        "{svc:?}"
    );
}

#[test]
fn all_backends_down_fail_open_balances_over_all_and_fail_closed_refuses() {
    if !require_privileged() {
        return;
    }
    // Data ports serve; the health port has no listener, so every backend is unhealthy.
    let health = Table::new().set("kind", "tcp").set("port", 9999);
    let open = Scenario::start(&[B1, B2], Proto::Tcp, config(&[B1, B2], &health, true));
    let ok = wait_for(WAIT, || web(&open).fail_open_active);
    assert!(ok, "never failed open: {:?}", web(&open));
    wait_backends(&open.pins, "web", &[B1, B2], WAIT);
    let report = open.client(VIP, 200, Proto::Tcp);
    assert_eq!(report.ok, 200, "{report:?}");
    assert!(report.from(B1) > 0 && report.from(B2) > 0, "{report:?}");
    assert!(open.agent.as_ref().unwrap().log().contains("FAILING OPEN"));

    let closed = Scenario::start(&[B1, B2], Proto::Tcp, config(&[B1, B2], &health, false));
    let emptied = wait_for(WAIT, || web(&closed).slots == 0);
    assert!(
        emptied,
        "fail-closed service kept backends: {:?}",
        web(&closed)
    );
    let report = closed.client(VIP, 50, Proto::Tcp);
    assert_eq!(report.failed("ECONNREFUSED"), 50, "{report:?}");
    assert!(!web(&closed).fail_open_active);
}

#[test]
fn hanging_probe_fails_after_its_timeout_without_stalling_the_checker() {
    if !require_privileged() {
        return;
    }
    let hang_port = "127.0.0.11:9090";
    let health = Table::new().set("kind", "http").set("port", 9090);
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, Config::new());
    s.start_backend(hang_port, Proto::Tcp, ServeMode::Hang);
    s.start_backend("127.0.0.12:9090", Proto::Tcp, ServeMode::Http(204));
    s.write_config(config(&[B1, B2], &health, false));
    s.agent().sighup();
    wait_backends(&s.pins, "web", &[B2], WAIT);
    // Probes keep coming every interval: the hung one times out instead of blocking.
    let ok = wait_for(WAIT, || {
        health_of(&web(&s), B1).is_some_and(|h| h.consecutive_fail >= FALL + 3)
    });
    let h = health_of(&web(&s), B1);
    assert!(ok, "checker stalled on a hanging backend: {h:?}");
    let h = h.expect("B1's probe state");
    assert!(h.last_result.starts_with("timeout"), "{h:?}");
    assert_eq!(health_of(&web(&s), B2).map(|h| h.healthy), Some(true));
}
