//! What the agent publishes each second for `stats` and `top`: health, ejections, sources and
//! fail-open state per service, gathered from the stages that own them.

use crate::admission::health::runner::Target;
use crate::admission::outlier::Outliers;
use crate::catalog::Service;
use crate::sources::kubernetes::translate::ClusterService;
use crate::status::{BackendHealth, ServiceStatus, SourceStatus, StatusFile};
use std::collections::{BTreeMap, BTreeSet};

/// Everything the status file is assembled from.
pub struct Parts<'a> {
    /// The services the maps were last reconciled to.
    pub services: &'a [Service],
    pub health: BTreeMap<Target, BackendHealth>,
    /// Discovery sources by service.
    pub sources: BTreeMap<String, SourceStatus>,
    /// The Kubernetes source, when configured.
    pub kubernetes: Option<SourceStatus>,
    /// The services Kubernetes reports, once synced.
    pub from_kubernetes: Option<Option<&'a [ClusterService]>>,
    pub outliers: &'a Outliers,
    /// Why the last reconcile failed, while its retry is pending.
    pub pending: Option<&'a str>,
    pub failing_open: &'a BTreeSet<String>,
    /// The cgroups bypassed now, by id.
    pub bypass: &'a BTreeMap<u64, crate::lifecycle::cgroup::Bypassed>,
    /// Sockets destroyed so far, by service and backend.
    pub terminated: &'a BTreeMap<String, BTreeMap<String, u64>>,
    pub termination_unavailable: Option<&'a str>,
    /// Idle connections closed so far by the rebalance, by service and backend.
    pub rebalanced: &'a BTreeMap<String, BTreeMap<String, u64>>,
    pub rebalance_unavailable: Option<&'a str>,
}

pub fn assemble(parts: Parts) -> StatusFile {
    let mut file = StatusFile {
        agent_pid: std::process::id(),
        written_unix_ms: crate::clock::now_ms(),
        kubernetes: parts.kubernetes,
        maps_out_of_date: parts.pending.map(str::to_owned),
        termination_unavailable: parts.termination_unavailable.map(str::to_owned),
        rebalance_unavailable: parts.rebalance_unavailable.map(str::to_owned),
        bypass: (parts.bypass.iter())
            .map(|(id, b)| (*id, b.path.display().to_string()))
            .collect(),
        bypass_pods: (parts.bypass.iter())
            .filter_map(|(id, b)| Some((*id, b.pod.clone()?)))
            .collect(),
        ..StatusFile::default()
    };
    for (target, health) in parts.health {
        let svc = file
            .services
            .entry(target.service.clone())
            .or_insert_with(|| ServiceStatus {
                fail_open_active: parts.failing_open.contains(&target.service),
                ..ServiceStatus::default()
            });
        svc.backends.insert(target.backend.to_string(), health);
    }
    if let Some(Some(from_api)) = parts.from_kubernetes {
        for svc in from_api {
            let entry = file.services.entry(svc.name.clone()).or_default();
            entry.source = Some("kubernetes".into());
        }
    }
    let now = std::time::Instant::now();
    for svc in parts
        .services
        .iter()
        .filter(|s| s.admission.outlier.is_some())
    {
        let ejected = parts.outliers.ejected(now, &svc.name);
        if !ejected.is_empty() {
            file.services
                .entry(svc.name.to_string())
                .or_default()
                .ejected = ejected;
        }
    }
    for (service, by_backend) in parts.terminated {
        file.services.entry(service.clone()).or_default().terminated = by_backend.clone();
    }
    for (service, by_backend) in parts.rebalanced {
        file.services.entry(service.clone()).or_default().rebalanced = by_backend.clone();
    }
    for (service, source) in parts.sources {
        let svc = file.services.entry(service.clone()).or_default();
        svc.fail_open_active = parts.failing_open.contains(&service);
        svc.discovery = Some(source);
    }
    file
}
