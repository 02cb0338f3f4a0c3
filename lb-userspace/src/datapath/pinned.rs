//! The pinned maps, opened by path: the same code serves the running agent, `stats` (no agent
//! needed) and `detach`. Each map's kind and key/value sizes are checked on open, so maps left
//! by an incompatible build are reported instead of misread.

use crate::admission::outlier::Observation;
use crate::datapath::capacity::Capacity;
use crate::datapath::mapped::MappedArray;
use crate::datapath::maps::Maps;
use crate::datapath::sys::update_batch;
use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError, MapInfo, MapType};
use aya::Pod;
use lb_common::names::*;
use lb_common::*;
use std::collections::BTreeMap;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Where this layout's maps are pinned under `pin_dir` (`MAPS_FOLDER`).
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(MAPS_FOLDER)
}

pub struct PinnedMaps {
    dir: PathBuf,
    capacity: Capacity,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: MappedArray<u32>,
    backends: MappedArray<BackendValue>,
    backend_counters: MappedArray<BackendCounters>,
    service_counters: MappedArray<ServiceCounters>,
    names: HashMap<MapData, u32, ServiceName>,
    meta: Array<MapData, Meta>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    bypass: HashMap<MapData, u64, u64>,
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
        MapType::Array if max_entries > 1 => MMAPABLE_FLAGS,
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

/// A slot array element: two slots (`SLOTS_PER_ENTRY`).
type SlotPair = [u32; SLOTS_PER_ENTRY as usize];

/// Every map of this layout as sized for `c`; the same sizes go to the loader for new maps.
pub const fn specs(c: &Capacity) -> [MapSpec; 10] {
    [
        spec::<u64, u64>(MAP_BYPASS, MapType::Hash, MAX_BYPASS + 1),
        spec::<AffinityKey, AffinityValue>(MAP_AFFINITY, MapType::LruHash, c.affinity),
        // Keyed by a socket (its fd from user space); sized by the sockets, not max_entries.
        spec::<i32, SocketState>(MAP_SOCKETS, MapType::SkStorage, 0),
        spec::<ServiceKey, ServiceValue>(MAP_SERVICES, MapType::Hash, c.services),
        spec::<u32, SlotPair>(MAP_SLOTS, MapType::Array, c.slots / SLOTS_PER_ENTRY),
        spec::<u32, BackendValue>(MAP_BACKENDS, MapType::Array, c.backends),
        spec::<u32, BackendCounters>(MAP_BACKEND_COUNTERS, MapType::Array, c.backends),
        spec::<u32, ServiceCounters>(MAP_SERVICE_COUNTERS, MapType::Array, c.services),
        spec::<u32, ServiceName>(MAP_SERVICE_NAMES, MapType::Hash, c.services),
        spec::<u32, Meta>(MAP_META, MapType::Array, 1),
    ]
}

/// What the pinned maps in `dir` were sized for: read from the services, backends and slot
/// maps (the other maps must agree, which `check_pinned` then checks).
pub fn pinned_capacity(dir: &Path) -> Result<Capacity> {
    let entries = |name: &str| -> Result<u32> {
        let path = dir.join(name);
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        Ok(info.max_entries())
    };
    let capacity = Capacity {
        services: entries(MAP_SERVICES)?,
        backends: entries(MAP_BACKENDS)?,
        slots: entries(MAP_SLOTS)?.saturating_mul(SLOTS_PER_ENTRY),
        affinity: entries(MAP_AFFINITY)?,
    };
    capacity
        .within_limits()
        .with_context(|| format!("pinned maps in {}", dir.display()))?;
    Ok(capacity)
}

/// Kernel memory of each pinned map in `dir` as the kernel accounts it (`memlock` of the map's
/// fdinfo: for hash maps, the elements in use), in bytes.
fn kernel_memory(dir: &Path) -> BTreeMap<String, u64> {
    ALL_MAPS
        .iter()
        .filter_map(|name| {
            let data = MapData::from_pin(dir.join(name)).ok()?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let line = info.lines().find(|l| l.starts_with("memlock:"))?;
            let bytes = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((name.to_string(), bytes))
        })
        .collect()
}

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

/// A memory-mapped array of `entries` values `V`, seen as an array of `T`.
fn mapped<V, T: Pod>(dir: &Path, name: &str, entries: u32) -> Result<MappedArray<T>> {
    MappedArray::open(&dir.join(name), entries, size_of::<V>())
}

fn open(dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    Ok(wrap(data))
}

impl PinnedMaps {
    /// This layout's maps under `pin_dir`, of whatever capacity they were created with.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let dir = &maps_dir(pin_dir);
        let c = pinned_capacity(dir)?;
        for s in &specs(&c) {
            check_pinned(dir, s)?;
        }
        let maps = Self {
            dir: dir.clone(),
            capacity: c,
            services: open(dir, MAP_SERVICES, Map::HashMap)?.try_into()?,
            slots: mapped::<SlotPair, _>(dir, MAP_SLOTS, c.slots / SLOTS_PER_ENTRY)?,
            backends: mapped::<BackendValue, _>(dir, MAP_BACKENDS, c.backends)?,
            backend_counters: mapped::<BackendCounters, _>(dir, MAP_BACKEND_COUNTERS, c.backends)?,
            service_counters: mapped::<ServiceCounters, _>(dir, MAP_SERVICE_COUNTERS, c.services)?,
            names: open(dir, MAP_SERVICE_NAMES, Map::HashMap)?.try_into()?,
            meta: open(dir, MAP_META, Map::Array)?.try_into()?,
            affinity: open(dir, MAP_AFFINITY, Map::LruHashMap)?.try_into()?,
            bypass: open(dir, MAP_BYPASS, Map::HashMap)?.try_into()?,
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

    /// Kernel memory of each map, as the kernel accounts it.
    pub fn kernel_memory(&self) -> BTreeMap<String, u64> {
        kernel_memory(&self.dir)
    }

    /// Entries the programs keep in a node-wide map themselves: remembered client choices.
    /// (What they keep per socket lives and dies with the socket.)
    pub fn affinity_entries(&self) -> usize {
        self.affinity.keys().count()
    }

    /// `LB_SOCKETS`, for the socket terminator's programs.
    pub fn sockets(&self) -> Result<MapData> {
        let path = self.dir.join(MAP_SOCKETS);
        MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))
    }

