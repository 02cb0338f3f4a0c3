//! Key and value layouts of the pinned maps.
//!
//! Pinned maps outlive the agent that created them, so a newer agent may find maps written by an
//! older one. `LAYOUT_VERSION` is stored in the `LB_META` map; an agent refuses to adopt pins of a
//! different version instead of misreading them. Bump it on any change below.

use crate::addr::RawAddr;
use core::mem::size_of;

pub const LAYOUT_VERSION: u32 = 2;
/// "LBM1": marks an `LB_META` entry as written by this project.
pub const META_MAGIC: u32 = 0x4c42_4d31;

/// `LB_SERVICES` key: one VIP:port:protocol. Address (16 bytes, IPv4 v4-mapped) and port in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub addr: RawAddr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Selection algorithm of a service (`ServiceValue::algorithm`): a random slot per choice.
pub const ALG_RANDOM: u8 = 0;
/// The slot table is a Maglev lookup table indexed by `client_hash` of the client key, so a
/// client keeps its backend, and only clients of a removed backend move.
pub const ALG_MAGLEV: u8 = 1;

/// `ServiceValue::flags`: remember each client's backend for `affinity_timeout_s`.
pub const FLAG_AFFINITY_CLIENT: u8 = 1;
/// `ServiceValue::flags`: the client key is the cgroup id of the calling task instead of the
/// network namespace cookie of the socket.
pub const FLAG_CLIENT_CGROUP: u8 = 2;

/// `LB_SERVICES` value. `revision` names the slot table currently in force: the agent writes a
/// table under a fresh revision, then replaces this value in one map update, then deletes the
/// old table, so a connect never reads a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub id: u32,
    pub revision: u32,
    /// Entries in the slot table; 0 means the service has no backend and connects are refused.
    pub slot_count: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: u16,
    /// Idle time after which a client's remembered backend is forgotten (client affinity).
    pub affinity_timeout_s: u32,
}

/// `LB_SLOTS` key: one entry of a service's selection table. Value: a backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey {
    pub service_id: u32,
    pub revision: u32,
    pub slot: u32,
}

/// `LB_BACKENDS` value (key: backend id `u32`). Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr: RawAddr,
    pub port: u16,
    pub _pad: u16,
    /// The one service this backend entry belongs to. A remembered backend (affinity) is used
    /// only while its entry still exists and names the same service: ids are reused.
    pub service_id: u32,
}

/// `LB_BACKEND_CTRS` per-CPU value, indexed by backend id. Connections currently open are
/// `established - closed` (a gauge kept as two counters, so CPUs never contend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendCounters {
    /// connect() calls rewritten to this backend, and new UDP sockets sending to it: attempts.
    pub connects: u64,
    /// TCP connections that completed the handshake (sock_ops).
    pub established: u64,
    /// TCP connections that ended before the handshake completed: refused, reset, timed out.
    pub failed: u64,
    /// Established TCP connections that have closed since.
    pub closed: u64,
    /// Packets and bytes (IP length) sent to the backend and received from it (cgroup_skb).
    pub packets_to: u64,
    pub bytes_to: u64,
    pub packets_from: u64,
    pub bytes_from: u64,
}

/// `LB_SERVICE_CTRS` per-CPU value, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// connect() calls to the VIP that were rewritten to a backend.
    pub connects: u64,
    /// connect() calls refused because the service had no backend.
    pub no_backend: u64,
    /// connect() calls refused because every lookup attempt raced with an update.
    pub update_races: u64,
    /// Choices answered from a remembered backend (client affinity, or a UDP socket's
    /// earlier datagram to the same service).
    pub affinity_hits: u64,
    /// Fresh choices stored for later (no remembered backend, it expired or it is gone).
    pub affinity_new: u64,
}

/// Field-wise sums, written beside the types so that a new counter field cannot be left out
/// when the agent adds up the per-CPU copies.
impl core::ops::Add for BackendCounters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            connects: self.connects + o.connects,
            established: self.established + o.established,
            failed: self.failed + o.failed,
            closed: self.closed + o.closed,
            packets_to: self.packets_to + o.packets_to,
            bytes_to: self.bytes_to + o.bytes_to,
            packets_from: self.packets_from + o.packets_from,
            bytes_from: self.bytes_from + o.bytes_from,
        }
    }
}

