//! `lb-agent run`: attach, reconcile the maps to the config, then follow config changes
//! (SIGHUP or the file changing) until SIGTERM/SIGINT. Exiting leaves the pins, so traffic keeps
//! being balanced by the last applied state while no agent runs.

use crate::bpf_maps::PinnedMaps;
use crate::dataplane::{apply, read_installed};
use crate::loader::{self, LoadOptions};
use crate::reconcile::{reconcile, Summary};
use crate::{cgroup, config, lock, plan};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

pub struct RunArgs {
    pub config: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    /// How often the config file is compared with what was last read; `None` disables it.
    pub watch_interval: Option<Duration>,
    pub bpf_log: bool,
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Validate before touching any kernel state: a bad config must not half-start the agent.
    let config = config::load(&args.config)?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup::cgroup2_root()?,
    };
    let _lock = lock::acquire(&args.pin_dir)?;
    loader::prepare_pin_dir(&args.pin_dir)?;
    let attached = loader::load_and_attach(&LoadOptions {
        pin_dir: &args.pin_dir,
        cgroup: &cgroup,
        bpf_log: args.bpf_log,
    })?;
    if let Some(logger) = attached.logger {
        tokio::spawn(drain_ebpf_logs(logger));
    }
    let mut maps = attached.maps;
    reconcile_to(&mut maps, &config).context("initial reconcile failed")?;
    info!(services = config.services.len(), "ready");

    let mut watcher = ConfigWatcher::new(&args.config);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(args.watch_interval.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                watcher.changed();
                reload(&mut maps, &args.config, "SIGHUP");
            }
            _ = tick.tick(), if args.watch_interval.is_some() => {
                if watcher.changed() {
                    reload(&mut maps, &args.config, "file changed");
                }
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

/// A rejected config keeps the running state: nothing is applied unless the whole file is valid.
fn reload(maps: &mut PinnedMaps, path: &Path, why: &str) {
    info!(reason = why, "reloading config");
    match config::load(path) {
        Err(e) => error!("config rejected, keeping the running state:\n{e}"),
        Ok(config) => {
            if let Err(e) = reconcile_to(maps, &config) {
                error!("reconcile failed, data plane left consistent at the last step: {e:#}");
            }
        }
    }
}

pub fn reconcile_to(maps: &mut PinnedMaps, config: &config::Config) -> Result<Summary> {
    let installed = read_installed(maps, true)?;
    let plan = reconcile(&installed, &plan::desired(config))?;
    apply(maps, &plan.ops)?;
    let s = &plan.summary;
    info!(
        added = s.added,
        updated = s.updated,
        removed = s.removed,
        unchanged = s.unchanged,
        map_ops = plan.ops.len(),
        "reconciled"
    );
    Ok(plan.summary)
}

/// Compares file contents rather than mtimes: editors replace files and Kubernetes swaps
/// ConfigMap symlinks, and both keep or reset mtimes unpredictably.
struct ConfigWatcher {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl ConfigWatcher {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            last: std::fs::read(path).ok(),
        }
    }

    fn changed(&mut self) -> bool {
        match std::fs::read(&self.path) {
            Ok(now) if self.last.as_ref() != Some(&now) => {
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

/// Polls the log ring buffer: debug logging is opt-in and a 100 ms delay on it costs nothing.
async fn drain_ebpf_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        logger.flush();
    }
}
