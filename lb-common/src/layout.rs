//! Key and value layouts of the pinned maps.
//!
//! Pinned maps outlive the agent that created them, so a newer agent may find maps written by an
//! older one. `LAYOUT_VERSION` is stored in the `LB_META` map; an agent refuses to adopt pins of a
//! different version instead of misreading them. Bump it on any change below.

use crate::addr::RawAddr;
use core::mem::size_of;

pub const LAYOUT_VERSION: u32 = 3;
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
/// Two random slots of the weighted table, and of their backends the one with fewer open
/// connections (`established - closed`): power of two choices.
pub const ALG_LEAST_CONNECTIONS: u8 = 2;

/// `ServiceValue::flags`: remember each client's backend for `affinity_timeout_s`.
pub const FLAG_AFFINITY_CLIENT: u8 = 1;
/// `ServiceValue::flags`: the client key is the cgroup id of the calling task instead of the
/// network namespace cookie of the socket.
pub const FLAG_CLIENT_CGROUP: u8 = 2;

/// `LB_SERVICES` value. `slot_base` is where the slot table in force starts in `LB_SLOTS`: the
/// agent writes a new table into a range no service uses, then replaces this value in one map
/// update, and only a later update may reuse the old range, so a connect never reads a
/// half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub id: u32,
    /// Counts the service's table writes (1 for its first table): not read by the programs,
    /// it tells operators and tests how many flips an update made.
    pub revision: u32,
    /// Entries in the slot table; 0 means the service has no backend and connects are refused.
    pub slot_count: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: u16,
    /// Idle time after which a client's remembered backend is forgotten (client affinity).
    pub affinity_timeout_s: u32,
    /// Where the table starts in `LB_SLOTS`.
    pub slot_base: u32,
}

/// `LB_BACKENDS` value: an array indexed by backend id. Address and port in network byte order.
/// An id no backend holds has port 0 (never written) or `service_id == NO_SERVICE` (removed;
/// the rest stays as it was, so a program racing the removal reads either the whole old
/// backend or one that is plainly absent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr: RawAddr,
    pub port: u16,
    pub _pad: u16,
    /// The one service this backend entry belongs to. A remembered backend (affinity) is used
    /// only while its entry still exists and names the same service: ids are reused.
    pub service_id: u32,
    /// Which owner of this id it is: bumped each time the agent hands the id to a new backend.
    /// Sockets record it with the id, and what they count later goes to their owner only.
    pub generation: u32,
    pub _pad2: u32,
}

/// `BackendValue::service_id` of a removed backend.
pub const NO_SERVICE: u32 = u32::MAX;

impl BackendValue {
    /// Whether this entry is a backend of `service_id`.
    #[inline(always)]
    pub fn serves(&self, service_id: u32) -> bool {
        self.port != 0 && self.service_id == service_id
    }
}

/// `LB_BACKEND_CTRS` value, indexed by backend id: one copy shared by all CPUs (the programs
/// add atomically), so its memory does not grow with the number of CPUs. Connections
/// currently open are `established - closed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendCounters {
    /// The owner these counters belong to (`BackendValue::generation`); the programs count
    /// only for a socket of that generation. Written by the agent when it hands the id over.
    pub generation: u32,
    /// Failed connects in a row (reset by an established one), read by outlier detection.
    /// Stored, not added: the order across CPUs is its meaning, and a lost update only delays
    /// an ejection by one failure.
    pub fail_streak: u32,
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

/// `LB_SERVICE_CTRS` value, indexed by service id, shared by all CPUs (atomic adds).
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
/// when the agent adds up counters (of several backends, or for rates).
impl core::ops::Add for BackendCounters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            generation: self.generation.max(o.generation),
            fail_streak: self.fail_streak.max(o.fail_streak),
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

/// `LB_AFFINITY` key: a service and a client (netns cookie or cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    pub key: u64,
}

/// `LB_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// The backend's generation when chosen: a reused id is another backend.
    pub generation: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
}

/// One backend a socket was sent to through a VIP (`SocketState::peers`): replies from it
/// (recvmsg) and the peer name (getpeername) show the VIP, and its connection and bytes count
/// for (backend id, generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketPeer {
    pub vip: ServiceKey,
    /// The backend's address and network-order port, as the socket sees its peer.
    pub backend: RawAddr,
    pub backend_port: u16,
    pub _pad: u16,
    /// The VIP is shown only while it still maps to this service id.
    pub service_id: u32,
    pub backend_id: u32,
    pub generation: u32,
}

/// Peers one socket remembers: a connected socket has one; an unconnected UDP socket keeps one
/// backend for each of up to this many services it sends to (a fifth replaces the oldest).
pub const SOCKET_PEERS: usize = 4;

/// `SocketState::flags`: the socket was connected through a VIP, so every packet of it is
/// with `peers[0]` and the byte counters need not read the packet's address.
pub const SOCKET_CONNECTED: u8 = 1;
/// `SocketState::flags`: sock_ops counted this TCP connection's end; nothing more counts.
pub const SOCKET_DONE: u8 = 2;

/// `LB_SOCKETS` value: the data plane's state of one socket, in the socket's own storage
/// (`BPF_MAP_TYPE_SK_STORAGE`). It is freed with the socket, so it can neither fill up nor be
/// evicted while the socket lives, and it costs nothing for sockets never sent to a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketState {
    pub peers: [SocketPeer; SOCKET_PEERS],
    /// Peers in use, from `peers[0]`.
    pub used: u8,
    pub flags: u8,
    /// The entry a new peer replaces when all are in use (round robin).
    pub next: u8,
    pub _pad: u8,
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
const _: () = assert!(size_of::<ServiceValue>() == 24);
const _: () = assert!(size_of::<BackendValue>() == 32);
const _: () = assert!(size_of::<BackendCounters>() == 72);
const _: () = assert!(size_of::<ServiceCounters>() == 40);
const _: () = assert!(size_of::<AffinityKey>() == 16);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<SocketPeer>() == 52);
const _: () = assert!(size_of::<SocketState>() == 52 * SOCKET_PEERS + 4);
const _: () = assert!(size_of::<ServiceName>() == 64);
const _: () = assert!(size_of::<Meta>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) with explicit padding fields, no implicit padding bytes
    // (checked by the size assertions above), and valid for any bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SocketPeer {}
    unsafe impl aya::Pod for SocketState {}
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
            generation: 3,
            fail_streak: 0,
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
        assert_eq!(two.generation, 3, "the generation is not a counter");
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
    fn the_maps_folder_names_the_layout_version() {
        let want = alloc_free_layout_name();
        assert_eq!(crate::names::MAPS_FOLDER.as_bytes(), &want[..]);
    }

    /// "layout-<LAYOUT_VERSION>" without an allocator (this crate is no_std).
    fn alloc_free_layout_name() -> [u8; 8] {
        const {
            assert!(
                LAYOUT_VERSION < 10,
                "two-digit versions need a longer name here"
            )
        };
        let mut name = *b"layout-0";
        name[7] += LAYOUT_VERSION as u8;
        name
    }

    #[test]
    fn service_name_rejects_invalid_utf8() {
        let mut n = ServiceName::new("");
        n.bytes[0] = 0xff;
        assert_eq!(n.as_str(), None);
    }
}
