//! Reverse translation: a socket that was sent to a backend through a VIP sees the VIP as the
//! source of replies (recvmsg) and as its peer (getpeername). Entries are keyed by socket
//! cookie and backend. A TCP socket's entry goes when the connection reaches CLOSE (sock_ops,
//! which counts that close first); a connected UDP socket's when it is released; unconnected
//! UDP sockets leave theirs to the LRU. The same entry tells sock_ops and cgroup_skb which
//! backend a socket's connection and bytes count for.

use crate::maps::{LB_REVERSE, LB_SERVICES};
use lb_common::{RawAddr, ReverseKey, ReverseValue, ServiceKey};

#[inline(always)]
pub fn key(cookie: u64, addr: RawAddr, port: u16) -> ReverseKey {
    ReverseKey {
        cookie,
        addr,
        port,
        _pad: [0; 6],
    }
}

/// `only_if_absent` saves a write per datagram on the UDP path, where the entry is usually
/// already there.
#[inline(always)]
pub fn record(key: &ReverseKey, vip: &ServiceKey, ids: (u32, u32), only_if_absent: bool) {
    if only_if_absent && LB_REVERSE.get_ptr(key).is_some() {
        return;
    }
    let value = ReverseValue {
        vip: *vip,
        service_id: ids.0,
        backend_id: ids.1,
        _pad: 0,
    };
    // A failed insert only means replies show the backend's address.
    let _ = LB_REVERSE.insert(key, &value, 0);
}

/// The VIP to show for this socket and peer, if it still names the same service: a VIP that
/// was removed, or now belongs to another service, is stale and the real peer shows.
#[inline(always)]
pub fn lookup(key: &ReverseKey) -> Option<ServiceKey> {
    let value = LB_REVERSE.get_ptr(key)?;
    // SAFETY: an LRU element stays valid under RCU for this run; copied at once.
    let value = unsafe { *value };
    let svc = LB_SERVICES.get_ptr(&value.vip)?;
    // SAFETY: as above.
    (unsafe { (*svc).id } == value.service_id).then_some(value.vip)
}

/// The backend a socket's traffic to or from `key`'s peer counts for, whatever happened to
/// the service since: the connection is still that backend's.
#[inline(always)]
pub fn backend_of(key: &ReverseKey) -> Option<u32> {
    let value = LB_REVERSE.get_ptr(key)?;
    // SAFETY: as above.
    Some(unsafe { (*value).backend_id })
}

#[inline(always)]
pub fn forget(key: &ReverseKey) {
    let _ = LB_REVERSE.remove(key);
}
