//! Backend choice over the service's slot table, where weights are slot multiplicity: a random
//! slot, for Maglev the slot the client's hash names, for least connections the less loaded of
//! two random slots' backends.

use crate::client::Client;
use crate::maps::{LB_BACKENDS, LB_BACKEND_CTRS, LB_SERVICES, LB_SLOTS};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    client_hash, BackendValue, ServiceKey, ServiceValue, ALG_LEAST_CONNECTIONS, ALG_MAGLEV,
    MAX_LOOKUP_ATTEMPTS, SLOTS_PER_ENTRY,
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
            random()
        };
        let Some((backend_id, backend)) = backend_at(&svc, hash) else {
            continue;
        };
        let (backend_id, backend) = if svc.algorithm == ALG_LEAST_CONNECTIONS {
            // Power of two choices: the second draw is used only if it is a live backend with
            // fewer open connections; a tie keeps the first.
            match backend_at(&svc, random()) {
                Some((other_id, other)) if open(other_id, &other) < open(backend_id, &backend) => {
                    (other_id, other)
                }
                _ => (backend_id, backend),
            }
        } else {
            (backend_id, backend)
        };
        return Choice::Backend {
            service_id: svc.id,
            backend_id,
            backend,
        };
    }
    Choice::Raced { service_id: svc.id }
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// The backend of the service's slot `hash % slot_count`. `None` for a slot naming an absent
/// backend, or another service's: a table the agent is replacing.
#[inline(always)]
fn backend_at(svc: &ServiceValue, hash: u32) -> Option<(u32, BackendValue)> {
    let slot = svc.slot_base.wrapping_add(hash % svc.slot_count);
    let pair = LB_SLOTS.get(slot / SLOTS_PER_ENTRY)?;
    let backend_id = if slot % SLOTS_PER_ENTRY == 0 {
        pair[0]
    } else {
        pair[1]
    };
    let backend = *LB_BACKENDS.get(backend_id)?;
    backend.serves(svc.id).then_some((backend_id, backend))
}

/// Open connections of a backend, as its counters have them (`established - closed`).
#[inline(always)]
fn open(backend_id: u32, backend: &BackendValue) -> u64 {
    match LB_BACKEND_CTRS.get(backend_id) {
        Some(c) if c.generation == backend.generation => c.established.saturating_sub(c.closed),
        _ => 0,
    }
}

/// A remembered backend, if its entry still exists and is still the same backend of this
/// service: a backend that left the service, or turned unhealthy, is deleted, and its id may
/// since belong to another backend (a new generation).
#[inline(always)]
pub fn still_serving(service_id: u32, backend_id: u32, generation: u32) -> Option<BackendValue> {
    let backend = *LB_BACKENDS.get(backend_id)?;
    (backend.serves(service_id) && backend.generation == generation).then_some(backend)
}