    /// Bypassed cgroups by id, with the connects and datagrams left untranslated for each.
    pub fn bypass_counts(&self) -> Result<BTreeMap<u64, u64>> {
        let all = collect(&self.bypass)?;
        Ok(all
            .into_iter()
            .filter(|(id, _)| *id != BYPASS_ANY)
            .collect())
    }

    /// Makes `ids` the bypassed cgroups; a cgroup already listed keeps its count. `BYPASS_ANY`
    /// goes in after the first and out before the last, so the programs look for a bypassed
    /// cgroup exactly while there may be one.
    pub fn set_bypass(&mut self, ids: &std::collections::BTreeSet<u64>) -> Result<()> {
        let present = self.bypass_counts()?;
        if ids.is_empty() {
            absent_ok(self.bypass.remove(&BYPASS_ANY))?;
        }
        for id in ids.iter().filter(|id| !present.contains_key(id)) {
            self.bypass.insert(id, 0, 0)?;
        }
        for id in present.keys().filter(|id| !ids.contains(id)) {
            absent_ok(self.bypass.remove(id))?;
        }
        if !ids.is_empty() {
            self.bypass.insert(BYPASS_ANY, 0, 0)?;
        }
        Ok(())
    }

    /// One service's entry, by a single lookup: for readers that follow a few services among
    /// many (reading them all takes a syscall per entry).
    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) => absent_ok(Err(e)).map(|()| None),
        }
    }

    /// The backend entry at `id`, if a service holds it.
    pub fn backend(&self, id: u32) -> Option<BackendValue> {
        let b = self.backends.get(id)?;
        (b.port != 0 && b.service_id != NO_SERVICE).then_some(b)
    }

    pub fn backend_counters(&self, id: u32) -> Result<BackendCounters> {
        self.backend_counters
            .get(id)
            .with_context(|| format!("backend id {id} is beyond the counters"))
    }

    pub fn service_counters(&self, id: u32) -> Result<ServiceCounters> {
        self.service_counters
            .get(id)
            .with_context(|| format!("service id {id} is beyond the counters"))
    }

    /// What the kernel counted for each of a service's `backends` (id, address), for outlier
    /// detection; a backend whose counters cannot be read is left out.
    pub fn observations(
        &self,
        backends: impl Iterator<Item = (u32, SocketAddr)>,
    ) -> Vec<(SocketAddr, Observation)> {
        backends
            .filter_map(|(id, address)| {
                let counters = self.backend_counters(id).ok()?;
                let observation = Observation {
                    streak: counters.fail_streak,
                    established: counters.established,
                    failed: counters.failed,
                };
                Some((address, observation))
            })
            .collect()
    }
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

    fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn slots(&self, base: u32, count: u32) -> Result<Vec<u32>> {
        (base..base.saturating_add(count))
            .map(|i| self.slots.get(i).context("beyond the slot array"))
            .collect()
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        Ok((0..self.backends.count())
            .filter_map(|id| Some((id, self.backend(id)?)))
            .collect())
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

    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        update_batch(self.services.map().fd().as_fd(), entries)
    }

    fn put_names(&mut self, entries: &[(u32, ServiceName)]) -> Result<()> {
        update_batch(self.names.map().fd().as_fd(), entries)
    }

    fn put_slots(&mut self, base: u32, backends: &[u32]) -> Result<()> {
        for (i, id) in backends.iter().enumerate() {
            let at = u32::try_from(i).ok().and_then(|i| base.checked_add(i));
            self.slots.set(at.context("beyond the slot array")?, *id)?;
        }
        Ok(())
    }

    /// The entry reads as absent until its last store: first the backend without a service,
    /// then the same with its service, a store that can only change `service_id`.
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        let absent = BackendValue {
            service_id: NO_SERVICE,
            ..*value
        };
        self.backends.set(id, absent)?;
        self.backends.set(id, *value)
    }

    /// Only `service_id` changes (see `BackendValue`); an absent entry stays absent.
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        match self.backends.get(id) {
            Some(b) if b.port != 0 => self.backends.set(
                id,
                BackendValue {
                    service_id: NO_SERVICE,
                    ..b
                },
            ),
            _ => Ok(()),
        }
    }

    fn put_name(&mut self, id: u32, name: &ServiceName) -> Result<()> {
        Ok(self.names.insert(id, name, 0)?)
    }

    fn delete_name(&mut self, id: u32) -> Result<()> {
        absent_ok(self.names.remove(&id))
    }

    fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        self.service_counters.set(id, ServiceCounters::default())
    }

    fn backend_generation(&self, id: u32) -> Result<u32> {
        Ok(self.backend_counters(id)?.generation)
    }

    /// One store of the whole element: its generation and zeroed counters and streak. The
    /// backend entry that follows names the generation the counters already carry.
    fn new_backend_generation(&mut self, id: u32) -> Result<()> {
        let fresh = BackendCounters {
            generation: self.backend_generation(id)?.wrapping_add(1),
            ..Default::default()
        };
        self.backend_counters.set(id, fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_differing_in_any_property_is_not_ours() {
        let specs = specs(&Capacity::default());
        let ours = specs.iter().find(|s| s.name == MAP_SERVICES).unwrap();
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
