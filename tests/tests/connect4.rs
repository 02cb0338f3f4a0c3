//! Privileged end-to-end tests of connect4 balancing: the real agent binary, real sockets in a
//! namespace of the test's own (lo only, no route out) and clients in a child cgroup.

use lb_testkit::config::{Config, Service};
use lb_testkit::procs::Proto;
use lb_testkit::{require_privileged, wait_backends, Scenario};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
const B3: &str = "127.0.0.13:8080";
const WAIT: Duration = Duration::from_secs(10);

fn web(backends: &[&str]) -> Config {
    Config::new().service(Service::tcp("web", VIP).backends(backends))
}

fn assert_near(label: &str, got: u64, expected: f64) {
    let tolerance = expected * 0.15;
    assert!(
        (got as f64 - expected).abs() <= tolerance,
        "{label}: {got} connects, expected {expected:.0} ± 15%"
    );
}

#[test]
fn vip_connects_reach_only_configured_backends() {
    if !require_privileged() {
        return;
    }
    let extra = "127.0.0.14:8080";
    let mut s = Scenario::start(&[B1, B2, B3, extra], Proto::Tcp, web(&[B1, B2, B3]));
    let report = s.client(VIP, 300, Proto::Tcp);
    assert_eq!(report.ok, 300, "{report:?}");
    assert_eq!(report.from(extra), 0);
    let accepted = s.stop_backends();
    assert_eq!(accepted[extra], 0, "an unconfigured backend was reached");
    assert_eq!(accepted[B1] + accepted[B2] + accepted[B3], 300);
}

/// The committed object loads as it is: no BTF the kernel rejects, no fallback, no warning.
#[test]
fn agent_starts_without_warnings() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1], Proto::Tcp, web(&[B1]));
    assert_eq!(s.client(VIP, 10, Proto::Tcp).ok, 10);
    let complaints = s.agent().complaints();
    assert!(complaints.is_empty(), "the agent warned: {complaints:#?}");
}

#[test]
fn spread_is_even_and_follows_weights() {
    if !require_privileged() {
        return;
    }
    let s = Scenario::start(&[B1, B2, B3], Proto::Tcp, web(&[B1, B2, B3]));
    let even = s.client(VIP, 3000, Proto::Tcp);
    assert_eq!(even.ok, 3000, "{even:?}");
    for b in [B1, B2, B3] {
        assert_near(b, even.from(b), 1000.0);
    }

    s.write_config(
        Config::new().service(Service::tcp("web", VIP).backends(&[B1, B2]).weighted(B3, 3)),
    );
    let mut s = s;
    s.agent().sighup();
    let ok = lb_testkit::wait_for(WAIT, || s.service_stats("web").slots == 5);
    assert!(ok, "weights never applied: {:?}", s.service_stats("web"));
    let report = s.client(VIP, 3000, Proto::Tcp);
    assert_eq!(report.ok, 3000, "{report:?}");
    assert_near(B1, report.from(B1), 600.0);
    assert_near(B2, report.from(B2), 600.0);
    assert_near(B3, report.from(B3), 1800.0);
}

#[test]
fn counters_equal_what_backends_and_clients_counted() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, web(&[B1, B2, B3]));
    let report = s.client(VIP, 500, Proto::Tcp);
    let svc = s.service_stats("web");
    let accepted = s.stop_backends();
    assert_eq!(svc.connects, 500);
    assert_eq!(svc.no_backend, 0);
    lb_testkit::stats::assert_counts_agree(&svc, &accepted, &report, &[B1, B2, B3]);
}

#[test]
fn client_outside_the_cgroup_is_not_rewritten() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1, B2]));
    let report = s.outside_client(VIP, 50, Proto::Tcp);
    assert_eq!(report.failed("ENETUNREACH"), 50, "{report:?}");
    assert_eq!(s.service_stats("web").connects, 0);
    let accepted = s.stop_backends();
    assert_eq!(accepted[B1] + accepted[B2], 0);
}

#[test]
fn non_service_destinations_are_untouched() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1, B2]));
    let direct = s.client(B1, 40, Proto::Tcp);
    assert_eq!(direct.from(B1), 40, "{direct:?}");
    let other_port = s.client("10.96.0.10:81", 20, Proto::Tcp);
    assert_eq!(other_port.failed("ENETUNREACH"), 20, "{other_port:?}");
    let udp_same_vip = s.client(VIP, 5, Proto::Udp);
    assert_eq!(
        udp_same_vip.ok, 0,
        "tcp service must not catch udp: {udp_same_vip:?}"
    );
    assert_eq!(s.service_stats("web").connects, 0);
    let accepted = s.stop_backends();
    assert_eq!((accepted[B1], accepted[B2]), (40, 0));
}

#[test]
fn empty_service_refuses_connects_with_econnrefused() {
    if !require_privileged() {
        return;
    }
    let s = Scenario::start(&[B1], Proto::Tcp, web(&[]));
    let report = s.client(VIP, 25, Proto::Tcp);
    assert_eq!(report.failed("ECONNREFUSED"), 25, "{report:?}");
    let svc = s.service_stats("web");
    assert_eq!(svc.no_backend, 25);
    assert_eq!(svc.connects, 0);
}

