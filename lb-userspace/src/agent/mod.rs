//! `lb-agent run`: attach, reconcile the maps to the config, the answers of discovery sources
//! and the health of backends, then follow config changes (SIGHUP or the file changing),
//! discovery answers and health transitions until SIGTERM/SIGINT. Exiting leaves the pins, so traffic keeps being balanced by the last applied
//! state while no agent runs.

use crate::admission::health::runner::{self, HealthRunner};
use crate::admission::outlier::{self, Outliers};
use crate::catalog;
use crate::codec::service_key;
use crate::config::Terminate;
use crate::datapath::apply::apply;
use crate::datapath::capacity::{Capacity, Requested};
use crate::datapath::maps::Maps;
use crate::datapath::mirror::Mirror;
use crate::datapath::ops::Op;
use crate::datapath::pinned::PinnedMaps;
use crate::datapath::reconcile::{Scope, Steps, Summary};
use crate::lifecycle::loader::{self, LoadOptions};
use crate::lifecycle::{cgroup, lock, pod_cgroups};
use crate::observe::http::{self, Endpoints, Readiness};
use crate::sources::kubernetes::{self, Kubernetes};
use crate::sources::Discovery;
use crate::status;
use crate::{config, plan};
use anyhow::{Context, Result};
use lb_common::ServiceKey;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

mod rebalancing;
mod terminating;
mod status_file;

pub struct RunArgs {
    pub config: PathBuf,
    /// Sizes asked for the maps, if this agent creates them.
    pub capacity: Requested,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    /// How often the config file is compared with what was last read; `None` disables it.
    pub watch_interval: Option<Duration>,
    pub bpf_log: bool,
    /// Where `/healthz` and `/readyz` are served; `None` = not at all.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Where `/metrics` is served; `None` = not at all.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Crash tests: SIGKILL itself this many operations into a plan after the first.
    pub crash_after_ops: Option<usize>,
}

/// How often health state is published for `lb-agent stats`.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How often `[dataplane] bypass` patterns and annotated pods are matched again, for cgroups
/// created since (a cgroup created below a bypassed one needs no new match: the kernel checks
/// ancestors).
const BYPASS_RESCAN: Duration = Duration::from_secs(2);

