//! `/metrics` in the Prometheus text format. Counters live in the pinned maps, so each scrape
//! reads them fresh (the same `report::collect` the CLI uses, so both always agree) and builds a
//! registry for that scrape; only what exists nowhere else (reconcile and probe timings,
//! ejection counts) is kept in process-wide metrics (`agent_metrics`) that every scrape
//! registers.

use crate::observe::report::{self, BackendReport, Report, ServiceReport};
use anyhow::Result;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::Path;

use crate::agent_metrics::{Labels, AGENT};
use crate::status::SourceState;

/// One scrape: the pinned maps and the agent's status file, rendered.
pub fn scrape(pin_dir: &Path) -> Result<String> {
    let maps = report::open(pin_dir)?;
    Ok(render(&report::sample(&maps, pin_dir, 0.0)?))
}

fn service_labels(s: &ServiceReport) -> Labels {
    vec![
        ("service".into(), s.name.clone()),
        ("vip".into(), format!("{}/{}", s.vip, s.protocol)),
        ("source".into(), s.source.clone()),
    ]
}

fn backend_labels(s: &ServiceReport, b: &BackendReport) -> Labels {
    let mut l = service_labels(s);
    l.push(("backend".into(), b.address.clone()));
    l
}

/// Registers a family filled from every service (or backend) of the report.
struct Builder<'a> {
    registry: Registry,
    report: &'a Report,
}

impl Builder<'_> {
    fn service_counter(&mut self, name: &str, help: &str, value: fn(&ServiceReport) -> u64) {
        let family = Family::<Labels, Counter>::default();
        for s in &self.report.services {
            family.get_or_create(&service_labels(s)).inc_by(value(s));
        }
        self.registry.register(name, help, family);
    }

    fn service_gauge(&mut self, name: &str, help: &str, value: fn(&ServiceReport) -> i64) {
        let family = Family::<Labels, Gauge>::default();
        for s in &self.report.services {
            family.get_or_create(&service_labels(s)).set(value(s));
        }
        self.registry.register(name, help, family);
    }

    fn backend_counter(&mut self, name: &str, help: &str, value: fn(&BackendReport) -> u64) {
        let family = Family::<Labels, Counter>::default();
        for s in &self.report.services {
            for b in &s.backends {
                family.get_or_create(&backend_labels(s, b)).inc_by(value(b));
            }
        }
        self.registry.register(name, help, family);
    }

    fn backend_gauge(&mut self, name: &str, help: &str, value: fn(&BackendReport) -> i64) {
        let family = Family::<Labels, Gauge>::default();
        for s in &self.report.services {
            for b in &s.backends {
                family.get_or_create(&backend_labels(s, b)).set(value(b));
            }
        }
        self.registry.register(name, help, family);
    }

    /// A counter per backend and direction (`to_backend`, `from_backend`).
    fn backend_traffic(&mut self, name: &str, help: &str, value: fn(&BackendReport) -> [u64; 2]) {
        let family = Family::<Labels, Counter>::default();
        for s in &self.report.services {
            for b in &s.backends {
                for (dir, v) in ["to_backend", "from_backend"].into_iter().zip(value(b)) {
                    let mut labels = backend_labels(s, b);
                    labels.push(("direction".into(), dir.into()));
                    family.get_or_create(&labels).inc_by(v);
                }
            }
        }
        self.registry.register(name, help, family);
    }
}

