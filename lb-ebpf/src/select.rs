//! Backend choice over the service's slot table, where weights are slot multiplicity: a random
//! slot, or for Maglev the slot the client's hash names.

use crate::client::Client;
use crate::maps::{LB_BACKENDS, LB_SERVICES, LB_SLOTS};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    client_hash, BackendValue, ServiceKey, ServiceValue, ALG_MAGLEV, MAX_LOOKUP_ATTEMPTS,
    SLOTS_PER_ENTRY,
};

pub enum Choice {
    Backend {
        service_id: u32,
        backend_id: u32,
        backend: BackendValue,
    },
    NoBackend {
        service_id: u32,
    },
    /// Every attempt read a table the agent had already replaced and cleaned up.
    Raced {
        service_id: u32,
    },
}

/// `svc` is the service entry the caller already read for `key`.
#[inline(always)]
pub fn choose(key: &ServiceKey, mut svc: ServiceValue, client: &mut Client) -> Choice {
    // A backend that is missing or another service's means the agent flipped the service to a
    // new table between our reads and the old range's backends are gone (or the range was
    // reused); reading the service again yields the new table.
    for attempt in 0..MAX_LOOKUP_ATTEMPTS {
        if attempt > 0 {
            let Some(again) = LB_SERVICES.get_ptr(key) else {
                return Choice::NoBackend { service_id: svc.id };
            };
            // SAFETY: the map is not preallocated, so the element stays valid under RCU while
            // we copy it.
            svc = unsafe { *again };
        }
        if svc.slot_count == 0 {
            return Choice::NoBackend { service_id: svc.id };
        }
        let hash = if svc.algorithm == ALG_MAGLEV {
            client_hash(client.key(svc.flags))
        } else {
            // SAFETY: plain helper call without arguments.
            unsafe { bpf_get_prandom_u32() }
        };
        let slot = svc.slot_base.wrapping_add(hash % svc.slot_count);
        let Some(pair) = LB_SLOTS.get(slot / SLOTS_PER_ENTRY) else {
            continue;
        };
        let backend_id = if slot % SLOTS_PER_ENTRY == 0 {
            pair[0]
        } else {
            pair[1]
        };
        let Some(backend) = LB_BACKENDS.get(backend_id) else {
            continue;
        };
        let backend = *backend;
        // A slot naming an absent backend, or another service's, is a table the agent is
        // replacing.
        if !backend.serves(svc.id) {
            continue;
        }
        return Choice::Backend {
            service_id: svc.id,
            backend_id,
            backend,
        };
    }
    Choice::Raced { service_id: svc.id }
}

/// A remembered backend, if its entry still exists and is still the same backend of this
/// service: a backend that left the service, or turned unhealthy, is deleted, and its id may
/// since belong to another backend (a new generation).
#[inline(always)]
pub fn still_serving(service_id: u32, backend_id: u32, generation: u32) -> Option<BackendValue> {
    let backend = *LB_BACKENDS.get(backend_id)?;
    (backend.serves(service_id) && backend.generation == generation).then_some(backend)
}