pub async fn run(args: RunArgs) -> Result<()> {
    // Validate before touching any kernel state: a bad config must not half-start the agent.
    let config = config::load(&args.config)?;
    args.capacity.check()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup::cgroup2_root()?,
    };
    let _lock = lock::acquire(&args.pin_dir)?;
    loader::prepare_pin_dir(&args.pin_dir)?;
    let load = LoadOptions {
        pin_dir: &args.pin_dir,
        cgroup: &cgroup,
        bpf_log: args.bpf_log,
        count_bytes: config.dataplane.count_bytes,
        capacity: Capacity::for_config(&config, &args.capacity),
    };
    let loaded = loader::load(&load)?;
    if let Some(logger) = loaded.logger {
        tokio::spawn(drain_ebpf_logs(logger));
    }
    let terminating = terminating::Terminating::load(loaded.maps.sockets());
    let (transitions_tx, mut transitions) = mpsc::unbounded_channel();
    let (discovery, mut answers) = Discovery::new();
    let (kubernetes, mut kube_events) = Kubernetes::new();
    let readiness = Readiness::default();
    serve_http(&args, &readiness)?;
    // What the previous agent knew of health and ejections: resumed, so that a restart does
    // not send traffic to backends that were out when it stopped.
    let previous = status::read(&args.pin_dir);
    let mut outliers = Outliers::default();
    let watched = |name: &str| {
        let service = config.services.iter().find(|s| &*s.name == name);
        service.is_some_and(|s| s.outlier.is_some())
    };
    outliers.resume(std::time::Instant::now(), previous.as_ref(), watched);
    if let Some(p) = &previous {
        let down = p.services.values().flat_map(|s| s.backends.values());
        let ejected = p.services.values().map(|s| s.ejected.len()).sum::<usize>();
        info!(
            down = down.filter(|h| !h.healthy).count(),
            ejected, "resuming the previous agent's health and ejections"
        );
    }
    let mut agent = Agent {
        kubernetes,
        readiness,
        maps: loaded.maps,
        mirror: None,
        health: HealthRunner::new(transitions_tx, runner::remembered(previous.as_ref())),
        discovery,
        config,
        wanted: Vec::new(),
        by_name: HashMap::new(),
        vips: catalog::Vips::new(),
        cluster_at: HashMap::new(),
        watches_outliers: false,
        cgroup_root: cgroup::mount_holding(&cgroup).ok(),
        bypass: BTreeMap::new(),
        bypass_problems: Vec::new(),
        pending: None,
        failing_open: BTreeSet::new(),
        dropped: Vec::new(),
        pin_dir: args.pin_dir.clone(),
        cgroup: cgroup.clone(),
        terminating,
        policies: HashMap::new(),
        departed: HashMap::new(),
        rebalancing: rebalancing::Rebalancing::default(),
        rebalances: false,
        crash_after_ops: args.crash_after_ops,
        published_empty: false,
        outliers,
    };
    agent.discovery.sync(&agent.config);
    agent.kubernetes.sync(agent.config.kubernetes.as_ref());
    agent.sync_bypass();
    agent
        .reconcile(Change::Everything)
        .context("initial reconcile failed")?;
    // Only now: programs of a new layout start with the maps they were loaded with.
    loaded.programs.attach(&load)?;
    agent.publish_status();
    info!(services = agent.config.services.len(), "ready");

    let mut watcher = ConfigWatcher::new(&args.config);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let watching = args.watch_interval.is_some();
    let mut watch = tokio::time::interval(args.watch_interval.unwrap_or(Duration::from_secs(3600)));
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    let mut outlier_check = tokio::time::interval(outlier::CHECK_EVERY);
    let mut bypass_rescan = tokio::time::interval(BYPASS_RESCAN);
    let mut rebalance = tokio::time::interval(rebalancing::EVERY);
    let mut terminate_more = tokio::time::interval(terminating::EVERY);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                watcher.changed();
                agent.reload(&args.config, "SIGHUP");
            }
            _ = watch.tick(), if watching => {
                if watcher.changed() {
                    agent.reload(&args.config, "file changed");
                }
            }
            Some(update) = answers.recv() => {
                agent.absorb(update, &mut answers, "discovery", |a, u| {
                    let name = u.service().to_owned();
                    a.discovery.apply(u).then(|| Change::of(name))
                });
            }
            Some(event) = kube_events.recv() => {
                agent.absorb(event, &mut kube_events, "kubernetes", |a, e| {
                    match a.kubernetes.apply(e) {
                        kubernetes::Changed::Nothing => None,
                        kubernetes::Changed::Services(names) => Some(Change::Services(names)),
                        kubernetes::Changed::All => Some(Change::Everything),
                    }
                });
                if agent.kubernetes.take_pods_changed() {
                    agent.sync_bypass();
                }
            }
            Some(service) = transitions.recv() => {
                // A transition always changes what the maps should hold.
                agent.absorb(service, &mut transitions, "health", |_, s| Some(Change::of(s)));
            }
            _ = status.tick() => agent.publish_status(),
            _ = retry_at(agent.pending.as_ref().map(|p| p.at)), if agent.pending.is_some() => {
                agent.retry();
            }
            _ = outlier_check.tick(), if agent.watches_outliers => agent.check_outliers(),
            _ = bypass_rescan.tick(), if !agent.config.dataplane.bypass.is_empty()
                || !agent.kubernetes.bypassed_pods().is_empty() => {
                agent.sync_bypass();
            }
            _ = terminate_more.tick(), if agent.terminating.pending() => {
                let rate = agent.config.dataplane.max_terminations_per_second;
                agent.terminating.pass(rate, &agent.cgroup);
            }
            _ = rebalance.tick(), if agent.rebalances => {
                let mirror = agent.mirror.as_ref();
                agent.rebalancing.pass(&agent.config, mirror, &agent.maps, &agent.cgroup);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!(
        pin_dir = %args.pin_dir.display(),
        "exiting; pinned state stays and keeps balancing (`lb-agent detach` removes it)"
    );
    Ok(())
}

/// `--http-listen` and `--metrics-listen`, on one listener when they name the same address.
fn serve_http(args: &RunArgs, readiness: &Readiness) -> Result<()> {
    let health = args.http_listen.map(|addr| {
        let metrics = (args.metrics_listen == Some(addr)).then(|| args.pin_dir.clone());
        (addr, Endpoints::new(Some(readiness.clone()), metrics))
    });
    let metrics = args
        .metrics_listen
        .filter(|m| Some(*m) != args.http_listen)
        .map(|addr| (addr, Endpoints::new(None, Some(args.pin_dir.clone()))));
    for (addr, endpoints) in health.into_iter().chain(metrics) {
        http::serve(addr, endpoints)?;
    }
    Ok(())
}

/// The first wait before retrying a failed reconcile, doubling up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A reconcile that failed and waits for its retry: the maps differ from the plan.
struct Pending {
    reason: String,
    wait: Duration,
    at: tokio::time::Instant,
}

