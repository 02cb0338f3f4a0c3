//! The pinned maps, opened by path: the same code serves the running agent, `stats` (no agent
//! needed) and `detach`. Each map's kind and key/value sizes are checked on open, so maps left
//! by an incompatible build are reported instead of misread.

use crate::admission::outlier::Observation;
use crate::codec::socket_addr;
use crate::datapath::maps::Maps;
use anyhow::{bail, Context, Result};
use aya::maps::{
    Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuValues,
};
use aya::Pod;
use lb_common::names::*;
use lb_common::*;
use std::mem::size_of;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where this layout's maps are pinned under `pin_dir` (`MAPS_FOLDER`).
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(MAPS_FOLDER)
}

pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, BackendValue>,
    backend_counters: PerCpuArray<MapData, BackendCounters>,
    service_counters: PerCpuArray<MapData, ServiceCounters>,
    names: HashMap<MapData, u32, ServiceName>,
    meta: Array<MapData, Meta>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    fail_streak: Array<MapData, FailStreak>,
}

/// Expected kind, layout, capacity and flags of one pinned map, as lb-ebpf's maps.rs defines
/// it: a map that differs in any of them was made by something else and is never adopted.
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapType,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
    pub flags: u32,
}

const fn spec<K, V>(name: &'static str, kind: MapType, max_entries: u32) -> MapSpec {
    let flags = match kind {
        // Socket storage requires it too (it is never preallocated).
        MapType::Hash | MapType::SkStorage => AGENT_HASH_FLAGS,
        _ => 0,
    };
    MapSpec {
        name,
        kind,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        max_entries,
        flags,
    }
}

pub const SPECS: [MapSpec; 10] = [
    spec::<u32, FailStreak>(MAP_FAIL_STREAK, MapType::Array, MAX_BACKENDS),
    spec::<AffinityKey, AffinityValue>(MAP_AFFINITY, MapType::LruHash, MAX_AFFINITY),
    // Keyed by a socket (its fd from user space); sized by the sockets, not by max_entries.
    spec::<i32, SocketState>(MAP_SOCKETS, MapType::SkStorage, 0),
    spec::<ServiceKey, ServiceValue>(MAP_SERVICES, MapType::Hash, MAX_SERVICES),
    spec::<SlotKey, u32>(MAP_SLOTS, MapType::Hash, MAX_SLOTS),
    spec::<u32, BackendValue>(MAP_BACKENDS, MapType::Hash, MAX_BACKENDS),
    spec::<u32, BackendCounters>(MAP_BACKEND_COUNTERS, MapType::PerCpuArray, MAX_BACKENDS),
    spec::<u32, ServiceCounters>(MAP_SERVICE_COUNTERS, MapType::PerCpuArray, MAX_SERVICES),
    spec::<u32, ServiceName>(MAP_SERVICE_NAMES, MapType::Hash, MAX_SERVICES),
    spec::<u32, Meta>(MAP_META, MapType::Array, 1),
];

/// Checks a pinned map against its spec without opening it for use.
pub fn check_pinned(dir: &Path, spec: &MapSpec) -> Result<()> {
    let path = dir.join(spec.name);
    let info = MapInfo::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    let found = MapSpec {
        name: spec.name,
        kind: info
            .map_type()
            .with_context(|| format!("{}: unknown map type", path.display()))?,
        key_size: info.key_size() as usize,
        value_size: info.value_size() as usize,
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    spec.matches(&found)
        .with_context(|| format!("pinned map {}", path.display()))
        .with_context(|| {
            format!(
                "it was not created by this agent or by a compatible version, so it is not \
                 adopted: check who pinned it, then remove the state with `lb-agent detach \
                 --pin-dir {}` (this interrupts balancing) and start again",
                dir.display()
            )
        })
}

impl MapSpec {
    /// Whether `found` is this map, naming the first difference.
    fn matches(&self, found: &MapSpec) -> Result<()> {
        let (want, got) = (self, found);
        if (want.kind, want.key_size, want.value_size) != (got.kind, got.key_size, got.value_size) {
            bail!(
                "has type {:?}, key {} bytes, value {} bytes; this agent expects {:?}, {} and {} \
                 bytes",
                got.kind,
                got.key_size,
                got.value_size,
                want.kind,
                want.key_size,
                want.value_size
            );
        }
        if (want.max_entries, want.flags) != (got.max_entries, got.flags) {
            bail!(
                "has {} entries and flags {:#x}; this agent's map has {} entries and flags {:#x}",
                got.max_entries,
                got.flags,
                want.max_entries,
                want.flags
            );
        }
        Ok(())
    }
}

fn open(dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    Ok(wrap(data))
}

impl PinnedMaps {
    /// This layout's maps under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let dir = &maps_dir(pin_dir);
        for s in &SPECS {
            check_pinned(dir, s)?;
        }
        let maps = Self {
            services: open(dir, MAP_SERVICES, Map::HashMap)?.try_into()?,
            slots: open(dir, MAP_SLOTS, Map::HashMap)?.try_into()?,
            backends: open(dir, MAP_BACKENDS, Map::HashMap)?.try_into()?,
            backend_counters: open(dir, MAP_BACKEND_COUNTERS, Map::PerCpuArray)?.try_into()?,
            service_counters: open(dir, MAP_SERVICE_COUNTERS, Map::PerCpuArray)?.try_into()?,
            names: open(dir, MAP_SERVICE_NAMES, Map::HashMap)?.try_into()?,
            meta: open(dir, MAP_META, Map::Array)?.try_into()?,
            affinity: open(dir, MAP_AFFINITY, Map::LruHashMap)?.try_into()?,
            fail_streak: open(dir, MAP_FAIL_STREAK, Map::Array)?.try_into()?,
        };
        Ok(maps)
    }

    /// Reads the `LB_META` in `dir` alone, before the other maps are known to be compatible
    /// (or in an older layout's folder).
    pub fn read_meta(dir: &Path) -> Result<Meta> {
        let meta: Array<MapData, Meta> = open(dir, MAP_META, Map::Array)?.try_into()?;
        Ok(meta.get(&0, 0)?)
    }

    pub fn set_meta(&mut self, meta: Meta) -> Result<()> {
        Ok(self.meta.set(0, meta, 0)?)
    }

    /// Entries the programs keep in a node-wide map themselves: remembered client choices.
    /// (What they keep per socket lives and dies with the socket.)
    pub fn affinity_entries(&self) -> usize {
        self.affinity.keys().count()
    }

    /// Connects to this backend that failed in a row, as the kernel saw them.
    pub fn fail_streak(&self, id: u32) -> Result<u32> {
        Ok(self.fail_streak.get(&id, 0)?.streak)
    }

    pub fn backend_counters(&self, id: u32) -> Result<BackendCounters> {
        Ok(summed(self.backend_counters.get(&id, 0)?))
    }

    pub fn service_counters(&self, id: u32) -> Result<ServiceCounters> {
        Ok(summed(self.service_counters.get(&id, 0)?))
    }

    /// What the kernel counted for each of `backends` that belongs to `service_id`, for
    /// outlier detection; a backend whose counters cannot be read is left out.
    pub fn observations(
        &self,
        service_id: u32,
        backends: &[(u32, BackendValue)],
    ) -> Vec<(SocketAddr, Observation)> {
        backends
            .iter()
            .filter(|(_, b)| b.service_id == service_id)
            .filter_map(|(id, b)| {
                let counters = self.backend_counters(*id).ok()?;
                let observation = Observation {
                    streak: self.fail_streak(*id).ok()?,
                    established: counters.established,
                    failed: counters.failed,
                };
                Some((socket_addr(b), observation))
            })
            .collect()
    }
}

