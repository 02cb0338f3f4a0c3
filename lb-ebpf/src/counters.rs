//! Per-CPU counters: no atomics needed, the agent sums the CPUs when it reads them.

use crate::maps::{LB_BACKEND_CTRS, LB_SERVICE_CTRS};
use lb_common::{BackendCounters, ServiceCounters};

#[inline(always)]
pub fn connected(service_id: u32, backend_id: u32) {
    bump_service(service_id, |c| c.connects += 1);
    backend(backend_id, |c| c.connects += 1);
}

#[inline(always)]
pub fn backend(backend_id: u32, bump: impl FnOnce(&mut BackendCounters)) {
    if let Some(c) = LB_BACKEND_CTRS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU element, written only by this CPU while the program runs.
        bump(unsafe { &mut *c });
    }
}

#[inline(always)]
pub fn no_backend(service_id: u32) {
    bump_service(service_id, |c| c.no_backend += 1);
}

#[inline(always)]
pub fn raced(service_id: u32) {
    bump_service(service_id, |c| c.update_races += 1);
}

#[inline(always)]
pub fn affinity_hit(service_id: u32) {
    bump_service(service_id, |c| c.affinity_hits += 1);
}

#[inline(always)]
pub fn affinity_new(service_id: u32) {
    bump_service(service_id, |c| c.affinity_new += 1);
}

#[inline(always)]
fn bump_service(service_id: u32, bump: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = LB_SERVICE_CTRS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU element, written only by this CPU while the program runs.
        bump(unsafe { &mut *c });
    }
}
