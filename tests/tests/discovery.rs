//! Privileged end-to-end tests of discovery sources against real servers in the test's
//! namespace: a real etcd, a real dnsmasq, and a Consul mock that follows Consul's documented
//! blocking-query contract (no Consul server can be installed here). Every change is checked in
//! the pinned maps and with real connects through the VIP.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::Proto;
use lb_testkit::stats::{agent_stats, backend_set, find_backend, service};
use lb_testkit::{
    consul_raw, consul_state, require_privileged, wait_backends, wait_for, ConsulMock, Dns,
    DnsRecords, Etcd, Scenario, SrvRecord,
};
use lb_userspace::status::{SourceState, SourceStatus};
use serde_json::json;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";
const VIP2: &str = "10.96.0.11:80";
const B1: &str = "127.0.0.21:8080";
const B2: &str = "127.0.0.22:8080";
const B3: &str = "127.0.0.23:8080";
const B4: &str = "127.0.0.23:9090";
const WAIT: Duration = Duration::from_secs(15);

/// A service whose backends come from `discovery`, retried fast so that a recovered source is
/// noticed quickly. The backends here listen on loopback, which discovery refuses by default.
fn discovered(name: &str, vip: &str, discovery: Table) -> Service {
    let discovery = discovery
        .set("retry_initial", "100ms")
        .set("retry_max", "1s")
        .set("allow_loopback_backends", true);
    Service::tcp(name, vip).discovery(discovery)
}

/// Service "web" on VIP, discovered from `prefix` in `etcd`.
fn etcd_service(etcd: &Etcd, prefix: &str) -> Config {
    let discovery = Table::new()
        .set("kind", "etcd")
        .set("endpoints", vec![etcd.endpoint.clone()])
        .set("prefix", prefix)
        .set("timeout", "1s");
    Config::new().service(discovered("web", VIP, discovery))
}

/// `None` until the agent has published the service's discovery state.
fn source(s: &Scenario, name: &str) -> Option<SourceStatus> {
    s.service_stats(name).discovery
}

fn wait_state(s: &Scenario, name: &str, state: SourceState) {
    let ok = wait_for(WAIT, || {
        source(s, name).is_some_and(|src| src.state == state)
    });
    assert!(
        ok,
        "source of {name} never {state:?}: {:?}",
        source(s, name)
    );
}

/// Installs a config and waits until the agent applied it (a reload by signal).
fn apply(s: &mut Scenario, config: &Config) {
    s.write_config(config);
    s.agent().sighup();
}

#[test]
fn etcd_registrations_leases_and_outages_reach_the_data_plane() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, Config::new());
    let mut etcd = Etcd::start(&s.net);
    let prefix = "/services/web/";
    let long = etcd.grant(60);
    let _long_alive = etcd.keep_alive(&long);
    etcd.put(&format!("{prefix}{B1}"), "", Some(&long));
    etcd.put(&format!("{prefix}{B2}"), r#"{"weight": 1}"#, Some(&long));
    // Garbage registrations are skipped, not fatal.
    etcd.put(&format!("{prefix}not-an-address"), "", None);
    apply(&mut s, &etcd_service(&etcd, prefix));
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);
    let src = source(&s, "web").expect("discovery state of web");
    assert_eq!(src.state, SourceState::Ok, "{src:?}");
    assert_eq!(src.skipped, 1, "{src:?}");

    // A new registration and a deregistration arrive through the watch.
    etcd.put(&format!("{prefix}{B3}"), "", Some(&long));
    wait_backends(&s.pins, "web", &[B1, B2, B3], WAIT);
    etcd.del(&format!("{prefix}{B1}"));
    wait_backends(&s.pins, "web", &[B2, B3], WAIT);
    s.assert_balanced(VIP, &[B2, B3]);

    // An instance that stops refreshing its lease disappears when the lease expires.
    let short = etcd.grant(2);
    etcd.put(&format!("{prefix}{B1}"), "", Some(&short));
    wait_backends(&s.pins, "web", &[B1, B2, B3], WAIT);
    let granted = Instant::now();
    wait_backends(&s.pins, "web", &[B2, B3], WAIT);
    assert!(
        granted.elapsed() < Duration::from_secs(8),
        "lease expiry took {:?}",
        granted.elapsed()
    );

    // etcd down: the last known set stays and keeps serving; the source shows the error.
    etcd.kill();
    wait_state(&s, "web", SourceState::Error);
    s.assert_balanced(VIP, &[B2, B3]);
    let src = source(&s, "web").expect("discovery state of web");
    assert!(src.last_error.is_some(), "{src:?}");
    assert!(src.last_success_unix_ms.is_some(), "{src:?}");
    assert!(s.agent().log().contains("keeping the last known set"));

    // Back up: the agent relists, catching up on what changed meanwhile.
    etcd.restart();
    etcd.del(&format!("{prefix}{B3}"));
    wait_state(&s, "web", SourceState::Ok);
    wait_backends(&s.pins, "web", &[B2], WAIT);

    // Every instance gone is a real "no instances": the service refuses connects.
    etcd.del(&format!("{prefix}{B2}"));
    let emptied = wait_for(WAIT, || s.service_stats("web").slots == 0);
    assert!(emptied, "{:?}", s.service_stats("web"));
    let report = s.client(VIP, 20, Proto::Tcp);
    assert_eq!(report.failed("ECONNREFUSED"), 20, "{report:?}");
}

