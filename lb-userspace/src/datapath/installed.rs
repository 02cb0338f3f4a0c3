//! What the data plane holds now, as read back from the pinned maps. The maps are the source of
//! truth: every reconcile starts from a fresh read, so a failed or interrupted update, or state
//! left by an earlier agent, is simply the next starting point.

use crate::catalog::{Held, Leftover, Leftovers};
use crate::codec::{backend_value, endpoint, service_key, socket_addr, vip_of, Mode};
use crate::config::{BackendConfig, Name, Protocol};
use crate::datapath::capacity::Capacity;
use crate::datapath::maps::Maps;
use anyhow::Result;
use lb_common::addr::RawAddr;
use lb_common::{ServiceKey, MAX_SLOTS_PER_SERVICE};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstalledService {
    pub id: u32,
    /// Table writes so far (`ServiceValue::revision`).
    pub revision: u32,
    /// Where its table starts in the slot array.
    pub slot_base: u32,
    pub name: Name,
    /// Slot count of the table as the service entry states it.
    pub slot_count: u32,
    pub mode: Mode,
    /// Backend id per slot of the table.
    pub slots: Vec<u32>,
    /// False if some slot names no backend (a table whose writing was interrupted, or written
    /// by something else): the next reconcile writes it anew in another range.
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

/// Backend addresses by id, in a table the ids index: ids are dense (they index the maps'
/// arrays), and an entry takes 20 bytes instead of the 60 a B-tree of 36-byte entries filled
/// in id order takes (400,000 backends: 8 MB instead of 24).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BackendAddrs {
    /// Never ends in an absent entry, so that equal contents compare equal.
    entries: Vec<Entry>,
    len: usize,
}

/// An address as the backend map stores it (`codec::backend_value`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Entry {
    addr: RawAddr,
    port: u16,
    present: bool,
}

impl BackendAddrs {
    pub fn get(&self, id: u32) -> Option<SocketAddr> {
        let entry = self.entries.get(id as usize).filter(|e| e.present)?;
        Some(endpoint(&entry.addr, entry.port))
    }

    pub fn insert(&mut self, id: u32, addr: SocketAddr) {
        let at = id as usize;
        if at >= self.entries.len() {
            // Growing by an eighth: the doubling of `resize` alone could leave half unused.
            let more = (at + 1 - self.entries.len()).max(self.entries.len() / 8);
            self.entries.reserve_exact(more);
            self.entries.resize(at + 1, Entry::default());
        }
        let value = backend_value(&addr, 0, 0);
        let entry = &mut self.entries[at];
        self.len += usize::from(!entry.present);
        *entry = Entry {
            addr: value.addr,
            port: value.port,
            present: true,
        };
    }

    pub fn remove(&mut self, id: u32) {
        let Some(entry) = self.entries.get_mut(id as usize).filter(|e| e.present) else {
            return;
        };
        *entry = Entry::default();
        self.len -= 1;
        while self.entries.last().is_some_and(|e| !e.present) {
            self.entries.pop();
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// In id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, SocketAddr)> + '_ {
        (0..self.entries.len() as u32).filter_map(|id| Some((id, self.get(id)?)))
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(id, _)| id)
    }
}

