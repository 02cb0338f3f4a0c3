//! Pure: what the data plane should hold for a config. Turns each service's weighted backends
//! into a slot table: for `random`, a backend's weight is the number of slots pointing at it;
//! for `maglev`, the table is the Maglev lookup table the kernel indexes by client hash.

pub mod maglev;

use crate::admission::fail_open::select;
use crate::catalog::Service;
use crate::codec::{service_key, Mode};
use crate::config::{Algorithm, BackendConfig, Name};
use lb_common::ServiceKey;
use lb_common::MAX_RANDOM_SLOTS;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub name: Name,
    /// One entry per slot; a backend appears as many times as its (reduced) weight.
    pub slots: Vec<SocketAddr>,
    pub mode: Mode,
}

pub type Desired = BTreeMap<ServiceKey, DesiredService>;

/// Backends a health check currently rejects are left out; a service whose healthy share is
/// too low fails open to all of its backends when it allows that (`admission::fail_open`).
/// Returns the desired state and the names of services failing open.
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    healthy: &dyn Fn(&str, &SocketAddr) -> bool,
) -> (Desired, Vec<String>) {
    let mut failing_open = Vec::new();
    let desired = services
        .into_iter()
        .map(|s| {
            let up: Vec<bool> = s
                .backends
                .iter()
                .map(|b| healthy(&s.name, &b.address))
                .collect();
            let (chosen, panic) = select(&up, s.admission.fail_open, s.admission.panic_threshold);
            if panic {
                failing_open.push(s.name.to_string());
            }
            let backends: Vec<BackendConfig> =
                chosen.iter().map(|&i| s.backends[i].clone()).collect();
            let svc = DesiredService {
                name: s.name.clone(),
                slots: match s.balancing.algorithm {
                    Algorithm::Random | Algorithm::LeastConnections => slot_table(&backends),
                    Algorithm::Maglev { table_size } => maglev_table(&backends, table_size),
                },
                mode: Mode::of(&s.balancing),
            };
            (service_key(s.vip, s.protocol), svc)
        })
        .collect();
    (desired, failing_open)
}

/// A plan holds its services' tables and operations until it is applied: about 600 bytes for
/// a service of four backends, 36 per slot. A large change is planned and applied in steps
/// of at most this many services and slots (`datapath::reconcile::Steps`), which keeps that
/// to a few MB; 8,192 services still go to the kernel in few batches.
pub const STEP_SERVICES: usize = 8192;
pub const STEP_SLOTS: usize = 1 << 20;

/// At most what planning some services takes from the maps, without planning them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub services: u64,
    pub backends: u64,
    pub slots: u64,
}

/// `services` cut into consecutive runs within the step bounds (a service larger than the slot
/// bound is a run of its own), at least one run, empty when `services` is; and at most what
/// they all take.
pub fn steps<'a>(services: impl IntoIterator<Item = &'a Service>) -> (Vec<Range<usize>>, Bound) {
    let mut runs = Vec::new();
    let mut bound = Bound::default();
    let (mut start, mut end, mut slots) = (0, 0, 0);
    for service in services {
        let size = max_slots(service);
        if end > start && (end - start == STEP_SERVICES || slots + size > STEP_SLOTS) {
            runs.push(start..end);
            (start, slots) = (end, 0);
        }
        slots += size;
        end += 1;
        bound.services += 1;
        bound.backends += service.backends.len() as u64;
        bound.slots += size as u64;
    }
    runs.push(start..end);
    (runs, bound)
}

/// At most the slots `desired` gives the service, without computing its table.
fn max_slots(service: &Service) -> usize {
    match service.balancing.algorithm {
        Algorithm::Maglev { table_size } => table_size as usize,
        Algorithm::Random | Algorithm::LeastConnections => {
            // Scaling down keeps one slot each, so the cap may be passed by one per backend.
            let weights: u64 = service.backends.iter().map(|b| u64::from(b.weight)).sum();
            (weights.min(u64::from(MAX_RANDOM_SLOTS)) + service.backends.len() as u64) as usize
        }
    }
}

/// The Maglev lookup table over `backends`; empty without backends, so that connects are
/// refused as for any service without backends.
pub fn maglev_table(backends: &[BackendConfig], size: u32) -> Vec<SocketAddr> {
    let ids: Vec<String> = backends.iter().map(|b| b.address.to_string()).collect();
    let members: Vec<maglev::Member> = backends
        .iter()
        .zip(&ids)
        .map(|(b, id)| maglev::Member {
            id: id.as_bytes(),
            weight: b.weight,
        })
        .collect();
    maglev::table(&members, size)
        .into_iter()
        .map(|i| backends[i as usize].address)
        .collect()
}

