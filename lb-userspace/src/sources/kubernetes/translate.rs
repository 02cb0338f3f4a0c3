//! Pure: Kubernetes Services and EndpointSlices → the agent's services. One service per
//! ClusterIP port; its backends are the endpoint addresses on the matching EndpointSlice port.
//!
//! Endpoint conditions follow kube-proxy: `ready` endpoints get new connections; when a
//! service has none, `serving` endpoints that are `terminating` are used (so a rolling update
//! of the last pod drains instead of refusing); anything else never. A missing `ready` counts as
//! ready and a missing `serving` as equal to `ready`, as the API documents.

use crate::config::{
    BackendConfig, Balancing, Protocol, AFFINITY_TIMEOUT_RANGE, DEFAULT_AFFINITY_TIMEOUT,
    MAX_BACKENDS_PER_SERVICE, MAX_NAME_LEN,
};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One ClusterIP port of a Service (one per family for a dual-stack one), balanced over its
/// endpoints. Kubernetes has no health checks or fail-open settings of ours to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterService {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<BackendConfig>,
    pub balancing: Balancing,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub services: Vec<ClusterService>,
    /// Things left out that an operator may want to know (not errors of the agent).
    pub notes: Vec<String>,
}

pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Translation {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(owner)) = (&slice.metadata.namespace, owner) {
            by_service
                .entry((ns.clone(), owner.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Translation::default();
    for service in services {
        let (Some(ns), Some(name)) = (&service.metadata.namespace, &service.metadata.name) else {
            continue;
        };
        let Some(spec) = &service.spec else { continue };
        let vips = cluster_ips(spec);
        if vips.is_empty() {
            if spec.cluster_ip.as_deref() != Some("None")
                && spec.type_.as_deref() != Some("ExternalName")
            {
                out.notes.push(format!("{ns}/{name}: no usable ClusterIP"));
            }
            continue;
        }
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map_or(&[][..], Vec::as_slice);
        let balancing = session_affinity(spec);
        for (vip, port) in vips
            .iter()
            .flat_map(|vip| spec.ports.iter().flatten().map(move |p| (*vip, p)))
        {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    out.notes.push(format!(
                        "{ns}/{name}: port {}: protocol {other} is not balanced",
                        port.port
                    ));
                    continue;
                }
            };
            let Ok(vip_port) = u16::try_from(port.port) else {
                continue;
            };
            if vip_port == 0 {
                continue;
            }
            let port_name = port.name.as_deref().unwrap_or("");
            let (backends, capped) = backends(slices, vip.is_ipv6(), port_name, protocol);
            if capped {
                out.notes.push(format!(
                    "{ns}/{name}: more than {MAX_BACKENDS_PER_SERVICE} endpoints; using the first {MAX_BACKENDS_PER_SERVICE} by address"
                ));
            }
            let mut label = if port_name.is_empty() {
                vip_port.to_string()
            } else {
                port_name.to_owned()
            };
            // Dual-stack Services get one service per family; the IPv4 one keeps the plain name.
            if vip.is_ipv6() {
                label.push_str(".ipv6");
            }
            out.services.push(ClusterService {
                name: service_name(ns, name, &label),
                vip: SocketAddr::new(vip, vip_port),
                protocol,
                backends,
                balancing,
            });
        }
    }
    out
}

/// At most one ClusterIP per family (dual-stack), usable ones only.
fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
    let mut found: Vec<IpAddr> = Vec::new();
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        if usable(ip) && !found.iter().any(|f| f.is_ipv6() == ip.is_ipv6()) {
            found.push(ip);
        }
    }
    found
}

fn usable(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !ip.is_unspecified() && !broadcast && !ip.is_multicast()
}

/// `sessionAffinity: ClientIP` is client affinity keyed by the pod's network namespace, with
/// Kubernetes' timeout (default three hours).
fn session_affinity(spec: &ServiceSpec) -> Balancing {
    let mut b = Balancing::default();
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let seconds = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        let (min, max) = (
            *AFFINITY_TIMEOUT_RANGE.start(),
            *AFFINITY_TIMEOUT_RANGE.end(),
        );
        b.affinity = Some(seconds.clamp(min, max));
    }
    b
}

