//! The one translation between config terms (addresses, protocols, balancing settings) and
//! the map keys and values that lb-common defines for the kernel. Every stage that touches a
//! map value goes through here, so an encoding is written once and read back the same way.

use crate::config::{is_prime, Algorithm, Balancing, ClientKey, Protocol};
use lb_common::{
    ip_from_raw, ip_to_raw, port_from_raw, port_to_raw, BackendValue, RawAddr, ServiceKey,
    ServiceValue, ALG_LEAST_CONNECTIONS, ALG_MAGLEV, ALG_RANDOM, FLAG_AFFINITY_CLIENT,
    FLAG_CLIENT_CGROUP, IPPROTO_TCP, IPPROTO_UDP,
};
use std::net::SocketAddr;

pub fn service_key(vip: SocketAddr, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: ip_to_raw(vip.ip()),
        port: port_to_raw(vip.port()),
        proto: match protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
        _pad: 0,
    }
}

/// The VIP and protocol a service key encodes; `None` for a protocol this agent never writes.
pub fn vip_of(key: &ServiceKey) -> Option<(SocketAddr, Protocol)> {
    let protocol = match key.proto {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some((endpoint(&key.addr, key.port), protocol))
}

/// A map address and raw port as a socket address (v4-mapped addresses come back as IPv4).
pub fn endpoint(addr: &RawAddr, raw_port: u16) -> SocketAddr {
    SocketAddr::new(ip_from_raw(addr), port_from_raw(raw_port))
}

pub fn socket_addr(b: &BackendValue) -> SocketAddr {
    endpoint(&b.addr, b.port)
}

pub fn backend_value(addr: &SocketAddr, service_id: u32, generation: u32) -> BackendValue {
    BackendValue {
        addr: ip_to_raw(addr.ip()),
        port: port_to_raw(addr.port()),
        _pad: 0,
        service_id,
        generation,
        _pad2: 0,
    }
}

/// The selection settings a service entry carries besides its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    pub algorithm: u8,
    pub flags: u8,
    pub affinity_timeout_s: u32,
}

impl Mode {
    pub fn of(b: &Balancing) -> Self {
        let algorithm = match b.algorithm {
            Algorithm::Random => ALG_RANDOM,
            Algorithm::Maglev { .. } => ALG_MAGLEV,
            Algorithm::LeastConnections => ALG_LEAST_CONNECTIONS,
        };
        let mut flags = 0;
        if b.affinity.is_some() {
            flags |= FLAG_AFFINITY_CLIENT;
        }
        if b.client_key == ClientKey::Cgroup {
            flags |= FLAG_CLIENT_CGROUP;
        }
        let timeout = b.affinity.map_or(0, |t| t.as_secs());
        Self {
            algorithm,
            flags,
            affinity_timeout_s: u32::try_from(timeout).unwrap_or(u32::MAX),
        }
    }

    pub fn from_value(v: &ServiceValue) -> Self {
        Self {
            algorithm: v.algorithm,
            flags: v.flags,
            affinity_timeout_s: v.affinity_timeout_s,
        }
    }

    /// The balancing that reproduces this mode; unknown bits (a newer writer) read as the
    /// defaults. `table_size` is the installed table's length.
    pub fn balancing(&self, table_size: u32) -> Balancing {
        Balancing {
            algorithm: match self.algorithm {
                ALG_MAGLEV if is_prime(table_size) => Algorithm::Maglev { table_size },
                ALG_LEAST_CONNECTIONS => Algorithm::LeastConnections,
                _ => Algorithm::Random,
            },
            affinity: (self.flags & FLAG_AFFINITY_CLIENT != 0)
                .then(|| std::time::Duration::from_secs(self.affinity_timeout_s.into())),
            client_key: if self.flags & FLAG_CLIENT_CGROUP != 0 {
                ClientKey::Cgroup
            } else {
                ClientKey::Netns
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_is_in_network_order() {
        let k = service_key("10.96.0.10:80".parse().unwrap(), Protocol::Udp);
        assert_eq!(
            lb_common::as_v4(&k.addr),
            Some(u32::from_ne_bytes([10, 96, 0, 10]))
        );
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, IPPROTO_UDP);
    }

    #[test]
    fn keys_and_backends_read_back_as_written() {
        for (vip, protocol) in [
            ("10.96.0.10:80", Protocol::Tcp),
            ("[fd00::10]:53", Protocol::Udp),
        ] {
            let vip: SocketAddr = vip.parse().unwrap();
            assert_eq!(vip_of(&service_key(vip, protocol)), Some((vip, protocol)));
            assert_eq!(socket_addr(&backend_value(&vip, 7, 1)), vip);
        }
        let mut odd = service_key("10.96.0.10:80".parse().unwrap(), Protocol::Tcp);
        odd.proto = 132;
        assert_eq!(vip_of(&odd), None);
    }
}
