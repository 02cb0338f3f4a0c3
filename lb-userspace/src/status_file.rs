//! The agent publishes health and discovery state to a small JSON file next to its lock, so
//! that `lb-agent stats` can show it from another process without a socket or a query API.

use crate::discovery::SourceStatus;
use crate::health::runner::BackendHealth;
use crate::lock::run_file;
use anyhow::{Context, Result};
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
    pub ejected: BTreeMap<String, crate::outlier::Ejection>,
}

pub fn path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "status.json")
}

/// Written to a temporary file and renamed, so a reader never sees half a file.
pub fn write(pin_dir: &Path, status: &StatusFile) -> Result<()> {
    let final_path = path(pin_dir);
    let tmp = final_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &final_path)
        .with_context(|| format!("cannot replace {}", final_path.display()))
}

/// Missing or unreadable state is no health information, not an error: stats still shows
/// the maps.
pub fn read(pin_dir: &Path) -> Option<StatusFile> {
    serde_json::from_slice(&std::fs::read(path(pin_dir)).ok()?).ok()
}
