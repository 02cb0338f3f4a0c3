//! `lb-userspace`: the agent's modules as a library, so that `lb-agent` (src/main.rs), the
//! integration tests and the fuzz targets (`fuzz/`) share one definition of every parser.

pub mod agent;
pub mod bpf_maps;
pub mod cgroup;
pub mod config;
pub mod dataplane;
pub mod detach;
pub mod discovery;
pub mod health;
pub mod http_api;
pub mod installed;
pub mod jitter;
pub mod kubernetes;
pub mod loader;
pub mod lock;
pub mod maglev;
pub mod metrics;
pub mod outlier;
pub mod plan;
pub mod reconcile;
pub mod stats;
pub mod status_file;
pub mod top;
