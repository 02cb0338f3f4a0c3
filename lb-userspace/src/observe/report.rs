//! One report of the pinned maps and the agent's status file, shared by every view: `stats`
//! (as a table, `table`, or as JSON), `top` and `/metrics`. Reads the maps directly, so it
//! works with or without a running agent. The types deserialize too, so that the end-to-end
//! tests read `stats --json` back into them instead of indexing untyped JSON.

use crate::codec::endpoint;
use crate::datapath::capacity::Capacity;
use crate::datapath::installed::read_installed;
use crate::datapath::maps::Maps;
use crate::datapath::pinned::PinnedMaps;
use crate::status::{BackendHealth, SourceStatus, StatusFile};
use anyhow::Result;
use lb_common::{
    BackendCounters, ServiceKey, ALG_LEAST_CONNECTIONS, ALG_MAGLEV, ALG_RANDOM,
    FLAG_AFFINITY_CLIENT, IPPROTO_TCP, IPPROTO_UDP,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// The Kubernetes source's state, when the agent has one.
    pub kubernetes: Option<SourceStatus>,
    /// Why the maps differ from the agent's plan, while it retries (from the status file).
    pub maps_out_of_date: Option<String>,
    pub services: Vec<ServiceReport>,
    /// Entries in the pinned hash maps, counted directly (strays included), so leaks show.
    pub map_entries: MapEntries,
    pub memory: MapMemory,
    /// The programs attached through the pin folder, read from their link pins (`sample`).
    pub programs: Vec<crate::lifecycle::loader::ProgramSize>,
    /// Cgroups left untranslated (`[dataplane] bypass`).
    #[serde(default)]
    pub bypass: Vec<BypassReport>,
    /// Why sockets of removed backends cannot be terminated on this kernel, if they cannot.
    #[serde(default)]
    pub termination_unavailable: Option<String>,
    /// Why idle connections cannot be rebalanced on this kernel, when a service asks for it.
    #[serde(default)]
    pub rebalance_unavailable: Option<String>,
}

/// A bypassed cgroup and the connects and datagrams of its processes left untranslated.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BypassReport {
    /// Its path as the agent last published it ("?" without a running agent).
    pub cgroup: String,
    /// The pod (`namespace/name`) whose annotation asked for it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub id: u64,
    pub connects: u64,
}

/// Number of entries in each pinned hash map: every key present, whether or not a service
/// entry references it (an interrupted update's leftovers count too).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapEntries {
    pub services: usize,
    /// Slots of the services' tables (the slot array's entries in use).
    pub slots: usize,
    pub backends: usize,
    pub names: usize,
    /// Remembered client choices (LRU). A socket's own choices live in its storage, which
    /// goes with the socket and is not counted here.
    pub affinity: usize,
}

/// What the maps were sized for and the kernel memory they take.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapMemory {
    pub capacity: Capacity,
    /// Bytes per map, as the kernel accounts them (preallocated arrays whole, hash maps by the
    /// elements in use).
    pub kernel_bytes: BTreeMap<String, u64>,
    /// What the balanced sockets' own state takes besides, when this kernel's type
    /// information tells the size.
    #[serde(default)]
    pub socket_state: Option<SocketStateMemory>,
}

impl MapMemory {
    pub fn total(&self) -> u64 {
        self.kernel_bytes.values().sum()
    }
}

/// Per-socket state lives outside the maps' memory figure, but is charged to the same memory
/// cgroup (`datapath::socket_memory`). Only TCP connections are counted: they are the ones
/// with an `active` gauge, while an unconnected UDP socket's state is nowhere counted.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketStateMemory {
    pub bytes_per_socket: u64,
    pub open_tcp_connections: u64,
}

impl SocketStateMemory {
    pub fn bytes(&self) -> u64 {
        self.bytes_per_socket * self.open_tcp_connections
    }
}

