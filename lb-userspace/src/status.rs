//! The agent publishes health and discovery state to a small JSON file next to its lock, so
//! that `lb-agent stats` can show it from another process without a socket or a query API.
//! The records it holds are defined here, below both the stages that produce them (sources,
//! admission) and the observers that read them back.

use crate::clock::now_ms;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatusFile {
    pub agent_pid: u32,
    pub written_unix_ms: u64,
    pub services: BTreeMap<String, ServiceStatus>,
    /// The Kubernetes source, when configured.
    #[serde(default)]
    pub kubernetes: Option<SourceStatus>,
    /// Why the maps differ from the plan, while a failed reconcile waits for its retry.
    #[serde(default)]
    pub maps_out_of_date: Option<String>,
    /// The cgroups bypassed now (`[dataplane] bypass` or a pod's annotation), by cgroup id.
    #[serde(default)]
    pub bypass: BTreeMap<u64, String>,
    /// The pod (`namespace/name`) of each cgroup bypassed by its annotation, by cgroup id.
    #[serde(default)]
    pub bypass_pods: BTreeMap<u64, String>,
    /// Why sockets of removed backends cannot be terminated on this kernel, if they cannot.
    #[serde(default)]
    pub termination_unavailable: Option<String>,
    /// Why idle connections cannot be rebalanced on this kernel, when a service asks for it.
    #[serde(default)]
    pub rebalance_unavailable: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Too few healthy backends: balancing over all configured ones.
    pub fail_open_active: bool,
    /// Keyed by backend address; only backends with a health block appear.
    pub backends: BTreeMap<String, BackendHealth>,
    /// The service's discovery source, if it has one.
    #[serde(default)]
    pub discovery: Option<SourceStatus>,
    /// "kubernetes" for a service from the API; `None` for the file's own.
    #[serde(default)]
    pub source: Option<String>,
    /// Backends ejected as outliers, by address.
    #[serde(default)]
    pub ejected: BTreeMap<String, Ejection>,
    /// Sockets destroyed since the agent started because their backend left (by backend).
    #[serde(default)]
    pub terminated: BTreeMap<String, u64>,
    /// Idle connections closed since the agent started by `[service.rebalance]` (by backend).
    #[serde(default)]
    pub rebalanced: BTreeMap<String, u64>,
}

/// Where a source stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// No answer yet; `last_error` says why, if it failed.
    #[default]
    Syncing,
    Ok,
    /// The last attempt failed; the last known set keeps serving.
    Error,
}

/// A source's state as `lb-agent stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub kind: String,
    pub target: String,
    pub state: SourceState,
    /// Size of the set in use; `None` before the first answer.
    pub instances: Option<usize>,
    pub skipped: usize,
    pub skipped_reasons: Vec<String>,
    pub last_success_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
    pub consecutive_errors: u32,
    /// The source's own limits and what they leave out (Kubernetes: `max_services`,
    /// `max_endpoints_per_service`); each is listed, also when it leaves nothing out.
    #[serde(default)]
    pub limits: Vec<LimitHit>,
}

/// A limit of a source: its setting, and what it leaves out of the source's answer now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitHit {
    /// The setting, such as `kubernetes.max_services`.
    pub setting: String,
    pub limit: usize,
    /// Entries left out now (Services, or endpoints summed over service ports).
    pub left_out: usize,
    /// The first few of them, for people.
    pub examples: Vec<String>,
}

impl SourceStatus {
    /// A failed attempt. Before the first answer the state stays syncing (the error says why
    /// it has not answered yet); after it, error while the last known set keeps serving.
    pub fn record_error(&mut self, error: String, answered_before: bool) {
        if answered_before {
            self.state = SourceState::Error;
        }
        self.last_error = Some(error);
        self.last_error_unix_ms = Some(now_ms());
        self.consecutive_errors = self.consecutive_errors.saturating_add(1);
    }

    /// A successful answer of `instances` entries, `skipped` of them unusable.
    pub fn record_answer(&mut self, instances: usize, skipped: usize, reasons: Vec<String>) {
        self.state = SourceState::Ok;
        self.last_success_unix_ms = Some(now_ms());
        self.consecutive_errors = 0;
        self.instances = Some(instances);
        self.skipped = skipped;
        self.skipped_reasons = reasons;
    }
}

/// What `lb-agent stats` shows per probed backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub healthy: bool,
    /// "ok", or why the last probe failed; empty before the first probe.
    pub last_result: String,
    pub last_probe_unix_ms: u64,
    pub last_change_unix_ms: u64,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
}

/// One ejected backend, for `stats`, `/metrics` and the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ejection {
    pub reason: String,
    /// How many times this backend has been ejected (the ejection time's multiplier).
    pub count: u32,
    pub remaining_ms: u64,
}

/// The folder of the agent's lock and status files.
pub const RUN_DIR: &str = "/run/lb-agent";

/// A file in /run named after the pin folder: bpffs cannot hold regular files.
pub fn run_file(pin_dir: &Path, suffix: &str) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '%'
            }
        })
        .collect();
    Path::new(RUN_DIR).join(format!("{name}.{suffix}"))
}

pub fn path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "status.json")
}

/// Replaced atomically and without following links (`private_files::replace`); the run folder
/// was checked when the agent took its lock.
pub fn write(pin_dir: &Path, status: &StatusFile) -> Result<()> {
    crate::private_files::replace(&path(pin_dir), &serde_json::to_vec(status)?)
}

/// Missing or unreadable state is no health information, not an error: stats still shows
/// the maps, and a restarting agent starts from its configured initial states. Unreadable
/// state is logged, since the agent then forgets which backends were down.
pub fn read(pin_dir: &Path) -> Option<StatusFile> {
    read_file(&path(pin_dir))
}

fn read_file(path: &Path) -> Option<StatusFile> {
    let refused = |e: String| {
        tracing::warn!(
            "status file {}: {e}; its health and ejection state is not used",
            path.display()
        )
    };
    match crate::private_files::read_own(path, crate::private_files::STATUS_LIMIT) {
        Ok(None) => None,
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map_err(|e| refused(format!("not a status file ({e})")))
            .ok(),
        Err(e) => {
            refused(e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_status_file_of_bounded_size_is_resumed() {
        let dir = std::env::temp_dir().join(format!("lb-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("status.json");
        assert!(read_file(&file).is_none());
        let status = StatusFile {
            agent_pid: 7,
            ..Default::default()
        };
        crate::private_files::replace(&file, &serde_json::to_vec(&status).unwrap()).unwrap();
        assert_eq!(read_file(&file).map(|s| s.agent_pid), Some(7));
        std::fs::write(&file, "not json").unwrap();
        assert!(read_file(&file).is_none());
        // Sparse: past the bound without writing it.
        let huge = std::fs::File::create(&file).unwrap();
        huge.set_len(crate::private_files::STATUS_LIMIT + 1)
            .unwrap();
        assert!(read_file(&file).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