/// A config of services discovered from `etcd`, each `(name, vip, prefix)`.
fn etcd_services(etcd: &Etcd, services: &[(&str, &str, &str)]) -> Config {
    services
        .iter()
        .fold(Config::new(), |config, (name, vip, prefix)| {
            let discovery = Table::new()
                .set("kind", "etcd")
                .set("endpoints", vec![etcd.endpoint.clone()])
                .set("prefix", *prefix)
                .set("timeout", "1s");
            config.service(discovered(name, vip, discovery))
        })
}

/// What etcd and the agent see of the agent's reading: connections from the agent to etcd's
/// client port, watchers etcd holds, and watch streams etcd has opened since it started.
fn etcd_reading(s: &mut Scenario, etcd: &Etcd) -> (usize, f64, f64) {
    let port = etcd
        .endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok());
    let connections = s.agent().connections_to(port.expect("etcd endpoint port"));
    let watchers = etcd.metric("etcd_debugging_mvcc_watcher_total");
    let streams = etcd.metric("grpc_server_started_total{grpc_method=\"Watch\"");
    (connections, watchers, streams)
}

#[test]
fn etcd_services_of_one_cluster_share_one_connection_and_one_watch() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, Config::new());
    let etcd = Etcd::start(&s.net);
    let watched_before = etcd.metric("grpc_server_started_total{grpc_method=\"Watch\"");
    let services = [
        ("svc0", "10.96.0.20:80", "/services/svc0/", vec![B1]),
        ("svc1", "10.96.0.21:80", "/services/svc1/", vec![B2]),
        ("svc2", "10.96.0.22:80", "/services/svc2/", vec![B3]),
        ("svc3", "10.96.0.23:80", "/services/svc3/", vec![B1, B2]),
        ("svc4", "10.96.0.24:80", "/services/svc4/", vec![B2, B3]),
        ("svc5", "10.96.0.25:80", "/services/svc5/", vec![B1, B3]),
    ];
    for (_, _, prefix, backends) in &services {
        for b in backends {
            etcd.put(&format!("{prefix}{b}"), "", None);
        }
    }
    // Not any service's: read by the shared watch on /services/ and given to nobody.
    etcd.put(&format!("/services/unused/{B1}"), "", None);
    let config = |names: &[&str]| {
        let listed: Vec<(&str, &str, &str)> = services
            .iter()
            .filter(|(name, ..)| names.contains(name))
            .map(|(name, vip, prefix, _)| (*name, *vip, *prefix))
            .collect();
        etcd_services(&etcd, &listed)
    };
    apply(&mut s, &config(&["svc0", "svc1", "svc2", "svc3", "svc4"]));
    for (name, _, _, backends) in &services[..5] {
        wait_backends(&s.pins, name, backends, WAIT);
    }
    let (connections, watchers, streams) = etcd_reading(&mut s, &etcd);
    assert_eq!(connections, 1, "connections from the agent to etcd");
    assert_eq!(watchers, 1.0, "watchers etcd holds");
    assert_eq!(streams - watched_before, 1.0, "watch streams etcd opened");

    // A change reaches its own service and no other.
    etcd.put(&format!("/services/svc0/{B3}"), "", None);
    etcd.del(&format!("/services/svc4/{B2}"));
    wait_backends(&s.pins, "svc0", &[B1, B3], WAIT);
    wait_backends(&s.pins, "svc4", &[B3], WAIT);
    s.assert_balanced("10.96.0.20:80", &[B1, B3]);
    for (name, _, _, backends) in &services[1..4] {
        wait_backends(&s.pins, name, backends, WAIT);
    }

    // One service leaves and one joins under the watched root: the joiner is listed on the
    // same connection and watch, the leaver is dropped from the maps.
    apply(&mut s, &config(&["svc0", "svc1", "svc2", "svc3", "svc5"]));
    wait_backends(&s.pins, "svc5", &[B1, B3], WAIT);
    let gone = wait_for(WAIT, || {
        agent_stats(&s.pins).is_some_and(|stats| service(&stats, "svc4").is_none())
    });
    assert!(gone, "svc4 still installed");
    etcd.put(&format!("/services/svc5/{B2}"), "", None);
    wait_backends(&s.pins, "svc5", &[B1, B2, B3], WAIT);
    let (connections, watchers, streams) = etcd_reading(&mut s, &etcd);
    assert_eq!(connections, 1, "connections after the config change");
    assert_eq!(watchers, 1.0, "watchers after the config change");
    assert_eq!(
        streams - watched_before,
        1.0,
        "the watch was not opened again"
    );
    let src = source(&s, "svc5").expect("discovery state of svc5");
    assert_eq!((src.state, src.skipped), (SourceState::Ok, 0), "{src:?}");
}

