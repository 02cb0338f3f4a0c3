//! Privileged end-to-end tests of the data plane beyond IPv4 TCP connect: IPv6 and v4-mapped
//! sockets, unconnected UDP with replies from the VIP, getpeername, Maglev and client affinity.
//! Real agent, real programs, real sockets in the test's own namespace (lo only).

use lb_testkit::config::{Config, Service};
use lb_testkit::procs::{run_client, run_client_with, Proto};
use lb_testkit::{require_privileged, wait_for, Scenario, TestCgroup};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn one_key(map: &std::collections::HashMap<String, u64>) -> Option<String> {
    (map.len() == 1)
        .then(|| map.keys().next().cloned())
        .flatten()
}

#[test]
fn ipv6_vip_reaches_ipv6_backends_and_peers_read_as_the_vip() {
    if !require_privileged() {
        return;
    }
    let (vip, b1, b2) = ("[fd00::10]:80", "[::1]:8081", "[::1]:8082");
    let s = Scenario::start(
        &[b1, b2],
        Proto::Tcp,
        Config::new().service(Service::tcp("web6", vip).backends(&[b1, b2])),
    );
    let report = s.client(vip, 100, Proto::Tcp);
    assert_eq!(report.ok, 100, "{report:?}");
    assert!(report.from(b1) > 10 && report.from(b2) > 10, "{report:?}");
    assert_eq!(report.peers.get(vip), Some(&100), "getpeername: {report:?}");

    // A socket the programs did not translate keeps its real peer.
    let direct = s.client(b1, 5, Proto::Tcp);
    assert_eq!(direct.peers.get(b1), Some(&5), "{direct:?}");

    // Each connection's end is counted once, for its backend (sock_ops at CLOSE).
    let counted = lb_testkit::wait_for(std::time::Duration::from_secs(5), || {
        let stats = s.service_stats("web6");
        let sum = |f: fn(&lb_userspace::observe::report::BackendReport) -> u64| {
            stats.backends.iter().map(f).sum::<u64>()
        };
        sum(|b| b.established) == 100 && sum(|b| b.closed) == 100
    });
    assert!(counted, "{:?}", s.service_stats("web6"));
}

#[test]
fn v4_mapped_socket_reaches_the_ipv4_vip_and_programs_are_sized() {
    if !require_privileged() {
        return;
    }
    let (vip, b1, b2) = ("10.96.0.10:80", "127.0.0.11:8080", "127.0.0.12:8080");
    let s = Scenario::start(
        &[b1, b2],
        Proto::Tcp,
        Config::new().service(Service::tcp("web", vip).backends(&[b1, b2])),
    );
    let mapped = "[::ffff:10.96.0.10]:80";
    let report = s.client(mapped, 60, Proto::Tcp);
    assert_eq!(report.ok, 60, "{report:?}");
    assert_eq!(report.from(b1) + report.from(b2), 60, "{report:?}");
    assert_eq!(report.peers.get(mapped), Some(&60), "{report:?}");

    let v4 = s.client(vip, 20, Proto::Tcp);
    assert_eq!(v4.peers.get(vip), Some(&20), "{v4:?}");
    let direct = s.client(b2, 3, Proto::Tcp);
    assert_eq!(direct.peers.get(b2), Some(&3), "{direct:?}");

    let stats = lb_testkit::agent_stats(&s.pins).expect("stats");
    let programs = &stats.programs;
    let names: BTreeSet<&str> = programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 11, "{programs:?}");
    for p in programs {
        assert!(p.verified_insns > 0, "{p:?}");
    }
}

#[test]
fn udp_sendto_keeps_one_backend_per_socket_and_replies_come_from_the_vip() {
    if !require_privileged() {
        return;
    }
    let vip = "10.96.0.53:53";
    let backends = ["127.0.0.11:5353", "127.0.0.12:5353", "127.0.0.13:5353"];
    let s = Scenario::start(
        &backends,
        Proto::Udp,
        Config::new().service(Service::udp("dns", vip).backends(&backends)),
    );
    let mut used = BTreeSet::new();
    for _ in 0..12 {
        let r = run_client_with(
            &s.net,
            Some(&s.cgroup),
            vip,
            10,
            Proto::Udp,
            &["--unconnected"],
        );
        assert_eq!(r.ok, 10, "{r:?}");
        let backend =
            one_key(&r.by_backend).unwrap_or_else(|| panic!("one socket, many backends: {r:?}"));
        assert_eq!(r.peers.get(vip), Some(&10), "recvfrom source: {r:?}");
        used.insert(backend);
    }
    assert!(used.len() >= 2, "12 sockets all went to {used:?}");
    let svc = s.service_stats("dns");
    assert_eq!(svc.affinity_new, 12, "{svc:?}");
    assert_eq!(svc.affinity_hits, 12 * 9, "{svc:?}");

    // Connected UDP sockets see the VIP as their peer too.
    let connected = s.client(vip, 5, Proto::Udp);
    assert_eq!(connected.peers.get(vip), Some(&5), "{connected:?}");
}