/// Sleeps until `at` (forever without one; the select guard keeps that branch off then).
async fn retry_at(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a reconcile has to look at.
enum Change {
    /// The config changed, or Kubernetes synced for the first time: every service is
    /// compared with before, and those that differ are planned.
    Everything,
    /// These services' answers, health, ejections or Kubernetes objects changed, and nothing
    /// else did.
    Services(BTreeSet<String>),
}

impl Change {
    fn of(service: String) -> Self {
        Self::Services(BTreeSet::from([service]))
    }

    fn merge(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(Self::Services(mut a)), Some(Self::Services(b))) => {
                a.extend(b);
                Some(Self::Services(a))
            }
            (Some(Self::Everything), _) | (_, Some(Self::Everything)) => Some(Self::Everything),
            (a, b) => a.or(b),
        }
    }
}

/// `terminate_on_removal` by service key for the file's services that do not use the default,
/// and the `previous` policies of services no longer wanted: a removed service's backends go
/// by the policy it had, while a service changed back to the default gets the default.
fn policies(
    config: &config::Config,
    wanted: &[catalog::Service],
    previous: HashMap<ServiceKey, Terminate>,
) -> (
    HashMap<ServiceKey, Terminate>,
    HashMap<ServiceKey, Terminate>,
) {
    let current = (config.services.iter())
        .filter(|s| s.terminate != Terminate::default())
        .map(|s| (service_key(s.vip, s.protocol), s.terminate))
        .collect();
    if previous.is_empty() {
        return (current, HashMap::new());
    }
    let still: HashSet<ServiceKey> = wanted
        .iter()
        .map(|s| service_key(s.vip, s.protocol))
        .collect();
    let departed = previous
        .into_iter()
        .filter(|(key, _)| !still.contains(key))
        .collect();
    (current, departed)
}

/// The services a change touched, by name and by key (a service whose VIP moved has two),
/// and where those still wanted are in `Agent::wanted`.
#[derive(Default)]
struct Touched {
    names: BTreeSet<String>,
    keys: BTreeSet<ServiceKey>,
    positions: Vec<usize>,
}

impl Touched {
    fn between(before: &[catalog::Service], after: &[catalog::Service]) -> Self {
        let mut touched = Self::default();
        let mut add = |s: &catalog::Service| {
            touched.names.insert(s.name.to_string());
            touched.keys.insert(service_key(s.vip, s.protocol));
        };
        let mut old: HashMap<&str, &catalog::Service> =
            before.iter().map(|s| (&*s.name, s)).collect();
        let mut positions = Vec::new();
        for (i, service) in after.iter().enumerate() {
            match old.remove(&*service.name) {
                Some(was) if was == service => continue,
                Some(was) => add(was),
                None => {}
            }
            add(service);
            positions.push(i);
        }
        old.into_values().for_each(add);
        touched.positions = positions;
        touched
    }
}

struct Agent {
    maps: PinnedMaps,
    /// What the maps hold, as of the last reconcile; `None` = read them again.
    mirror: Option<Mirror>,
    health: HealthRunner,
    discovery: Discovery,
    kubernetes: Kubernetes,
    readiness: Readiness,
    /// The config in force: the last valid one read.
    config: config::Config,
    /// The services the maps were last reconciled to (`catalog::effective`).
    wanted: Vec<catalog::Service>,
    /// File services a change may name (discovered, health-checked or outlier-watched), by
    /// name: their place in `config.services` and `wanted`.
    by_name: HashMap<String, usize>,
    /// Every VIP, while some service's backends come from a source (`catalog::effective`
    /// made it; `catalog::refresh` and `catalog::refresh_cluster` check against it).
    vips: catalog::Vips,
    /// The Kubernetes services in `wanted`, by name: their place there.
    cluster_at: HashMap<String, usize>,
    /// Some service has `[service.outlier]`.
    watches_outliers: bool,
    /// The cgroup the programs are attached to.
    cgroup: PathBuf,
    /// Destroys sockets of removed backends, within the rate bound.
    terminating: terminating::Terminating,
    /// `terminate_on_removal` of the services that do not use the default.
    policies: HashMap<ServiceKey, Terminate>,
    /// The policies of services the last config or Kubernetes change removed, for their
    /// backends' sockets.
    departed: HashMap<ServiceKey, Terminate>,
    /// Closing idle connections of services with `[service.rebalance]`.
    rebalancing: rebalancing::Rebalancing,
    /// Some service has `[service.rebalance]`.
    rebalances: bool,
    /// `RunArgs::crash_after_ops`, armed once the first plan is applied.
    crash_after_ops: Option<usize>,
    /// The cgroup2 mount, where `[dataplane] bypass` patterns start.
    cgroup_root: Option<PathBuf>,
    /// The cgroups bypassed now, by id, and why some pattern or pod matched nothing usable.
    bypass: BTreeMap<u64, cgroup::Bypassed>,
    bypass_problems: Vec<String>,
    /// A failed reconcile waiting for its retry.
    pending: Option<Pending>,
    failing_open: BTreeSet<String>,
    /// Discovered backends last left out for being VIPs, logged when this changes.
    dropped: Vec<catalog::Note>,
    pin_dir: PathBuf,
    published_empty: bool,
    outliers: Outliers,
}

