//! Privileged end-to-end tests of `[service.rebalance]`, with third-party pooled clients (Go's
//! net/http and Python's urllib3) holding keep-alive connections through the VIP: the agent
//! closes idle ones so that they reconnect, and the clients see no failed request. Where the
//! connections are is read from the backends' side (`ss` in the test's namespace).

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::pooled::{established_at, Load, Pooled, PooledClient};
use lb_testkit::procs::{read_accept_log, Backends, Proto, ServeMode};
use lb_testkit::stats::service;
use lb_testkit::{agent_stats, require_privileged, wait_for, Scenario};
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.80:80";
const BACKENDS: [&str; 4] = [
    "127.0.0.31:8080",
    "127.0.0.32:8080",
    "127.0.0.33:8080",
    "127.0.0.34:8080",
];
/// Each worker pauses this long between requests, so its connection is idle most of the time.
const EVERY: Duration = Duration::from_millis(300);

fn web(backends: &[&str], rebalance: &Table) -> Config {
    let service = Service::tcp("web", VIP).backends(backends);
    Config::new().service(service.rebalance(rebalance.clone()))
}

#[test]
fn pooled_go_and_python_clients_spread_over_added_backends_without_a_failed_request() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[], Proto::Tcp);
    let _servers = Backends::start_mode(&s.net, &BACKENDS, Proto::Tcp, ServeMode::KeepAlive);
    let rebalance = Table::new()
        .set("idle_after", "100ms")
        .set("tolerance", 0)
        .set("max_connection_age", "10s");
    s.write_config(web(&BACKENDS[..2], &rebalance));
    s.start_agent();
    let load = Load {
        workers: 16,
        run: Duration::from_secs(30),
        every: EVERY,
        ..Load::default()
    };
    let clients = [Pooled::Go, Pooled::Python]
        .map(|kind| PooledClient::start(kind, &s.net, &s.cgroup, VIP, &load));
    let net = &s.net;
    let held = || established_at(net, &BACKENDS);
    let on_two = wait_for(Duration::from_secs(15), || {
        let h = held();
        h[BACKENDS[0]] + h[BACKENDS[1]] == 32
    });
    assert!(
        on_two,
        "the clients never settled on 32 connections: {:?}",
        held()
    );
    let before = held();
    s.write_config(web(&BACKENDS, &rebalance));
    s.agent.as_ref().expect("started").sighup();
    let added = Instant::now();
    let even = |h: &std::collections::BTreeMap<String, usize>| {
        h.values().sum::<usize>() == 32 && h.values().all(|n| (7..=9).contains(n))
    };
    // The bound: max_connection_age + 2 s (measured here: 3.5 to 5 s).
    let spread = wait_for(Duration::from_secs(12), || even(&held()));
    let took = added.elapsed();
    let after = held();
    let reports = clients.map(PooledClient::wait);
    let log = s.agent().log();
    eprintln!("before {before:?}, after {after:?} in {took:?}; clients {reports:?}");
    assert!(spread, "not spread within ±1 of 8 each: {after:?}\n{log}");
    for (kind, report) in [Pooled::Go, Pooled::Python].iter().zip(&reports) {
        assert_eq!(report.failed, 0, "{kind:?} saw failed requests: {report:?}");
        assert!(report.ok > 500, "{kind:?} hardly ran: {report:?}");
    }
    assert!(
        log.contains("closed idle connections") && log.contains("reason=\"skew\""),
        "no rebalance logged:\n{log}"
    );
    let stats = agent_stats(&s.pins).expect("stats");
    let moved: u64 = service(&stats, "web")
        .expect("web")
        .rebalanced
        .values()
        .sum();
    assert!(moved >= 16, "stats counts {moved} rebalanced connections");
}

#[test]
fn connections_past_max_connection_age_are_replaced_without_a_failed_request() {
    if !require_privileged() {
        return;
    }
    let backend = BACKENDS[0];
    let mut s = Scenario::without_agent(&[], Proto::Tcp);
    let log = s.config.with_extension("accepts");
    let _servers = Backends::start_logged_mode(&s.net, &[backend], &log, ServeMode::KeepAlive);
    let rebalance = Table::new()
        .set("max_connection_age", "2s")
        .set("age_jitter", "500ms")
        .set("on_skew", false)
        .set("idle_after", "100ms");
    s.write_config(web(&[backend], &rebalance));
    s.start_agent();
    let load = Load {
        run: Duration::from_secs(9),
        every: EVERY,
        ..Load::default()
    };
    let client = PooledClient::start(Pooled::Python, &s.net, &s.cgroup, VIP, &load);
    let report = client.wait();
    let accepted = read_accept_log(&log).len();
    let agent_log = s.agent().log();
    eprintln!("{accepted} connections accepted; client {report:?}");
    assert_eq!(report.failed, 0, "failed requests: {report:?}");
    assert!(report.ok > 100, "the client hardly ran: {report:?}");
    // 8 connections, each replaced about every 2 s (± 0.5 s, plus up to a second of passes)
    // over 9 s: at least two more generations of 8.
    assert!(
        accepted >= 24,
        "only {accepted} connections in 9 s: none replaced by age\n{agent_log}"
    );
    assert!(agent_log.contains("reason=\"age\""), "{agent_log}");
    let counted = wait_for(Duration::from_secs(5), || {
        let stats = agent_stats(&s.pins);
        let web = stats.as_ref().and_then(|r| service(r, "web"));
        web.is_some_and(|w| w.rebalanced.get(backend).is_some_and(|n| *n >= 16))
    });
    assert!(counted, "stats does not count the closes");
}

/// Requests the server takes 1.5 s to answer, sent back to back, on connections long past
/// their age: each connection is always awaiting an answer, so none is ever closed, and with
/// retries off a close in the middle of a request would show as a failed one.
#[test]
fn a_connection_awaiting_its_answer_is_never_closed_however_old() {
    if !require_privileged() {
        return;
    }
    let backend = BACKENDS[0];
    let mut s = Scenario::without_agent(&[], Proto::Tcp);
    let _servers = Backends::start_mode(&s.net, &[backend], Proto::Tcp, ServeMode::KeepAlive);
    let rebalance = Table::new()
        .set("max_connection_age", "1s")
        .set("age_jitter", "0ms")
        .set("on_skew", false)
        .set("idle_after", "100ms");
    s.write_config(web(&[backend], &rebalance));
    s.start_agent();
    let load = Load {
        workers: 4,
        run: Duration::from_secs(8),
        every: Duration::ZERO,
        path: "/slow/1500".into(),
        retries: false,
    };
    let report = PooledClient::start(Pooled::Python, &s.net, &s.cgroup, VIP, &load).wait();
    let log = s.agent().log();
    eprintln!("client {report:?}");
    assert_eq!(
        report.failed, 0,
        "requests cut off mid-way: {report:?}\n{log}"
    );
    assert!(report.ok >= 16, "the client hardly ran: {report:?}");
    assert!(!log.contains("closed idle connections"), "{log}");
}