#[test]
fn agent_restart_keeps_discovered_backends_until_the_source_answers() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, Config::new());
    let mut etcd = Etcd::start(&s.net);
    etcd.put(&format!("/services/web/{B1}"), "", None);
    etcd.put(&format!("/services/web/{B2}"), "", None);
    apply(&mut s, &etcd_service(&etcd, "/services/web/"));
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);

    // With its source unreachable, a new agent must not wipe the pinned service.
    s.agent().sigkill();
    etcd.kill();
    s.start_agent();
    std::thread::sleep(Duration::from_millis(1500));
    let stats = agent_stats(&s.pins).expect("stats");
    assert_eq!(
        backend_set(&stats, "web").unwrap(),
        [B1, B2],
        "restart without a source emptied the service: {stats:?}"
    );
    s.assert_balanced(VIP, &[B1, B2]);
    etcd.restart();
    etcd.del(&format!("/services/web/{B1}"));
    wait_backends(&s.pins, "web", &[B2], WAIT);
}

fn records(ttl: u32, a: &[&str], srv: &[(&str, u16, u16)]) -> DnsRecords {
    DnsRecords {
        ttl,
        a: a.iter()
            .map(|ip| ("web.lb.test".to_string(), ip.parse().unwrap()))
            .chain(srv.iter().map(|(target, _, _)| {
                let ip = target.split(':').next().unwrap();
                (
                    format!("t{}.lb.test", ip.replace('.', "-")),
                    ip.parse().unwrap(),
                )
            }))
            .collect(),
        srv: srv
            .iter()
            .map(|(target, priority, weight)| {
                let (ip, port) = target.split_once(':').unwrap();
                SrvRecord {
                    name: "_web._tcp.lb.test".into(),
                    target: format!("t{}.lb.test", ip.replace('.', "-")),
                    port: port.parse().unwrap(),
                    priority: *priority,
                    weight: *weight,
                }
            })
            .collect(),
    }
}

