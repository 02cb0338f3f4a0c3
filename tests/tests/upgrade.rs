//! Privileged end-to-end test of an upgrade from the previous release: its agent, built from
//! this repository's git history (`lb_testkit::previous`), runs and balances; under a steady
//! load it is stopped and the current agent takes over the same pin folder and cgroup. Not one
//! connect may fail or reach anything but a backend of its own service.
//!
//! Only the agents' command line is used (`run`, SIGTERM, `stats`), so the test holds whether
//! the current agent adopts the previous one's pinned maps (same layout) or replaces them with
//! its own.

use lb_testkit::config::{Config, Service};
use lb_testkit::previous::{previous_agent, PREVIOUS_LAYOUT_REV};
use lb_testkit::stats::{backend_connects, backend_set, service};
use lb_testkit::{agent_stats, paths, require_privileged, wait_for, ClientReport, Scenario};
use lb_testkit::{procs::Proto, stats::ServiceReport};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const WEB_VIP: &str = "10.96.0.10:80";
const WEB: [&str; 3] = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];
/// A second service, so that a connect sent to the other service's backends shows.
const API_VIP: &str = "10.96.0.20:80";
const API: [&str; 2] = ["127.0.0.21:8080", "127.0.0.22:8080"];
/// Listens, but is in no config: any connect it gets went somewhere it must not.
const DECOY: &str = "127.0.0.99:8080";
const LOAD_INTERVAL: Duration = Duration::from_millis(2);
/// How long the load runs on the previous agent before the upgrade starts.
const BEFORE: Duration = Duration::from_secs(1);
/// Between the previous agent's exit and the current one's start the pinned programs serve
/// on their own, as in a real rolling upgrade.
const GAP: Duration = Duration::from_millis(300);
/// How long the load at least runs after the current agent is ready.
const AFTER: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);
/// Connects a service's load must at least make over the whole test (about 1,100 in 2.5 s
/// here, with room for a slow or busy machine).
const MIN_ATTEMPTS: u64 = 500;

fn config() -> Config {
    Config::new()
        .service(Service::tcp("web", WEB_VIP).backends(&WEB))
        .service(Service::tcp("api", API_VIP).backends(&API))
}

/// Each backend's kernel connect counter, as the current agent's `stats` reads it.
fn connects(s: &Scenario, name: &str, backends: &[&str]) -> BTreeMap<String, u64> {
    let svc: ServiceReport = s.service_stats(name);
    backends
        .iter()
        .map(|b| (b.to_string(), backend_connects(&svc, b)))
        .collect()
}

/// Every connect answered, each by a backend of `backends` (0 misrouted), each of which
/// answered some.
fn assert_served_only_by(report: &ClientReport, backends: &[&str], what: &str) {
    let when = format!("across the upgrade from {PREVIOUS_LAYOUT_REV} ({what})");
    report.assert_lost_nothing(MIN_ATTEMPTS, &when);
    let landed: BTreeSet<&str> = report.by_backend.keys().map(String::as_str).collect();
    let allowed: BTreeSet<&str> = backends.iter().copied().collect();
    assert!(
        landed.is_subset(&allowed),
        "connects misrouted {when}: answered by {:?}: {report:?}",
        landed.difference(&allowed).collect::<Vec<_>>()
    );
    for b in backends {
        assert!(report.from(b) > 0, "{b} never answered {when}: {report:?}");
    }
}

/// What the backends of `backends` accepted in total.
fn accepted_by(accepted: &HashMap<String, u64>, backends: &[&str]) -> u64 {
    backends
        .iter()
        .map(|b| accepted.get(*b).copied().unwrap_or(0))
        .sum()
}

