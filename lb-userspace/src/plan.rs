//! Pure: what the data plane should hold for a config. Turns each service's weighted backends
//! into a slot table, where a backend's weight is the number of slots pointing at it.

use crate::config::{BackendConfig, Config, Protocol};
use crate::health::state::select;
use lb_common::MAX_SLOTS_PER_SERVICE;
use lb_common::{ipv4_to_raw, port_to_raw, ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    /// One entry per slot; a backend appears as many times as its (reduced) weight.
    pub slots: Vec<SocketAddrV4>,
}

pub type Desired = BTreeMap<ServiceKey, DesiredService>;

/// Backends a health check currently rejects are left out; a service whose healthy share is
/// too low fails open to all of its backends when it allows that (`health::state::select`).
/// Returns the desired state and the names of services failing open.
pub fn desired(
    config: &Config,
    healthy: &dyn Fn(&str, &SocketAddrV4) -> bool,
) -> (Desired, Vec<String>) {
    let mut failing_open = Vec::new();
    let desired = config
        .services
        .iter()
        .map(|s| {
            let up: Vec<bool> = s
                .backends
                .iter()
                .map(|b| healthy(&s.name, &b.address))
                .collect();
            let (chosen, panic) = select(&up, s.fail_open, s.panic_threshold);
            if panic {
                failing_open.push(s.name.clone());
            }
            let backends: Vec<BackendConfig> =
                chosen.iter().map(|&i| s.backends[i].clone()).collect();
            let svc = DesiredService {
                name: s.name.clone(),
                slots: slot_table(&backends),
            };
            (service_key(s.vip, s.protocol), svc)
        })
        .collect();
    (desired, failing_open)
}

pub fn service_key(vip: SocketAddrV4, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: ipv4_to_raw(vip.ip().octets()),
        port: port_to_raw(vip.port()),
        proto: match protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
        _pad: 0,
    }
}

/// Backends are ordered by address so that reordering a config does not rewrite the table.
/// Weights are divided by their gcd (weights 2:2:4 take 4 slots, not 8); if the sum still
/// exceeds `MAX_SLOTS_PER_SERVICE` they are scaled down proportionally, keeping one slot each.
pub fn slot_table(backends: &[BackendConfig]) -> Vec<SocketAddrV4> {
    let mut sorted: Vec<&BackendConfig> = backends.iter().collect();
    sorted.sort_by_key(|b| b.address);
    let g = sorted.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    let total: u64 = sorted.iter().map(|b| u64::from(b.weight / g)).sum();
    let cap = u64::from(MAX_SLOTS_PER_SERVICE);
    let share = |w: u32| -> usize {
        let w = u64::from(w / g);
        let scaled = if total > cap {
            (w * cap / total).max(1)
        } else {
            w
        };
        scaled as usize
    };
    sorted
        .iter()
        .flat_map(|b| std::iter::repeat_n(b.address, share(b.weight)))
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be(addr: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            address: addr.parse().unwrap(),
            weight,
        }
    }

    fn count(slots: &[SocketAddrV4], addr: &str) -> usize {
        let a: SocketAddrV4 = addr.parse().unwrap();
        slots.iter().filter(|s| **s == a).count()
    }

    #[test]
    fn equal_weights_take_one_slot_each() {
        let t = slot_table(&[be("10.0.0.2:80", 5), be("10.0.0.1:80", 5)]);
        assert_eq!(
            t,
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap()
            ]
        );
    }

    #[test]
    fn weights_are_slot_multiplicity_reduced_by_gcd() {
        let t = slot_table(&[
            be("10.0.0.1:80", 2),
            be("10.0.0.2:80", 6),
            be("10.0.0.3:80", 4),
        ]);
        assert_eq!(t.len(), 6);
        assert_eq!(count(&t, "10.0.0.1:80"), 1);
        assert_eq!(count(&t, "10.0.0.2:80"), 3);
        assert_eq!(count(&t, "10.0.0.3:80"), 2);
    }

    #[test]
    fn order_of_backends_in_config_does_not_change_the_table() {
        let a = slot_table(&[be("10.0.0.1:80", 1), be("10.0.0.2:80", 3)]);
        let b = slot_table(&[be("10.0.0.2:80", 3), be("10.0.0.1:80", 1)]);
        assert_eq!(a, b);
    }

    #[test]
    fn oversized_tables_are_scaled_to_the_cap_keeping_every_backend() {
        let backends: Vec<_> = (1..=3)
            .map(|i| be(&format!("10.0.0.{i}:80"), 10_000 - i))
            .chain([be("10.0.1.1:80", 1)])
            .collect();
        let t = slot_table(&backends);
        assert!(
            t.len() <= MAX_SLOTS_PER_SERVICE as usize,
            "{} slots",
            t.len()
        );
        assert_eq!(count(&t, "10.0.1.1:80"), 1);
        assert!(count(&t, "10.0.0.1:80") > 1000);
    }

    #[test]
    fn no_backends_gives_an_empty_table() {
        assert!(slot_table(&[]).is_empty());
    }

    #[test]
    fn service_key_is_in_network_order() {
        let k = service_key("10.96.0.10:80".parse().unwrap(), Protocol::Udp);
        assert_eq!(k.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, IPPROTO_UDP);
    }
}
