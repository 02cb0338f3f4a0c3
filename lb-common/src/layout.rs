//! Key and value layouts of the pinned maps.
//!
//! Pinned maps outlive the agent that created them, so a newer agent may find maps written by an
//! older one. `LAYOUT_VERSION` is stored in the `LB_META` map; an agent refuses to adopt pins of a
//! different version instead of misreading them. Bump it on any change below.

use core::mem::size_of;

pub const LAYOUT_VERSION: u32 = 1;
/// "LBM1": marks an `LB_META` entry as written by this project.
pub const META_MAGIC: u32 = 0x4c42_4d31;

/// `LB_SERVICES` key: one VIP:port:protocol. Address and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Selection algorithm of a service (`ServiceValue::algorithm`).
pub const ALG_RANDOM: u8 = 0;

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
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `LB_BACKEND_CTRS` per-CPU value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendCounters {
    /// connect() calls rewritten to this backend.
    pub connects: u64,
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
const _: () = assert!(size_of::<ServiceKey>() == 8);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<SlotKey>() == 12);
const _: () = assert!(size_of::<BackendValue>() == 8);
const _: () = assert!(size_of::<BackendCounters>() == 8);
const _: () = assert!(size_of::<ServiceCounters>() == 24);
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
    fn service_name_rejects_invalid_utf8() {
        let mut n = ServiceName::new("");
        n.bytes[0] = 0xff;
        assert_eq!(n.as_str(), None);
    }
}
