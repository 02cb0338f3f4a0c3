//! Remembered choices of client-affinity services: a client's backend, until it has been idle
//! for the service's timeout. (An unconnected UDP socket's backend per service is the
//! socket's own state, `socket.rs`.)

use crate::client::Client;
use crate::maps::LB_AFFINITY;
use crate::select::still_serving;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{AffinityKey, AffinityValue, BackendValue, ServiceValue, FLAG_AFFINITY_CLIENT};

pub struct Slot {
    key: AffinityKey,
    timeout_ns: u64,
}

/// The entry this service's choice is remembered under, if it has client affinity.
#[inline(always)]
pub fn slot(svc: &ServiceValue, client: &mut Client) -> Option<Slot> {
    if svc.flags & FLAG_AFFINITY_CLIENT == 0 {
        return None;
    }
    Some(Slot {
        key: AffinityKey {
            service_id: svc.id,
            _pad: 0,
            key: client.key(svc.flags),
        },
        timeout_ns: u64::from(svc.affinity_timeout_s) * 1_000_000_000,
    })
}

/// The remembered backend, refreshed as used now; `None` if absent, expired or gone.
#[inline(always)]
pub fn recall(slot: &Slot) -> Option<(u32, BackendValue)> {
    let entry = LB_AFFINITY.get_ptr_mut(&slot.key)?;
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: an LRU element stays valid under RCU for this run; racing writers only store
    // whole aligned words, so the worst case is a slightly older timestamp.
    let remembered = unsafe { &mut *entry };
    if slot.timeout_ns != 0 && now.saturating_sub(remembered.last_used_ns) > slot.timeout_ns {
        return None;
    }
    let backend = still_serving(
        slot.key.service_id,
        remembered.backend_id,
        remembered.generation,
    )?;
    remembered.last_used_ns = now;
    Some((remembered.backend_id, backend))
}

#[inline(always)]
pub fn remember(slot: &Slot, backend_id: u32, backend: &BackendValue) {
    let value = AffinityValue {
        backend_id,
        generation: backend.generation,
        // SAFETY: plain helper call without arguments.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A failed insert only costs a fresh choice next time.
    let _ = LB_AFFINITY.insert(&slot.key, &value, 0);
}