pub fn render(report: &Report) -> String {
    let mut m = Builder {
        registry: Registry::default(),
        report,
    };
    // Counter names get `_total` appended by the encoder.
    m.service_counter(
        "lb_service_connects",
        "Connects to the VIP translated to a backend (and new UDP sockets).",
        |s| s.connects,
    );
    m.service_counter(
        "lb_service_no_backend",
        "Connects refused because the service had no backend.",
        |s| s.no_backend,
    );
    m.service_counter(
        "lb_service_update_races",
        "Connects refused after losing every race with an update.",
        |s| s.update_races,
    );
    m.service_counter(
        "lb_service_affinity_hits",
        "Choices answered from a remembered backend.",
        |s| s.affinity_hits,
    );
    m.service_counter(
        "lb_service_affinity_new",
        "Fresh choices stored for client or socket affinity.",
        |s| s.affinity_new,
    );
    m.service_gauge(
        "lb_service_active_connections",
        "Open TCP connections over all backends.",
        |s| s.active as i64,
    );
    m.service_gauge("lb_service_backends", "Backends in the data plane.", |s| {
        s.backends.iter().filter(|b| b.id.is_some()).count() as i64
    });
    m.service_gauge(
        "lb_service_fail_open",
        "1 while too few backends are healthy and all are used.",
        |s| i64::from(s.fail_open_active),
    );
    m.backend_counter(
        "lb_backend_connects",
        "Connect attempts sent to the backend.",
        |b| b.connects,
    );
    m.backend_counter(
        "lb_backend_established",
        "TCP connections that completed the handshake.",
        |b| b.established,
    );
    m.backend_counter(
        "lb_backend_failed",
        "TCP connections that failed before the handshake completed.",
        |b| b.failed,
    );
    m.backend_counter(
        "lb_backend_closed",
        "Established TCP connections closed since.",
        |b| b.closed,
    );
    m.backend_gauge(
        "lb_backend_active_connections",
        "Open TCP connections.",
        |b| b.active as i64,
    );
    m.backend_traffic(
        "lb_backend_bytes",
        "Bytes (IP length) between balanced clients and the backend.",
        |b| [b.bytes_to, b.bytes_from],
    );
    m.backend_traffic(
        "lb_backend_packets",
        "Packets between balanced clients and the backend.",
        |b| [b.packets_to, b.packets_from],
    );
    m.backend_gauge(
        "lb_backend_weight",
        "Slots pointing at the backend (0 when out of the data plane).",
        |b| i64::from(b.weight),
    );
    m.backend_gauge(
        "lb_backend_up",
        "1 when the backend is in the data plane.",
        |b| i64::from(b.id.is_some()),
    );
    m.backend_gauge(
        "lb_backend_healthy",
        "Health check verdict: 1 healthy, 0 failing, -1 not checked.",
        |b| b.health.as_ref().map_or(-1, |h| i64::from(h.healthy)),
    );
    m.backend_gauge(
        "lb_backend_ejected",
        "1 while ejected as an outlier.",
        |b| i64::from(b.ejected.is_some()),
    );
    agent_metrics(&mut m.registry, report);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &m.registry);
    out
}

