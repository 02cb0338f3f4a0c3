//! The data plane's maps as a set of primitives. The pinned BPF maps implement the trait
//! (`pinned`); the unit tests implement it in memory (`fake`), so the read and apply logic that
//! runs against the kernel is the logic under test.

use crate::datapath::capacity::Capacity;
use anyhow::Result;
use lb_common::{BackendValue, ServiceKey, ServiceName, ServiceValue};

pub trait Maps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    /// What the maps were sized for.
    fn capacity(&self) -> Capacity;
    /// The backend ids at `base..base + count` of the slot array; an error beyond its end.
    fn slots(&self, base: u32, count: u32) -> Result<Vec<u32>>;
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>>;
    fn names(&self) -> Result<Vec<(u32, ServiceName)>>;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    /// Many at once, in order (the pinned maps use one syscall per few thousand); a failure
    /// leaves a prefix written.
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        entries.iter().try_for_each(|(k, v)| self.put_service(k, v))
    }
    /// Deleting an absent entry is not an error: cleanups are retried after interruptions.
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()>;
    /// Writes a table at `base..base + backends.len()` of the slot array.
    fn put_slots(&mut self, base: u32, backends: &[u32]) -> Result<()>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn put_name(&mut self, id: u32, name: &ServiceName) -> Result<()>;
    /// Many at once, like `put_services`.
    fn put_names(&mut self, entries: &[(u32, ServiceName)]) -> Result<()> {
        entries.iter().try_for_each(|(id, n)| self.put_name(*id, n))
    }
    fn delete_name(&mut self, id: u32) -> Result<()>;
    fn reset_service_counters(&mut self, id: u32) -> Result<()>;
    /// The generation of the backend id's current owner.
    fn backend_generation(&self, id: u32) -> Result<u32>;
    /// Hands the id to a new owner: the next generation, with zeroed counters and streak.
    fn new_backend_generation(&mut self, id: u32) -> Result<()>;
}

/// An in-memory data plane for unit tests, with the invariant the connect program relies on.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, Default)]
    pub struct FakeMaps {
        pub services: BTreeMap<ServiceKey, ServiceValue>,
        /// The slot array, sparse: entries never written read as 0, as in the kernel's.
        pub slots: BTreeMap<u32, u32>,
        pub capacity: Capacity,
        pub backends: BTreeMap<u32, BackendValue>,
        pub names: BTreeMap<u32, ServiceName>,
        pub generations: BTreeMap<u32, u32>,
        pub service_resets: Vec<u32>,
    }

    impl FakeMaps {
        /// What a connect could observe: every service entry names a complete slot table of
        /// existing backends. Returns the first violation.
        pub fn check_consistent(&self) -> Result<(), String> {
            for (key, v) in &self.services {
                for slot in 0..v.slot_count {
                    let index = v.slot_base + slot;
                    let Some(b) = self.slots.get(&index) else {
                        return Err(format!(
                            "{key:?}: slot {slot} (index {index}) never written"
                        ));
                    };
                    let Some(backend) = self.backends.get(b) else {
                        return Err(format!("{key:?}: slot {slot} names missing backend {b}"));
                    };
                    if backend.service_id != v.id {
                        return Err(format!("{key:?}: slot {slot} names another service's {b}"));
                    }
                    let generation = self.generations.get(b).copied().unwrap_or(0);
                    if backend.generation != generation {
                        return Err(format!(
                            "{key:?}: backend {b} has generation {}, its counters {generation}",
                            backend.generation
                        ));
                    }
                }
            }
            Ok(())
        }
    }

    fn vec_of<K: Copy, V: Copy>(m: &BTreeMap<K, V>) -> Vec<(K, V)> {
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }

    impl Maps for FakeMaps {
        fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
            Ok(vec_of(&self.services))
        }
        fn capacity(&self) -> Capacity {
            self.capacity
        }
        fn slots(&self, base: u32, count: u32) -> Result<Vec<u32>> {
            anyhow::ensure!(
                u64::from(base) + u64::from(count) <= u64::from(self.capacity.slots),
                "beyond the slot array"
            );
            Ok((base..base + count)
                .map(|i| self.slots.get(&i).copied().unwrap_or(0))
                .collect())
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
        fn put_slots(&mut self, base: u32, backends: &[u32]) -> Result<()> {
            anyhow::ensure!(
                u64::from(base) + backends.len() as u64 <= u64::from(self.capacity.slots),
                "beyond the slot array"
            );
            for (i, id) in backends.iter().enumerate() {
                self.slots.insert(base + i as u32, *id);
            }
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
        fn backend_generation(&self, id: u32) -> Result<u32> {
            Ok(self.generations.get(&id).copied().unwrap_or(0))
        }
        fn new_backend_generation(&mut self, id: u32) -> Result<()> {
            *self.generations.entry(id).or_insert(0) += 1;
            Ok(())
        }
    }
}
