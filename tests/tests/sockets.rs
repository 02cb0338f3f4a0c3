//! Privileged end-to-end tests of the per-socket state (`LB_SOCKETS`, socket-local storage):
//! nothing a socket was translated to can be evicted by other sockets, and nothing a socket of
//! a removed backend does is counted for the backend that later gets the same id.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::{udp_churn, HeldConnections, Proto, ServeMode};
use lb_testkit::stats::{agent_stats, ServiceReport};
use lb_testkit::{require_privileged, wait_backends, wait_for, Scenario};
use lb_userspace::observe::report::BackendReport;
use std::collections::BTreeMap;
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
const DNS_VIP: &str = "10.96.0.53:53";
const DNS: &str = "127.0.0.13:5353";
/// Inside `lb_testkit::join::BLACKHOLE_NET` (hosts .2 to .9): a SYN sent there is never
/// answered.
const SILENT: &str = "10.255.255.2:80";
const WAIT: Duration = Duration::from_secs(10);

fn backend<'a>(svc: &'a ServiceReport, addr: &str) -> &'a BackendReport {
    svc.backends
        .iter()
        .find(|b| b.address == addr)
        .unwrap_or_else(|| panic!("{addr} not in {svc:?}"))
}

fn total(svc: &ServiceReport, field: fn(&BackendReport) -> u64) -> u64 {
    svc.backends.iter().map(field).sum()
}

/// Layout 2 kept each socket's translation in a node-wide LRU map of 131,072 entries that
/// unconnected UDP sockets never left; open TCP connections whose entries were evicted showed
/// their backend as peer and went uncounted at close. Measured with layout 2's agent
/// (`LB_AGENT_BIN`): 200,000 sockets evicted none of the 50 (the LRU gives entries read since
/// their insert a second chance), 400,000 and 600,000 evicted all 50.
#[test]
fn open_connections_keep_their_state_through_400k_udp_sockets() {
    if !require_privileged() {
        return;
    }
    let config = Config::new()
        .service(Service::tcp("web", VIP).backends(&[B1, B2]))
        .service(Service::udp("dns", DNS_VIP).backends(&[DNS]));
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, config);
    s.start_backend(DNS, Proto::Udp, ServeMode::Answer);

    let held = HeldConnections::open(&s.net, &s.cgroup, VIP, 50);
    assert_eq!(held.held, 50, "{:?}", held.peers);
    assert_eq!(held.peers, BTreeMap::from([(VIP.to_string(), 50)]));
    // Their state is kernel memory charged to the agent; `stats` counts it per connection.
    let memory = agent_stats(&s.pins).expect("stats --json").memory;
    let state = memory
        .socket_state
        .expect("this kernel's BTF gives the size");
    assert_eq!(state.open_tcp_connections, 50, "{state:?}");
    assert!(
        state.bytes_per_socket > size_of::<lb_common::SocketState>() as u64,
        "{state:?}"
    );

    let sent = udp_churn(&s.net, &s.cgroup, DNS_VIP, 400_000);
    assert_eq!(sent, 400_000);
    let dns = s.service_stats("dns");
    assert!(
        total(&dns, |b| b.connects) >= 200_000,
        "the churn did not go through the balancer: {dns:?}"
    );

    let peers = held.close();
    assert_eq!(
        peers,
        BTreeMap::from([(VIP.to_string(), 50)]),
        "getpeername after the churn"
    );
    let counted = wait_for(WAIT, || {
        let web = s.service_stats("web");
        total(&web, |b| b.closed) >= 50
    });
    let web = s.service_stats("web");
    assert!(counted, "closes not counted: {web:?}");
    assert_eq!(total(&web, |b| b.established), 50, "{web:?}");
    assert_eq!(total(&web, |b| b.closed), 50, "{web:?}");
    assert_eq!(total(&web, |b| b.active), 0, "{web:?}");
    let state = agent_stats(&s.pins).and_then(|r| r.memory.socket_state);
    assert_eq!(
        state.as_ref().map(|s| s.open_tcp_connections),
        Some(0),
        "{state:?}"
    );
}

/// A connection to a backend that never answers is still in SYN_SENT when the backend is
/// removed and its id goes to a newcomer. The connection's failure comes later and belongs to
/// the old owner: counted for the newcomer it would eject a healthy backend.
#[test]
fn a_reused_backend_id_counts_nothing_of_its_previous_owner() {
    if !require_privileged() {
        return;
    }
    let outlier = Table::new()
        .set("consecutive_failures", 1)
        .set("base_ejection_time", "30s")
        .set("max_ejection_percent", 100);
    let web = |backends: &[&str]| {
        Config::new().service(
            Service::tcp("web", VIP)
                .backends(backends)
                .outlier(outlier.clone()),
        )
    };
    let mut s = Scenario::with_blackhole(&[B1, B2], Proto::Tcp, web(&[SILENT]));

    let pending = HeldConnections::open_pending(&s.net, &s.cgroup, VIP, 1);
    assert_eq!(pending.held, 1, "{:?}", pending.peers);
    let before = s.service_stats("web");
    let silent = backend(&before, SILENT);
    assert_eq!((silent.connects, silent.failed), (1, 0), "{silent:?}");
    let old_id = silent.id.expect("SILENT is in the maps");

    // Two steps: ids freed by a plan are not handed out by the same plan.
    s.write_config(web(&[B1]));
    s.agent().sighup();
    wait_backends(&s.pins, "web", &[B1], WAIT);
    s.write_config(web(&[B1, B2]));
    s.agent().sighup();
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    let reused = s.service_stats("web");
    assert_eq!(
        backend(&reused, B2).id,
        Some(old_id),
        "the premise: B2 took SILENT's id: {reused:?}"
    );

    // The connect fails now (closed in SYN_SENT), for SILENT's generation of the id.
    let peers = pending.close();
    assert_eq!(
        peers,
        BTreeMap::from([("connecting".to_string(), 1)]),
        "the premise: the connect was still in SYN_SENT"
    );
    // Outlier checks run every 250 ms: time for several to see a wrongly counted failure.
    std::thread::sleep(Duration::from_millis(1500));
    let after = s.service_stats("web");
    let b2 = backend(&after, B2);
    assert_eq!(
        b2.failed, 0,
        "the old owner's failure counted for B2: {b2:?}"
    );
    assert!(b2.ejected.is_none(), "B2 ejected: {b2:?}");
    let report = s.client(VIP, 40, Proto::Tcp);
    assert_eq!(report.ok, 40, "{report:?}");
    assert!(report.from(B2) > 0, "B2 gets no traffic: {report:?}");
}