impl MapEntries {
    fn count(maps: &PinnedMaps) -> Result<Self> {
        // One walk of the services map serves both counts: at 250,000 services a walk is
        // 250,000 syscalls.
        let services = maps.services()?;
        Ok(Self {
            services: services.len(),
            slots: services.iter().map(|(_, v)| v.slot_count as usize).sum(),
            backends: maps.backends()?.len(),
            names: maps.names()?.len(),
            affinity: maps.affinity_entries(),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub id: u32,
    pub revision: u32,
    pub slots: u32,
    pub connects: u64,
    pub no_backend: u64,
    pub update_races: u64,
    /// "random" or "maglev".
    pub algorithm: String,
    /// Client affinity timeout in seconds; `None` without client affinity.
    pub affinity_timeout_s: Option<u32>,
    pub affinity_hits: u64,
    pub affinity_new: u64,
    /// Health checks found too few healthy backends; balancing over all configured ones.
    pub fail_open_active: bool,
    /// The service's discovery source as the agent last published it; `None` for listed
    /// backends.
    pub discovery: Option<SourceStatus>,
    /// Where the backends come from: "static", "dns", "etcd", "consul" or "kubernetes".
    pub source: String,
    /// Open connections over all backends.
    pub active: u64,
    /// Sockets destroyed because their backend left, by backend, since the agent started.
    #[serde(default)]
    pub terminated: BTreeMap<String, u64>,
    /// Idle connections closed by `[service.rebalance]`, by backend, since the agent started.
    #[serde(default)]
    pub rebalanced: BTreeMap<String, u64>,
    /// Per second over the sampling interval; `None` when sampled once.
    pub rates: Option<Rates>,
    pub backends: Vec<BackendReport>,
}

/// Per-second rates between two samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub connects: f64,
    pub failed: f64,
    pub no_backend: f64,
    pub bytes_to: f64,
    pub bytes_from: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendReport {
    /// None for a backend a health check took out of the data plane.
    pub id: Option<u32>,
    pub address: String,
    /// Slots pointing at this backend: its effective weight.
    pub weight: u32,
    /// Attempts: translated connects and new UDP sockets.
    pub connects: u64,
    pub established: u64,
    pub failed: u64,
    pub closed: u64,
    /// Open TCP connections: established and not closed yet.
    pub active: u64,
    pub packets_to: u64,
    pub bytes_to: u64,
    pub packets_from: u64,
    pub bytes_from: u64,
    /// Present when the service has a health block and the agent has published state.
    pub health: Option<BackendHealth>,
    /// Why the agent took this backend out although health checks pass (outlier ejection).
    pub ejected: Option<String>,
    pub rates: Option<Rates>,
}

/// `status` is the agent's published health state, if any. Backends a health check removed
/// are not in the maps, so they are listed from it with zero weight.
impl BackendReport {
    fn out_of_service(address: &str, health: &BackendHealth) -> Self {
        Self::new(
            None,
            address.to_string(),
            0,
            BackendCounters::default(),
            Some(health.clone()),
        )
    }

    fn new(
        id: Option<u32>,
        address: String,
        weight: u32,
        c: BackendCounters,
        health: Option<BackendHealth>,
    ) -> Self {
        Self {
            id,
            address,
            weight,
            connects: c.connects,
            established: c.established,
            failed: c.failed,
            closed: c.closed,
            // A connection established under an id that was later reused may close under its
            // successor; never show that as a negative gauge.
            active: c.established.saturating_sub(c.closed),
            packets_to: c.packets_to,
            bytes_to: c.bytes_to,
            packets_from: c.packets_from,
            bytes_from: c.bytes_from,
            health,
            ejected: None,
            rates: None,
        }
    }
}

/// The pinned maps for reading, with a clear message when nothing is pinned there.
pub fn open(pin_dir: &Path) -> Result<PinnedMaps> {
    let maps_dir = crate::datapath::pinned::maps_dir(pin_dir);
    if !maps_dir.join(lb_common::names::MAP_META).exists() {
        anyhow::bail!(
            "no pinned state at {} (is `lb-agent run` using another --pin-dir?)",
            pin_dir.display()
        );
    }
    PinnedMaps::open(pin_dir)
}

/// One report; with a non-zero `interval` (seconds), two samples that far apart and the rates
/// between them. BPF run-time statistics are on only during that window (the kernel keeps them
/// on while the descriptor is open), so the programs' cost per run is measured then and costs
/// nothing otherwise.
pub fn sample(maps: &PinnedMaps, pin_dir: &Path, interval: f64) -> Result<Report> {
    let read = || {
        let mut report = collect(maps, crate::status::read(pin_dir).as_ref())?;
        report.programs = crate::lifecycle::loader::attached_programs(pin_dir);
        Ok::<_, anyhow::Error>(report)
    };
    if interval <= 0.0 {
        return read();
    }
    let _run_time_stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let start = std::time::Instant::now();
    let earlier = read()?;
    std::thread::sleep(std::time::Duration::from_secs_f64(interval));
    let mut later = read()?;
    add_rates(&earlier, &mut later, start.elapsed().as_secs_f64());
    Ok(later)
}

pub fn collect(maps: &PinnedMaps, status: Option<&StatusFile>) -> Result<Report> {
    let installed = read_installed(maps, false)?;
    let mut services = Vec::new();
    for (key, svc) in &installed.services {
        let counters = maps.service_counters(svc.id)?;
        let mut weights: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &svc.slots {
            *weights.entry(*id).or_default() += 1;
        }
        let svc_status = status.and_then(|f| f.services.get(&*svc.name));
        let health_of = |addr: &str| svc_status.and_then(|s| s.backends.get(addr)).cloned();
        let mut backends = Vec::new();
        for (id, weight) in weights {
            let address = installed
                .backends
                .get(id)
                .map_or("?".into(), |a| a.to_string());
            let counters = maps.backend_counters(id)?;
            let health = health_of(&address);
            backends.push(BackendReport::new(
                Some(id),
                address,
                weight,
                counters,
                health,
            ));
        }
        for (addr, health) in svc_status.map(|s| &s.backends).into_iter().flatten() {
            if !backends.iter().any(|b| &b.address == addr) {
                backends.push(BackendReport::out_of_service(addr, health));
            }
        }
        for (addr, e) in svc_status.map(|s| &s.ejected).into_iter().flatten() {
            let why = format!("{}; back in {}s", e.reason, e.remaining_ms.div_ceil(1000));
            match backends.iter_mut().find(|b| &b.address == addr) {
                Some(b) => b.ejected = Some(why),
                None => {
                    let mut b =
                        BackendReport::new(None, addr.clone(), 0, BackendCounters::default(), None);
                    b.ejected = Some(why);
                    backends.push(b);
                }
            }
        }
        backends.sort_by(|a, b| a.address.cmp(&b.address));
        services.push(ServiceReport {
            name: svc.name.to_string(),
            vip: vip(key).to_string(),
            protocol: protocol(key.proto),
            id: svc.id,
            revision: svc.revision,
            slots: svc.slot_count,
            connects: counters.connects,
            no_backend: counters.no_backend,
            update_races: counters.update_races,
            algorithm: algorithm_name(svc.mode.algorithm),
            affinity_timeout_s: (svc.mode.flags & FLAG_AFFINITY_CLIENT != 0)
                .then_some(svc.mode.affinity_timeout_s),
            affinity_hits: counters.affinity_hits,
            affinity_new: counters.affinity_new,
            fail_open_active: svc_status.is_some_and(|s| s.fail_open_active),
            discovery: svc_status.and_then(|s| s.discovery.clone()),
            source: svc_status
                .and_then(|s| {
                    s.discovery
                        .as_ref()
                        .map(|d| d.kind.clone())
                        .or(s.source.clone())
                })
                .unwrap_or_else(|| "static".into()),
            active: backends.iter().map(|b| b.active).sum(),
            terminated: svc_status.map(|s| s.terminated.clone()).unwrap_or_default(),
            rebalanced: svc_status.map(|s| s.rebalanced.clone()).unwrap_or_default(),
            rates: None,
            backends,
        });
    }
    services.sort_by(|a, b| (&a.name, &a.vip).cmp(&(&b.name, &b.vip)));
    let socket_state =
        crate::datapath::socket_memory::per_socket().map(|bytes_per_socket| SocketStateMemory {
            bytes_per_socket,
            open_tcp_connections: services.iter().map(|s| s.active).sum(),
        });
    Ok(Report {
        kubernetes: status.and_then(|s| s.kubernetes.clone()),
        maps_out_of_date: status.and_then(|s| s.maps_out_of_date.clone()),
        termination_unavailable: status.and_then(|s| s.termination_unavailable.clone()),
        rebalance_unavailable: status.and_then(|s| s.rebalance_unavailable.clone()),
        services,
        map_entries: MapEntries::count(maps)?,
        memory: MapMemory {
            capacity: maps.capacity(),
            kernel_bytes: maps.kernel_memory(),
            socket_state,
        },
        programs: Vec::new(),
        bypass: maps
            .bypass_counts()?
            .into_iter()
            .map(|(id, connects)| BypassReport {
                cgroup: status
                    .and_then(|s| s.bypass.get(&id).cloned())
                    .unwrap_or_else(|| "?".into()),
                pod: status.and_then(|s| s.bypass_pods.get(&id).cloned()),
                id,
                connects,
            })
            .collect(),
    })
}

fn vip(key: &ServiceKey) -> SocketAddr {
    endpoint(&key.addr, key.port)
}

fn algorithm_name(alg: u8) -> String {
    match alg {
        ALG_RANDOM => "random".into(),
        ALG_MAGLEV => "maglev".into(),
        ALG_LEAST_CONNECTIONS => "least_connections".into(),
        other => format!("algorithm-{other}"),
    }
}

fn protocol(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        other => format!("proto-{other}"),
    }
}

/// Fills in per-second rates of `later` from an `earlier` sample `secs` before it. Services
/// and backends are matched by name and address; counters that went down (a reused id) give
/// no negative rate.
pub fn add_rates(earlier: &Report, later: &mut Report, secs: f64) {
    let per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs.max(1e-3);
    for s in &mut later.services {
        let Some(e) = earlier.services.iter().find(|e| e.name == s.name) else {
            continue;
        };
        let mut svc = Rates {
            connects: per_s(s.connects, e.connects),
            no_backend: per_s(s.no_backend, e.no_backend),
            ..Rates::default()
        };
        for b in &mut s.backends {
            let Some(eb) = e.backends.iter().find(|eb| eb.address == b.address) else {
                continue;
            };
            let r = Rates {
                connects: per_s(b.connects, eb.connects),
                failed: per_s(b.failed, eb.failed),
                no_backend: 0.0,
                bytes_to: per_s(b.bytes_to, eb.bytes_to),
                bytes_from: per_s(b.bytes_from, eb.bytes_from),
            };
            svc.failed += r.failed;
            svc.bytes_to += r.bytes_to;
            svc.bytes_from += r.bytes_from;
            b.rates = Some(r);
        }
        s.rates = Some(svc);
    }
    for p in &mut later.programs {
        let Some(e) = earlier.programs.iter().find(|e| e.name == p.name) else {
            continue;
        };
        let runs = p.run_count.saturating_sub(e.run_count);
        p.runs_per_s = Some(runs as f64 / secs.max(1e-3));
        p.ns_per_run =
            (runs > 0).then(|| p.run_time_ns.saturating_sub(e.run_time_ns) as f64 / runs as f64);
    }
}

/// Keeps only the service called `name`.
pub fn only_service(report: &mut Report, name: &str) {
    report.services.retain(|s| s.name == name);
}