impl core::ops::Add for ServiceCounters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            connects: self.connects + o.connects,
            no_backend: self.no_backend + o.no_backend,
            update_races: self.update_races + o.update_races,
            affinity_hits: self.affinity_hits + o.affinity_hits,
            affinity_new: self.affinity_new + o.affinity_new,
        }
    }
}

/// `LB_AFFINITY` key kinds.
pub const AFFINITY_CLIENT: u32 = 0;
pub const AFFINITY_SOCKET: u32 = 1;

/// `LB_AFFINITY` key: a service and a client (netns cookie or cgroup id) or a socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub kind: u32,
    pub key: u64,
}

/// `LB_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
}

/// `LB_REVERSE` key: a socket and the backend it was sent to. Replies (recvmsg) and the peer
/// name (getpeername) from that backend on that socket are shown as the service VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseKey {
    pub cookie: u64,
    pub addr: RawAddr,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `LB_REVERSE` value: the service the socket addressed. Used only while that VIP still maps
/// to the same service id; otherwise the socket sees the backend's real address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseValue {
    pub vip: ServiceKey,
    pub service_id: u32,
    /// Where the socket's connection and traffic are counted (sock_ops, cgroup_skb).
    pub backend_id: u32,
    pub _pad: u32,
}

/// `LB_SVC_NAMES` value (key: service id): the configured name, NUL-padded. Only read by
/// `lb-agent stats`, so that pinned state is readable without the config.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; 64],
}

/// `LB_META` value (array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    pub magic: u32,
    pub layout_version: u32,
}

// The eBPF object and the agent must agree to the byte; these fail the build of either side.
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceValue>() == 20);
const _: () = assert!(size_of::<SlotKey>() == 12);
const _: () = assert!(size_of::<BackendValue>() == 24);
const _: () = assert!(size_of::<BackendCounters>() == 64);
const _: () = assert!(size_of::<ServiceCounters>() == 40);
const _: () = assert!(size_of::<AffinityKey>() == 16);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<ReverseKey>() == 32);
const _: () = assert!(size_of::<ReverseValue>() == 32);
const _: () = assert!(size_of::<ServiceName>() == 64);
const _: () = assert!(size_of::<Meta>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) with explicit padding fields, no implicit padding bytes
    // (checked by the size assertions above), and valid for any bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
}

impl ServiceName {
    /// Stores at most `MAX_NAME_LEN` bytes; the agent validates names before this.
    pub fn new(name: &str) -> Self {
        let mut bytes = [0u8; 64];
        let src = name.as_bytes();
        let n = if src.len() < crate::MAX_NAME_LEN {
            src.len()
        } else {
            crate::MAX_NAME_LEN
        };
        bytes[..n].copy_from_slice(&src[..n]);
        Self { bytes }
    }

    /// The stored name; `None` if it is not UTF-8 (a map written by something else).
    pub fn as_str(&self) -> Option<&str> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.bytes.len());
        core::str::from_utf8(&self.bytes[..end]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_round_trips_and_truncates() {
        assert_eq!(ServiceName::new("web").as_str(), Some("web"));
        let long = "x".repeat(100);
        assert_eq!(
            ServiceName::new(&long).as_str().map(str::len),
            Some(crate::MAX_NAME_LEN)
        );
    }

    #[test]
    fn counters_add_every_field() {
        let one = BackendCounters {
            connects: 1,
            established: 2,
            failed: 3,
            closed: 4,
            packets_to: 5,
            bytes_to: 6,
            packets_from: 7,
            bytes_from: 8,
        };
        let two = one + one;
        assert_eq!(two.connects + two.established + two.failed + two.closed, 20);
        assert_eq!(
            two.packets_to + two.bytes_to + two.packets_from + two.bytes_from,
            52
        );
        let s = ServiceCounters {
            connects: 1,
            no_backend: 2,
            update_races: 3,
            affinity_hits: 4,
            affinity_new: 5,
        };
        assert_eq!(
            s + s,
            ServiceCounters {
                connects: 2,
                no_backend: 4,
                update_races: 6,
                affinity_hits: 8,
                affinity_new: 10
            }
        );
    }

    #[test]
    fn service_name_rejects_invalid_utf8() {
        let mut n = ServiceName::new("");
        n.bytes[0] = 0xff;
        assert_eq!(n.as_str(), None);
    }
}