impl Agent {
    /// A rejected config keeps the running state: nothing is applied unless the whole file is
    /// valid.
    fn reload(&mut self, path: &Path, why: &str) {
        info!(reason = why, "reloading config");
        match config::load(path) {
            Err(e) => error!("config rejected, keeping the running state:\n{e}"),
            Ok(config) => {
                if config.dataplane.count_bytes != self.config.dataplane.count_bytes {
                    // Programs are attached at start-up; a restart adopts the maps seamlessly.
                    warn!("dataplane.count_bytes changed: it takes effect when the agent is restarted");
                }
                self.config = config;
                self.sync_bypass();
                self.discovery.sync(&self.config);
                self.kubernetes.sync(self.config.kubernetes.as_ref());
                if let Err(e) = self.reconcile(Change::Everything) {
                    error!("reconcile failed, data plane left consistent at the last step: {e:#}");
                }
            }
        }
    }

    /// Records `first` and every message already queued behind it, then reconciles once if any
    /// of them changed what the maps should hold.
    fn absorb<T>(
        &mut self,
        first: T,
        queue: &mut mpsc::UnboundedReceiver<T>,
        source: &str,
        apply: impl Fn(&mut Self, T) -> Option<Change>,
    ) {
        let mut changed = apply(self, first);
        while let Ok(next) = queue.try_recv() {
            changed = Change::merge(changed, apply(self, next));
        }
        if let Some(change) = changed {
            if let Err(e) = self.reconcile(change) {
                error!("reconcile after a {source} change failed: {e:#}");
            }
        }
        self.publish_status();
    }

    /// The one path into the maps, whatever changed: config, discovery answers or health. A
    /// failure is retried with backoff until a reconcile succeeds; meanwhile `/readyz` is 503
    /// and `stats` says why.
    fn reconcile(&mut self, change: Change) -> Result<()> {
        let start = std::time::Instant::now();
        self.readiness.reconciling(true);
        let result = self.reconcile_once(change);
        self.readiness.reconciling(false);
        // From the change reaching the agent to the maps holding it.
        let elapsed = start.elapsed();
        crate::agent_metrics::AGENT.reconciled(elapsed.as_secs_f64(), result.is_ok());
        if let Ok(s) = &result {
            let micros = elapsed.as_micros() as u64;
            info!(
                added = s.added,
                updated = s.updated,
                removed = s.removed,
                unchanged = s.unchanged,
                map_ops = s.map_ops,
                micros,
                "reconciled"
            );
        }
        let result = result.map(drop);
        self.pending = match (&result, self.pending.take()) {
            (Ok(()), _) => None,
            (Err(e), earlier) => {
                let wait = earlier.map_or(RETRY_FIRST, |p| (p.wait * 2).min(RETRY_MAX));
                Some(Pending {
                    reason: format!("{e:#}"),
                    wait,
                    at: tokio::time::Instant::now() + wait,
                })
            }
        };
        result
    }

    /// The retry of a failed reconcile, when its backoff has passed.
    fn retry(&mut self) {
        let reason = self.pending.as_ref().map(|p| p.reason.clone());
        info!(
            last_error = reason.as_deref().unwrap_or(""),
            "retrying the failed reconcile"
        );
        match self.reconcile(Change::Everything) {
            Ok(()) => info!("the retried reconcile succeeded: the maps follow the plan again"),
            Err(e) => error!(
                "the retried reconcile failed, the data plane left consistent at the last step; \
                 next try in {:?}: {e:#}",
                self.pending.as_ref().map(|p| p.wait).unwrap_or_default()
            ),
        }
        self.publish_status();
    }

