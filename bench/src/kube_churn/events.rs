//! The cluster the Kubernetes churn benchmark serves, and the stream of endpoint changes made
//! to it. Every change gives its service a set of backends that service never had before, so
//! a set read from the maps names exactly one change: matching needs no timing guesswork.

use lb_testkit::kube_mock::{service, slice, Endpoint};
use serde_json::{json, Value};
use std::collections::{BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub const NAMESPACE: &str = "bench";
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// ClusterIPs count up from here (10.96.0.0/12 holds a million).
const FIRST_VIP: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// Endpoint addresses, one per endpoint ever made, count up from here (10.128.0.0/9).
const FIRST_ENDPOINT: u32 = u32::from_be_bytes([10, 128, 0, 1]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A new endpoint (a pod scaled up).
    Add,
    /// The oldest endpoint goes (scaled down).
    Remove,
    /// The oldest endpoint goes and a new one comes (a pod replaced, with a new IP).
    Replace,
}

pub struct Event {
    pub index: usize,
    pub service: usize,
    pub op: Op,
    /// The service's EndpointSlice after the change.
    pub slice: Value,
    /// What the maps must then hold for the service.
    pub backends: BTreeSet<SocketAddr>,
}

pub struct Cluster {
    /// Per service, its endpoints' ids, oldest first.
    endpoints: Vec<VecDeque<u32>>,
    per_service: usize,
    next_id: u32,
    stride: usize,
    made: usize,
}

impl Cluster {
    /// `services` (at least one) of `per_service` endpoints each (at least one).
    pub fn new(services: usize, per_service: usize) -> Self {
        let services = services.max(1);
        let per_service = per_service.max(1);
        let mut next_id = 0u32;
        let endpoints = (0..services)
            .map(|_| {
                (0..per_service)
                    .map(|_| {
                        next_id += 1;
                        next_id - 1
                    })
                    .collect()
            })
            .collect();
        Cluster {
            endpoints,
            per_service,
            next_id,
            stride: stride(services),
            made: 0,
        }
    }

    pub fn services(&self) -> usize {
        self.endpoints.len()
    }

    pub fn vip(i: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Self::cluster_ip(i), PORT))
    }

    fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(FIRST_VIP.wrapping_add(i as u32))
    }

    fn name(i: usize) -> String {
        format!("svc{i}")
    }

    pub fn service_object(&self, i: usize) -> Value {
        let ip = Self::cluster_ip(i).to_string();
        let ports = [("http", PORT, "TCP", json!("http"))];
        service(NAMESPACE, &Self::name(i), Some(&ip), &ports)
    }

    /// Service `i`'s one EndpointSlice, every endpoint ready.
    pub fn slice_object(&self, i: usize) -> Value {
        let ips: Vec<String> = self.endpoints[i]
            .iter()
            .map(|id| endpoint_ip(*id).to_string())
            .collect();
        let endpoints: Vec<Endpoint> = ips
            .iter()
            .map(|ip| (ip.as_str(), Some(true), Some(true), Some(false)))
            .collect();
        let name = Self::name(i);
        let ports = [("http", TARGET_PORT, "TCP")];
        slice(NAMESPACE, &format!("{name}-a"), &name, &endpoints, &ports)
    }

    /// What the maps hold for service `i` once they follow the cluster.
    pub fn backends(&self, i: usize) -> BTreeSet<SocketAddr> {
        self.endpoints[i]
            .iter()
            .map(|id| SocketAddr::V4(SocketAddrV4::new(endpoint_ip(*id), TARGET_PORT)))
            .collect()
    }

    /// The next change. Consecutive ones go to services `stride` apart, and a service is
    /// changed again only after every other one was: one change per service while there are
    /// fewer changes than services.
    pub fn next_event(&mut self) -> Event {
        let index = self.made;
        self.made += 1;
        let n = self.services();
        let service = ((index as u128 * self.stride as u128) % n as u128) as usize;
        let eps = &mut self.endpoints[service];
        let wanted = [Op::Add, Op::Remove, Op::Replace][index % 3];
        // Never empty (a service without endpoints is another matter), never unbounded.
        let op = match wanted {
            Op::Add if eps.len() >= self.per_service + 2 => Op::Replace,
            Op::Remove if eps.len() <= 1 => Op::Replace,
            op => op,
        };
        // Ids only grow, and each change raises the oldest or the newest id a service has, so
        // no set of endpoints comes back.
        if op != Op::Add {
            eps.pop_front();
        }
        if op != Op::Remove {
            eps.push_back(self.next_id);
            self.next_id += 1;
        }
        Event {
            index,
            service,
            op,
            slice: self.slice_object(service),
            backends: self.backends(service),
        }
    }
}

fn endpoint_ip(id: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_ENDPOINT.wrapping_add(id))
}

/// A step near n/φ that is coprime with n: visiting `k × step mod n` goes through every
/// service once per n changes, neighbours in time far apart in the list.
fn stride(n: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut s = (n * 618 / 1000).max(1);
    while gcd(s, n) != 1 {
        s += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn each_service_is_changed_once_before_any_twice() {
        for n in [1, 2, 10, 1_000, 10_000] {
            let mut c = Cluster::new(n, 5);
            let mut seen = BTreeSet::new();
            for _ in 0..n {
                assert!(seen.insert(c.next_event().service), "n = {n}");
            }
            assert_eq!(seen.len(), n);
        }
        // Neighbours in time are far apart in the list.
        let mut c = Cluster::new(10_000, 5);
        let (a, b) = (c.next_event().service, c.next_event().service);
        assert!(a.abs_diff(b) > 1_000, "{a} {b}");
    }

    #[test]
    fn no_set_of_backends_comes_back_and_none_is_empty() {
        // Three services and many changes: every service goes through every kind of change,
        // and the bounds, many times.
        let mut c = Cluster::new(3, 2);
        let mut history: BTreeMap<usize, Vec<BTreeSet<SocketAddr>>> =
            (0..3).map(|i| (i, vec![c.backends(i)])).collect();
        let mut ops = BTreeSet::new();
        for _ in 0..3_000 {
            let e = c.next_event();
            assert!(!e.backends.is_empty());
            assert!(e.backends.len() <= 4);
            assert_eq!(e.backends, c.backends(e.service));
            let past = history.entry(e.service).or_default();
            assert!(
                !past.contains(&e.backends),
                "a set came back: {:?}",
                e.backends
            );
            past.push(e.backends);
            ops.insert(format!("{:?}", e.op));
        }
        assert_eq!(ops.len(), 3, "{ops:?}");
    }

    #[test]
    fn the_slice_names_the_backends() {
        let mut c = Cluster::new(4, 5);
        let e = c.next_event();
        assert_eq!(e.op, Op::Add);
        let ips: BTreeSet<String> = e.slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ep| ep["addresses"][0].as_str().unwrap().to_string())
            .collect();
        let want: BTreeSet<String> = e.backends.iter().map(|b| b.ip().to_string()).collect();
        assert_eq!(ips, want);
        assert_eq!(ips.len(), 6);
        assert_eq!(e.slice["ports"][0]["port"], 8080);
        let svc = c.service_object(e.service);
        assert_eq!(
            e.slice["metadata"]["labels"]["kubernetes.io/service-name"],
            svc["metadata"]["name"]
        );
        assert_eq!(
            svc["spec"]["clusterIP"],
            Cluster::vip(e.service).ip().to_string()
        );
    }
}