#[test]
fn upgrade_from_the_previous_layout_under_load_loses_and_misroutes_nothing() {
    if !require_privileged() {
        return;
    }
    let previous = previous_agent().unwrap_or_else(|e| panic!("the previous agent: {e:#}"));
    let all: Vec<&str> = WEB.iter().chain(&API).copied().chain([DECOY]).collect();
    let mut s = Scenario::without_agent(&all, Proto::Tcp);
    s.write_config(config());
    s.agent_bin = previous;
    s.start_agent();
    // Read with clients only: the current `stats` need not read the previous layout.
    s.assert_balanced(WEB_VIP, &WEB);
    s.assert_balanced(API_VIP, &API);

    let web_load = s.steady_load(WEB_VIP, LOAD_INTERVAL, Duration::from_secs(30));
    let api_load = s.steady_load(API_VIP, LOAD_INTERVAL, Duration::from_secs(30));
    std::thread::sleep(BEFORE);

    // Kept until the end, so that a failure prints the previous agent's log too.
    let mut old = s.agent.take().expect("the previous agent runs");
    assert!(
        old.sigterm_and_wait(),
        "the previous agent did not exit cleanly"
    );
    let exited = Instant::now();
    std::thread::sleep(GAP);
    s.agent_bin = paths::agent_bin();
    s.start_agent();
    let ready = Instant::now();

    // The current agent's data plane serves: every backend's counter in the maps it reads
    // grows past its value at readiness (all of them: a table with a backend missing fails).
    let (web_at_ready, api_at_ready) = (connects(&s, "web", &WEB), connects(&s, "api", &API));
    let all_grew = wait_for(WAIT, || {
        let (web, api) = (connects(&s, "web", &WEB), connects(&s, "api", &API));
        WEB.iter().all(|b| web[*b] >= web_at_ready[*b] + 10)
            && API.iter().all(|b| api[*b] >= api_at_ready[*b] + 10)
    });
    assert!(
        all_grew,
        "not every backend served through the current agent's maps after the upgrade: at \
         ready web {web_at_ready:?} api {api_at_ready:?}, now web {:?} api {:?}",
        connects(&s, "web", &WEB),
        connects(&s, "api", &API)
    );
    if let Some(rest) = AFTER.checked_sub(ready.elapsed()) {
        std::thread::sleep(rest);
    }
    let web_report = web_load.stop();
    let api_report = api_load.stop();
    eprintln!(
        "upgrade: no agent for {} ms, then the current one ready and serving for {} ms; \
         {} web and {} api connects",
        (ready - exited).as_millis(),
        ready.elapsed().as_millis(),
        web_report.attempts,
        api_report.attempts
    );
    assert_served_only_by(&web_report, &WEB, "web");
    assert_served_only_by(&api_report, &API, "api");

    // Layout 3 keeps its maps in their own folder; layout 2's maps and its retired program's
    // link are gone, the programs' links are the current agent's.
    let log = s.agent().log();
    assert!(
        log.contains("upgraded the layout from=2 to=3"),
        "the current agent did not report the upgrade:\n{log}"
    );
    for gone in [
        "LB_META",
        "LB_REVERSE",
        "LB_SERVICES",
        "lb_sock_release_link",
    ] {
        assert!(!s.pins.path.join(gone).exists(), "{gone} left behind");
    }
    assert!(s.pins.path.join("layout-3/LB_SOCKETS").exists());
    assert!(s.pins.path.join("lb_connect4_link").exists());

    // `stats` works after the upgrade and shows both services with their backends.
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json after the upgrade");
    for (name, backends) in [("web", &WEB[..]), ("api", &API[..])] {
        let mut want: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        want.sort();
        assert_eq!(backend_set(&stats, name), Some(want), "{stats:?}");
        let svc = service(&stats, name).expect("listed");
        assert_eq!(svc.no_backend, 0, "{svc:?}");
        assert_eq!(svc.update_races, 0, "{svc:?}");
    }
    let table = std::process::Command::new(paths::agent_bin())
        .args(["stats", "--interval", "0", "--pin-dir"])
        .arg(&s.pins.path)
        .output()
        .expect("run lb-agent stats");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success() && text.contains("web") && text.contains("api"),
        "lb-agent stats after the upgrade: {}\n{text}{}",
        table.status,
        String::from_utf8_lossy(&table.stderr)
    );

    // The backends' own count: nothing reached the decoy, and each service's backends
    // accepted exactly what its clients saw answered (plus assert_balanced's 120).
    let accepted = s.stop_backends();
    assert_eq!(accepted.get(DECOY).copied().unwrap_or(0), 0, "{accepted:?}");
    assert_eq!(
        accepted_by(&accepted, &WEB),
        web_report.ok + 120,
        "{accepted:?}"
    );
    assert_eq!(
        accepted_by(&accepted, &API),
        api_report.ok + 120,
        "{accepted:?}"
    );
    drop(old);
}