/// The per-CPU copies of one counter element added up.
fn summed<T: Pod + Default + std::ops::Add<Output = T>>(per_cpu: PerCpuValues<T>) -> T {
    per_cpu.iter().fold(T::default(), |acc, c| acc + *c)
}

/// `value` as every possible CPU's copy of a per-CPU element.
fn on_every_cpu<T: Pod>(value: T) -> Result<PerCpuValues<T>> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    Ok(PerCpuValues::try_from(vec![value; cpus])?)
}

fn collect<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    map.iter().map(|r| r.map_err(Into::into)).collect()
}

fn absent_ok(r: Result<(), MapError>) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}

impl Maps for PinnedMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        collect(&self.services)
    }

    fn slot(&self, key: &SlotKey) -> Result<Option<u32>> {
        match self.slots.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn slot_keys(&self) -> Result<Vec<SlotKey>> {
        self.slots.keys().map(|r| r.map_err(Into::into)).collect()
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        collect(&self.backends)
    }

    fn names(&self) -> Result<Vec<(u32, ServiceName)>> {
        collect(&self.names)
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        Ok(self.services.insert(key, value, 0)?)
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        absent_ok(self.services.remove(key))
    }

    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<()> {
        Ok(self.slots.insert(key, backend_id, 0)?)
    }

    fn delete_slot(&mut self, key: &SlotKey) -> Result<()> {
        absent_ok(self.slots.remove(key))
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        Ok(self.backends.insert(id, value, 0)?)
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        absent_ok(self.backends.remove(&id))
    }

    fn put_name(&mut self, id: u32, name: &ServiceName) -> Result<()> {
        Ok(self.names.insert(id, name, 0)?)
    }

    fn delete_name(&mut self, id: u32) -> Result<()> {
        absent_ok(self.names.remove(&id))
    }

    fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        Ok(self
            .service_counters
            .set(id, on_every_cpu(ServiceCounters::default())?, 0)?)
    }

    fn backend_generation(&self, id: u32) -> Result<u32> {
        Ok(self.fail_streak.get(&id, 0)?.generation)
    }

    /// Counters first, then the streak whose generation `backend_generation` reads: the
    /// backend entry that follows names a generation both already carry.
    fn new_backend_generation(&mut self, id: u32) -> Result<()> {
        let generation = self.backend_generation(id)?.wrapping_add(1);
        let fresh = BackendCounters {
            generation,
            ..Default::default()
        };
        self.backend_counters.set(id, on_every_cpu(fresh)?, 0)?;
        let streak = FailStreak {
            generation,
            streak: 0,
        };
        Ok(self.fail_streak.set(id, streak, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_differing_in_any_property_is_not_ours() {
        let ours = &SPECS[3];
        assert_eq!(ours.name, MAP_SERVICES);
        let same = MapSpec { ..*ours };
        assert!(ours.matches(&same).is_ok());
        let variants = [
            MapSpec {
                kind: MapType::LruHash,
                ..*ours
            },
            MapSpec {
                key_size: 8,
                ..*ours
            },
            MapSpec {
                value_size: 8,
                ..*ours
            },
            MapSpec {
                max_entries: 1,
                ..*ours
            },
            MapSpec { flags: 0, ..*ours },
        ];
        for other in &variants {
            let err = ours.matches(other).unwrap_err().to_string();
            assert!(err.contains("this agent"), "{err}");
        }
    }
}
