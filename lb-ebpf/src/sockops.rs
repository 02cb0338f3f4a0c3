//! `sock_ops`: follows each TCP connection the connect programs sent to a backend and counts
//! its outcome per backend: established, failed before the handshake (refused, reset, timed
//! out), closed. A socket is recognised by its reverse entry (cookie and peer), so sockets the
//! programs did not translate cost one lookup and nothing else.

use crate::abi::{AF_INET6, TCP_CLOSE, TCP_SYN_SENT};
use crate::counters;
use crate::maps::LB_FAIL_STREAK;
use crate::reverse;
use crate::sockaddr;
use aya_ebpf::programs::SockOpsContext;
use core::ptr::{addr_of, read_volatile};
use lb_common::{v4_mapped, ReverseKey};

const OP_TCP_CONNECT: u32 = 3;
const OP_ACTIVE_ESTABLISHED: u32 = 4;
const OP_STATE_CHANGE: u32 = 10;
/// Asks for `OP_STATE_CHANGE` callbacks on this socket (BPF_SOCK_OPS_STATE_CB_FLAG).
const STATE_CB_FLAG: u32 = 1 << 2;

#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != OP_TCP_CONNECT && op != OP_ACTIVE_ESTABLISHED && op != OP_STATE_CHANGE {
        return;
    }
    let key = peer(ctx);
    let Some(backend_id) = reverse::backend_of(&key) else {
        return;
    };
    match op {
        // State callbacks are off by default; only translated sockets pay for them.
        OP_TCP_CONNECT => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | STATE_CB_FLAG) as i32);
        }
        OP_ACTIVE_ESTABLISHED => {
            counters::backend(backend_id, |c| c.established += 1);
            set_streak(backend_id, |_| 0);
        }
        _ => {
            if ctx.arg(1) != TCP_CLOSE {
                return;
            }
            if ctx.arg(0) == TCP_SYN_SENT {
                counters::backend(backend_id, |c| c.failed += 1);
                set_streak(backend_id, |n| n.saturating_add(1));
            } else {
                counters::backend(backend_id, |c| c.closed += 1);
            }
            // The connection is over: nothing will ask for its VIP or count for it again.
            reverse::forget(&key);
        }
    }
}

/// The reverse-entry key of this socket's peer. `remote_port` holds the network-order port in
/// its upper 16 bits (the kernel shifts it there on little-endian machines). Both address
/// forms are read and one is picked afterwards: choosing between two context fields first
/// lets the compiler compute the field offset, a context access the verifier refuses.
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> ReverseKey {
    // SAFETY: fields of the context the kernel passed, read one word at a time.
    let (ip4, ip6) = unsafe {
        let ops = ctx.ops;
        (
            read_volatile(addr_of!((*ops).remote_ip4)),
            sockaddr::words(addr_of!((*ops).remote_ip6) as *const u32),
        )
    };
    let addr = if ctx.family() == AF_INET6 {
        ip6
    } else {
        v4_mapped(ip4)
    };
    reverse::key(crate::cookie(ctx), addr, (ctx.remote_port() >> 16) as u16)
}

/// Not atomic: two CPUs failing at once may lose one increment, which only delays an
/// ejection by one failure.
#[inline(always)]
fn set_streak(backend_id: u32, next: impl FnOnce(u32) -> u32) {
    if let Some(p) = LB_FAIL_STREAK.get_ptr_mut(backend_id) {
        // SAFETY: an element of a preallocated array, valid for this run.
        unsafe { *p = next(*p) };
    }
}