#[test]
fn dns_a_and_srv_records_refresh_on_their_ttl() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3, B4], Proto::Tcp, Config::new());
    let ttl = 1;
    let mut dns = Dns::start(
        &s.net,
        &records(
            ttl,
            &["127.0.0.21", "127.0.0.22"],
            &[(B3, 10, 1), (B1, 20, 1)],
        ),
    );
    let dns_source = |name: &str| {
        Table::new()
            .set("kind", "dns")
            .set("name", name)
            .set("nameservers", vec![dns.addr.clone()])
            .set("min_refresh", "200ms")
            .set("max_refresh", "30s")
            .set("timeout", "500ms")
    };
    let a = dns_source("web.lb.test").set("port", 8080);
    let srv = dns_source("_web._tcp.lb.test").set("record", "srv");
    let config = Config::new()
        .service(discovered("web-a", VIP, a))
        .service(discovered("web-srv", VIP2, srv));
    apply(&mut s, &config);
    wait_backends(&s.pins, "web-a", &[B1, B2], WAIT);
    // Only the lowest SRV priority is used: B1 (priority 20) is a fallback.
    wait_backends(&s.pins, "web-srv", &[B3], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);
    s.assert_balanced(VIP2, &[B3]);

    // New records are picked up once the TTL runs out (the server changes them under the
    // agent, which is only told by the TTL).
    let changed = Instant::now();
    dns.set(&records(ttl, &["127.0.0.23"], &[(B3, 10, 1), (B4, 10, 3)]));
    wait_backends(&s.pins, "web-a", &["127.0.0.23:8080"], WAIT);
    wait_backends(&s.pins, "web-srv", &[B3, B4], WAIT);
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "TTL {ttl}s refresh took {:?}",
        changed.elapsed()
    );
    let srv = s.service_stats("web-srv");
    assert_eq!(
        find_backend(&srv, B4).map(|b| b.weight),
        Some(3),
        "SRV weight: {srv:?}"
    );
    s.assert_balanced(VIP, &["127.0.0.23:8080"]);

    // A name with no records is an empty answer from a healthy server: the service empties.
    dns.set(&records(ttl, &[], &[(B3, 10, 1)]));
    let emptied = wait_for(WAIT, || s.service_stats("web-a").slots == 0);
    assert!(emptied, "{:?}", s.service_stats("web-a"));
    assert_eq!(
        source(&s, "web-a").map(|src| src.state),
        Some(SourceState::Ok)
    );
    let report = s.client(VIP, 20, Proto::Tcp);
    assert_eq!(report.failed("ECONNREFUSED"), 20, "{report:?}");

    // No server at all is an error: the last set stays.
    drop(dns);
    wait_state(&s, "web-srv", SourceState::Error);
    s.assert_balanced(VIP2, &[B3]);
}

#[test]
fn consul_blocking_queries_follow_the_index_and_survive_garbage() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, Config::new());
    let consul = ConsulMock::start(
        &s.net,
        &consul_state(10, &[(B1, "passing"), (B2, "passing"), (B3, "critical")]),
    );
    let token = s.config.with_extension("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let discovery = Table::new()
        .set("kind", "consul")
        .set("address", consul.addr.clone())
        .set("service", "web")
        .set("tag", "v1")
        .set("datacenter", "dc1")
        .set("token_file", token.display().to_string())
        .set("wait", "2s");
    apply(
        &mut s,
        &Config::new().service(discovered("web", VIP, discovery)),
    );
    // Only passing instances: B3's check is critical.
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);

    // A change wakes the blocked query at once.
    let changed = Instant::now();
    consul.set(&consul_state(
        11,
        &[(B1, "passing"), (B2, "passing"), (B3, "passing")],
    ));
    wait_backends(&s.pins, "web", &[B1, B2, B3], WAIT);
    assert!(
        changed.elapsed() < Duration::from_secs(2),
        "blocking query did not return on change: {:?}",
        changed.elapsed()
    );
    let requests = consul.requests();
    let blocking = requests
        .iter()
        .find(|r| r.contains("index=10"))
        .unwrap_or_else(|| panic!("no blocking query on index 10: {requests:#?}"));
    for part in ["passing", "wait=2000ms", "dc=dc1", "tag=v1", "token=s3cret"] {
        assert!(blocking.contains(part), "{part} missing in {blocking}");
    }

    // The index going backwards (a restored Consul) resets: the new, smaller state is used.
    consul.set(&consul_state(5, &[(B1, "passing")]));
    wait_backends(&s.pins, "web", &[B1], WAIT);
    // Per Consul's rules the agent first asks without an index, then blocks on the new one.
    let reset_seen = wait_for(WAIT, || {
        let r = consul.requests();
        let after = r
            .iter()
            .rposition(|q| q.contains("index=11"))
            .map_or(0, |i| i + 1);
        let fresh = r[after..].iter().position(|q| !q.contains("index="));
        fresh.is_some_and(|f| r[after + f..].iter().any(|q| q.contains("index=5&")))
    });
    assert!(
        reset_seen,
        "no reset after the index went back: {:#?}",
        consul.requests()
    );

    // Garbage answers never change the set; the source shows the error.
    for (index, body, error) in [
        (20, "{not json".to_string(), "not valid JSON"),
        (
            21,
            "{\"not\": \"an array\"}".to_string(),
            "not a JSON array",
        ),
        (22, ten_thousand_instances(), "10000 usable instances"),
    ] {
        consul.set(&consul_raw(index, &body));
        let ok = wait_for(WAIT, || {
            source(&s, "web").is_some_and(|src| {
                src.state == SourceState::Error
                    && src.last_error.as_deref().unwrap_or("").contains(error)
            })
        });
        assert!(
            ok,
            "answer {index} not reported as {error:?}: {:?}",
            source(&s, "web")
        );
        let stats = agent_stats(&s.pins).unwrap();
        assert_eq!(backend_set(&stats, "web").unwrap(), [B1], "{stats:?}");
    }
    s.assert_balanced(VIP, &[B1]);
    let table = lb_testkit::stats::stats_table(&s.pins);
    assert!(
        table.contains("source consul \"web\": ERROR x")
            && table.contains("serving the last known set"),
        "{table}"
    );

    // Bad entries inside a good answer are skipped, the rest is used.
    let mut state = consul_state(30, &[(B1, "passing"), (B2, "passing")]);
    state["services"]["web"][1]["node_address"] = json!("not-an-ip");
    consul.set(&state);
    wait_state(&s, "web", SourceState::Ok);
    let ok = wait_for(WAIT, || {
        source(&s, "web").is_some_and(|src| src.skipped == 1)
    });
    assert!(ok, "{:?}", source(&s, "web"));
    s.assert_balanced(VIP, &[B1]);
}