/// Returns the backends for one service port and whether the list was cut to the cap.
fn backends(
    slices: &[&EndpointSlice],
    ipv6: bool,
    port_name: &str,
    protocol: Protocol,
) -> (Vec<BackendConfig>, bool) {
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol_name(protocol)
        }) else {
            continue;
        };
        let Some(port) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let c = endpoint.conditions.clone().unwrap_or_default();
            let is_ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(is_ready);
            let terminating = c.terminating.unwrap_or(false);
            let set = if is_ready && !terminating {
                &mut ready
            } else if serving && terminating {
                &mut draining
            } else {
                continue;
            };
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    if usable(ip) && ip.is_ipv6() == ipv6 {
                        set.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
    }
    let chosen = if ready.is_empty() { draining } else { ready };
    let capped = chosen.len() > MAX_BACKENDS_PER_SERVICE;
    let backends = chosen
        .into_iter()
        .take(MAX_BACKENDS_PER_SERVICE)
        .map(|address| BackendConfig { address, weight: 1 })
        .collect();
    (backends, capped)
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// `namespace.service.port`: Kubernetes names hold no dots, so this is unambiguous. Names
/// longer than the 63 bytes `stats` can store keep their start and a hash of the whole.
pub fn service_name(ns: &str, service: &str, port: &str) -> String {
    let full = format!("{ns}.{service}.{port}");
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    // FNV-1a: stable across runs and versions, unlike the std hasher.
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    // Cut on a character boundary: the API server only sends ASCII names, but a hostile or
    // broken one must not make this panic.
    let mut keep = MAX_NAME_LEN - 9;
    while !full.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}~{:08x}", &full[..keep], hash as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(ns: &str, name: &str, cluster_ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports}
        }))
        .unwrap()
    }

    fn slice(
        ns: &str,
        owner: &str,
        endpoints: serde_json::Value,
        ports: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": format!("{owner}-x"),
                         "labels": {SERVICE_NAME_LABEL: owner}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports
        }))
        .unwrap()
    }

    fn ep(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn addrs(s: &ClusterService) -> Vec<String> {
        s.backends.iter().map(|b| b.address.to_string()).collect()
    }

    #[test]
    fn each_cluster_ip_port_maps_to_its_named_slice_port() {
        let svc = service(
            "shop",
            "web",
            "10.96.0.10",
            json!([
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
            ]),
        );
        let sl = slice(
            "shop",
            "web",
            json!([
                ep("10.1.0.1", Some(true), None, None),
                ep("10.1.0.2", None, None, None)
            ]),
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        );
        let t = translate([&svc], [&sl]);
        assert_eq!(t.services.len(), 2);
        let http = &t.services[0];
        assert_eq!(http.name, "shop.web.http");
        assert_eq!(http.vip.to_string(), "10.96.0.10:80");
        assert_eq!(addrs(http), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        let dns = &t.services[1];
        assert_eq!((dns.protocol, dns.vip.port()), (Protocol::Udp, 53));
        assert_eq!(addrs(dns), ["10.1.0.1:5353", "10.1.0.2:5353"]);
    }

    #[test]
    fn terminating_serving_endpoints_are_used_only_when_none_is_ready() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let ports = json!([{"port": 8080}]);
        let mixed = slice(
            "a",
            "web",
            json!([
                ep("10.1.0.1", Some(true), Some(true), Some(false)),
                ep("10.1.0.2", Some(false), Some(true), Some(true)),
                ep("10.1.0.3", Some(false), Some(false), Some(false)),
            ]),
            ports.clone(),
        );
        let t = translate([&svc], [&mixed]);
        assert_eq!(addrs(&t.services[0]), ["10.1.0.1:8080"]);
        assert_eq!(t.services[0].name, "a.web.80");
        let draining = slice(
            "a",
            "web",
            json!([
                ep("10.1.0.2", Some(false), Some(true), Some(true)),
                ep("10.1.0.4", Some(false), Some(false), Some(true)),
                ep("10.1.0.3", Some(false), None, None),
            ]),
            ports,
        );
        let t = translate([&svc], [&draining]);
        assert_eq!(addrs(&t.services[0]), ["10.1.0.2:8080"]);
    }

    #[test]
    fn dual_stack_gives_one_service_per_family_and_client_ip_affinity_carries_over() {
        let mut svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["10.96.0.10".into(), "fd00::10".into()]);
        spec.session_affinity = Some("ClientIP".into());
        let v4 = slice(
            "a",
            "web",
            json!([ep("10.1.0.1", None, None, None)]),
            json!([{"port": 8080}]),
        );
        let mut v6 = slice(
            "a",
            "web",
            json!([ep("fd00::1", None, None, None)]),
            json!([{"port": 8080}]),
        );
        v6.address_type = "IPv6".into();
        let t = translate([&svc], [&v4, &v6]);
        let names: Vec<&str> = t.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a.web.80", "a.web.80.ipv6"]);
        assert_eq!(addrs(&t.services[0]), ["10.1.0.1:8080"]);
        assert_eq!(addrs(&t.services[1]), ["[fd00::1]:8080"]);
        assert_eq!(t.services[1].vip, "[fd00::10]:80".parse().unwrap());
        for s in &t.services {
            assert_eq!(s.balancing.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        }
    }

    #[test]
    fn headless_external_and_sctp_are_skipped() {
        let headless = service("a", "h", "None", json!([{"port": 80}]));
        let v6 = service("a", "six", "::", json!([{"port": 80}]));
        let sctp = service(
            "a",
            "s",
            "10.96.0.3",
            json!([{"port": 80, "protocol": "SCTP"}]),
        );
        let external: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }))
        .unwrap();
        let t = translate([&headless, &v6, &sctp, &external], []);
        assert!(t.services.is_empty(), "{:?}", t.services);
        assert_eq!(t.notes.len(), 2, "{:?}", t.notes);
    }

    #[test]
    fn slices_of_other_services_namespaces_or_families_do_not_count() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let other_ns = slice(
            "b",
            "web",
            json!([ep("10.1.0.1", None, None, None)]),
            json!([{"port": 1}]),
        );
        let other_svc = slice(
            "a",
            "api",
            json!([ep("10.1.0.2", None, None, None)]),
            json!([{"port": 1}]),
        );
        let mut v6 = slice(
            "a",
            "web",
            json!([ep("fd00::1", None, None, None)]),
            json!([{"port": 1}]),
        );
        v6.address_type = "IPv6".into();
        let wrong_port = slice(
            "a",
            "web",
            json!([ep("10.1.0.3", None, None, None)]),
            json!([{"name": "x", "port": 1}]),
        );
        let t = translate([&svc], [&other_ns, &other_svc, &v6, &wrong_port]);
        assert!(t.services[0].backends.is_empty());
    }

    #[test]
    fn endpoints_are_capped_and_deduplicated() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let many: Vec<serde_json::Value> = (0..2000u32)
            .map(|i| {
                ep(
                    &std::net::Ipv4Addr::from(0x0a01_0000 + i).to_string(),
                    None,
                    None,
                    None,
                )
            })
            .chain([ep("10.1.0.0", None, None, None)])
            .collect();
        let sl = slice("a", "web", json!(many), json!([{"port": 8080}]));
        let t = translate([&svc], [&sl]);
        assert_eq!(t.services[0].backends.len(), MAX_BACKENDS_PER_SERVICE);
        assert_eq!(t.notes.len(), 1);
    }

    #[test]
    fn long_non_ascii_names_are_cut_on_a_character_boundary() {
        let name = service_name(&format!("a{}", "é".repeat(30)), "web", "80");
        assert!(name.len() <= MAX_NAME_LEN, "{name}");
    }

    #[test]
    fn long_names_are_shortened_stably_and_distinctly() {
        let ns = "n".repeat(40);
        let a = service_name(&ns, &"s".repeat(40), "http");
        let b = service_name(&ns, &"s".repeat(40), "grpc");
        assert!(a.len() <= MAX_NAME_LEN && b.len() <= MAX_NAME_LEN);
        assert_ne!(a, b);
        assert_eq!(a, service_name(&ns, &"s".repeat(40), "http"));
    }
}
