//! Privileged end-to-end tests of `terminate_on_removal`: when a backend leaves its service,
//! the sockets translated to it are destroyed (BPF socket iterator + `bpf_sock_destroy()`), so
//! a connected UDP client stops talking to the removed backend and pooled TCP connections
//! reconnect to live ones. What the backends received is read from their accept logs.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::{monotonic_micros, read_accept_log, Backends, HeldConnections, Proto};
use lb_testkit::stats::service;
use lb_testkit::{agent_stats, require_privileged, wait_for, Scenario, SteadyClient};
use std::time::Duration;

const VIP: &str = "10.96.0.53:53";
const OLD: &str = "127.0.0.11:5353";
const NEW: &str = "127.0.0.12:5353";
const WAIT: Duration = Duration::from_secs(10);

fn dns(backend: &str, terminate: &str) -> Config {
    Config::new().service(
        Service::udp("dns", VIP)
            .set("terminate_on_removal", terminate)
            .backends(&[backend]),
    )
}

/// A resolver-like client (one connected UDP socket, re-created after an error) talks to the
/// only backend; the backend is replaced. Returns the datagrams the old and the new backend
/// got from one second after the replacement was applied on, and the agent's log.
fn replace_under_a_connected_udp_client(terminate: &str) -> (usize, usize, String) {
    let mut s = Scenario::without_agent(&[], Proto::Udp);
    let log = s.config.with_extension("accepts");
    let servers = Backends::start_logged(&s.net, &[OLD, NEW], Proto::Udp, &log);
    s.write_config(dns(OLD, terminate));
    s.start_agent();
    let every = Duration::from_millis(20);
    let client = SteadyClient::start_with(
        &s.net,
        &s.cgroup,
        (VIP, Proto::Udp),
        every,
        Duration::from_secs(30),
        &["--persistent"],
    );
    let got = |addr: &str, after: u64| {
        read_accept_log(&log)
            .iter()
            .filter(|a| a.listener == addr && a.monotonic_micros > after)
            .count()
    };
    assert!(
        wait_for(WAIT, || got(OLD, 0) >= 5),
        "the client never reached the backend"
    );
    s.write_config(dns(NEW, terminate));
    let reconciles = s.agent().log().matches(" reconciled ").count();
    s.agent().sighup();
    assert!(wait_for(WAIT, || {
        s.agent().log().matches(" reconciled ").count() > reconciles
    }));
    // The agent destroys the sockets right after the flip; a second is what a client gets.
    let applied = monotonic_micros();
    std::thread::sleep(Duration::from_secs(1));
    let settled = monotonic_micros();
    std::thread::sleep(Duration::from_millis(500));
    let report = client.stop();
    drop(servers);
    let (old, new) = (got(OLD, settled), got(NEW, applied));
    eprintln!("{terminate}: after the change old got {old}, new got {new}: {report:?}");
    (old, new, s.agent().log())
}

#[test]
fn a_connected_udp_client_leaves_a_removed_backend_within_a_second() {
    if !require_privileged() {
        return;
    }
    let (old, new, log) = replace_under_a_connected_udp_client("udp");
    assert_eq!(old, 0, "the removed backend still got datagrams:\n{log}");
    assert!(new > 0, "the new backend got nothing:\n{log}");
    assert!(
        log.contains("terminated sockets of a removed backend") && log.contains("sockets=1"),
        "no termination logged:\n{log}"
    );
}

/// The same with termination off: the socket keeps its removed backend (what every
/// connect-time balancer does without it), which is what the test above must tell apart.
#[test]
fn without_termination_the_client_keeps_the_removed_backend() {
    if !require_privileged() {
        return;
    }
    let (old, new, log) = replace_under_a_connected_udp_client("none");
    assert!(old > 10, "the socket left its backend by itself:\n{log}");
    assert_eq!(new, 0, "{log}");
}

#[test]
fn idle_tcp_connections_to_a_removed_backend_are_closed_with_all() {
    if !require_privileged() {
        return;
    }
    const VIP_TCP: &str = "10.96.0.10:80";
    let (a, b) = ("127.0.0.21:8080", "127.0.0.22:8080");
    let web = |backend: &str, terminate: &str| {
        Config::new().service(
            Service::tcp("web", VIP_TCP)
                .set("terminate_on_removal", terminate)
                .backends(&[backend]),
        )
    };
    let mut s = Scenario::without_agent(&[a, b], Proto::Tcp);
    s.write_config(web(a, "all"));
    s.start_agent();
    let held = HeldConnections::open(&s.net, &s.cgroup, VIP_TCP, 20);
    assert_eq!(held.held, 20, "{:?}", held.peers);
    s.write_config(web(b, "all"));
    s.agent().sighup();
    let closed = wait_for(Duration::from_secs(1) + WAIT, || {
        s.agent().log().contains("sockets=20")
    });
    assert!(closed, "20 sockets not terminated:\n{}", s.agent().log());
    let peers = held.close();
    assert_eq!(
        peers.get("ECONNABORTED").copied(),
        Some(20),
        "what the held connections saw: {peers:?}"
    );
    // `stats` says what went, by backend.
    let counted = wait_for(WAIT, || {
        let stats = agent_stats(&s.pins);
        let web = stats.as_ref().and_then(|r| service(r, "web"));
        web.is_some_and(|w| w.terminated.get(a) == Some(&20))
    });
    assert!(counted, "stats does not count the 20 terminations");
    // Their owners reconnect through the VIP, to the live backend.
    let again = s.client(VIP_TCP, 20, Proto::Tcp);
    assert_eq!(again.from(b), 20, "{again:?}");
}

/// `[dataplane] max_terminations_per_second` spreads the terminations of a removed backend's
/// connections over passes a second apart, so its clients do not all reconnect at once.
#[test]
fn terminations_are_bounded_per_second() {
    if !require_privileged() {
        return;
    }
    const VIP_TCP: &str = "10.96.0.10:80";
    let (a, b) = ("127.0.0.21:8080", "127.0.0.22:8080");
    let web = |backend: &str| {
        Config::new()
            .dataplane(Table::new().set("max_terminations_per_second", 5))
            .service(
                Service::tcp("web", VIP_TCP)
                    .set("terminate_on_removal", "all")
                    .backends(&[backend]),
            )
    };
    let mut s = Scenario::without_agent(&[a, b], Proto::Tcp);
    s.write_config(web(a));
    s.start_agent();
    let held = HeldConnections::open(&s.net, &s.cgroup, VIP_TCP, 20);
    assert_eq!(held.held, 20, "{:?}", held.peers);
    s.write_config(web(b));
    s.agent().sighup();
    let all = wait_for(Duration::from_secs(4) + WAIT, || {
        agent_stats(&s.pins)
            .as_ref()
            .and_then(|r| service(r, "web"))
            .is_some_and(|w| w.terminated.get(a) == Some(&20))
    });
    let log = s.agent().log();
    assert!(all, "not all 20 terminated:\n{log}");
    let passes: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("terminated sockets of a removed backend"))
        .filter_map(|l| l.split("sockets=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    // Passes a second apart, each within the 5 tokens refilled since the last.
    let (most, total) = (passes.iter().max(), passes.iter().sum::<u64>());
    assert!(
        most == Some(&5) && total == 20 && passes.len() >= 4,
        "sockets per pass {passes:?}:\n{log}"
    );
    let peers = held.close();
    assert_eq!(peers.get("ECONNABORTED").copied(), Some(20), "{peers:?}");
}
