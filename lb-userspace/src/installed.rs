//! What the data plane holds now, as read back from the pinned maps. The maps are the source of
//! truth: every reconcile starts from a fresh read, so a failed or interrupted update, or state
//! left by an earlier agent, is simply the next starting point.

use lb_common::{ServiceKey, SlotKey};
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstalledService {
    pub id: u32,
    pub revision: u32,
    pub name: String,
    /// Slot count of the current revision as the service entry states it.
    pub slot_count: u32,
    pub mode: crate::plan::Mode,
    /// Backend id per slot of the current revision (the ones found, if incomplete).
    pub slots: Vec<u32>,
    /// False if some slot of the current revision is missing (written by something else):
    /// the next reconcile rewrites the table under a new revision.
    pub complete: bool,
}

impl InstalledService {
    /// Backend ids this service owns (a backend id belongs to exactly one service).
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let mut seen = std::collections::BTreeSet::new();
        self.slots
            .iter()
            .copied()
            .filter(move |id| seen.insert(*id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Installed {
    pub services: BTreeMap<ServiceKey, InstalledService>,
    pub backends: BTreeMap<u32, SocketAddr>,
    /// Slots of no current revision: an update interrupted between its flip and its cleanup.
    pub stray_slots: Vec<SlotKey>,
    /// Names of service ids that no longer exist.
    pub stray_names: Vec<u32>,
}

impl Installed {
    /// Backends no service references (interrupted removal).
    pub fn stray_backends(&self) -> Vec<u32> {
        let used: std::collections::BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|s| s.slots.iter().copied())
            .collect();
        self.backends
            .keys()
            .copied()
            .filter(|id| !used.contains(id))
            .collect()
    }
}
