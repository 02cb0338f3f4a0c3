//! The pinned maps. Names and layouts come from lb-common; the agent creates nothing itself, it
//! loads this object with a pin folder so that every map below is created once and then reused
//! by later agents (adoption).
//!
//! Hash maps are not preallocated: with preallocation a deleted element can be reused by a
//! concurrent insert while this program still reads it, which would defeat the revision swap.
//! What the programs keep per socket lives in the socket's own storage (`LB_SOCKETS`); the
//! one node-wide map they write, client affinity, is an LRU map that makes room by itself.

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use core::ffi::c_void;
use lb_common::{
    AffinityKey, AffinityValue, BackendCounters, BackendValue, Meta, ServiceCounters, ServiceKey,
    ServiceName, ServiceValue, SocketState, AGENT_HASH_FLAGS, MAX_AFFINITY, MAX_BACKENDS,
    MAX_BYPASS, MAX_SERVICES, MAX_SLOTS, MMAPABLE_FLAGS, SLOTS_PER_ENTRY,
};

#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, AGENT_HASH_FLAGS);

/// Every service's slot table, in ranges (`ServiceValue::slot_base`): an array, so a lookup is
/// an index computation, and memory-mappable, so the agent writes a Maglev table of 65,537
/// entries with plain stores.
#[map]
pub static LB_SLOTS: Array<[u32; SLOTS_PER_ENTRY as usize]> =
    Array::pinned(MAX_SLOTS / SLOTS_PER_ENTRY, MMAPABLE_FLAGS);

/// Indexed by backend id (ids are dense); memory-mappable, so the agent writes a million
/// backends without a syscall each. See `BackendValue` for how an absent one reads.
#[map]
pub static LB_BACKENDS: Array<BackendValue> = Array::pinned(MAX_BACKENDS, MMAPABLE_FLAGS);

/// Shared by all CPUs rather than per CPU: per-CPU copies of a million backends' counters
/// would take gigabytes on a large node. Memory-mappable, so the agent reads them in bulk.
#[map]
pub static LB_BACKEND_CTRS: Array<BackendCounters> = Array::pinned(MAX_BACKENDS, MMAPABLE_FLAGS);

#[map]
pub static LB_SERVICE_CTRS: Array<ServiceCounters> = Array::pinned(MAX_SERVICES, MMAPABLE_FLAGS);

#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(MAX_AFFINITY, 0);

/// A BTF map definition: the loader reads the map's properties from the types of these
/// fields, never from their values. aya-ebpf has a socket-storage map, but without the
/// `pinning` field, and this map must be pinned like the others: a restarted agent's programs
/// have to find the state of sockets its predecessor's programs translated.
#[repr(C)]
pub struct SocketStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SocketState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}

// SAFETY: never dereferenced; the fields only carry types for the BTF the loader reads.
unsafe impl Sync for SocketStorage {}

impl SocketStorage {
    /// The map argument of the storage helpers: the loader relocates this symbol to the map.
    #[inline(always)]
    pub fn as_ptr(&'static self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// Each socket's `SocketState`, created by the first translation of the socket.
#[link_section = ".maps"]
#[no_mangle]
pub static LB_SOCKETS: SocketStorage = SocketStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// Read only by `lb-agent stats`; declared here so that it is created and pinned with the rest.
#[map]
pub static LB_SVC_NAMES: HashMap<u32, ServiceName> =
    HashMap::pinned(MAX_SERVICES, AGENT_HASH_FLAGS);

/// Cgroups whose processes are never translated (`[dataplane] bypass`): cgroup id → connects
/// and datagrams left untranslated. Added to in place, like the counters; the agent writes
/// only keys. `BYPASS_ANY` is present while any cgroup is listed.
#[map]
pub static LB_BYPASS: HashMap<u64, u64> = HashMap::pinned(MAX_BYPASS + 1, AGENT_HASH_FLAGS);

/// Layout version of the pinned maps, checked by the agent before it adopts them.
#[map]
pub static LB_META: Array<Meta> = Array::pinned(1, 0);