/// The backend the agent's Maglev table (equal weights, the default size) gives a client.
fn maglev_choice(backends: &[&str], client: u64) -> std::net::SocketAddr {
    let configs: Vec<lb_userspace::config::BackendConfig> = backends
        .iter()
        .map(|b| lb_userspace::config::BackendConfig {
            address: b.parse().unwrap(),
            weight: 1,
        })
        .collect();
    let table = lb_userspace::plan::maglev_table(&configs, 65_537);
    table[(lb_common::client_hash(client) % 65_537) as usize]
}

#[test]
fn maglev_choice_in_the_kernel_equals_the_agent_table() {
    if !require_privileged() {
        return;
    }
    let vip = "10.96.0.20:80";
    let addrs: Vec<String> = (21..31).map(|i| format!("127.0.0.{i}:8080")).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mg = Service::tcp("mg", vip)
        .set("algorithm", "maglev")
        .set("client_key", "cgroup");
    let config = Config::new().service(mg.clone().backends(&all));
    let mut s = Scenario::start(&all, Proto::Tcp, config);
    let clients: Vec<TestCgroup> = (0..12).map(|_| s.cgroup.child()).collect();

    let check = |s: &Scenario, backends: &[&str]| -> BTreeMap<u64, String> {
        let mut seen = BTreeMap::new();
        for c in &clients {
            let expected = maglev_choice(backends, c.id()).to_string();
            let r = run_client(&s.net, Some(c), vip, 3, Proto::Tcp);
            assert_eq!(r.ok, 3, "{r:?}");
            assert_eq!(
                one_key(&r.by_backend),
                Some(expected),
                "cgroup {}: {r:?}",
                c.id()
            );
            seen.insert(c.id(), one_key(&r.by_backend).unwrap());
        }
        seen
    };
    let before = check(&s, &all);
    assert!(
        before.values().collect::<BTreeSet<_>>().len() >= 3,
        "{before:?}"
    );

    // One backend leaves: the kernel follows the agent's new table (`check`), and the
    // clients of the removed backend move. Maglev keeps nearly every other entry in place,
    // but not all, so a client of a staying backend may move only where the table moved it.
    let removed = before.values().next().unwrap().clone();
    let rest: Vec<&str> = all.iter().copied().filter(|a| *a != removed).collect();
    s.write_config(Config::new().service(mg.backends(&rest)));
    s.agent().sighup();
    assert!(wait_for(WAIT, || s.service_stats("mg").backends.len() == 9));
    let after = check(&s, &rest);
    let moved_by_table = |id: u64| maglev_choice(&all, id) != maglev_choice(&rest, id);
    for (id, b) in &before {
        if *b == removed {
            assert_ne!(&after[id], b, "cgroup {id} kept the removed backend");
        } else if &after[id] != b {
            assert!(
                moved_by_table(*id),
                "cgroup {id} moved although its backend stayed"
            );
        }
    }
    drop(clients);
}

#[test]
fn client_affinity_keeps_the_backend_across_changes_until_idle() {
    if !require_privileged() {
        return;
    }
    let vip = "10.96.0.30:80";
    let backends = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];
    // Long enough that a slow reload below cannot expire the client by accident.
    let sticky = Service::tcp("sticky", vip)
        .set("affinity", "client")
        .set("affinity_timeout", "5s");
    let mut s = Scenario::start(
        &[
            "127.0.0.11:8080",
            "127.0.0.12:8080",
            "127.0.0.13:8080",
            "127.0.0.14:8080",
        ],
        Proto::Tcp,
        Config::new().service(sticky.clone().backends(&backends)),
    );
    let r = s.client(vip, 100, Proto::Tcp);
    assert_eq!(r.ok, 100, "{r:?}");
    let kept = one_key(&r.by_backend).unwrap_or_else(|| panic!("affinity broken: {r:?}"));
    let svc = s.service_stats("sticky");
    assert_eq!((svc.affinity_new, svc.affinity_hits), (1, 99), "{svc:?}");

    // A new backend does not move the client.
    let mut more = backends.to_vec();
    more.push("127.0.0.14:8080");
    s.write_config(Config::new().service(sticky.backends(&more)));
    s.agent().sighup();
    assert!(wait_for(WAIT, || s.service_stats("sticky").backends.len() == 4));
    let r = s.client(vip, 20, Proto::Tcp);
    assert_eq!(r.from(&kept), 20, "moved after a backend was added: {r:?}");

    // Idle past the timeout: the next connect is a fresh choice.
    std::thread::sleep(Duration::from_millis(5_500));
    let r = s.client(vip, 1, Proto::Tcp);
    assert_eq!(r.ok, 1, "{r:?}");
    let svc = s.service_stats("sticky");
    assert_eq!(
        svc.affinity_new, 2,
        "no fresh choice after the timeout: {svc:?}"
    );
}