fn agent_metrics(r: &mut Registry, report: &Report) {
    let a = &*AGENT;
    r.register(
        "lb_reconcile_duration_seconds",
        "Time to read, plan and apply one reconcile.",
        a.reconcile_seconds.clone(),
    );
    r.register(
        "lb_reconciles",
        "Reconciles by result.",
        a.reconciles.clone(),
    );
    r.register(
        "lb_probe_duration_seconds",
        "Health probe latency.",
        a.probe_seconds.clone(),
    );
    r.register(
        "lb_terminated_sockets",
        "Sockets destroyed because their backend left the service (terminate_on_removal), \
         since the agent started.",
        a.terminated.clone(),
    );
    r.register(
        "lb_rebalanced_connections",
        "Idle connections closed so that their clients reconnect elsewhere ([service.rebalance]), \
         by reason (age, skew), since the agent started.",
        a.rebalanced.clone(),
    );
    r.register(
        "lb_outlier_ejections",
        "Backends ejected as outliers since the agent started.",
        a.ejections.clone(),
    );
    let e = &report.map_entries;
    let entries = [
        ("services", e.services),
        ("slots", e.slots),
        ("backends", e.backends),
        ("names", e.names),
        ("affinity", e.affinity),
    ];
    let entries = by_map(entries.map(|(m, n)| (m.to_string(), n as i64)));
    r.register("lb_map_entries", "Entries in each pinned map.", entries);
    let c = &report.memory.capacity;
    let capacity = [
        ("services", c.services),
        ("backends", c.backends),
        ("slots", c.slots),
        ("affinity", c.affinity),
    ];
    r.register(
        "lb_map_capacity",
        "Services, backends, slots and client choices the maps were sized for when created.",
        by_map(capacity.map(|(m, n)| (m.to_string(), i64::from(n)))),
    );
    let memory = report.memory.kernel_bytes.iter();
    r.register(
        "lb_map_memory_bytes",
        "Kernel memory of each pinned map, as the kernel accounts it.",
        by_map(memory.map(|(m, n)| (m.clone(), *n as i64))),
    );
    if let Some(s) = &report.memory.socket_state {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(s.bytes()).unwrap_or(i64::MAX));
        r.register(
            "lb_socket_state_bytes",
            "Kernel memory of the open balanced TCP connections' per-socket state (this \
             kernel's bytes per socket times the open connections; UDP sockets not counted), \
             charged to the agent's memory cgroup like the maps.",
            g,
        );
    }
    let bypassed = Family::<Labels, Counter>::default();
    for b in &report.bypass {
        let labels = vec![("cgroup".into(), b.cgroup.clone())];
        bypassed.get_or_create(&labels).inc_by(b.connects);
    }
    r.register(
        "lb_bypassed_connects",
        "Connects and datagrams to services left untranslated, per bypassed cgroup.",
        bypassed,
    );
    let out_of_date = Gauge::<i64>::default();
    out_of_date.set(i64::from(report.maps_out_of_date.is_some()));
    r.register(
        "lb_maps_out_of_date",
        "1 while a failed reconcile is being retried: the maps differ from the plan.",
        out_of_date,
    );
    let sources = Family::<Labels, Gauge>::default();
    let errors = Family::<Labels, Gauge>::default();
    let left_out = Family::<Labels, Gauge>::default();
    let kube = report
        .kubernetes
        .iter()
        .map(|k| ("kubernetes".to_string(), k));
    let discovered = report
        .services
        .iter()
        .filter_map(|s| s.discovery.as_ref().map(|d| (s.name.clone(), d)));
    for (service, d) in kube.chain(discovered) {
        let labels = vec![
            ("service".into(), service),
            ("kind".into(), d.kind.clone()),
            ("target".into(), d.target.clone()),
        ];
        sources
            .get_or_create(&labels)
            .set(i64::from(d.state == SourceState::Ok));
        errors
            .get_or_create(&labels)
            .set(i64::from(d.consecutive_errors));
        for limit in &d.limits {
            let mut labels = labels.clone();
            labels.push(("limit".into(), limit.setting.clone()));
            left_out
                .get_or_create(&labels)
                .set(i64::try_from(limit.left_out).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "lb_source_up",
        "1 when a discovery or Kubernetes source answered its last query.",
        sources,
    );
    r.register(
        "lb_source_consecutive_errors",
        "Failed queries in a row per source.",
        errors,
    );
    r.register(
        "lb_source_left_out",
        "Entries a source's limit leaves out now (Kubernetes: Services beyond max_services, \
         endpoints beyond max_endpoints_per_service); 0 while under the limit.",
        left_out,
    );
    let insns = Family::<Labels, Gauge>::default();
    for p in &report.programs {
        insns
            .get_or_create(&vec![("program".into(), p.name.clone())])
            .set(i64::from(p.verified_insns));
    }
    r.register(
        "lb_program_verified_instructions",
        "Instructions the verifier processed per attached program.",
        insns,
    );
}

/// A gauge per map, labelled `map`.
fn by_map(values: impl IntoIterator<Item = (String, i64)>) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (map, n) in values {
        family.get_or_create(&vec![("map".into(), map)]).set(n);
    }
    family
}