    fn reconcile_once(&mut self, change: Change) -> Result<Summary> {
        // Taken, not borrowed: a plan that fails to be made or applied drops it, and the next
        // reconcile reads the maps again and plans every service.
        let (mut mirror, fresh) = match self.mirror.take() {
            Some(mirror) => (mirror, false),
            None => (Mirror::read(&self.maps)?, true),
        };
        let touched = match change {
            Change::Services(names) if !fresh => match self.refresh(&names, &mirror) {
                Some(touched) => Some(touched),
                None => self.recompute(&mirror, fresh),
            },
            _ => self.recompute(&mirror, fresh),
        };
        let positions: Vec<usize> = match &touched {
            None => (0..self.wanted.len()).collect(),
            Some(t) => t.positions.clone(),
        };
        let only = touched.as_ref().map(|t| &t.names);
        let services = positions.iter().map(|&i| &self.wanted[i]);
        self.health.sync(services.clone(), only);
        let scope = match &touched {
            None => Scope::All,
            Some(t) => Scope::Keys(&t.keys),
        };
        let (steps, bound) = plan::steps(services);
        if steps.len() > 1 {
            let chunks = steps
                .iter()
                .map(|run| self.desired(&positions[run.clone()]).0);
            Steps::fit(&mirror.installed, &mirror.pools, &bound, chunks)?;
        }
        let mut planner = Steps::new(scope);
        let mut summary = Summary::default();
        let mut failing_open = BTreeSet::new();
        // Services recorded in order leave the mirror's B-tree half full: repacked as it grows
        // by a quarter, so that the slack never comes to much (`Installed::compact`), at the
        // cost of moving each entry about five times.
        let mut packed = mirror.installed.services.len();
        for (n, run) in steps.iter().enumerate() {
            let (desired, failing) = self.desired(&positions[run.clone()]);
            failing_open.extend(failing);
            let last = n + 1 == steps.len();
            let plan = planner.plan(&mirror.installed, &mut mirror.pools, &desired, last)?;
            drop(desired);
            self.crash_test(&plan.ops, fresh);
            apply(&mut self.maps, &plan.ops)?;
            if !plan.removed.is_empty() {
                self.terminate(&plan.removed, &mirror);
            }
            summary += &plan.summary;
            mirror.record(plan.ops);
            if mirror.installed.services.len() > packed + packed / 4 + plan::STEP_SERVICES / 2 {
                mirror.installed.compact();
                packed = mirror.installed.services.len();
            }
        }
        self.log_fail_open(failing_open, touched.as_ref().map(|t| &t.names));
        // After a first load (or most of one): what the steps freed handed back to the
        // system, which glibc does not do for free memory amid the heap.
        if fresh || summary.added * 2 > mirror.installed.services.len() {
            mirror.installed.compact();
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        self.mirror = Some(mirror);
        Ok(summary)
    }

    /// What the maps should hold for these services of `wanted`, and those failing open.
    fn desired(&self, positions: &[usize]) -> (plan::Desired, Vec<String>) {
        let (health, outliers) = (&self.health, &self.outliers);
        // Either a health check or an ejection takes a backend out; both must agree to restore.
        plan::desired(positions.iter().map(|&i| &self.wanted[i]), &|svc, addr| {
            health.is_healthy(svc, addr) && !outliers.is_ejected(svc, addr)
        })
    }

    /// Every service anew (a config or Kubernetes change, or maps read afresh). Returns what
    /// differs from before, or `None` when everything must be planned.
    fn recompute(&mut self, mirror: &Mirror, fresh: bool) -> Option<Touched> {
        let discovery = &self.discovery;
        let sources = catalog::Sources {
            discovered: &|svc| discovery.backends(svc),
            kubernetes: self.kubernetes.services(),
        };
        let (effective, notes, vips) =
            catalog::effective(&self.config, &sources, &mirror.installed);
        self.note_dropped(notes, None);
        let touched = (!fresh).then(|| Touched::between(&self.wanted, &effective));
        self.wanted = effective;
        let previous = std::mem::take(&mut self.policies);
        (self.policies, self.departed) = policies(&self.config, &self.wanted, previous);
        self.watches_outliers = self.wanted.iter().any(|s| s.admission.outlier.is_some());
        self.rebalances = self.config.services.iter().any(|s| s.rebalance.is_some());
        let refreshable = |s: &config::ServiceConfig| {
            s.discovery.is_some() || s.health.is_some() || s.outlier.is_some()
        };
        self.by_name = (self.config.services.iter().enumerate())
            .filter(|(_, s)| refreshable(s))
            .map(|(i, s)| (s.name.to_string(), i))
            .collect();
        let listed = self.config.services.len();
        self.cluster_at = match self.kubernetes.services() {
            // After the file's services come Kubernetes' once synced (before, the maps'
            // leftovers).
            Some(Some(_)) => (self.wanted[listed..].iter().enumerate())
                .map(|(k, s)| (s.name.to_string(), listed + k))
                .collect(),
            _ => HashMap::new(),
        };
        self.vips = vips;
        touched
    }

    /// These file services anew, after an answer, a health transition or an ejection; nothing
    /// else changed.
    /// `None` when one of them cannot be refreshed alone: a Kubernetes service that came,
    /// went or moved to another VIP changes the VIPs every discovered backend is checked
    /// against, so everything is recomputed then.
    fn refresh(&mut self, names: &BTreeSet<String>, mirror: &Mirror) -> Option<Touched> {
        let discovery = &self.discovery;
        let sources = catalog::Sources {
            discovered: &|svc| discovery.backends(svc),
            kubernetes: self.kubernetes.services(),
        };
        let mut touched = Touched::default();
        let mut notes = Vec::new();
        let mut refreshed = Vec::new();
        for name in names {
            let (i, (service, dropped)) = match self.by_name.get(name) {
                Some(&i) => {
                    let file = &self.config.services[i];
                    let fresh = catalog::refresh(file, &sources, &mirror.installed, &self.vips);
                    (i, fresh)
                }
                None => match (self.cluster_at.get(name), self.kubernetes.service(name)) {
                    // Gone from the config before its answer arrived.
                    (None, None) => continue,
                    (Some(&i), Some(from_api))
                        if (from_api.vip, from_api.protocol)
                            == (self.wanted[i].vip, self.wanted[i].protocol) =>
                    {
                        (i, catalog::refresh_cluster(from_api, &self.vips))
                    }
                    _ => return None,
                },
            };
            notes.extend(dropped);
            touched.names.insert(name.clone());
            touched
                .keys
                .insert(service_key(service.vip, service.protocol));
            touched.positions.push(i);
            refreshed.push((i, service));
        }
        for (i, service) in refreshed {
            self.wanted[i] = service;
        }
        self.note_dropped(notes, Some(&touched.names));
        Some(touched)
    }

    /// `--crash-after-ops`: applies that much of a plan (not the first: the agent must have
    /// started) and dies as a SIGKILL would leave it, in the middle of the apply.
    fn crash_test(&mut self, ops: &[Op], first: bool) {
        let Some(k) = self.crash_after_ops.filter(|k| !first && ops.len() > *k) else {
            return;
        };
        let done = apply(&mut self.maps, &ops[..k]);
        warn!(
            applied = k,
            of = ops.len(),
            ?done,
            "crash test: SIGKILL in the middle of an apply"
        );
        // SAFETY: raising a signal at ourselves.
        unsafe { libc::raise(libc::SIGKILL) };
    }

    /// Destroys the sockets translated to backends a plan just removed, as each service's
    /// `terminate_on_removal` says (within the rate bound; the rest follows on the tick).
    fn terminate(&mut self, removed: &[(u32, ServiceKey)], mirror: &Mirror) {
        if self.terminating.terminator.is_err() {
            return;
        }
        let mut doomed = BTreeMap::new();
        for &(id, key) in removed {
            let policy = self.policies.get(&key).or(self.departed.get(&key));
            let Ok(generation) = self.maps.backend_generation(id) else {
                continue;
            };
            let service = mirror
                .installed
                .services
                .get(&key)
                .map(|s| s.name.to_string());
            let backend = mirror.installed.backends.get(id).map(|a| a.to_string());
            let one = terminating::Doomed {
                generation,
                policy: policy.copied().unwrap_or_default(),
                service: service.unwrap_or_default(),
                backend: backend.unwrap_or_default(),
            };
            doomed.insert(id, one);
        }
        let rate = self.config.dataplane.max_terminations_per_second;
        self.terminating.add(doomed, rate, &self.cgroup);
    }

    /// Matches `[dataplane] bypass` and the pods annotated to be bypassed against the cgroups
    /// there are now and updates the map when the set changed. Failures are logged and leave
    /// the map as it was.
    fn sync_bypass(&mut self) {
        let patterns = &self.config.dataplane.bypass;
        let (mut found, mut problems) = match &self.cgroup_root {
            Some(root) => cgroup::bypassed(root, patterns),
            None if patterns.is_empty() => Default::default(),
            None => (
                BTreeMap::new(),
                vec!["no cgroup2 mount found: [dataplane] bypass cannot be applied".to_owned()],
            ),
        };
        // Below the cgroup the programs are attached to, not the mount: only its processes are
        // translated, and in a container the mount may be the container's own cgroup namespace
        // while `--cgroup` names the host's tree.
        let pods = self.kubernetes.bypassed_pods();
        if !pods.is_empty() {
            pod_cgroups::add(&self.cgroup, pods, &mut found, &mut problems);
        }
        if problems != self.bypass_problems {
            problems.iter().for_each(|p| warn!("{p}"));
            self.bypass_problems = problems;
        }
        if found == self.bypass {
            return;
        }
        let ids = found.keys().copied().collect();
        if let Err(e) = self.maps.set_bypass(&ids) {
            return error!("cannot update the bypassed cgroups: {e:#}");
        }
        for (id, b) in found.iter().filter(|(id, _)| !self.bypass.contains_key(id)) {
            let cgroup = b.path.display();
            info!(%cgroup, id, pod = b.pod, "cgroup bypassed: its connects are not translated");
        }
        for b in (self.bypass.iter())
            .filter(|(id, _)| !found.contains_key(id))
            .map(|e| e.1)
        {
            info!(cgroup = %b.path.display(), pod = b.pod, "cgroup no longer bypassed");
        }
        self.bypass = found;
    }

    /// Logs what sources had left out, once per change; `only`: the notes of these services.
    fn note_dropped(&mut self, notes: Vec<catalog::Note>, only: Option<&BTreeSet<String>>) {
        for note in notes.iter().filter(|n| !self.dropped.contains(n)) {
            warn!("{}", note.text);
        }
        match only {
            None => self.dropped = notes,
            Some(names) => {
                self.dropped.retain(|n| !names.contains(&n.service));
                self.dropped.extend(notes);
            }
        }
    }

    /// Feeds the kernel's connect outcomes of every service with `[service.outlier]` to the
    /// detector and reconciles when a backend is ejected or comes back.
    fn check_outliers(&mut self) {
        // The mirror says which backend ids each service has, so only their counters are read.
        // Without it a failed reconcile awaits its retry, which reads the maps again.
        let Some(mirror) = &self.mirror else {
            return;
        };
        let maps = &self.maps;
        let observed = |svc: &catalog::Service| {
            let installed = &mirror.installed;
            let Some(have) = installed.services.get(&service_key(svc.vip, svc.protocol)) else {
                return Vec::new();
            };
            let ids = have.backend_ids();
            let backends = ids.filter_map(|id| Some((id, installed.backends.get(id)?)));
            maps.observations(backends)
        };
        let changed = self
            .outliers
            .check(std::time::Instant::now(), &self.wanted, observed);
        if !changed.is_empty() {
            // Published first, so `stats` never shows an ejected backend as simply gone.
            self.publish_status();
            if let Err(e) = self.reconcile(Change::Services(changed)) {
                error!("reconcile after an outlier change failed: {e:#}");
            }
        }
    }

    /// Failing open sends traffic to backends known to be failing: say so loudly, once per
    /// change. `only`: `now` covers these services.
    fn log_fail_open(&mut self, mut now: BTreeSet<String>, only: Option<&BTreeSet<String>>) {
        if let Some(names) = only {
            now.extend(self.failing_open.difference(names).cloned());
        }
        for name in now.difference(&self.failing_open) {
            warn!(service = %name, "too few healthy backends: FAILING OPEN to all configured backends");
        }
        for name in self.failing_open.difference(&now) {
            info!(service = %name, "enough healthy backends again: no longer failing open");
        }
        self.failing_open = now;
    }

    /// Without health blocks or discovery there is nothing to publish after the first (empty)
    /// file.
    fn publish_status(&mut self) {
        // Ready once every source has reported and what it reported is in the maps (reconcile
        // runs before this on every change).
        let ready =
            self.kubernetes.is_synced() && self.discovery.all_answered() && self.pending.is_none();
        self.readiness.set(ready);
        let snapshot = self.health.snapshot();
        let sources = self.discovery.status();
        let kubernetes = self
            .config
            .kubernetes
            .as_ref()
            .map(|_| self.kubernetes.status.clone());
        let empty = snapshot.is_empty()
            && sources.is_empty()
            && self.config.kubernetes.is_none()
            && kubernetes.is_none()
            && self.outliers.next_expiry().is_none()
            && self.pending.is_none()
            && self.bypass.is_empty()
            && self.terminating.terminated.is_empty()
            && self.rebalancing.closed.is_empty()
            && self.terminating.terminator.is_ok();
        if empty && self.published_empty {
            return;
        }
        self.published_empty = empty;
        let file = status_file::assemble(status_file::Parts {
            services: &self.wanted,
            health: snapshot,
            sources,
            kubernetes,
            from_kubernetes: self.kubernetes.services(),
            outliers: &self.outliers,
            pending: self.pending.as_ref().map(|p| p.reason.as_str()),
            failing_open: &self.failing_open,
            bypass: &self.bypass,
            terminated: &self.terminating.terminated,
            termination_unavailable: (self.terminating.terminator.as_ref().err())
                .map(String::as_str),
            rebalanced: &self.rebalancing.closed,
            rebalance_unavailable: self.rebalancing.unavailable(self.rebalances),
        });
        if let Err(e) = status::write(&self.pin_dir, &file) {
            warn!("cannot publish health state: {e:#}");
        }
    }
}

/// Tells whether the config file changed since it was last looked at. Compares contents
/// rather than mtimes (editors replace files and Kubernetes swaps ConfigMap symlinks, and both
/// keep or reset mtimes unpredictably), by a digest: its bytes would be a second copy of the
/// config held for the agent's life.
struct ConfigWatcher {
    path: PathBuf,
    last: Option<[u8; 32]>,
}

impl ConfigWatcher {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            last: config_digest(path).ok(),
        }
    }

    fn changed(&mut self) -> bool {
        match config_digest(&self.path) {
            Ok(now) if self.last != Some(now) => {
                self.last = Some(now);
                true
            }
            Ok(_) => false,
            Err(e) => {
                if self.last.take().is_some() {
                    warn!(path = %self.path.display(), "config unreadable, keeping state: {e}");
                }
                false
            }
        }
    }
}

