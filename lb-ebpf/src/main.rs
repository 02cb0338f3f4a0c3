//! The cgroup programs. `connect4/6` translate connect() to a service VIP:port into a backend
//! IP:port, once, in the syscall; after that the socket talks to the backend directly, with no
//! per-packet NAT. `sendmsg4/6` do the same for each unconnected UDP datagram (one backend per
//! socket and service). `recvmsg4/6` and `getpeername4/6` show the VIP instead of the backend,
//! and `sock_release` forgets a released UDP socket's reverse entry. `sock_ops` counts each
//! translated TCP connection's outcome and `cgroup_skb` its bytes, per backend.
#![no_std]
#![no_main]

mod abi;
mod affinity;
mod client;
mod counters;
mod maps;
mod reverse;
mod select;
mod sockaddr;
mod sockops;
mod traffic;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use client::Client;
use lb_common::{BackendValue, ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
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

/// Only a connected socket knows its peer here; unconnected UDP sockets leave their entries
/// to the LRU. A TCP socket still closing (FIN_WAIT, TIME_WAIT…) keeps its entry until
/// sock_ops sees it reach CLOSE and counts the close.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    let sock = sockaddr::released(ctx.sock);
    if sock.port != 0 && !sock.tcp_open {
        reverse::forget(&reverse::key(cookie(&ctx), sock.peer, sock.port));
    }
    ALLOW
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
        return ALLOW;
    };
    // SAFETY: the map is not preallocated, so the element stays valid under RCU while we copy.
    let svc = unsafe { *svc };
    let cookie = cookie(ctx);
    let mut client = Client::new(ctx);
    let remembered = affinity::slot(&svc, &mut client, SEND.then_some(cookie));
    if let Some(slot) = &remembered {
        if let Some((backend_id, backend)) = affinity::recall(slot) {
            counters::affinity_hit(svc.id);
            // A datagram on a socket that already has its backend is no new connection.
            if !SEND {
                counters::connected(svc.id, backend_id);
            }
            return rewrite::<V6>(sa, &key, (svc.id, backend_id), cookie, &backend, SEND);
        }
    }
    match select::choose(&key, svc, &mut client) {
        Choice::Backend {
            service_id,
            backend_id,
            backend,
        } => {
            if let Some(slot) = &remembered {
                affinity::remember(slot, backend_id);
                counters::affinity_new(service_id);
            }
            counters::connected(service_id, backend_id);
            debug!(ctx, "service {} -> backend {}", service_id, backend_id);
            rewrite::<V6>(sa, &key, (service_id, backend_id), cookie, &backend, false)
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

#[inline(always)]
fn rewrite<const V6: bool>(
    sa: &mut bpf_sock_addr,
    vip: &ServiceKey,
    (service_id, backend_id): (u32, u32),
    cookie: u64,
    backend: &BackendValue,
    only_if_absent: bool,
) -> i32 {
    if !sockaddr::set::<V6>(sa, &backend.addr, backend.port) {
        return refuse();
    }
    let key = reverse::key(cookie, backend.addr, backend.port);
    reverse::record(&key, vip, (service_id, backend_id), only_if_absent);
    ALLOW
}

/// recvmsg and getpeername: a backend address this socket reached through a VIP reads as
/// the VIP.
#[inline(always)]
fn show_vip<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = reverse::key(cookie(ctx), sockaddr::addr::<V6>(sa), sockaddr::port(sa));
    if let Some(vip) = reverse::lookup(&key) {
        sockaddr::set::<V6>(sa, &vip.addr, vip.port);
    }
    ALLOW
}

#[inline(always)]
pub(crate) fn cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: the context pointer is the program's own, valid for this run.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
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
