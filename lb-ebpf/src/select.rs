//! Backend choice: random over the service's slot table, where weights are slot multiplicity.

use crate::maps::{LB_BACKENDS, LB_SERVICES, LB_SLOTS};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{BackendValue, ServiceKey, SlotKey, MAX_LOOKUP_ATTEMPTS};

pub enum Choice {
    NotAService,
    Backend {
        service_id: u32,
        backend_id: u32,
        backend: BackendValue,
    },
    NoBackend {
        service_id: u32,
    },
    /// Every attempt read a revision the agent had already replaced and cleaned up.
    Raced {
        service_id: u32,
    },
}

#[inline(always)]
pub fn choose(key: &ServiceKey) -> Choice {
    let mut service_id = 0;
    // A miss on the slot or backend means the agent flipped the service to a new revision and
    // deleted the old table between our reads; reading the service again yields the new one.
    for _ in 0..MAX_LOOKUP_ATTEMPTS {
        let Some(svc) = LB_SERVICES.get_ptr(key) else {
            return Choice::NotAService;
        };
        // SAFETY: the map is not preallocated, so the element stays valid under RCU while we
        // copy it.
        let svc = unsafe { *svc };
        service_id = svc.id;
        if svc.slot_count == 0 {
            return Choice::NoBackend { service_id };
        }
        // SAFETY: plain helper call without arguments.
        let slot = unsafe { bpf_get_prandom_u32() } % svc.slot_count;
        let slot_key = SlotKey {
            service_id: svc.id,
            revision: svc.revision,
            slot,
        };
        let Some(backend_id) = LB_SLOTS.get_ptr(&slot_key) else {
            continue;
        };
        // SAFETY: as above.
        let backend_id = unsafe { *backend_id };
        let Some(backend) = LB_BACKENDS.get_ptr(&backend_id) else {
            continue;
        };
        // SAFETY: as above.
        let backend = unsafe { *backend };
        return Choice::Backend {
            service_id,
            backend_id,
            backend,
        };
    }
    Choice::Raced { service_id }
}