#[test]
fn reload_removing_a_backend_stops_traffic_to_it_and_bad_config_is_rejected() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, web(&[B1, B2, B3]));
    assert_eq!(s.client(VIP, 90, Proto::Tcp).ok, 90);

    s.write_config(web(&[B1, B2]));
    s.agent().sighup();
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    let after = s.client(VIP, 500, Proto::Tcp);
    assert_eq!(after.ok, 500, "{after:?}");
    assert_eq!(
        after.from(B3),
        0,
        "removed backend still reached: {after:?}"
    );

    s.write_config("[[service]]\nname = \"web\"\nvip = \"10.96.0.10:0\"\nbackends = []\n");
    s.agent().sighup();
    let rejected = lb_testkit::wait_for(WAIT, || {
        s.agent.as_ref().unwrap().log().contains("config rejected")
    });
    assert!(
        rejected,
        "invalid config was not reported:\n{}",
        s.agent().log()
    );
    assert!(s.agent().is_running(), "agent died on an invalid config");
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    assert_eq!(
        s.client(VIP, 50, Proto::Tcp).ok,
        50,
        "old state must keep serving"
    );
    assert!(s.agent().sigterm_and_wait(), "clean exit on SIGTERM");
}

#[test]
fn agent_sigkill_under_load_loses_nothing_and_restart_adopts_pins() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, web(&[B1, B2, B3]));
    let load = s.steady_load(VIP, Duration::from_millis(2), Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    s.agent().sigkill();
    s.agent = None;
    std::thread::sleep(Duration::from_secs(1));
    let report = load.stop();
    report.assert_lost_nothing(101, "while the agent was dead");
    let before = s.service_stats("web").connects;
    assert_eq!(before, report.ok);

    s.start_agent_adopting();
    let svc = s.service_stats("web");
    assert_eq!(svc.connects, before, "counters reset on restart");
    assert_eq!(
        svc.revision, 1,
        "unchanged config must not rewrite the table"
    );
    assert_eq!(s.client(VIP, 100, Proto::Tcp).ok, 100);

    assert!(s.agent().sigterm_and_wait());
    s.agent = None;
    let detach = std::process::Command::new(lb_testkit::paths::agent_bin())
        .arg("detach")
        .arg("--pin-dir")
        .arg(&s.pins.path)
        .output()
        .unwrap();
    assert!(detach.status.success(), "{detach:?}");
    let after = s.client(VIP, 10, Proto::Tcp);
    assert_eq!(
        after.failed("ENETUNREACH"),
        10,
        "program still attached after detach: {after:?}"
    );
}

#[test]
fn second_agent_on_the_same_pins_refuses_and_traffic_continues() {
    if !require_privileged() {
        return;
    }
    let s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1, B2]));
    let mut second = lb_testkit::Agent::start(&s.net, &s.cgroup, &s.pins, &s.config, 0, &[]);
    let exited = lb_testkit::wait_for(WAIT, || !second.is_running());
    assert!(exited, "second agent kept running");
    assert!(
        second.log().contains("another lb-agent"),
        "{}",
        second.log()
    );
    assert_eq!(s.client(VIP, 50, Proto::Tcp).ok, 50);
}

#[test]
fn connected_udp_is_balanced() {
    if !require_privileged() {
        return;
    }
    let (u1, u2) = ("127.0.0.11:5353", "127.0.0.12:5353");
    let config = Config::new().service(Service::udp("dns", "10.96.0.10:53").backends(&[u1, u2]));
    let mut s = Scenario::start(&[u1, u2], Proto::Udp, config);
    let report = s.client("10.96.0.10:53", 300, Proto::Udp);
    assert_eq!(report.ok, 300, "{report:?}");
    assert!(report.from(u1) > 0 && report.from(u2) > 0, "{report:?}");
    let accepted = s.stop_backends();
    assert_eq!(accepted[u1] + accepted[u2], 300);
    assert_eq!(s.service_stats("dns").connects, 300);
}

#[test]
fn editing_the_config_file_reloads_without_a_signal() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::start(&[B1, B2], Proto::Tcp, web(&[B1]));
    assert!(s.agent().sigterm_and_wait());
    s.watch_ms = 100;
    s.start_agent();
    s.write_config(web(&[B2]));
    wait_backends(&s.pins, "web", &[B2], WAIT);
    let report = s.client(VIP, 50, Proto::Tcp);
    assert_eq!(report.from(B2), 50, "{report:?}");
    assert!(
        s.agent().log().contains("file changed"),
        "{}",
        s.agent().log()
    );
}

#[test]
fn backend_set_swaps_under_load_fail_no_connect() {
    if !require_privileged() {
        return;
    }
    let sets: [&[&str]; 2] = [&[B1, B2], &[B2, B3]];
    let mut s = Scenario::start(&[B1, B2, B3], Proto::Tcp, web(sets[0]));
    let load = s.steady_load(VIP, Duration::from_millis(1), Duration::from_secs(60));
    for round in 1..=20 {
        let set = sets[round % 2];
        s.write_config(web(set));
        s.agent().sighup();
        wait_backends(&s.pins, "web", set, WAIT);
        // Pacing, not an assertion: let connects run against each set before the next swap.
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = load.stop();
    report.assert_lost_nothing(201, "during swaps");
    let svc = s.service_stats("web");
    assert_eq!(svc.update_races, 0, "{svc:?}");
    assert_eq!(svc.revision, 21, "{svc:?}");
}
