//! Privileged end-to-end test of an agent killed in the middle of a large apply: 5,000
//! services move to other backends, and the agent is SIGKILLed while the maps hold some
//! services moved and some not. Under a steady load not one connect fails, nothing lands
//! anywhere but a backend of the old or the new set, and the restarted agent finishes the
//! change exactly: every service on its new backends, and no map entry more or less.

use lb_testkit::config::{Config, Service};
use lb_testkit::stats::{backend_set, map_entries};
use lb_testkit::{agent_stats, procs::Proto, require_privileged, Scenario, SteadyClient};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SERVICES: usize = 5_000;
const OLD: [&str; 2] = ["127.0.0.11:8080", "127.0.0.12:8080"];
const NEW: [&str; 2] = ["127.0.0.13:8080", "127.0.0.14:8080"];
/// Services under load: the first, one in the middle and the last.
const LOADED: [usize; 3] = [0, SERVICES / 2, SERVICES - 1];
const LOAD_INTERVAL: Duration = Duration::from_millis(2);
const ATTEMPTS: usize = 12;

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

fn reconciles(s: &mut Scenario) -> usize {
    s.agent().log().matches(" reconciled ").count()
}

/// SIGHUP to the agent's `reconciled` line, and the line's own `micros` (the plan and its
/// apply, without reading the file).
fn change_time(s: &mut Scenario, to: &[&str]) -> (Duration, Duration) {
    let before = reconciles(s);
    s.write_config(config(to));
    let t0 = Instant::now();
    s.agent().sighup();
    assert!(
        lb_testkit::wait_for(Duration::from_secs(60), || reconciles(s) > before),
        "the change was not applied:\n{}",
        s.agent().log()
    );
    let total = t0.elapsed();
    let log = s.agent().log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" reconciled "))
        .unwrap();
    let micros = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("micros="))
        .and_then(|m| m.parse().ok())
        .expect("reconciled micros=");
    (total, Duration::from_micros(micros))
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
    s.start_agent();
    let loads: Vec<SteadyClient> = LOADED
        .iter()
        .map(|&i| s.steady_load(&vip(i), LOAD_INTERVAL, Duration::from_secs(300)))
        .collect();

    // How long a whole change takes here, and how much of it is the apply: the kill aims at
    // the middle of the apply, and moves until it lands there.
    let (total, apply) = change_time(&mut s, &NEW);
    let mut current: &[&str] = &NEW;
    let mut delay = total.saturating_sub(apply / 2);
    let mut mixed = None;
    // The latest kill that found nothing moved, and the earliest that found everything moved.
    let (mut early, mut late) = (None, None);
    for attempt in 0..ATTEMPTS {
        let target: &[&str] = if current == NEW { &OLD } else { &NEW };
        s.write_config(config(target));
        s.agent().sighup();
        std::thread::sleep(delay);
        s.agent().sigkill();
        let (on_old, on_new) = split(&s);
        let (moved, kept) = if target == OLD {
            (on_old, on_new)
        } else {
            (on_new, on_old)
        };
        eprintln!(
            "attempt {attempt}: killed {} ms after SIGHUP: {moved} moved, {kept} not yet",
            delay.as_millis()
        );
        current = target;
        if moved > 0 && kept > 0 {
            mixed = Some((moved, kept));
            break;
        }
        // Too early or too late: halve the window the apply must lie in, then let a fresh
        // agent finish this change.
        if moved == 0 {
            early = Some(delay);
        } else {
            late = Some(delay);
        }
        delay = match (early, late) {
            (Some(e), Some(l)) => (e + l) / 2,
            (Some(e), None) => e + apply / 2,
            (None, Some(l)) => l.saturating_sub(apply / 2),
            (None, None) => unreachable!(),
        };
        s.agent = None;
        s.start_agent();
    }
    let (moved, kept) = mixed.unwrap_or_else(|| {
        panic!("no kill in {ATTEMPTS} attempts landed in the middle of the apply")
    });
    eprintln!("killed with {moved} services moved and {kept} not yet");

    // The pinned programs serve on without an agent; the restarted one finishes the change.
    std::thread::sleep(Duration::from_millis(300));
    s.agent = None;
    s.start_agent();
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    let want = sorted(current);
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
