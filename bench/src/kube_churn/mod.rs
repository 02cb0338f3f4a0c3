//! Kubernetes churn (`lb-bench kube-churn`): the release agent against the kube mock with many
//! Services and EndpointSlices; after the initial sync, endpoint changes at a steady rate, each
//! timed from the mock writing it to the agent's watch to the agent's maps holding it. Also
//! whether every change was applied, how `/healthz` answered meanwhile, and the agent's CPU and
//! memory. Prints a table (and writes it with `--out`); nothing here asserts on time.
//!
//! Both ends are read where they happen, on one clock (CLOCK_MONOTONIC, shared by every
//! process of the host): the mock stamps each change's event right after writing it to the
//! watch connection, and the bench reads the changed services' entries in the pinned maps
//! (a hash lookup and a few memory-mapped words each) every `POLL`. A change counts as applied
//! when its service's backends are exactly the set the change leads to; no service ever gets
//! the same set twice (see `events`), so a set names one change, and a seen time is late by at
//! most one read pass, never early.

mod events;
mod track;

use crate::process::{reconcile_micros, require_root, usage};
use anyhow::{bail, Context, Result};
use events::Cluster;
use lb_testkit::config::{Config, Table};
use lb_testkit::kube_mock::Kind;
use lb_testkit::procs::{monotonic_micros, Proto};
use lb_testkit::{http_status, KubeMock, Scenario, TestNet};
use lb_userspace::codec::{service_key, socket_addr};
use lb_userspace::config::Protocol;
use lb_userspace::datapath::maps::Maps;
use lb_userspace::datapath::pinned::PinnedMaps;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use track::{Outcome, Tracker};

/// How often the pending services' entries are read.
const POLL: Duration = Duration::from_millis(2);
/// How often `/healthz` is asked.
const PROBE: Duration = Duration::from_millis(100);
const HTTP: &str = "127.0.0.1:9901";
/// Endpoints per service in the initial state.
const PER_SERVICE: usize = 5;
/// From agent start to the maps holding the whole initial state.
const SYNC_BUDGET: Duration = Duration::from_secs(300);
/// After the last change, how long the rest may take to show.
const DRAIN: Duration = Duration::from_secs(15);

pub struct Plan {
    pub services: usize,
    /// Changes per second.
    pub rate: u32,
    pub seconds: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                services: 1_000,
                rate: 100,
                seconds: 10,
            }
        } else {
            Plan {
                services: 10_000,
                rate: 100,
                seconds: 60,
            }
        }
    }
}

/// What a run measured, for the table.
struct Report {
    services: usize,
    rate: u32,
    seconds: u64,
    /// Agent start to the maps holding the initial state.
    sync: Duration,
    sync_peak_rss_kib: u64,
    outcome: Outcome,
    ops: [usize; 3],
    /// The agent's reconciles during the churn, by its own clock (µs), sorted.
    reconciles: Vec<u64>,
    /// The longest gap between two read passes: how late a seen time may be.
    poll_gap: Duration,
    /// The furthest a change was sent behind its schedule.
    send_lag: Duration,
    probes: usize,
    probe_failures: usize,
    probe_worst: Duration,
    cpu_percent: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
    load: (f64, f64),
}

