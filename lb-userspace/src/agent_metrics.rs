//! The agent's own metrics, kept in the process because they exist nowhere else: reconcile and
//! probe timings, reconcile results, ejections. A leaf, so that the reconcile loop and the probe
//! tasks record into it without depending on the `/metrics` renderer (observe::prometheus).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::LazyLock;

pub type Labels = Vec<(String, String)>;

/// Process-wide, because the reconcile loop, the probe tasks and the scrape handler all reach
/// them without sharing any other state.
pub struct AgentMetrics {
    pub reconcile_seconds: Histogram,
    pub reconciles: Family<Labels, Counter>,
    pub probe_seconds: Histogram,
    pub ejections: Family<Labels, Counter>,
    pub terminated: Family<Labels, Counter>,
    pub rebalanced: Family<Labels, Counter>,
}

pub static AGENT: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    // 100 µs .. ~3 s: a small reconcile is sub-millisecond, a 65k-entry Maglev swap seconds.
    reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
    reconciles: Family::default(),
    // 100 µs .. ~1.6 s: loopback probes are fast, a timing-out one hits the top.
    probe_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
    ejections: Family::default(),
    terminated: Family::default(),
    rebalanced: Family::default(),
});

impl AgentMetrics {
    pub fn reconciled(&self, seconds: f64, ok: bool) {
        self.reconcile_seconds.observe(seconds);
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }

    pub fn ejected(&self, service: &str, backend: &str) {
        self.ejections.get_or_create(&of(service, backend)).inc();
    }

    pub fn terminated(&self, service: &str, backend: &str, sockets: u64) {
        let labels = of(service, backend);
        self.terminated.get_or_create(&labels).inc_by(sockets);
    }

    pub fn rebalanced(&self, service: &str, backend: &str, reason: &str) {
        let mut labels = of(service, backend);
        labels.push(("reason".into(), reason.into()));
        self.rebalanced.get_or_create(&labels).inc();
    }
}

fn of(service: &str, backend: &str) -> Labels {
    vec![
        ("service".into(), service.into()),
        ("backend".into(), backend.into()),
    ]
}
