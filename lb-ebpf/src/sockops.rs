//! `sock_ops`: follows each TCP connection the connect programs sent to a backend and counts
//! its outcome for that backend: established, failed before the handshake (refused, reset,
//! timed out), closed. A socket is recognised by its own state (`socket.rs`), so sockets the
//! programs did not translate cost one storage lookup and nothing else.

use crate::abi::{TCP_CLOSE, TCP_SYN_SENT};
use crate::{counters, socket};
use aya_ebpf::programs::SockOpsContext;
use core::ptr::{addr_of, read_volatile};
use lb_common::{SOCKET_CONNECTED, SOCKET_DONE};

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
    // SAFETY: the context's socket field, read as one 8-byte word as the verifier requires;
    // it is null for a socket that is not a full one.
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return;
    }
    let Some(state) = socket::state(sk.cast(), false) else {
        return;
    };
    if state.used == 0 || state.flags & (SOCKET_CONNECTED | SOCKET_DONE) != SOCKET_CONNECTED {
        return;
    }
    let peer = state.peers[0];
    match op {
        // State callbacks are off by default; only translated sockets pay for them.
        OP_TCP_CONNECT => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | STATE_CB_FLAG) as i32);
        }
        OP_ACTIVE_ESTABLISHED => {
            counters::backend(&peer, |c| counters::add(&mut c.established, 1));
            counters::streak(&peer, |_| 0);
        }
        _ => {
            if ctx.arg(1) != TCP_CLOSE {
                return;
            }
            if ctx.arg(0) == TCP_SYN_SENT {
                counters::backend(&peer, |c| counters::add(&mut c.failed, 1));
                counters::streak(&peer, |n| n.saturating_add(1));
            } else {
                counters::backend(&peer, |c| counters::add(&mut c.closed, 1));
            }
            state.flags |= SOCKET_DONE;
        }
    }
}