/// A well-formed answer with far more instances than a service may have.
fn ten_thousand_instances() -> String {
    let entries: Vec<String> = (0..10_000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a01_0000 + i);
            format!(
                r#"{{"Node":{{"Node":"n{i}","Address":"{ip}"}},"Service":{{"Service":"web","Address":"","Port":8080}},"Checks":[]}}"#
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

#[test]
fn discovered_backends_go_through_health_checks() {
    if !require_privileged() {
        return;
    }
    // B3 is registered as passing in Consul but nothing listens there: the agent's own probe
    // must keep it out.
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, Config::new());
    let consul = ConsulMock::start(
        &s.net,
        &consul_state(3, &[(B1, "passing"), (B2, "passing"), (B3, "passing")]),
    );
    let discovery = Table::new()
        .set("kind", "consul")
        .set("address", consul.addr.clone())
        .set("service", "web");
    let health = Table::new()
        .set("kind", "tcp")
        .set("interval", "200ms")
        .set("timeout", "100ms")
        .set("rise", 1)
        .set("fall", 2)
        .set("jitter", "20ms");
    let config = Config::new().service(discovered("web", VIP, discovery).health(health));
    apply(&mut s, &config);
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    // The maps can show the change before the status file does (it is published after the
    // reconcile's socket-termination pass), so the health verdict is waited for as well.
    let b3_down = || {
        let svc = s.service_stats("web");
        find_backend(&svc, B3).and_then(|b| b.health.as_ref().map(|h| h.healthy)) == Some(false)
    };
    assert!(wait_for(WAIT, b3_down), "{:?}", s.service_stats("web"));
    s.assert_balanced(VIP, &[B1, B2]);
}

#[test]
fn loopback_answers_need_allow_loopback_backends() {
    if !require_privileged() {
        return;
    }
    // An answer naming this node's own addresses would send clients to its local ports.
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, Config::new());
    let consul = ConsulMock::start(
        &s.net,
        &consul_state(3, &[(B1, "passing"), (B2, "passing")]),
    );
    let discovery = Table::new()
        .set("kind", "consul")
        .set("address", consul.addr.clone())
        .set("service", "web")
        .set("retry_initial", "100ms")
        .set("retry_max", "1s");
    let refusing = Config::new().service(Service::tcp("web", VIP).discovery(discovery.clone()));
    apply(&mut s, &refusing);
    let skipped = wait_for(WAIT, || {
        source(&s, "web").is_some_and(|src| src.state == SourceState::Ok && src.skipped == 2)
    });
    let src = source(&s, "web");
    assert!(skipped, "{src:?}");
    let reasons = src.map(|src| src.skipped_reasons).unwrap_or_default();
    assert!(
        reasons[0].starts_with(&format!("{B1}: a loopback or link-local address"))
            && reasons[0].contains("allow_loopback_backends = true"),
        "{reasons:?}"
    );
    assert_eq!(s.service_stats("web").slots, 0);
    let report = s.client(VIP, 10, Proto::Tcp);
    assert_eq!(report.failed("ECONNREFUSED"), 10, "{report:?}");

    // Allowed for this service: the same answer is used.
    let allowing = discovery.set("allow_loopback_backends", true);
    apply(
        &mut s,
        &Config::new().service(Service::tcp("web", VIP).discovery(allowing)),
    );
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);
}
