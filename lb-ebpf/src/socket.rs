//! Per-socket state (`LB_SOCKETS`, socket-local storage): which backends a socket was sent to
//! through which VIP. Replies (recvmsg) and the peer name (getpeername) from such a backend
//! show the VIP; sock_ops and cgroup_skb count the socket's connection and bytes for that
//! backend. The state is created by the socket's first translation and freed with the socket,
//! so nothing else can evict it and no close has to clean it up.

use crate::maps::{LB_SERVICES, LB_SOCKETS};
use aya_ebpf::helpers::generated::bpf_sk_storage_get;
use core::ffi::c_void;
use lb_common::{
    BackendValue, RawAddr, ServiceKey, SocketPeer, SocketState, SOCKET_CONNECTED, SOCKET_PEERS,
};

/// BPF_SK_STORAGE_GET_F_CREATE.
const CREATE: u64 = 1;

/// The socket's state; with `create`, a zeroed one is made if there is none yet. `sk` must be a
/// pointer the verifier knows as a socket (a context's `sk` field, checked for null).
#[inline(always)]
pub fn state(sk: *mut c_void, create: bool) -> Option<&'static mut SocketState> {
    let flags = if create { CREATE } else { 0 };
    // SAFETY: the helper checks its arguments itself and returns null on any failure.
    let p = unsafe { bpf_sk_storage_get(LB_SOCKETS.as_ptr(), sk, core::ptr::null_mut(), flags) };
    // SAFETY: a non-null result points at this socket's value, valid while the program runs.
    unsafe { p.cast::<SocketState>().as_mut() }
}

#[inline(always)]
pub fn peer(vip: &ServiceKey, ids: (u32, u32), backend: &BackendValue) -> SocketPeer {
    SocketPeer {
        vip: *vip,
        backend: backend.addr,
        backend_port: backend.port,
        _pad: 0,
        service_id: ids.0,
        backend_id: ids.1,
        generation: backend.generation,
    }
}

/// connect(): the socket's one peer from now on.
#[inline(always)]
pub fn connected(state: &mut SocketState, peer: SocketPeer) {
    state.peers[0] = peer;
    state.used = 1;
    state.flags = SOCKET_CONNECTED;
}

/// A UDP socket connected to an address that is no VIP: replies from an earlier peer are no
/// longer the VIP's.
#[inline(always)]
pub fn forget(state: &mut SocketState) {
    state.used = 0;
    state.flags = 0;
}

/// An unconnected datagram sent through a VIP: remembered per service, in the service's
/// entry, a free one, or in place of the oldest. A datagram to a backend the socket already
/// has writes nothing.
#[inline(always)]
pub fn sent(state: &mut SocketState, peer: SocketPeer) {
    state.flags &= !SOCKET_CONNECTED;
    let used = usize::from(state.used);
    for p in state.peers.iter_mut().take(used) {
        if p.service_id == peer.service_id && same_vip(&p.vip, &peer.vip) {
            if p.backend_id != peer.backend_id || p.generation != peer.generation {
                *p = peer;
            }
            return;
        }
    }
    let i = if used < SOCKET_PEERS {
        state.used += 1;
        state.used - 1
    } else {
        let i = state.next % SOCKET_PEERS as u8;
        state.next = (i + 1) % SOCKET_PEERS as u8;
        i
    };
    if let Some(slot) = state.peers.get_mut(usize::from(i)) {
        *slot = peer;
    }
}

/// The peer this socket already sends to for this service, if any.
#[inline(always)]
pub fn sent_before(state: &SocketState, vip: &ServiceKey, service_id: u32) -> Option<SocketPeer> {
    in_use(state)
        .find(|p| p.service_id == service_id && same_vip(&p.vip, vip))
        .copied()
}

/// The peer a packet or address from `addr`:`port` belongs to.
#[inline(always)]
pub fn by_backend(state: &SocketState, addr: &RawAddr, port: u16) -> Option<SocketPeer> {
    in_use(state)
        .find(|p| p.backend_port == port && same_addr(&p.backend, addr))
        .copied()
}

/// The VIP to show for `peer`, if it still names the same service: a VIP that was removed,
/// or now belongs to another service, is stale and the real peer shows.
#[inline(always)]
pub fn vip_of(peer: &SocketPeer) -> Option<ServiceKey> {
    let svc = LB_SERVICES.get_ptr(&peer.vip)?;
    // SAFETY: the map is not preallocated, so the element stays valid under RCU for this run.
    (unsafe { (*svc).id } == peer.service_id).then_some(peer.vip)
}

#[inline(always)]
fn in_use(state: &SocketState) -> impl Iterator<Item = &SocketPeer> {
    state.peers.iter().take(usize::from(state.used))
}

/// Word by word: a derived comparison of arrays may become a call to memcmp, which eBPF lacks.
#[inline(always)]
fn same_addr(a: &RawAddr, b: &RawAddr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn same_vip(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.port == b.port && a.proto == b.proto && same_addr(&a.addr, &b.addr)
}
