//! Privileged end-to-end test of an agent killed in the middle of a large apply: 5,000
//! services move to other backends, and the agent SIGKILLs itself (`--crash-after-ops`, a
//! hidden flag for this) while the maps hold half the services moved and half not. Under a steady load not one connect fails, nothing lands
//! anywhere but a backend of the old or the new set, and the restarted agent finishes the
//! change exactly: every service on its new backends, and no map entry more or less.

use lb_testkit::config::{Config, Service};
use lb_testkit::stats::{backend_set, map_entries};
use lb_testkit::{agent_stats, procs::Proto, require_privileged, Scenario, SteadyClient};
use std::collections::BTreeSet;
use std::time::Duration;

const SERVICES: usize = 5_000;
const OLD: [&str; 2] = ["127.0.0.11:8080", "127.0.0.12:8080"];
const NEW: [&str; 2] = ["127.0.0.13:8080", "127.0.0.14:8080"];
/// Services under load: the first, one in the middle and the last.
const LOADED: [usize; 3] = [0, SERVICES / 2, SERVICES - 1];
const LOAD_INTERVAL: Duration = Duration::from_millis(2);

fn vip(i: usize) -> String {
    format!("10.96.{}.{}:80", i / 200, i % 200 + 1)
}

fn config(backends: &[&str]) -> Config {
    (0..SERVICES).fold(Config::new(), |c, i| {
        c.service(Service::tcp(&format!("s{i}"), &vip(i)).backends(backends))
    })
}

fn sorted(backends: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    v.sort();
    v
}

/// How many services the maps have on `OLD` and on `NEW` backends.
fn split(s: &Scenario) -> (usize, usize) {
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    let (old, new) = (sorted(&OLD), sorted(&NEW));
    (0..SERVICES).fold((0, 0), |(o, n), i| {
        match backend_set(&stats, &format!("s{i}")) {
            Some(set) if set == old => (o + 1, n),
            Some(set) if set == new => (o, n + 1),
            other => panic!("s{i} has {other:?}: neither the old nor the new backends"),
        }
    })
}

#[test]
fn an_agent_killed_mid_apply_loses_no_connect_and_its_restart_finishes_exactly() {
    if !require_privileged() {
        return;
    }
    let all: Vec<&str> = OLD.iter().chain(&NEW).copied().collect();
    let mut s = Scenario::without_agent(&all, Proto::Tcp);
    s.ready_timeout = Duration::from_secs(120);
    s.write_config(config(&OLD));
    s.agent_args = vec!["--crash-after-ops".into(), "17500".into()];
    s.start_agent();
    let loads: Vec<SteadyClient> = LOADED
        .iter()
        .map(|&i| s.steady_load(&vip(i), LOAD_INTERVAL, Duration::from_secs(300)))
        .collect();

    // The plan moving every service: new backends and tables (15,000 operations), then the
    // 5,000 service entries (flipped in batches), then the old backends (10,000). Killed
    // after 17,500: half the services moved, and the new backends of the others written.
    let reconciles = s.agent().log().matches(" reconciled ").count();
    s.write_config(config(&NEW));
    s.agent().sighup();
    assert!(
        lb_testkit::wait_for(Duration::from_secs(60), || !s.agent().is_running()),
        "the agent did not die mid-apply:\n{}",
        s.agent().log()
    );
    let log = s.agent().log();
    assert!(log.contains("crash test: SIGKILL"), "{log}");
    assert_eq!(log.matches(" reconciled ").count(), reconciles, "{log}");
    let (on_old, on_new) = split(&s);
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    eprintln!("killed with {on_new} services moved and {on_old} not yet");
    assert_eq!((on_new, on_old), (SERVICES / 2, SERVICES / 2));
    assert_eq!(
        map_entries(&stats)[2],
        SERVICES * 4,
        "old and new backends both present"
    );

    // The pinned programs serve on without an agent; the restarted one finishes the change.
    std::thread::sleep(Duration::from_millis(300));
    s.agent = None;
    s.agent_args.clear();
    s.start_agent();
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    let want = sorted(&NEW);
    for i in 0..SERVICES {
        assert_eq!(
            backend_set(&stats, &format!("s{i}")),
            Some(want.clone()),
            "s{i} after the restart"
        );
    }
    assert_eq!(
        map_entries(&stats),
        [SERVICES, SERVICES * 2, SERVICES * 2, SERVICES],
        "map entries (services, slots, backends, names) after the restart"
    );
    for svc in &stats.services {
        assert_eq!(svc.update_races, 0, "{svc:?}");
        assert_eq!(svc.no_backend, 0, "{svc:?}");
    }

    let allowed: BTreeSet<&str> = all.iter().copied().collect();
    for (load, i) in loads.into_iter().zip(LOADED) {
        let report = load.stop();
        report.assert_lost_nothing(200, &format!("through the kill ({})", vip(i)));
        let landed: BTreeSet<&str> = report.by_backend.keys().map(String::as_str).collect();
        assert!(landed.is_subset(&allowed), "{report:?}");
    }
}