pub fn run(plan: &Plan, out: Option<&Path>, quick: bool) -> Result<()> {
    require_root()?;
    if plan.services == 0 || plan.rate == 0 || plan.seconds == 0 {
        bail!("kube-churn needs services, a rate and seconds above zero");
    }
    let load_before = load_average();
    let mut cluster = Cluster::new(plan.services, PER_SERVICE);
    eprintln!(
        "bench: kube churn: {} services × {PER_SERVICE} endpoints, {} changes/s for {} s",
        plan.services, plan.rate, plan.seconds
    );
    // Dropped in reverse order on every way out: mock, then agent, pins, cgroup, namespace.
    let mut s = Scenario::without_agent(&[], Proto::Tcp);
    let mock = KubeMock::start(&s.net);
    let n = cluster.services();
    let services: Vec<_> = (0..n).map(|i| cluster.service_object(i)).collect();
    let slices: Vec<_> = (0..n).map(|i| cluster.slice_object(i)).collect();
    mock.set(&services, &slices);
    drop((services, slices));
    let dir = s.config.parent().context("config folder")?.to_path_buf();
    let kubeconfig = mock.kubeconfig(&dir).display().to_string();
    s.write_config(Config::new().kubernetes(Table::new().set("kubeconfig", kubeconfig)));
    s.agent_args = ["--http-listen", HTTP, "--metrics-listen", "off"]
        .map(String::from)
        .to_vec();
    s.ready_timeout = SYNC_BUDGET;
    let t0 = Instant::now();
    s.start_agent();
    let maps = wait_synced(&s, &cluster, t0)?;
    let sync = t0.elapsed();
    let agent = s.agent.as_ref().context("agent")?;
    let pid = agent.pid();
    let sync_peak_rss_kib = agent.peak_rss_kib();
    agent.reset_peak_rss();
    let reconciles_before = reconcile_micros(&agent.log()).len();
    eprintln!(
        "bench: kube churn: initial sync in {:.1} s; churning",
        sync.as_secs_f64()
    );
    let (cpu0, _) = usage(pid)?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let (churn, probes) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| probe(&s.net, &stop));
        let churn = churn(plan, &mut cluster, &mock, &maps);
        stop.store(true, Ordering::Relaxed);
        (churn, prober.join().unwrap_or_default())
    });
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, rss_kib) = usage(pid)?;
    let agent = s.agent.as_ref().context("agent")?;
    let outcome = Outcome::of(churn.sent, &mock.emitted(), churn.tracker.seen());
    let mut reconciles = reconcile_micros(&agent.log()).split_off(reconciles_before);
    reconciles.sort_unstable();
    let report = Report {
        services: n,
        rate: plan.rate,
        seconds: plan.seconds,
        sync,
        sync_peak_rss_kib,
        outcome,
        ops: churn.ops,
        reconciles,
        poll_gap: churn.poll_gap,
        send_lag: churn.send_lag,
        probes: probes.len(),
        probe_failures: probes.iter().filter(|(_, ok)| !ok).count(),
        probe_worst: probes.iter().map(|(d, _)| *d).max().unwrap_or_default(),
        cpu_percent: 100.0 * (cpu1 - cpu0) / wall,
        rss_kib,
        peak_rss_kib: agent.peak_rss_kib(),
        load: (load_before, load_average()),
    };
    let text = report.markdown();
    println!("{text}");
    if let Some(dir) = out {
        let name = if quick {
            "kube-churn-quick.md"
        } else {
            "kube-churn.md"
        };
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        std::fs::write(&path, format!("# Kubernetes churn\n\n{text}"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Waits until `/readyz` says the first sync is in the maps, then until the maps hold every
/// service's initial backends exactly.
fn wait_synced(s: &Scenario, cluster: &Cluster, t0: Instant) -> Result<PinnedMaps> {
    let ready = lb_testkit::wait_for(SYNC_BUDGET, || {
        http_status(&s.net, HTTP, "/readyz") == Some(200)
    });
    if !ready {
        bail!("/readyz not 200 within {SYNC_BUDGET:?}");
    }
    let maps = PinnedMaps::open(&s.pins.path)?;
    let mut next = 0;
    while next < cluster.services() {
        if cluster.backends(next) == held(&maps, Cluster::vip(next)) {
            next += 1;
        } else if t0.elapsed() > SYNC_BUDGET {
            bail!("service {next} not as listed within {SYNC_BUDGET:?} of the agent's start");
        } else {
            std::thread::sleep(POLL);
        }
    }
    Ok(maps)
}

/// The backends a service's table names now (empty if it has none or is not installed; a
/// table caught mid-rewrite reads as what it names, which no change leads to).
fn held(maps: &PinnedMaps, vip: SocketAddr) -> BTreeSet<SocketAddr> {
    let Ok(Some(value)) = maps.service(&service_key(vip, Protocol::Tcp)) else {
        return BTreeSet::new();
    };
    let ids: BTreeSet<u32> = maps
        .slots(value.slot_base, value.slot_count)
        .unwrap_or_default()
        .into_iter()
        .collect();
    ids.into_iter()
        .filter_map(|id| maps.backend(id))
        .filter(|b| b.service_id == value.id)
        .map(|b| socket_addr(&b))
        .collect()
}

struct Churn {
    sent: usize,
    /// Additions, removals and replacements sent.
    ops: [usize; 3],
    tracker: Tracker,
    poll_gap: Duration,
    send_lag: Duration,
}

/// Sends `rate × seconds` changes on schedule and reads the maps of the services with changes
/// pending, until all are seen or `DRAIN` after the last one; bounded by the schedule, the
/// drain and a margin whatever happens.
fn churn(plan: &Plan, cluster: &mut Cluster, mock: &KubeMock, maps: &PinnedMaps) -> Churn {
    let total = plan.rate as usize * plan.seconds as usize;
    let every = Duration::from_secs(1) / plan.rate;
    let start = Instant::now();
    let hard_stop = start + Duration::from_secs(plan.seconds) + DRAIN + Duration::from_secs(30);
    let mut c = Churn {
        sent: 0,
        ops: [0; 3],
        tracker: Tracker::default(),
        poll_gap: Duration::ZERO,
        send_lag: Duration::ZERO,
    };
    let mut last_pass = Instant::now();
    let mut drain_until = None;
    loop {
        let now = Instant::now();
        while c.sent < total && now >= start + every * c.sent as u32 {
            let due = start + every * c.sent as u32;
            c.send_lag = c.send_lag.max(now - due);
            let e = cluster.next_event();
            c.ops[e.op as usize] += 1;
            c.tracker.sent(e.index, e.service, e.backends);
            mock.put(Kind::EndpointSlice, &e.slice, Some(&e.index.to_string()));
            c.sent += 1;
        }
        let pass = Instant::now();
        c.poll_gap = c.poll_gap.max(pass - last_pass);
        last_pass = pass;
        for service in c.tracker.services() {
            let set = held(maps, Cluster::vip(service));
            c.tracker.observe(service, &set, monotonic_micros());
        }
        if c.sent == total {
            let until = *drain_until.get_or_insert(Instant::now() + DRAIN);
            if c.tracker.pending() == 0 || Instant::now() > until {
                break;
            }
        }
        if Instant::now() > hard_stop {
            break;
        }
        let mut wake = pass + POLL;
        if c.sent < total {
            wake = wake.min(start + every * c.sent as u32);
        }
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    c
}

/// `/healthz` every `PROBE` until `stop`: (time to answer, answered 200).
fn probe(net: &TestNet, stop: &AtomicBool) -> Vec<(Duration, bool)> {
    let mut probes = Vec::new();
    // Bounded by `stop` and, should the churn never end, by a count.
    while !stop.load(Ordering::Relaxed) && probes.len() < 100_000 {
        let t = Instant::now();
        let ok = http_status(net, HTTP, "/healthz") == Some(200);
        probes.push((t.elapsed(), ok));
        std::thread::sleep(PROBE.saturating_sub(t.elapsed()));
    }
    probes
}

/// The 1-minute load average: other work on the machine shows here.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Report {
    fn markdown(&self) -> String {
        let ms = |us: Option<u64>| us.map_or("-".into(), |u| format!("{:.1}", u as f64 / 1e3));
        let o = &self.outcome;
        let mib = |kib: u64| kib as f64 / 1024.0;
        format!(
            "{} Services × {PER_SERVICE} endpoints (one EndpointSlice each), {} endpoint \
             changes/s for {} s (additions, removals and replacements in turn, each service \
             changed at most once per {} changes). Latency: from the mock writing the event to \
             the agent's watch to the pinned maps holding the service's new backends (read \
             every {} ms; the longest gap between reads was {:.1} ms, so a time may be late by \
             that much). Load average {:.2} before, {:.2} after{}.\n\n\
             | initial sync (agent start → maps hold all) | peak RSS during sync |\n\
             |---|---|\n\
             | {:.1} s | {:.0} MiB |\n\n\
             | changes sent | emitted to the watch | applied | p50 | p99 | max | /healthz probes (not 200) | /healthz worst | agent CPU (% of a core) | agent RSS (peak) |\n\
             |---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} ms | {} ms | {} ms | {} ({}) | {:.1} ms | {:.0} | {:.0} MiB ({:.0} MiB) |\n\n\
             The changes: {} additions, {} removals, {} replacements, sent at most {:.1} ms \
             behind their schedule. The agent reconciled {} times meanwhile, each taking {} ms \
             (p50) and at most {} ms by its own clock (`reconciled … micros=`); the rest of a \
             change's latency is the watch, the batching of changes (a batch closes 50 ms after \
             its last change or 100 ms after its first) and the translation.\n",
            self.services,
            self.rate,
            self.seconds,
            self.services,
            POLL.as_millis(),
            self.poll_gap.as_secs_f64() * 1e3,
            self.load.0,
            self.load.1,
            if self.load.0.max(self.load.1) > 2.0 {
                // The benchmark itself keeps about one core busy (agent, mock, reads).
                ": other work shared the machine, so read the times as such"
            } else {
                ""
            },
            self.sync.as_secs_f64(),
            mib(self.sync_peak_rss_kib),
            o.sent,
            o.emitted,
            o.applied,
            ms(o.quantile(0.5)),
            ms(o.quantile(0.99)),
            ms(o.latencies.last().copied()),
            self.probes,
            self.probe_failures,
            self.probe_worst.as_secs_f64() * 1e3,
            self.cpu_percent,
            mib(self.rss_kib),
            mib(self.peak_rss_kib),
            self.ops[0],
            self.ops[1],
            self.ops[2],
            self.send_lag.as_secs_f64() * 1e3,
            self.reconciles.len(),
            ms(self.reconciles.get(self.reconciles.len() / 2).copied()),
            ms(self.reconciles.last().copied()),
        )
    }
}
