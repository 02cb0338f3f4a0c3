//! Privileged end-to-end tests of the kernel-side counters: what `lb-agent stats` reports per
//! backend must equal what the backends accepted and what the clients saw.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::{HeldConnections, Proto, ServeMode};
use lb_testkit::stats::{backend, find_backend};
use lb_testkit::{require_privileged, wait_for, Scenario};
use serde_json::Value;
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
/// Configured but nothing listens: every connect to it is refused (RST to the SYN).
const DEAD: &str = "127.0.0.13:8080";
const WAIT: Duration = Duration::from_secs(10);

fn web(backends: &[&str]) -> Config {
    Config::new().service(Service::tcp("web", VIP).backends(backends))
}

#[test]
fn connection_counters_equal_what_backends_and_clients_saw() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1, B2, DEAD]));
    // The dead backend's address must exist, so that the refusal is a RST from the kernel.
    let report = s.client(VIP, 300, Proto::Tcp);
    assert_eq!(report.attempts, 300, "{report:?}");
    let refused = report.failed("ECONNREFUSED");
    assert_eq!(report.ok + refused, 300, "{report:?}");
    assert!(refused > 30 && report.ok > 60, "{report:?}");

    // Every connection has closed once established == closed for each live backend.
    let settled = wait_for(WAIT, || {
        let svc = s.service_stats("web");
        [B1, B2].iter().all(|a| {
            let b = backend(&svc, a);
            b.established == b.closed && b.established > 0
        })
    });
    let svc = s.service_stats("web");
    assert!(settled, "connections never all closed: {svc:?}");
    let accepted = s.stop_backends();
    for addr in [B1, B2] {
        let b = backend(&svc, addr);
        assert_eq!(b.established, accepted[addr], "{addr}: {b:?}");
        assert_eq!(b.established, report.from(addr), "{addr}: {b:?}");
        assert_eq!(b.failed, 0, "{addr}: {b:?}");
        assert_eq!(b.connects, b.established, "{addr}: {b:?}");
        assert_eq!(b.active, 0, "{addr}: {b:?}");
        // Each connection carried the backend's reply: at least that many bytes came back,
        // and at least SYN, ACK and FIN went out.
        let reply = addr.len() as u64 + 1;
        assert!(b.bytes_from >= reply * accepted[addr], "{addr}: {b:?}");
        assert!(b.packets_to >= 3 * accepted[addr], "{addr}: {b:?}");
    }
    let dead = backend(&svc, DEAD);
    assert_eq!(dead.failed, refused, "{dead:?}");
    assert_eq!(dead.connects, refused, "{dead:?}");
    assert_eq!(dead.established, 0, "{dead:?}");
    assert_eq!(svc.connects, 300, "{svc:?}");
}

#[test]
fn long_lived_connections_show_as_active_until_closed() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[], Proto::Tcp);
    for b in [B1, B2] {
        s.start_backend(b, Proto::Tcp, ServeMode::Hang);
    }
    s.write_config(web(&[B1, B2]));
    s.start_agent();
    let held = HeldConnections::open(&s.net, &s.cgroup, VIP, 40);
    assert_eq!(held.held, 40);
    let active = |s: &Scenario| {
        let svc = s.service_stats("web");
        (svc.active, svc)
    };
    assert!(wait_for(WAIT, || active(&s).0 == 40), "{:?}", active(&s).1);
    let svc = active(&s).1;
    let per_backend: u64 = [B1, B2].iter().map(|a| backend(&svc, a).active).sum();
    assert_eq!(per_backend, 40, "{svc:?}");
    held.close();
    assert!(wait_for(WAIT, || active(&s).0 == 0), "{:?}", active(&s).1);
    let svc = active(&s).1;
    for a in [B1, B2] {
        let b = backend(&svc, a);
        assert_eq!(b.closed, b.established, "{b:?}");
    }
}

#[test]
fn byte_counting_can_be_turned_off() {
    if !require_privileged() {
        return;
    }
    let config = web(&[B1]).dataplane(Table::new().set("count_bytes", false));
    let s = Scenario::start(&[B1], Proto::Tcp, config);
    let report = s.client(VIP, 20, Proto::Tcp);
    assert_eq!(report.ok, 20, "{report:?}");
    assert!(wait_for(WAIT, || backend(&s.service_stats("web"), B1)
        .closed
        == 20));
    let svc = s.service_stats("web");
    let b = backend(&svc, B1);
    assert_eq!((b.bytes_to, b.bytes_from), (0, 0), "{b:?}");
    assert_eq!(b.established, 20, "connection counters stay on: {b:?}");
    let stats = lb_testkit::agent_stats(&s.pins).expect("stats");
    let names: Vec<&str> = stats.programs.iter().map(|p| p.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.starts_with("lb_skb")), "{names:?}");
}

