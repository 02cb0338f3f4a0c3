//! Workloads left untranslated (`[dataplane] bypass`, for sidecars and sandboxes that do
//! their own balancing): a connect or datagram from a process whose cgroup, or an ancestor of
//! it, is listed goes to the VIP as written.

use crate::counters::add;
use crate::maps::LB_BYPASS;
use aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id;
use lb_common::{BYPASS_ANY, MAX_CGROUP_DEPTH};

/// Whether the calling task is bypassed; counted on the listed cgroup that says so. Ancestors
/// are looked up in the kernel rather than listed by the agent, so a cgroup created below a
/// listed one (a new container in a bypassed pod) is bypassed from its first connect.
#[inline(always)]
pub fn bypassed() -> bool {
    if LB_BYPASS.get_ptr(&BYPASS_ANY).is_none() {
        return false;
    }
    // Level 0 is the root: never listed.
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: a helper without pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            // Below the task's own cgroup.
            return false;
        }
        if let Some(count) = LB_BYPASS.get_ptr_mut(&id) {
            // SAFETY: a map value, valid while this program runs (RCU).
            add(unsafe { &mut *count }, 1);
            return true;
        }
    }
    false
}