/// Backends are ordered by address so that reordering a config does not rewrite the table.
/// Weights are divided by their gcd (weights 2:2:4 take 4 slots, not 8); if the sum still
/// exceeds `MAX_RANDOM_SLOTS` they are scaled down proportionally, keeping one slot each.
pub fn slot_table(backends: &[BackendConfig]) -> Vec<SocketAddr> {
    let mut sorted: Vec<&BackendConfig> = backends.iter().collect();
    sorted.sort_by_key(|b| b.address);
    let g = sorted.iter().fold(0, |g, b| gcd(g, b.weight)).max(1);
    let total: u64 = sorted.iter().map(|b| u64::from(b.weight / g)).sum();
    let cap = u64::from(MAX_RANDOM_SLOTS);
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

    fn count(slots: &[SocketAddr], addr: &str) -> usize {
        let a: SocketAddr = addr.parse().unwrap();
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
        assert!(t.len() <= MAX_RANDOM_SLOTS as usize, "{} slots", t.len());
        assert_eq!(count(&t, "10.0.1.1:80"), 1);
        assert!(count(&t, "10.0.0.1:80") > 1000);
    }

    #[test]
    fn steps_bound_services_and_slots_and_what_they_take() {
        let svc = |backends: usize, algorithm: Algorithm| Service {
            name: "s".into(),
            vip: "10.96.0.1:80".parse().unwrap(),
            protocol: crate::config::Protocol::Tcp,
            backends: (0..backends)
                .map(|i| be(&format!("10.0.0.{i}:80"), 2))
                .collect(),
            balancing: crate::config::Balancing {
                algorithm,
                ..Default::default()
            },
            admission: crate::catalog::Admission::default(),
        };
        let (runs, bound) = steps(&[]);
        assert_eq!(
            (runs.len(), runs[0].clone(), bound),
            (1, 0..0, Bound::default())
        );
        let small = vec![svc(4, Algorithm::Random); STEP_SERVICES * 2 + 1];
        let (runs, bound) = steps(&small);
        let n = STEP_SERVICES;
        assert_eq!(runs, [0..n, n..2 * n, 2 * n..2 * n + 1]);
        // Weights 2 of four backends: 8, plus one a backend for scaling down (it takes 4).
        assert_eq!(bound.slots, 12 * (2 * n as u64 + 1));
        assert_eq!(bound.backends, 4 * (2 * n as u64 + 1));
        let big = svc(2, Algorithm::Maglev { table_size: 65_537 });
        let mixed = [
            vec![big.clone(); 16],
            vec![svc(4, Algorithm::Random)],
            vec![big],
        ]
        .concat();
        let (runs, bound) = steps(&mixed);
        // 15 tables of 65,537 fit in 2^20 slots, the 16th starts the next step.
        assert_eq!(runs, [0..15, 15..18]);
        assert_eq!(bound.services, 18);
        let desired_slots: usize = desired(&mixed, &|_, _| true)
            .0
            .values()
            .map(|d| d.slots.len())
            .sum();
        assert!(
            bound.slots >= desired_slots as u64,
            "{bound:?} {desired_slots}"
        );
    }

    #[test]
    fn no_backends_gives_an_empty_table() {
        assert!(slot_table(&[]).is_empty());
    }
}

#[cfg(test)]
mod maglev_tests {
    use super::*;
    use crate::config::{parse, Algorithm};
    use lb_common::{ALG_MAGLEV, FLAG_AFFINITY_CLIENT, FLAG_CLIENT_CGROUP};

    #[test]
    fn a_maglev_service_gets_its_lookup_table_and_mode() {
        let text = "[[service]]\nname = \"m\"\nvip = \"[fd00::10]:80\"\n\
                    backends = [\"[fd00::1]:80\", { address = \"[fd00::2]:80\", weight = 3 }]\n\
                    algorithm = \"maglev\"\nmaglev_table_size = 1031\naffinity = \"client\"\n\
                    affinity_timeout = \"90s\"\nclient_key = \"cgroup\"\n";
        let config = parse(text, "t").unwrap();
        assert_eq!(
            config.services[0].balancing.algorithm,
            Algorithm::Maglev { table_size: 1031 }
        );
        let (d, _) = desired(&crate::catalog::listed(&config), &|_, _| true);
        let svc = d.values().next().unwrap();
        assert_eq!(svc.slots.len(), 1031);
        let heavy = svc
            .slots
            .iter()
            .filter(|a| a.port() == 80 && a.to_string() == "[fd00::2]:80");
        let share = heavy.count() as f64 / 1031.0;
        assert!((0.70..0.80).contains(&share), "weight 3 of 4 got {share}");
        assert_eq!(
            svc.mode,
            Mode {
                algorithm: ALG_MAGLEV,
                flags: FLAG_AFFINITY_CLIENT | FLAG_CLIENT_CGROUP,
                affinity_timeout_s: 90,
            }
        );
        assert_eq!(svc.mode.balancing(1031), config.services[0].balancing);
    }
}