#[test]
fn a_refusing_backend_is_ejected_and_restored_without_health_checks() {
    if !require_privileged() {
        return;
    }
    let outlier = Table::new()
        .set("consecutive_failures", 3)
        .set("base_ejection_time", "2s")
        .set("max_ejection_percent", 50);
    let config = Config::new().service(
        Service::tcp("web", VIP)
            .backends(&[B1, B2, DEAD])
            .outlier(outlier),
    );
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, config);
    let load = s.steady_load(
        VIP,
        // About 7 refused connects a second: even a check delayed by a loaded machine stays
        // well inside the bound below.
        Duration::from_millis(50),
        Duration::from_secs(20),
    );
    let ejected = wait_for(WAIT, || {
        let svc = s.service_stats("web");
        find_backend(&svc, DEAD).is_some_and(|d| d.ejected.is_some() && d.id.is_none())
    });
    let report = load.stop();
    let svc = s.service_stats("web");
    assert!(ejected, "never ejected: {svc:?}");
    // The agent looks every 250 ms, so a few more than 3 may fail before it acts.
    let refused = report.failed("ECONNREFUSED");
    assert!((3..=30).contains(&refused), "{refused} refused: {report:?}");
    assert!(
        backend(&svc, DEAD)
            .ejected
            .as_deref()
            .is_some_and(|r| r.contains("connect failures in a row")),
        "{svc:?}"
    );
    let while_out = s.client(VIP, 60, Proto::Tcp);
    assert_eq!(
        while_out.ok, 60,
        "an ejected backend still got connects: {while_out:?}"
    );

    // It comes back after the ejection time; now it answers.
    s.start_backend(DEAD, Proto::Tcp, ServeMode::Answer);
    let restored = wait_for(WAIT, || {
        let svc = s.service_stats("web");
        find_backend(&svc, DEAD).is_some_and(|d| d.ejected.is_none() && d.id.is_some())
    });
    assert!(restored, "never restored: {:?}", s.service_stats("web"));
    let after = s.client(VIP, 90, Proto::Tcp);
    assert_eq!(after.ok, 90, "{after:?}");
    assert!(
        after.from(DEAD) > 0,
        "restored backend got nothing: {after:?}"
    );
}

/// The value of `metric` with these label values in a parsed scrape.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_parse_as_prometheus_text_and_carry_the_same_numbers() {
    if !require_privileged() {
        return;
    }
    let s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1, B2, DEAD]));
    let report = s.client(VIP, 100, Proto::Tcp);
    assert_eq!(report.attempts, 100, "{report:?}");
    assert!(wait_for(WAIT, || {
        let svc = s.service_stats("web");
        [B1, B2]
            .iter()
            .all(|a| backend(&svc, a).closed == report.from(a))
    }));
    let svc = s.service_stats("web");
    let (status, body) = lb_testkit::http_get(&s.net, "127.0.0.1:9902", "/metrics")
        .expect("the agent serves /metrics on 127.0.0.1:9902 by default");
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    let svc_labels = [
        ("service", "web"),
        ("vip", "10.96.0.10:80/tcp"),
        ("source", "static"),
    ];
    assert_eq!(
        sample(&scrape, "lb_service_connects_total", &svc_labels),
        Some(100.0),
        "{body}"
    );
    for addr in [B1, B2, DEAD] {
        let b = backend(&svc, addr);
        let labels = [("service", "web"), ("backend", addr)];
        for (metric, value) in [
            ("lb_backend_connects_total", b.connects),
            ("lb_backend_established_total", b.established),
            ("lb_backend_failed_total", b.failed),
            ("lb_backend_closed_total", b.closed),
            ("lb_backend_active_connections", b.active),
        ] {
            assert_eq!(
                sample(&scrape, metric, &labels),
                Some(value as f64),
                "{metric} {addr}: {b:?}"
            );
        }
        let to = [("backend", addr), ("direction", "from_backend")];
        assert_eq!(
            sample(&scrape, "lb_backend_bytes_total", &to),
            Some(b.bytes_from as f64)
        );
    }
    assert_eq!(
        sample(&scrape, "lb_backend_failed_total", &[("backend", DEAD)]),
        Some(report.failed("ECONNREFUSED") as f64)
    );
    assert!(
        sample(&scrape, "lb_map_entries", &[("map", "services")]) == Some(1.0),
        "{body}"
    );
    assert!(
        body.contains("lb_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    assert!(
        sample(&scrape, "lb_reconciles_total", &[("result", "ok")]) >= Some(1.0),
        "{body}"
    );
    dashboard_uses_only_exported_metrics(&body);
}

/// deploy/grafana's dashboard may only query metrics this agent exports (a renamed metric
/// would otherwise leave panels silently empty).
fn dashboard_uses_only_exported_metrics(scrape: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/lb-agent-dashboard.json"
    );
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let registered = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../lb-userspace/src/observe/prometheus.rs"
    ))
    .expect("observe/prometheus.rs");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "too few queries found: {exprs:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("lb_") {
            let token: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + token.len()..];
            names.insert(token);
        }
    }
    for name in &names {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // Families without series (no ejection, no discovery source in this scenario) are
        // not printed at all; those must at least be registered by the agent's code.
        let exported = scrape.contains(&format!("# TYPE {base} "))
            || registered.contains(&format!("\"{base}\""));
        assert!(exported, "dashboard queries {name}, which is not exported");
    }
}

/// Every PromQL string of a Grafana dashboard: panel targets and template variables.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}
