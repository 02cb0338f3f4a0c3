//! The cgroup programs. `connect4/6` translate connect() to a service VIP:port into a backend
//! IP:port, once, in the syscall; after that the socket talks to the backend directly, with no
//! per-packet NAT. `sendmsg4/6` do the same for each unconnected UDP datagram (one backend per
//! socket and service). `recvmsg4/6` and `getpeername4/6` show the VIP instead of the backend.
//! `sock_ops` counts each translated TCP connection's outcome and `cgroup_skb` its bytes, per
//! backend. What a socket was translated to is kept in the socket's own storage (`socket.rs`).
//! Processes in bypassed cgroups are left alone (`bypass.rs`).
#![no_std]
#![no_main]
// Atomic adds (counters.rs): the eBPF target has no compare-and-swap, so only the intrinsic
// offers them.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod abi;
mod affinity;
mod bypass;
mod client;
mod counters;
mod maps;
mod select;
mod sockaddr;
mod socket;
mod sockops;
mod traffic;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    macros::{cgroup_skb, cgroup_sock_addr, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use client::Client;
use lb_common::{ServiceKey, SocketPeer, SocketState, IPPROTO_TCP, IPPROTO_UDP};
use maps::LB_SERVICES;
use select::Choice;

/// Return values of cgroup programs: 1 lets the syscall proceed, 0 fails it.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// errno a connect to a service without backends fails with. ECONNREFUSED is what clients
/// already handle as "nobody is serving" (a closed port): they retry or fail over, instead of
/// the confusing EPERM a bare rejection would give.
const ECONNREFUSED: i32 = 111;

#[sock_ops]
pub fn lb_sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx);
    0
}

#[cgroup_skb]
pub fn lb_skb_egress(ctx: SkBuffContext) -> i32 {
    traffic::count(&ctx, true);
    ALLOW
}

#[cgroup_skb]
pub fn lb_skb_ingress(ctx: SkBuffContext) -> i32 {
    traffic::count(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    forward::<false, false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    forward::<true, false>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<false, true>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<true, true>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_vip::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_vip::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_vip::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    show_vip::<true>(&ctx)
}

/// Translates a VIP destination. `V6`: the program's family; `SEND`: an unconnected UDP
/// datagram (sendmsg), which keeps the socket's earlier backend.
#[inline(always)]
fn forward<const V6: bool, const SEND: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let key = ServiceKey {
        addr: sockaddr::addr::<V6>(sa),
        port: sockaddr::port(sa),
        proto,
        _pad: 0,
    };
    let Some(svc) = LB_SERVICES.get_ptr(&key) else {
        // Only a UDP socket can connect again, elsewhere: its earlier peer is not its VIP now.
        if !SEND && proto == IPPROTO_UDP {
            if let Some(state) = socket::state(sockaddr::socket(sa), false) {
                socket::forget(state);
            }
        }
        return ALLOW;
    };
    if bypass::bypassed() {
        return ALLOW;
    }
    // SAFETY: the map is not preallocated, so the element stays valid under RCU while we copy.
    let svc = unsafe { *svc };
    // Without storage (out of memory) the socket is still balanced; only its replies would
    // show the backend and its outcome would go uncounted.
    let state = socket::state(sockaddr::socket(sa), true);
    let mut client = Client::new(ctx);
    let client_slot = affinity::slot(&svc, &mut client);
    let remembered = match &client_slot {
        Some(slot) => affinity::recall(slot).map(|(id, b)| socket::peer(&key, (svc.id, id), &b)),
        None if SEND => state
            .as_deref()
            .and_then(|s| socket::sent_before(s, &key, svc.id))
            .filter(|p| select::still_serving(svc.id, p.backend_id, p.generation).is_some()),
        None => None,
    };
    if let Some(peer) = remembered {
        counters::affinity_hit(svc.id);
        // A datagram on a socket that already has its backend is no new connection.
        if !SEND {
            counters::connected(&peer);
        }
        return rewrite::<V6, SEND>(sa, &peer, state);
    }
    match select::choose(&key, svc, &mut client) {
        Choice::Backend {
            service_id,
            backend_id,
            backend,
        } => {
            if let Some(slot) = &client_slot {
                affinity::remember(slot, backend_id, &backend);
            }
            if client_slot.is_some() || SEND {
                counters::affinity_new(service_id);
            }
            let peer = socket::peer(&key, (service_id, backend_id), &backend);
            counters::connected(&peer);
            debug!(ctx, "service {} -> backend {}", service_id, backend_id);
            rewrite::<V6, SEND>(sa, &peer, state)
        }
        Choice::NoBackend { service_id } => {
            counters::no_backend(service_id);
            refuse()
        }
        Choice::Raced { service_id } => {
            counters::raced(service_id);
            refuse()
        }
    }
}

/// Points the syscall at the peer's backend and records it: a connect makes it the socket's
/// one peer, a datagram its peer for this service.
#[inline(always)]
fn rewrite<const V6: bool, const SEND: bool>(
    sa: &mut bpf_sock_addr,
    peer: &SocketPeer,
    state: Option<&mut SocketState>,
) -> i32 {
    if !sockaddr::set::<V6>(sa, &peer.backend, peer.backend_port) {
        return refuse();
    }
    match state {
        Some(state) if SEND => socket::sent(state, *peer),
        Some(state) => socket::connected(state, *peer),
        None => {}
    }
    ALLOW
}

/// recvmsg and getpeername: a backend address this socket reached through a VIP reads as
/// the VIP.
#[inline(always)]
fn show_vip<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(state) = socket::state(sockaddr::socket(sa), false) else {
        return ALLOW;
    };
    let addr = sockaddr::addr::<V6>(sa);
    let vip = socket::by_backend(state, &addr, sockaddr::port(sa)).and_then(|p| socket::vip_of(&p));
    if let Some(vip) = vip {
        sockaddr::set::<V6>(sa, &vip.addr, vip.port);
    }
    ALLOW
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call; cgroup programs may set the syscall's return value (5.18+).
    unsafe { aya_ebpf::helpers::generated::bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
