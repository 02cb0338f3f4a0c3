//! What the data plane holds now, as read back from the pinned maps. The maps are the source of
//! truth: every reconcile starts from a fresh read, so a failed or interrupted update, or state
//! left by an earlier agent, is simply the next starting point.

use crate::catalog::{Leftover, Leftovers};
use crate::codec::{socket_addr, vip_of, Mode};
use crate::config::BackendConfig;
use crate::datapath::maps::Maps;
use anyhow::Result;
use lb_common::{ServiceKey, SlotKey, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS_PER_SERVICE};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstalledService {
    pub id: u32,
    pub revision: u32,
    pub name: String,
    /// Slot count of the current revision as the service entry states it.
    pub slot_count: u32,
    pub mode: Mode,
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
    /// What the maps hold, in config terms: what the catalog keeps for a service whose source
    /// has not answered yet. A key of a protocol this agent never writes is left out.
    pub fn leftovers(&self) -> Leftovers {
        self.services
            .iter()
            .filter_map(|(key, service)| {
                let leftover = Leftover {
                    name: service.name.clone(),
                    backends: self.weighted_backends(service),
                    balancing: service.mode.balancing(service.slot_count),
                };
                Some((vip_of(key)?, leftover))
            })
            .collect()
    }

    /// The backends a service's current slot table points at, weighted by their slot count.
    fn weighted_backends(&self, service: &InstalledService) -> Vec<BackendConfig> {
        let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for id in &service.slots {
            if let Some(address) = self.backends.get(id) {
                *weights.entry(*address).or_default() += 1;
            }
        }
        weights
            .into_iter()
            .map(|(address, weight)| BackendConfig { address, weight })
            .collect()
    }

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

/// `scan_strays` walks the whole slot map to find leftovers; `stats` skips it.
pub fn read_installed(dp: &impl Maps, scan_strays: bool) -> Result<Installed> {
    let mut installed = Installed::default();
    let names: std::collections::BTreeMap<u32, String> = dp
        .names()?
        .into_iter()
        .map(|(id, n)| (id, n.as_str().unwrap_or("").to_string()))
        .collect();
    for (key, value) in dp.services()? {
        if value.slot_count > MAX_SLOTS_PER_SERVICE {
            return Err(inconsistent(format!(
                "service id {} claims {} slots (at most {MAX_SLOTS_PER_SERVICE})",
                value.id, value.slot_count
            )));
        }
        let mut slots = Vec::with_capacity(value.slot_count as usize);
        for slot in 0..value.slot_count {
            let k = SlotKey {
                service_id: value.id,
                revision: value.revision,
                slot,
            };
            if let Some(id) = dp.slot(&k)? {
                slots.push(id);
            }
        }
        let svc = InstalledService {
            id: value.id,
            revision: value.revision,
            name: names.get(&value.id).cloned().unwrap_or_default(),
            slot_count: value.slot_count,
            mode: Mode::from_value(&value),
            complete: slots.len() == value.slot_count as usize,
            slots,
        };
        installed.services.insert(key, svc);
    }
    check_ids(&installed)?;
    installed.backends = dp
        .backends()?
        .iter()
        .map(|(id, b)| (*id, socket_addr(b)))
        .collect();
    if scan_strays {
        let live: BTreeSet<(u32, u32)> = installed
            .services
            .values()
            .map(|s| (s.id, s.revision))
            .collect();
        installed.stray_slots = dp
            .slot_keys()?
            .into_iter()
            .filter(|k| !live.contains(&(k.service_id, k.revision)))
            .collect();
        let ids: BTreeSet<u32> = installed.services.values().map(|s| s.id).collect();
        installed.stray_names = names
            .keys()
            .copied()
            .filter(|id| !ids.contains(id))
            .collect();
    }
    Ok(installed)
}

fn inconsistent(what: String) -> anyhow::Error {
    anyhow::anyhow!(
        "the pinned maps are inconsistent ({what}); this agent never writes such state, so \
         nothing was changed. `lb-agent detach` resets it (balancing stops until the next start)"
    )
}

/// Reconcile relies on ids being in range (they index the counter arrays) and owned once: a
/// service id by one service, a backend id by one service. State breaking that is refused
/// rather than repaired by guesswork.
fn check_ids(installed: &Installed) -> Result<()> {
    let mut service_ids = BTreeSet::new();
    let mut backend_owner = std::collections::BTreeMap::new();
    for svc in installed.services.values() {
        if svc.id >= MAX_SERVICES || !service_ids.insert(svc.id) {
            return Err(inconsistent(format!(
                "service id {} out of range or repeated",
                svc.id
            )));
        }
        for b in svc.backend_ids() {
            let owner = *backend_owner.entry(b).or_insert(svc.id);
            if b >= MAX_BACKENDS || owner != svc.id {
                return Err(inconsistent(format!(
                    "backend id {b} out of range or used by services {owner} and {}",
                    svc.id
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::service_key;
    use crate::config::Protocol;

    #[test]
    fn leftovers_weigh_backends_by_their_slots() {
        let mut installed = Installed::default();
        installed.backends.insert(7, "10.0.2.1:80".parse().unwrap());
        installed.backends.insert(8, "10.0.2.2:80".parse().unwrap());
        let vip = "10.96.0.2:80".parse().unwrap();
        let service = InstalledService {
            name: "web".into(),
            slot_count: 3,
            slots: vec![7, 8, 8],
            complete: true,
            ..InstalledService::default()
        };
        installed
            .services
            .insert(service_key(vip, Protocol::Tcp), service);
        let leftovers = installed.leftovers();
        let web = &leftovers[&(vip, Protocol::Tcp)];
        assert_eq!(web.name, "web");
        let weights: Vec<(String, u32)> = web
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(
            weights,
            [("10.0.2.1:80".into(), 1), ("10.0.2.2:80".into(), 2)]
        );
    }
}
