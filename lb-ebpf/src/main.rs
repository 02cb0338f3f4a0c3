//! `cgroup/connect4`: translate connect() to a service VIP:port into a backend IP:port, once,
//! in the syscall. After that the socket talks to the backend directly: no per-packet NAT.
#![no_std]
#![no_main]

mod counters;
mod maps;
mod select;

use aya_ebpf::{bindings::bpf_sock_addr, macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use lb_common::{ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
use select::Choice;

/// Return values of sock_addr programs: 1 lets the syscall proceed, 0 fails it.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// errno a connect to a service without backends fails with. ECONNREFUSED is what clients
/// already handle as "nobody is serving" (a closed port): they retry or fail over, instead of
/// the confusing EPERM a bare rejection would give.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(key) = service_key(sa) else {
        return ALLOW;
    };
    match select::choose(&key) {
        Choice::NotAService => ALLOW,
        Choice::Backend {
            service_id,
            backend_id,
            backend,
        } => {
            sa.user_ip4 = backend.addr;
            sa.user_port = u32::from(backend.port);
            counters::connected(service_id, backend_id);
            debug!(&ctx, "service {} -> backend {}", service_id, backend_id);
            ALLOW
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
fn service_key(sa: &bpf_sock_addr) -> Option<ServiceKey> {
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    Some(ServiceKey {
        addr: sa.user_ip4,
        // The port sits in network byte order in the low 16 bits.
        port: sa.user_port as u16,
        proto,
        _pad: 0,
    })
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
