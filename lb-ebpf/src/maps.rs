//! The pinned maps. Names and layouts come from lb-common; the agent creates nothing itself, it
//! loads this object with a pin folder so that every map below is created once and then reused
//! by later agents (adoption).
//!
//! Hash maps are not preallocated: with preallocation a deleted element can be reused by a
//! concurrent insert while this program still reads it, which would defeat the revision swap.
//! The two maps the programs write themselves (affinity and reverse translation) are LRU maps:
//! they can never fill up, the least recently used entry makes room.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityValue, BackendCounters, BackendValue, Meta, ReverseKey, ReverseValue,
    ServiceCounters, ServiceKey, ServiceName, ServiceValue, SlotKey, AGENT_HASH_FLAGS,
    MAX_AFFINITY, MAX_BACKENDS, MAX_REVERSE, MAX_SERVICES, MAX_SLOTS,
};

#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, AGENT_HASH_FLAGS);

#[map]
pub static LB_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_SLOTS, AGENT_HASH_FLAGS);

#[map]
pub static LB_BACKENDS: HashMap<u32, BackendValue> =
    HashMap::pinned(MAX_BACKENDS, AGENT_HASH_FLAGS);

#[map]
pub static LB_BACKEND_CTRS: PerCpuArray<BackendCounters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map]
pub static LB_SERVICE_CTRS: PerCpuArray<ServiceCounters> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Consecutive failed connects per backend id (reset by an established one), read by the
/// agent's outlier detection. Shared rather than per CPU: the order across CPUs matters.
#[map]
pub static LB_FAIL_STREAK: Array<u32> = Array::pinned(MAX_BACKENDS, 0);

#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(MAX_AFFINITY, 0);

#[map]
pub static LB_REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(MAX_REVERSE, 0);

/// Read only by `lb-agent stats`; declared here so that it is created and pinned with the rest.
#[map]
pub static LB_SVC_NAMES: HashMap<u32, ServiceName> =
    HashMap::pinned(MAX_SERVICES, AGENT_HASH_FLAGS);

/// Layout version of the pinned maps, checked by the agent before it adopts them.
#[map]
pub static LB_META: Array<Meta> = Array::pinned(1, 0);
