//! The data plane as a set of map primitives, and the two generic procedures over it: reading
//! what is installed, and applying a reconcile plan. The pinned BPF maps implement the trait
//! (`bpf_maps`); the unit tests implement it in memory, so the read and apply logic that runs
//! against the kernel is the logic under test.

use crate::installed::{Installed, InstalledService};
use crate::reconcile::Op;
use anyhow::{Context, Result};
use lb_common::{
    ip_from_raw, ip_to_raw, port_from_raw, port_to_raw, BackendValue, RawAddr, ServiceKey,
    ServiceName, ServiceValue, SlotKey,
};
use lb_common::{MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS_PER_SERVICE};
use std::collections::BTreeSet;
use std::net::SocketAddr;

pub trait Dataplane {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    fn slot(&self, key: &SlotKey) -> Result<Option<u32>>;
    fn slot_keys(&self) -> Result<Vec<SlotKey>>;
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>>;
    fn names(&self) -> Result<Vec<(u32, ServiceName)>>;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<()>;
    /// Deleting an absent entry is not an error: cleanups are retried after interruptions.
    fn delete_slot(&mut self, key: &SlotKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn put_name(&mut self, id: u32, name: &ServiceName) -> Result<()>;
    fn delete_name(&mut self, id: u32) -> Result<()>;
    fn reset_service_counters(&mut self, id: u32) -> Result<()>;
    fn reset_backend_counters(&mut self, id: u32) -> Result<()>;
}

/// A map address and raw port as a socket address (v4-mapped addresses come back as IPv4).
pub fn endpoint(addr: &RawAddr, raw_port: u16) -> SocketAddr {
    SocketAddr::new(ip_from_raw(addr), port_from_raw(raw_port))
}

pub fn socket_addr(b: &BackendValue) -> SocketAddr {
    endpoint(&b.addr, b.port)
}

pub fn backend_value(addr: &SocketAddr, service_id: u32) -> BackendValue {
    BackendValue {
        addr: ip_to_raw(addr.ip()),
        port: port_to_raw(addr.port()),
        _pad: 0,
        service_id,
    }
}

/// `scan_strays` walks the whole slot map to find leftovers; `stats` skips it.
pub fn read_installed(dp: &impl Dataplane, scan_strays: bool) -> Result<Installed> {
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
            mode: crate::plan::Mode::from_value(&value),
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

/// Applies operations in order and stops at the first failure; see `reconcile` for why any
/// prefix leaves a consistent data plane.
pub fn apply(dp: &mut impl Dataplane, ops: &[Op]) -> Result<()> {
    for op in ops {
        apply_one(dp, op).with_context(|| format!("applying {op:?}"))?;
    }
    Ok(())
}

fn apply_one(dp: &mut impl Dataplane, op: &Op) -> Result<()> {
    match op {
        Op::ResetServiceCounters(id) => dp.reset_service_counters(*id),
        Op::ResetBackendCounters(id) => dp.reset_backend_counters(*id),
        Op::PutBackend {
            id,
            addr,
            service_id,
        } => dp.put_backend(*id, &backend_value(addr, *service_id)),
        Op::PutSlots {
            service_id,
            revision,
            backends,
        } => {
            for (slot, backend) in backends.iter().enumerate() {
                let key = SlotKey {
                    service_id: *service_id,
                    revision: *revision,
                    slot: slot as u32,
                };
                dp.put_slot(&key, *backend)?;
            }
            Ok(())
        }
        Op::PutName { service_id, name } => dp.put_name(*service_id, &ServiceName::new(name)),
        Op::PutService { key, value } => dp.put_service(key, value),
        Op::DeleteService(key) => dp.delete_service(key),
        Op::DeleteSlots {
            service_id,
            revision,
            count,
        } => {
            for slot in 0..*count {
                dp.delete_slot(&SlotKey {
                    service_id: *service_id,
                    revision: *revision,
                    slot,
                })?;
            }
            Ok(())
        }
        Op::DeleteSlot(key) => dp.delete_slot(key),
        Op::DeleteName(id) => dp.delete_name(*id),
        Op::DeleteBackend(id) => dp.delete_backend(*id),
    }
}

/// An in-memory data plane for unit tests, with the invariant the connect program relies on.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Default, Clone)]
    pub struct FakeDataplane {
        pub services: BTreeMap<ServiceKey, ServiceValue>,
        pub slots: BTreeMap<SlotKey, u32>,
        pub backends: BTreeMap<u32, BackendValue>,
        pub names: BTreeMap<u32, ServiceName>,
        pub backend_connects: BTreeMap<u32, u64>,
        pub service_resets: Vec<u32>,
    }

    impl FakeDataplane {
        /// What a connect could observe: every service entry names a complete slot table of
        /// existing backends. Returns the first violation.
        pub fn check_consistent(&self) -> Result<(), String> {
            for (key, v) in &self.services {
                for slot in 0..v.slot_count {
                    let k = SlotKey {
                        service_id: v.id,
                        revision: v.revision,
                        slot,
                    };
                    let Some(b) = self.slots.get(&k) else {
                        return Err(format!(
                            "{key:?}: slot {slot} of revision {} missing",
                            v.revision
                        ));
                    };
                    if !self.backends.contains_key(b) {
                        return Err(format!("{key:?}: slot {slot} names missing backend {b}"));
                    }
                }
            }
            Ok(())
        }
    }

    fn vec_of<K: Copy, V: Copy>(m: &BTreeMap<K, V>) -> Vec<(K, V)> {
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }

    impl Dataplane for FakeDataplane {
        fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
            Ok(vec_of(&self.services))
        }
        fn slot(&self, key: &SlotKey) -> Result<Option<u32>> {
            Ok(self.slots.get(key).copied())
        }
        fn slot_keys(&self) -> Result<Vec<SlotKey>> {
            Ok(self.slots.keys().copied().collect())
        }
        fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
            Ok(vec_of(&self.backends))
        }
        fn names(&self) -> Result<Vec<(u32, ServiceName)>> {
            Ok(vec_of(&self.names))
        }
        fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
            self.services.insert(*key, *value);
            Ok(())
        }
        fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
            self.services.remove(key);
            Ok(())
        }
        fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<()> {
            self.slots.insert(*key, backend_id);
            Ok(())
        }
        fn delete_slot(&mut self, key: &SlotKey) -> Result<()> {
            self.slots.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
            self.backends.insert(id, *value);
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<()> {
            self.backends.remove(&id);
            Ok(())
        }
        fn put_name(&mut self, id: u32, name: &ServiceName) -> Result<()> {
            self.names.insert(id, *name);
            Ok(())
        }
        fn delete_name(&mut self, id: u32) -> Result<()> {
            self.names.remove(&id);
            Ok(())
        }
        fn reset_service_counters(&mut self, id: u32) -> Result<()> {
            self.service_resets.push(id);
            Ok(())
        }
        fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
            self.backend_connects.insert(id, 0);
            Ok(())
        }
    }
}
