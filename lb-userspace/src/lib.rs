//! `lb-userspace`: the agent's modules as a library, so that `lb-agent` (src/main.rs), the
//! integration tests and the fuzz targets (`fuzz/`) share one definition of every parser.
//!
//! Modules are listed in pipeline order, and each imports only from those above it
//! (`cargo test -p xtask` checks this). First the leaves that any stage may use, then the
//! stages a change travels through: config and sources → catalog → admission → plan →
//! datapath, then what loads the programs, what observes them, and the agent that drives it all.

// Leaves.
/// Wall-clock milliseconds, as the status file and the sources report them.
pub mod clock;
/// Spreading periodic work (probes, retries) so it does not arrive in bursts.
pub mod jitter;
/// Folders only the agent may change, and files written without following links.
pub mod private_files;
/// What the agent publishes for `stats` and `top` under /run/lb-agent, and its types.
pub mod status;
/// The agent's own process-wide metrics (reconcile and probe timings, ejections).
pub mod agent_metrics;

// The pipeline.
/// The TOML config: the model, parsing and every validation rule.
pub mod config;
/// The one translation between config terms and the map keys and values of lb-common.
pub mod codec;
/// Where backends come from besides the file: DNS, etcd, Consul and Kubernetes.
pub mod sources;
/// File + source answers + Kubernetes + the maps' leftovers → the services wanted.
pub mod catalog;
/// Which backends may receive traffic: active health, outlier ejection, fail-open.
pub mod admission;
/// The services wanted, admitted backends only → the slot tables the maps should hold.
pub mod plan;
/// The maps: their primitives, reading what is installed, the diff, applying it.
pub mod datapath;
/// The connections in use → the idle ones to close, by age and by skew, so clients spread.
pub mod rebalance;
/// Loading and attaching the programs, the pin folder's lock, cgroups, detaching.
pub mod lifecycle;
/// Reading the maps back for people: reports, `stats` tables, `/metrics`, `top`, HTTP.
pub mod observe;
/// `lb-agent run`: the loop that drives the pipeline on every change.
pub mod agent;