impl std::fmt::Debug for BackendAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(u32, SocketAddr)> for BackendAddrs {
    fn from_iter<I: IntoIterator<Item = (u32, SocketAddr)>>(iter: I) -> Self {
        let mut table = Self::default();
        for (id, addr) in iter {
            table.insert(id, addr);
        }
        table
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Installed {
    pub services: BTreeMap<ServiceKey, InstalledService>,
    pub backends: BackendAddrs,
    /// Names of service ids that no longer exist.
    pub stray_names: Vec<u32>,
    /// What the maps hold at most. (Ranges of the slot array no service points at are free,
    /// whatever they hold: an interrupted update leaves nothing to clean up there.)
    pub capacity: Capacity,
}

impl Held for Installed {
    /// A key of a protocol this agent never writes is left out.
    fn leftover(&self, vip: SocketAddr, protocol: Protocol) -> Option<Leftover> {
        let service = self.services.get(&service_key(vip, protocol))?;
        Some(self.leftover_of(service))
    }

    fn leftovers(&self) -> Leftovers {
        self.services
            .iter()
            .filter_map(|(key, service)| Some((vip_of(key)?, self.leftover_of(service))))
            .collect()
    }
}

impl Installed {
    fn leftover_of(&self, service: &InstalledService) -> Leftover {
        Leftover {
            name: service.name.clone(),
            backends: self.weighted_backends(service).into(),
            balancing: service.mode.balancing(service.slot_count),
        }
    }

    /// The backends a service's current slot table points at, weighted by their slot count.
    fn weighted_backends(&self, service: &InstalledService) -> Vec<BackendConfig> {
        let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for id in &service.slots {
            if let Some(address) = self.backends.get(*id) {
                *weights.entry(address).or_default() += 1;
            }
        }
        weights
            .into_iter()
            .map(|(address, weight)| BackendConfig { address, weight })
            .collect()
    }

    /// Repacks the services' B-tree. Filled in key order, as a first load fills it, its nodes
    /// stay a little over half full (a split leaves six of eleven entries behind): 100,000
    /// services take 18 MB instead of 11. Appending to a map of one entry builds full nodes
    /// from the two sorted runs and frees the old nodes as it goes, so no copy of every entry
    /// is held in between (as collecting one would).
    pub fn compact(&mut self) {
        let Some(first) = self.services.pop_first() else {
            return;
        };
        let mut packed = BTreeMap::from([first]);
        packed.append(&mut self.services);
        self.services = packed;
    }

    /// Backends no service references (interrupted removal).
    pub fn stray_backends(&self) -> Vec<u32> {
        let used: std::collections::BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|s| s.slots.iter().copied())
            .collect();
        self.backends
            .ids()
            .filter(|id| !used.contains(id))
            .collect()
    }
}

/// `scan_strays` looks for leftovers of interrupted updates; `stats` skips it.
pub fn read_installed(dp: &impl Maps, scan_strays: bool) -> Result<Installed> {
    let mut installed = Installed {
        capacity: dp.capacity(),
        ..Installed::default()
    };
    let names: std::collections::BTreeMap<u32, Name> = dp
        .names()?
        .into_iter()
        .map(|(id, n)| (id, Name::from(n.as_str().unwrap_or(""))))
        .collect();
    for (key, value) in dp.services()? {
        if value.slot_count > MAX_SLOTS_PER_SERVICE {
            return Err(inconsistent(format!(
                "service id {} claims {} slots (at most {MAX_SLOTS_PER_SERVICE})",
                value.id, value.slot_count
            )));
        }
        let slots = dp.slots(value.slot_base, value.slot_count).map_err(|e| {
            inconsistent(format!(
                "service id {} has its table at {}..+{}: {e}",
                value.id, value.slot_base, value.slot_count
            ))
        })?;
        let svc = InstalledService {
            id: value.id,
            revision: value.revision,
            slot_base: value.slot_base,
            name: names.get(&value.id).cloned().unwrap_or_default(),
            slot_count: value.slot_count,
            mode: Mode::from_value(&value),
            complete: true,
            slots,
        };
        installed.services.insert(key, svc);
    }
    let backends = dp.backends()?;
    installed.backends = backends
        .iter()
        .map(|(id, b)| (*id, socket_addr(b)))
        .collect();
    let owners: BTreeMap<u32, u32> = backends.iter().map(|(id, b)| (*id, b.service_id)).collect();
    for svc in installed.services.values_mut() {
        svc.complete = svc.slots.iter().all(|b| owners.get(b) == Some(&svc.id));
        if !svc.complete {
            // What the slots name is not this service's: nothing of it may be taken as owned.
            svc.slots.retain(|b| owners.get(b) == Some(&svc.id));
        }
    }
    check_ids(&installed)?;
    if scan_strays {
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
/// service id by one service, a backend id by the one service its entry names. State breaking
/// that is refused rather than repaired by guesswork.
fn check_ids(installed: &Installed) -> Result<()> {
    let mut service_ids = BTreeSet::new();
    for svc in installed.services.values() {
        if svc.id >= installed.capacity.services || !service_ids.insert(svc.id) {
            return Err(inconsistent(format!(
                "service id {} out of range or repeated",
                svc.id
            )));
        }
    }
    let backends = installed.capacity.backends;
    if let Some(b) = installed.backends.ids().find(|b| *b >= backends) {
        return Err(inconsistent(format!("backend id {b} out of range")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses_by_id_compare_by_contents() {
        let v4: SocketAddr = "10.0.2.1:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:8080".parse().unwrap();
        let mut table = BackendAddrs::default();
        table.insert(3, v6);
        table.insert(0, v4);
        table.insert(0, v4);
        assert_eq!(
            (table.len(), table.get(0), table.get(3)),
            (2, Some(v4), Some(v6))
        );
        assert_eq!(table.get(1), None);
        assert_eq!(table.iter().collect::<Vec<_>>(), [(0, v4), (3, v6)]);
        // As the map gives it back: a v4-mapped IPv6 address reads as IPv4.
        table.insert(1, "[::ffff:10.0.2.9]:81".parse().unwrap());
        assert_eq!(table.get(1), Some("10.0.2.9:81".parse().unwrap()));
        table.remove(1);
        table.remove(1);
        table.remove(3);
        table.remove(99);
        assert_eq!(table.len(), 1);
        // Removing the highest ids leaves what a table built with the rest is.
        assert_eq!(table, [(0, v4)].into_iter().collect::<BackendAddrs>());
        table.remove(0);
        assert!(table.is_empty());
        assert_eq!(table, BackendAddrs::default());
    }

    #[test]
    fn compacting_keeps_every_service() {
        let mut installed = Installed::default();
        installed.compact();
        for i in 0..1000u32 {
            let vip = SocketAddr::from(([10, 96, (i >> 8) as u8, i as u8], 80));
            let service = InstalledService {
                id: i,
                ..InstalledService::default()
            };
            installed
                .services
                .insert(service_key(vip, Protocol::Tcp), service);
        }
        let before = installed.clone();
        installed.compact();
        assert_eq!(installed, before);
    }

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
        assert_eq!(&*web.name, "web");
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