fn config_digest(path: &Path) -> Result<[u8; 32], String> {
    crate::private_files::digest_bounded(path, crate::private_files::CONFIG_LIMIT, "config file")
}

/// Polls the log ring buffer: debug logging is opt-in and a 100 ms delay on it costs nothing.
async fn drain_ebpf_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        logger.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Admission, Service};
    use crate::config::{BackendConfig, Protocol};

    fn svc(name: &str, vip: &str, backend: &str) -> Service {
        Service {
            name: name.into(),
            vip: vip.parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: vec![BackendConfig {
                address: backend.parse().unwrap(),
                weight: 1,
            }]
            .into(),
            balancing: Default::default(),
            admission: Admission::default(),
        }
    }

    fn key(vip: &str) -> ServiceKey {
        service_key(vip.parse().unwrap(), Protocol::Tcp)
    }

    #[test]
    fn touched_are_the_changed_added_and_removed_services_and_both_keys_of_a_move() {
        let before = [
            svc("same", "10.96.0.1:80", "10.0.0.1:80"),
            svc("changed", "10.96.0.2:80", "10.0.0.2:80"),
            svc("moved", "10.96.0.3:80", "10.0.0.3:80"),
            svc("removed", "10.96.0.4:80", "10.0.0.4:80"),
        ];
        let after = [
            svc("added", "10.96.0.5:80", "10.0.0.5:80"),
            svc("moved", "10.96.0.6:80", "10.0.0.3:80"),
            svc("changed", "10.96.0.2:80", "10.0.0.9:80"),
            svc("same", "10.96.0.1:80", "10.0.0.1:80"),
        ];
        let t = Touched::between(&before, &after);
        let names: Vec<&str> = t.names.iter().map(String::as_str).collect();
        assert_eq!(names, ["added", "changed", "moved", "removed"]);
        let keys: BTreeSet<ServiceKey> = ["10.96.0.2:80", "10.96.0.3:80", "10.96.0.4:80"]
            .into_iter()
            .chain(["10.96.0.5:80", "10.96.0.6:80"])
            .map(key)
            .collect();
        assert_eq!(t.keys, keys);
        let at: Vec<&str> = t.positions.iter().map(|&i| &*after[i].name).collect();
        assert_eq!(at, ["added", "moved", "changed"]);
    }

    #[test]
    fn changes_merge_into_the_union_and_everything_wins() {
        let names = |c: Option<Change>| match c {
            Some(Change::Services(n)) => n.into_iter().collect::<Vec<_>>(),
            Some(Change::Everything) => vec!["*".to_owned()],
            None => vec![],
        };
        let one = |s: &str| Some(Change::of(s.to_owned()));
        assert_eq!(names(Change::merge(one("a"), one("b"))), ["a", "b"]);
        assert_eq!(names(Change::merge(None, one("b"))), ["b"]);
        assert_eq!(names(Change::merge(one("a"), None)), ["a"]);
        assert_eq!(
            names(Change::merge(one("a"), Some(Change::Everything))),
            ["*"]
        );
        assert_eq!(names(Change::merge(None, None)), Vec::<String>::new());
    }

    #[test]
    fn a_removed_service_keeps_its_policy_and_a_changed_one_takes_the_new() {
        let file = |services: &[(&str, &str, &str)]| {
            let text: String = services
                .iter()
                .map(|(name, vip, t)| {
                    format!(
                        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nbackends = []\n\
                         terminate_on_removal = \"{t}\"\n"
                    )
                })
                .collect();
            crate::config::parse(&text, "t").unwrap()
        };
        let before = file(&[
            ("a", "10.96.0.1:80", "all"),
            ("b", "10.96.0.2:80", "none"),
            ("c", "10.96.0.3:80", "udp"),
        ]);
        let (current, departed) = policies(&before, &catalog::listed(&before), HashMap::new());
        assert_eq!(current.len(), 2);
        assert_eq!(current[&key("10.96.0.1:80")], Terminate::All);
        assert!(departed.is_empty());
        // a goes back to the default, b is removed, c stays.
        let after = file(&[("a", "10.96.0.1:80", "udp"), ("c", "10.96.0.3:80", "udp")]);
        let (current, departed) = policies(&after, &catalog::listed(&after), current);
        assert!(current.is_empty(), "{current:?}");
        assert_eq!(departed.len(), 1, "{departed:?}");
        assert_eq!(departed[&key("10.96.0.2:80")], Terminate::None);
        // The next change forgets b.
        let (_, departed) = policies(&after, &catalog::listed(&after), current);
        assert!(departed.is_empty());
    }
}
