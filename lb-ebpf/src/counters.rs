//! Counters, one copy per id shared by all CPUs: added to atomically, so no update is lost and
//! their memory does not grow with the number of CPUs. A backend's counters carry the
//! generation of the id's current owner; whatever a socket of an earlier owner does is counted
//! for nobody.

use crate::maps::{LB_BACKEND_CTRS, LB_SERVICE_CTRS};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use lb_common::{BackendCounters, ServiceCounters, SocketPeer};

/// Adds `n` to a counter in a map value: an atomic add whose result is unused, which LLVM emits
/// as one BPF atomic instruction. (The target has no compare-and-swap, so core's atomic types
/// offer no `fetch_add`; the intrinsic is what they would call.)
#[inline(always)]
pub fn add(counter: &mut u64, n: u64) {
    // SAFETY: the counter lies in a map value that stays valid while the program runs;
    // every writer uses atomic adds (the agent only writes it while the id has no owner).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

#[inline(always)]
pub fn connected(peer: &SocketPeer) {
    bump_service(peer.service_id, |c| add(&mut c.connects, 1));
    backend(peer, |c| add(&mut c.connects, 1));
}

#[inline(always)]
pub fn backend(peer: &SocketPeer, bump: impl FnOnce(&mut BackendCounters)) {
    if let Some(c) = LB_BACKEND_CTRS.get_ptr_mut(peer.backend_id) {
        // SAFETY: an element of a preallocated array, valid for this run.
        let c = unsafe { &mut *c };
        if c.generation == peer.generation {
            bump(c);
        }
    }
}

/// The streak is stored, not added (see `BackendCounters::fail_streak`).
#[inline(always)]
pub fn streak(peer: &SocketPeer, next: impl FnOnce(u32) -> u32) {
    backend(peer, |c| c.fail_streak = next(c.fail_streak));
}

#[inline(always)]
pub fn no_backend(service_id: u32) {
    bump_service(service_id, |c| add(&mut c.no_backend, 1));
}

#[inline(always)]
pub fn raced(service_id: u32) {
    bump_service(service_id, |c| add(&mut c.update_races, 1));
}

#[inline(always)]
pub fn affinity_hit(service_id: u32) {
    bump_service(service_id, |c| add(&mut c.affinity_hits, 1));
}

#[inline(always)]
pub fn affinity_new(service_id: u32) {
    bump_service(service_id, |c| add(&mut c.affinity_new, 1));
}

#[inline(always)]
fn bump_service(service_id: u32, bump: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = LB_SERVICE_CTRS.get_ptr_mut(service_id) {
        // SAFETY: an element of a preallocated array, valid for this run.
        bump(unsafe { &mut *c });
    }
}
