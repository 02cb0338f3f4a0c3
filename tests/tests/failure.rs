//! Privileged failure tests: the agent killed or replaced under load, and backends churned fast
//! under load. Real agent binary, real sockets in the test's own namespace (lo only, no route
//! out: a VIP connect left untranslated fails with ENETUNREACH) and clients in a child cgroup.

use lb_testkit::config::{Config, Service};
use lb_testkit::procs::{monotonic_micros, read_accept_log, Backends, Proto};
use lb_testkit::stats::{backend_set, has_backend, map_entries, ServiceReport};
use lb_testkit::{
    agent_stats, require_privileged, wait_backends, wait_for, PinDir, Scenario, SteadyClient,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";
const API_VIP: &str = "10.96.0.20:80";
const B1: &str = "127.0.0.11:8080";
const B2: &str = "127.0.0.12:8080";
const B3: &str = "127.0.0.13:8080";
/// The second service's only backend in the upgrade test.
const A1: &str = "127.0.0.21:8080";
/// Listens, but is in no config: any connect it gets went somewhere it must not.
const DECOY: &str = "127.0.0.99:8080";
const WAIT: Duration = Duration::from_secs(10);
/// Steady load: one connect per millisecond (plus the exchange itself).
const LOAD_INTERVAL: Duration = Duration::from_millis(1);

fn web(backends: &[&str]) -> Config {
    Config::new().service(Service::tcp("web", VIP).backends(backends))
}

/// Per backend address of a service's stats: (backend id, connects counter).
fn backend_counters(svc: &ServiceReport) -> BTreeMap<String, (u32, u64)> {
    svc.backends
        .iter()
        .map(|b| (b.address.clone(), (b.id.expect("id"), b.connects)))
        .collect()
}

/// Waits (bounded) until `web`'s service counter reached `n`: the load is really running.
fn wait_connects(s: &Scenario, n: u64) {
    let ok = wait_for(WAIT, || s.service_stats("web").connects >= n);
    assert!(
        ok,
        "load never reached {n} connects: {:?}",
        s.service_stats("web")
    );
}

/// Steady connects to the VIP, already balancing when this returns.
fn start_load(s: &Scenario) -> SteadyClient {
    let load = s.steady_load(VIP, LOAD_INTERVAL, Duration::from_secs(30));
    wait_connects(s, 100);
    load
}

#[test]
fn agent_sigkill_under_load_then_restart_loses_nothing() {
    if !require_privileged() {
        return;
    }
    let backends = [B1, B2, B3];
    let mut s = Scenario::start(&backends, Proto::Tcp, web(&backends));
    let load = start_load(&s);
    let before = s.service_stats("web");

    s.agent().sigkill();
    s.agent = None;
    std::thread::sleep(Duration::from_secs(1));
    // No agent: the pinned program and maps balance on their own.
    let headless = s.service_stats("web");
    assert!(
        headless.connects >= before.connects + 100,
        "little or no balancing without an agent: before {before:?}, after 1 s {headless:?}"
    );

    s.start_agent_adopting();
    let adopted = s.service_stats("web");
    // Adopted, not rewritten: same service id and revision (an unchanged service gets no new
    // table), the same backend ids, counters continuing from where they were.
    for (key, was, is) in [
        ("id", before.id, adopted.id),
        ("revision", before.revision, adopted.revision),
        ("slots", before.slots, adopted.slots),
    ] {
        assert_eq!(
            is, was,
            "{key} changed on restart: {before:?} -> {adopted:?}"
        );
    }
    let (c_before, c_headless, c_adopted) = (
        backend_counters(&before),
        backend_counters(&headless),
        backend_counters(&adopted),
    );
    let listed: Vec<&str> = c_adopted.keys().map(String::as_str).collect();
    assert_eq!(listed, backends, "{adopted:?}");
    for b in backends {
        let (id0, n0) = c_before[b];
        let (id1, n1) = c_headless[b];
        let (id2, n2) = c_adopted[b];
        assert!(
            id0 == id1 && id1 == id2,
            "{b}: backend id changed {id0} -> {id1} -> {id2}"
        );
        assert!(
            n0 <= n1 && n1 <= n2,
            "{b}: counter went back {n0} -> {n1} -> {n2}"
        );
    }

    // Every backend still served after the restart: its counter grows past the adopted value.
    let all_grew = wait_for(WAIT, || {
        let now = backend_counters(&s.service_stats("web"));
        backends.iter().all(|b| now[*b].1 > c_adopted[*b].1 + 10)
    });
    assert!(
        all_grew,
        "not every backend served after restart: {:?}",
        s.service_stats("web")
    );
    let report = load.stop();
    let last = s.service_stats("web");
    report.assert_lost_nothing(500, "across SIGKILL, 1 s without agent and restart");
    for b in backends {
        assert!(report.from(b) > 0, "{b} never answered: {report:?}");
    }
    // Nothing was ever reset: every connect the client made since the start is counted.
    assert_eq!(
        last.connects, report.ok,
        "service counter vs client: {last:?}"
    );
    assert_eq!(last.no_backend, 0, "{last:?}");
    assert_eq!(last.update_races, 0, "{last:?}");
    let accepted = s.stop_backends();
    lb_testkit::stats::assert_counts_agree(&last, &accepted, &report, &backends);
}

#[test]
fn agent_upgrade_with_a_different_config_has_no_empty_window() {
    if !require_privileged() {
        return;
    }
    let config_x = web(&[B1, B2]);
    let config_y = web(&[B2, B3]).service(Service::tcp("api", API_VIP).backends(&[A1]));
    let mut s = Scenario::start(&[B1, B2, B3, A1, DECOY], Proto::Tcp, config_x);
    let load = start_load(&s);
    let old = s.service_stats("web");

    assert!(s.agent().sigterm_and_wait(), "agent A did not exit cleanly");
    s.agent = None;
    // A gap between the two agents, as in a real upgrade: the pins keep serving config X.
    std::thread::sleep(Duration::from_millis(300));
    s.write_config(config_y);
    s.start_agent();
    wait_backends(&s.pins, "web", &[B2, B3], WAIT);
    let new = s.service_stats("web");
    assert_eq!(
        new.id, old.id,
        "service re-created instead of updated: {old:?} -> {new:?}"
    );
    assert_eq!(
        new.revision,
        old.revision + 1,
        "X -> Y must be exactly one table flip: {old:?} -> {new:?}"
    );
    // Load keeps running on Y for a while: B3 (only in Y) gets a share.
    let b3_served = wait_for(WAIT, || {
        backend_counters(&s.service_stats("web"))
            .get(B3)
            .map_or(0, |c| c.1)
            >= 20
    });
    assert!(
        b3_served,
        "B3 never served after the upgrade: {:?}",
        s.service_stats("web")
    );
    let report = load.stop();
    report.assert_lost_nothing(300, "across SIGTERM, the gap and the new agent");
    assert!(
        report.from(B1) > 0,
        "B1 (config X) never served: {report:?}"
    );
    assert!(
        report.from(B3) > 0,
        "B3 (config Y) never served: {report:?}"
    );
    let landed: BTreeSet<&str> = report.by_backend.keys().map(String::as_str).collect();
    assert!(
        landed.is_subset(&BTreeSet::from([B1, B2, B3])),
        "connects outside X ∪ Y: {report:?}"
    );

    // Final state: exactly Y.
    let stats = agent_stats(&s.pins).expect("stats");
    assert_eq!(backend_set(&stats, "web").unwrap(), [B2, B3], "{stats:?}");
    assert_eq!(backend_set(&stats, "api").unwrap(), [A1], "{stats:?}");
    // Old table, B1's backend entry: gone. 2 services, 2 + 1 slots, 3 backends, 2 names.
    assert_eq!(map_entries(&stats), [2, 3, 3, 2], "{stats:?}");
    s.assert_balanced(VIP, &[B2, B3]);
    let api = s.client(API_VIP, 50, Proto::Tcp);
    assert_eq!(api.from(A1), 50, "{api:?}");

    let accepted = s.stop_backends();
    assert_eq!(
        accepted[DECOY], 0,
        "a backend in neither config was reached"
    );
    assert_eq!(accepted[A1], 50, "web traffic reached api's backend");
    assert_eq!(
        accepted[B1],
        report.from(B1),
        "B1 reached after the upgrade"
    );
    assert_eq!(accepted[B1] + accepted[B2] + accepted[B3], report.ok + 120);
}

/// Churned backends: each is added and removed in turn, so one address is out of the service
/// for most of its rotation (4 × 100 ms of every 500 ms) and a late connect to it shows.
const CHURN: [&str; 5] = [
    "127.0.0.31:8080",
    "127.0.0.32:8080",
    "127.0.0.33:8080",
    "127.0.0.34:8080",
    "127.0.0.35:8080",
];
const CHURN_ITERATIONS: usize = 300;
const CHURN_PERIOD: Duration = Duration::from_millis(100);
const CHURN_MAX: Duration = Duration::from_secs(40);
/// How long a churned backend stays in the service per iteration (after the add is visible).
const CHURN_DWELL: Duration = Duration::from_millis(25);
/// A connect is translated inside connect(), reading the service entry once. One that read the
/// entry just before the removal flip is translated to the removed backend; on loopback the
/// handshake completes within that same connect() call and the connection then waits in the
/// accept queue until the backend's accept thread runs and stamps it, which is a wake-up and a
/// scheduling delay: microseconds on an idle machine, a few milliseconds on a busy one. The
/// client is sequential (it waits for each answer before the next connect), so at most one
/// such connect exists per flip. 50 ms covers that lag with a wide margin and is still a
/// small fraction of the ~400 ms each address is out of the service per rotation.
const GRACE_MICROS: u64 = 50_000;

/// Polls the pinned maps (bounded) until `web` does (`present`) or does not list `addr`;
/// returns CLOCK_MONOTONIC taken after the `stats` process that saw it had exited, so the
/// returned time is after the map state it observed was written.
fn wait_membership(pins: &PinDir, addr: &str, present: bool) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = agent_stats(pins);
        let seen = monotonic_micros();
        if stats.as_ref().and_then(|s| has_backend(s, "web", addr)) == Some(present) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never {} in web: {stats:?}",
            if present { "appeared" } else { "disappeared" }
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// When a churned backend may legitimately accept: from before its add's config write to
/// after its removal was seen in the maps (plus the grace).
struct Window {
    addr: &'static str,
    from: u64,
    removed_seen: u64,
}

#[test]
fn backend_churn_ten_per_second_for_thirty_seconds() {
    if !require_privileged() {
        return;
    }
    let stable = [B1, B2];
    let mut s = Scenario::start(&stable, Proto::Tcp, web(&stable));
    let log = s.config.with_extension("accepts.log");
    let churned = Backends::start_logged(&s.net, &CHURN, Proto::Tcp, &log);
    let baseline_stats = agent_stats(&s.pins).expect("stats");
    let baseline = map_entries(&baseline_stats);
    assert_eq!(baseline, [1, 2, 2, 1], "{baseline_stats:?}");

    let load = s.steady_load(VIP, LOAD_INTERVAL, Duration::from_secs(45));
    let started = Instant::now();
    let mut windows = Vec::new();
    let mut seen_after_hup = Vec::new();
    for i in 0..CHURN_ITERATIONS {
        if started.elapsed() > CHURN_MAX {
            break;
        }
        let tick = Instant::now();
        let addr = CHURN[i % CHURN.len()];
        let from = monotonic_micros();
        s.write_config(web(&[B1, B2, addr]));
        s.agent().sighup();
        wait_membership(&s.pins, addr, true);
        std::thread::sleep(CHURN_DWELL);
        s.write_config(web(&stable));
        let removal_sent = monotonic_micros();
        s.agent().sighup();
        let removed_seen = wait_membership(&s.pins, addr, false);
        // The flip lies between these two: how loosely `removed_seen` bounds it.
        seen_after_hup.push(removed_seen - removal_sent);
        windows.push(Window {
            addr,
            from,
            removed_seen,
        });
        if let Some(rest) = CHURN_PERIOD.checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let churn_time = started.elapsed();
    let report = load.stop();
    let accepted = churned.stop();
    let accepts = read_accept_log(&log);
    let stats = agent_stats(&s.pins).expect("stats");
    let iterations = windows.len();
    eprintln!(
        "churn: {iterations} add/remove cycles in {churn_time:?}; load {} connects, {} to \
         churned backends",
        report.attempts,
        accepts.len()
    );
    assert!(
        iterations >= 250,
        "only {iterations} churn cycles in {churn_time:?}: not 10 per second"
    );

    // (a) Nothing failed.
    report.assert_lost_nothing(5_000, "during churn");
    let svc = lb_testkit::stats::service(&stats, "web").expect("web");
    assert_eq!(svc.update_races, 0, "{svc:?}");
    assert_eq!(svc.no_backend, 0, "{svc:?}");
    assert_eq!(
        svc.revision,
        1 + 2 * iterations as u32,
        "every add and every removal is one flip: {svc:?}"
    );

    // (b) No connect reached a churned backend after its removal flip (+ grace). The accept
    // log is complete: it has one line per connection each backend counted, and the client
    // saw an answer for each.
    let logged: u64 = accepts.len() as u64;
    assert_eq!(
        logged,
        accepted.values().sum::<u64>(),
        "accept log incomplete"
    );
    let answered: u64 = CHURN.iter().map(|c| report.from(c)).sum();
    assert_eq!(logged, answered, "client vs churned backends: {report:?}");
    assert!(
        logged >= iterations as u64,
        "churned backends got too little traffic ({logged}) to prove anything"
    );
    let mut late = Vec::new();
    let mut in_grace = 0;
    for a in &accepts {
        let t = a.monotonic_micros;
        let window = windows
            .iter()
            .filter(|w| w.addr == a.listener)
            .find(|w| w.from <= t && t <= w.removed_seen + GRACE_MICROS);
        match window {
            None => late.push(a),
            Some(w) if t > w.removed_seen => in_grace += 1,
            Some(_) => {}
        }
    }
    seen_after_hup.sort_unstable();
    eprintln!(
        "churn: removal seen in the maps {} µs (median) / {} µs (max) after its SIGHUP; {in_grace} \
         accepts within the grace after a removal was seen",
        seen_after_hup[seen_after_hup.len() / 2],
        seen_after_hup.last().copied().unwrap_or(0)
    );
    // For the message: the first late accept and the last window of its address before it.
    let context = late.first().map(|a| {
        let before = windows
            .iter()
            .rev()
            .find(|w| w.addr == a.listener && w.from <= a.monotonic_micros)
            .map(|w| (w.from, w.removed_seen));
        (a, before)
    });
    assert!(
        late.is_empty(),
        "{} connects reached a churned backend outside its membership; first one and the \
         (added-from, removal-seen) µs window of that address before it: {context:?}",
        late.len()
    );

    // (c) Same config as before the churn: the same number of entries in every map.
    assert_eq!(
        map_entries(&stats),
        baseline,
        "map entries leaked by churn (services, slots, backends, names): {stats:?}"
    );
    assert_eq!(backend_set(&stats, "web").unwrap(), [B1, B2], "{stats:?}");
}
