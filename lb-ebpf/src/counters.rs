//! Per-CPU counters: no atomics needed, the agent sums the CPUs when it reads them. A backend's
//! counters carry the generation of the id's current owner; whatever a socket of an earlier
//! owner does is counted for nobody.

use crate::maps::{LB_BACKEND_CTRS, LB_FAIL_STREAK, LB_SERVICE_CTRS};
use lb_common::{BackendCounters, ServiceCounters, SocketPeer};

#[inline(always)]
pub fn connected(peer: &SocketPeer) {
    bump_service(peer.service_id, |c| c.connects += 1);
    backend(peer, |c| c.connects += 1);
}

#[inline(always)]
pub fn backend(peer: &SocketPeer, bump: impl FnOnce(&mut BackendCounters)) {
    if let Some(c) = LB_BACKEND_CTRS.get_ptr_mut(peer.backend_id) {
        // SAFETY: a per-CPU element, written only by this CPU while the program runs.
        let c = unsafe { &mut *c };
        if c.generation == peer.generation {
            bump(c);
        }
    }
}

/// Not atomic: two CPUs failing at once may lose one increment, which only delays an
/// ejection by one failure.
#[inline(always)]
pub fn streak(peer: &SocketPeer, next: impl FnOnce(u32) -> u32) {
    if let Some(s) = LB_FAIL_STREAK.get_ptr_mut(peer.backend_id) {
        // SAFETY: an element of a preallocated array, valid for this run.
        let s = unsafe { &mut *s };
        if s.generation == peer.generation {
            s.streak = next(s.streak);
        }
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
