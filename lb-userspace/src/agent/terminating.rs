//! The agent's side of `terminate_on_removal`: the backends whose sockets are still to be
//! destroyed, and the rate bound. A pass destroys at most what the token bucket holds
//! (`[dataplane] max_terminations_per_second`), so a removed backend with ten thousand
//! connections does not send ten thousand clients to the others in one instant; the rest wait
//! for the next pass, a second later. The generation in each entry keeps a late pass from
//! touching the sockets of an id's next owner.

use crate::config::Terminate;
use crate::datapath::terminate::Terminator;
use aya::maps::MapData;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often a pass runs while sockets may remain.
pub const EVERY: Duration = Duration::from_secs(1);

/// A backend whose sockets are to go.
#[derive(Clone, Debug)]
pub struct Doomed {
    pub generation: u32,
    pub policy: Terminate,
    pub service: String,
    pub backend: String,
}

pub struct Terminating {
    /// Destroys sockets, or why it cannot on this kernel.
    pub terminator: Result<Terminator, String>,
    /// By backend id.
    pending: BTreeMap<u32, Doomed>,
    tokens: f64,
    refilled: Instant,
    /// Sockets destroyed so far, by service and backend.
    pub terminated: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Terminating {
    pub fn load(sockets: anyhow::Result<MapData>) -> Self {
        let terminator = sockets
            .and_then(|sockets| Terminator::load(&sockets))
            .map_err(|e| format!("{e:#}"));
        if let Err(why) = &terminator {
            warn!("sockets of removed backends cannot be terminated on this kernel: {why}");
        }
        Self {
            terminator,
            pending: BTreeMap::new(),
            tokens: f64::MAX,
            refilled: Instant::now(),
            terminated: BTreeMap::new(),
        }
    }

    /// Sockets may remain from an earlier pass.
    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Adds backends a plan removed, and runs a pass.
    pub fn add(&mut self, doomed: BTreeMap<u32, Doomed>, rate: u32, cgroup: &Path) {
        if self.terminator.is_err() {
            return;
        }
        let wanted = doomed
            .into_iter()
            .filter(|(_, d)| d.policy != Terminate::None);
        self.pending.extend(wanted);
        self.pass(rate, cgroup);
    }

    /// Destroys what the budget allows of the pending backends' sockets; forgets them once a
    /// pass ends with budget to spare (nothing of theirs is left).
    pub fn pass(&mut self, rate: u32, cgroup: &Path) {
        let Ok(terminator) = &self.terminator else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let rate = f64::from(rate);
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.refilled = now;
        let budget = self.tokens.floor() as u64;
        let backends = (self.pending.iter())
            .map(|(id, d)| (*id, (d.generation, d.policy)))
            .collect();
        let pass = match terminator.destroy_everywhere(cgroup, &backends, budget) {
            Ok(pass) => pass,
            Err(e) => {
                warn!("terminating sockets of removed backends failed: {e:#}");
                self.pending.clear();
                return;
            }
        };
        let mut spent = 0;
        for (id, sockets) in &pass.destroyed {
            let Some(d) = self.pending.get(id) else {
                continue;
            };
            spent += sockets;
            info!(
                service = d.service,
                backend = d.backend,
                sockets,
                more_to_come = pass.exhausted,
                "terminated sockets of a removed backend"
            );
            crate::agent_metrics::AGENT.terminated(&d.service, &d.backend, *sockets);
            let by_backend = self.terminated.entry(d.service.clone()).or_default();
            *by_backend.entry(d.backend.clone()).or_default() += sockets;
        }
        self.tokens -= spent as f64;
        if !pass.exhausted {
            self.pending.clear();
        }
    }
}
