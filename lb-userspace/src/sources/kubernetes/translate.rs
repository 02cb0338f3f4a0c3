//! Pure: Kubernetes Services and EndpointSlices → the agent's services. One service per
//! ClusterIP port; its backends are the endpoint addresses on the matching EndpointSlice port.
//!
//! Which endpoints, as kube-proxy (`pkg/proxy/topology.go`, `CategorizeEndpoints`) decides for
//! ClusterIP traffic:
//!
//! - Conditions: `ready` endpoints get new connections; when a service has none, `serving`
//!   endpoints that are `terminating` are used (so a rolling update of the last pod drains
//!   instead of refusing); anything else never. A missing `ready` counts as ready and a missing
//!   `serving` as equal to `ready`, as the API documents.
//! - `internalTrafficPolicy: Local`: only endpoints whose `nodeName` is this node (ready ones,
//!   else serving+terminating ones). None: the service has no backends. There is no fallback to
//!   other nodes: kube-proxy drops such traffic (here a connect is refused), and topology hints
//!   are not looked at.
//! - Otherwise hints, looked at over the ready endpoints only: when every one has a node hint
//!   (`hints.forNodes`, `trafficDistribution: PreferSameNode`) and one is hinted for this node,
//!   the ready endpoints hinted for this node; else when every one has a zone hint
//!   (`hints.forZones`: `PreferClose`/`PreferSameZone`, or the `topology-mode: Auto`
//!   annotation) and one is hinted for this node's zone, those hinted for the zone; else all
//!   ready endpoints. Like kube-proxy since 1.31 this follows the hints alone, not the Service
//!   field or annotation that asked the EndpointSlice controller for them. With no ready
//!   endpoint, serving+terminating ones are used regardless of hints.
//! - Our own rules, after those: endpoints in 127/8, ::1, 169.254/16 or fe80::/10 (also
//!   v4-mapped) are refused unless `allow_loopback_backends`; at most
//!   `max_endpoints_per_service` per service port (lowest addresses first) and
//!   `max_services` Services (oldest first, then by namespace and name, so that a new Service
//!   never pushes out one already served).

use crate::config::{
    BackendConfig, Balancing, KubernetesConfig, Protocol, AFFINITY_TIMEOUT_RANGE,
    DEFAULT_AFFINITY_TIMEOUT, DEFAULT_KUBE_MAX_SERVICES, MAX_BACKENDS_PER_SERVICE, MAX_NAME_LEN,
};
use crate::sources::answer::is_loopback_or_link_local;
use crate::status::LimitHit;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// How many of the Services or endpoints a limit left out are named in `stats`.
const LIMIT_EXAMPLES: usize = 5;

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
    /// `max_services` and `max_endpoints_per_service`, with what they left out.
    pub limits: Vec<LimitHit>,
}

/// The agent's settings that shape the translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// This node, for `internalTrafficPolicy: Local` and node hints.
    pub node_name: Option<String>,
    /// This node's zone, for zone hints.
    pub zone: Option<String>,
    pub max_services: usize,
    pub max_endpoints_per_service: usize,
    pub allow_loopback_backends: bool,
    /// Services are picked by a label selector (and their EndpointSlices watched with it).
    pub label_selector: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_name: None,
            zone: None,
            max_services: DEFAULT_KUBE_MAX_SERVICES,
            max_endpoints_per_service: MAX_BACKENDS_PER_SERVICE,
            allow_loopback_backends: false,
            label_selector: false,
        }
    }
}

impl Options {
    /// `env_node_name`: `$NODE_NAME` (the downward API's `spec.nodeName`), used when the config
    /// names no node.
    pub fn new(config: &KubernetesConfig, env_node_name: Option<String>) -> Self {
        Options {
            node_name: config
                .node_name
                .clone()
                .or(env_node_name.filter(|n| !n.is_empty())),
            zone: config.zone.clone(),
            max_services: config.max_services,
            max_endpoints_per_service: config.max_endpoints_per_service,
            allow_loopback_backends: config.allow_loopback_backends,
            label_selector: config.label_selector.is_some(),
        }
    }
}

pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    options: &Options,
) -> Translation {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(owner)) = (&slice.metadata.namespace, owner) {
            by_service.entry((ns, owner)).or_default().push(slice);
        }
    }
    let mut out = Translation::default();
    // The Services that would be balanced, oldest first: `max_services` keeps the first ones.
    let mut wanted = Vec::new();
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
        let created = service.metadata.creation_timestamp.as_ref();
        wanted.push((created, ns.as_str(), name.as_str(), spec, vips));
    }
    wanted.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let left_out: Vec<String> = wanted
        .iter()
        .skip(options.max_services)
        .map(|(_, ns, name, ..)| format!("{ns}/{name}"))
        .collect();
    out.limits.push(LimitHit {
        setting: "kubernetes.max_services".into(),
        limit: options.max_services,
        left_out: left_out.len(),
        examples: left_out.into_iter().take(LIMIT_EXAMPLES).collect(),
    });
    let mut endpoints_cut = LimitHit {
        setting: "kubernetes.max_endpoints_per_service".into(),
        limit: options.max_endpoints_per_service,
        ..LimitHit::default()
    };
    wanted.truncate(options.max_services);
    wanted.sort_by(|a, b| (a.1, a.2).cmp(&(b.1, b.2)));
    for (_, ns, name, spec, vips) in wanted {
        let slices = by_service.get(&(ns, name)).map_or(&[][..], Vec::as_slice);
        if slices.is_empty() && options.label_selector && !has_pod_selector(spec) {
            out.notes.push(format!(
                "{ns}/{name}: no Pod selector and no EndpointSlice with the label_selector's \
                 labels (the EndpointSlice controller copies a Service's labels to its slices \
                 only for Services with a selector; label hand-made slices alike)"
            ));
        }
        let node_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        if node_local && options.node_name.is_none() {
            out.notes.push(format!(
                "{ns}/{name}: internalTrafficPolicy Local but this node's name is unknown \
                 (set kubernetes.node_name or NODE_NAME): no backends"
            ));
        }
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
            let mut label = if port_name.is_empty() {
                vip_port.to_string()
            } else {
                port_name.to_owned()
            };
            // Dual-stack Services get one service per family; the IPv4 one keeps the plain name.
            if vip.is_ipv6() {
                label.push_str(".ipv6");
            }
            let candidates = candidates(slices, vip.is_ipv6(), port_name, protocol);
            let (allowed, refused): (Vec<Candidate>, Vec<Candidate>) =
                candidates.into_iter().partition(|c| {
                    options.allow_loopback_backends || !is_loopback_or_link_local(c.address.ip())
                });
            if let Some(first) = refused.first() {
                out.notes.push(format!(
                    "{ns}/{name}: port {label}: {} loopback or link-local endpoint(s) refused, \
                     such as {} (kubernetes.allow_loopback_backends)",
                    refused.len(),
                    first.address.ip()
                ));
            }
            let chosen = choose(&allowed, node_local, options);
            let cap = options.max_endpoints_per_service;
            if chosen.len() > cap {
                endpoints_cut.left_out += chosen.len() - cap;
                if endpoints_cut.examples.len() < LIMIT_EXAMPLES {
                    endpoints_cut.examples.push(format!(
                        "{ns}/{name} port {label}: {} of {}",
                        chosen.len() - cap,
                        chosen.len()
                    ));
                }
            }
            let backends = chosen
                .into_iter()
                .take(cap)
                .map(|address| BackendConfig { address, weight: 1 })
                .collect();
            out.services.push(ClusterService {
                name: service_name(ns, name, &label),
                vip: SocketAddr::new(vip, vip_port),
                protocol,
                backends,
                balancing,
            });
        }
    }
    out.limits.push(endpoints_cut);
    out
}

fn has_pod_selector(spec: &ServiceSpec) -> bool {
    spec.selector.as_ref().is_some_and(|s| !s.is_empty())
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

/// One endpoint address on one service port, with what `choose` looks at.
struct Candidate<'a> {
    address: SocketAddr,
    ready: bool,
    /// Serving and terminating: used only when nothing is ready.
    draining: bool,
    endpoint: &'a Endpoint,
}

impl Candidate<'_> {
    fn zone_hints(&self) -> impl Iterator<Item = &str> {
        let hints = self.endpoint.hints.as_ref();
        hints
            .and_then(|h| h.for_zones.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|z| z.name.as_str())
    }

    fn node_hints(&self) -> impl Iterator<Item = &str> {
        let hints = self.endpoint.hints.as_ref();
        hints
            .and_then(|h| h.for_nodes.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|n| n.name.as_str())
    }

    fn on_node(&self, node: Option<&str>) -> bool {
        node.is_some() && self.endpoint.node_name.as_deref() == node
    }
}

/// The usable addresses of one service port's endpoints in this family, with their conditions.
fn candidates<'a>(
    slices: &[&'a EndpointSlice],
    ipv6: bool,
    port_name: &str,
    protocol: Protocol,
) -> Vec<Candidate<'a>> {
    let mut out = Vec::new();
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
            let ready = is_ready && !terminating;
            let draining = serving && terminating;
            if !ready && !draining {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    if usable(ip) && ip.is_ipv6() == ipv6 {
                        out.push(Candidate {
                            address: SocketAddr::new(ip, port),
                            ready,
                            draining,
                            endpoint,
                        });
                    }
                }
            }
        }
    }
    out
}

/// kube-proxy's choice among one service port's endpoints (module documentation), sorted by
/// address and without duplicates.
fn choose(candidates: &[Candidate], node_local: bool, options: &Options) -> BTreeSet<SocketAddr> {
    let node = options.node_name.as_deref();
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> BTreeSet<SocketAddr> {
        candidates
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.address)
            .collect()
    };
    if node_local {
        let local = pick(&|c| c.ready && c.on_node(node));
        return if local.is_empty() {
            pick(&|c| c.draining && c.on_node(node))
        } else {
            local
        };
    }
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return pick(&|c| c.draining);
    }
    let for_node = |c: &Candidate| node.is_some_and(|n| c.node_hints().any(|h| h == n));
    let for_zone = |c: &Candidate| {
        let zone = options.zone.as_deref();
        zone.is_some_and(|z| c.zone_hints().any(|h| h == z))
    };
    let all_hinted = |hints: &dyn Fn(&Candidate) -> bool| ready.iter().all(|c| hints(c));
    if all_hinted(&|c| c.node_hints().next().is_some()) && ready.iter().any(|c| for_node(c)) {
        return pick(&|c| c.ready && for_node(c));
    }
    if all_hinted(&|c| c.zone_hints().next().is_some()) && ready.iter().any(|c| for_zone(c)) {
        return pick(&|c| c.ready && for_zone(c));
    }
    pick(&|c| c.ready)
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
        let t = translate([&svc], [&sl], &Options::default());
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
        let t = translate([&svc], [&mixed], &Options::default());
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
        let t = translate([&svc], [&draining], &Options::default());
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
        let t = translate([&svc], [&v4, &v6], &Options::default());
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
        let t = translate([&headless, &v6, &sctp, &external], [], &Options::default());
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
        let t = translate(
            [&svc],
            [&other_ns, &other_svc, &v6, &wrong_port],
            &Options::default(),
        );
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
        let t = translate([&svc], [&sl], &Options::default());
        assert_eq!(t.services[0].backends.len(), MAX_BACKENDS_PER_SERVICE);
        assert_eq!(
            t.services[0].backends[0].address.to_string(),
            "10.1.0.0:8080"
        );
        assert_eq!(t.limits[1].left_out, 2000 - MAX_BACKENDS_PER_SERVICE);
        assert_eq!(t.limits[0].left_out, 0);
    }

    /// An endpoint on `node` with zone hints (`None`: no `hints`).
    fn ep_at(ip: &str, ready: bool, node: &str, zones: Option<&[&str]>) -> serde_json::Value {
        let mut e = json!({"addresses": [ip], "nodeName": node,
                           "conditions": {"ready": ready, "serving": ready, "terminating": false}});
        if let Some(zones) = zones {
            let zones: Vec<_> = zones.iter().map(|z| json!({"name": z})).collect();
            e["hints"] = json!({"forZones": zones});
        }
        e
    }

    fn at(node: &str, zone: &str) -> Options {
        Options {
            node_name: Some(node.into()),
            zone: Some(zone.into()),
            ..Options::default()
        }
    }

    fn one(svc: &Service, endpoints: serde_json::Value, options: &Options) -> Vec<String> {
        let sl = slice("a", "web", endpoints, json!([{"port": 8080}]));
        let t = translate([svc], [&sl], options);
        addrs(&t.services[0])
    }

    #[test]
    fn zone_hints_are_used_only_when_every_ready_endpoint_has_one_and_one_is_ours() {
        let mut svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
        let z = |zones: &'static [&'static str]| Some(zones);
        let hinted = json!([
            ep_at("10.1.0.1", true, "n1", z(&["a"])),
            ep_at("10.1.0.2", true, "n2", z(&["b"])),
            ep_at("10.1.0.3", true, "n3", z(&["a", "b"])),
            // Not ready: its missing hint does not count, and it is never used.
            ep_at("10.1.0.4", false, "n4", None),
        ]);
        assert_eq!(
            one(&svc, hinted.clone(), &at("n9", "a")),
            ["10.1.0.1:8080", "10.1.0.3:8080"]
        );
        assert_eq!(
            one(&svc, hinted.clone(), &at("n9", "b")),
            ["10.1.0.2:8080", "10.1.0.3:8080"]
        );
        // No endpoint hinted for our zone, or our zone unknown: all ready endpoints.
        let all = ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"];
        assert_eq!(one(&svc, hinted.clone(), &at("n9", "c")), all);
        assert_eq!(one(&svc, hinted.clone(), &Options::default()), all);
        // One ready endpoint without hints: all ready endpoints.
        let partly = json!([
            ep_at("10.1.0.1", true, "n1", z(&["a"])),
            ep_at("10.1.0.2", true, "n2", None),
        ]);
        assert_eq!(
            one(&svc, partly, &at("n9", "a")),
            ["10.1.0.1:8080", "10.1.0.2:8080"]
        );
        // Hints count without the Service field too (kube-proxy follows the hints alone), and
        // with nothing ready, draining endpoints are used whatever their hints.
        svc.spec.as_mut().unwrap().traffic_distribution = None;
        assert_eq!(
            one(&svc, hinted, &at("n9", "a")),
            ["10.1.0.1:8080", "10.1.0.3:8080"]
        );
        let draining = json!([
            {"addresses": ["10.1.0.5"], "hints": {"forZones": [{"name": "b"}]},
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            ep_at("10.1.0.6", false, "n1", z(&["a"])),
        ]);
        assert_eq!(one(&svc, draining, &at("n9", "a")), ["10.1.0.5:8080"]);
    }

    #[test]
    fn node_hints_win_over_zone_hints_when_every_ready_endpoint_has_one() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let mut eps = json!([
            ep_at("10.1.0.1", true, "n1", Some(&["a"])),
            ep_at("10.1.0.2", true, "n2", Some(&["a"])),
            ep_at("10.1.0.3", true, "n3", Some(&["b"])),
        ]);
        for (i, node) in ["n1", "n2", "n3"].iter().enumerate() {
            eps[i]["hints"]["forNodes"] = json!([{"name": node}]);
        }
        assert_eq!(one(&svc, eps.clone(), &at("n2", "a")), ["10.1.0.2:8080"]);
        // Not hinted for our node: the zone hints decide.
        assert_eq!(
            one(&svc, eps.clone(), &at("n9", "a")),
            ["10.1.0.1:8080", "10.1.0.2:8080"]
        );
        eps[0]["hints"].as_object_mut().unwrap().remove("forNodes");
        assert_eq!(
            one(&svc, eps, &at("n2", "a")),
            ["10.1.0.1:8080", "10.1.0.2:8080"]
        );
    }

    #[test]
    fn internal_traffic_policy_local_uses_this_nodes_endpoints_or_none() {
        let mut svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let draining_on = |ip: &str, node: &str| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": false, "serving": true, "terminating": true}})
        };
        let eps = json!([
            ep_at("10.1.0.1", true, "n1", Some(&["a"])),
            ep_at("10.1.0.2", true, "n2", Some(&["a"])),
            ep_at("10.1.0.3", false, "n1", None),
            draining_on("10.1.0.4", "n1"),
        ]);
        // Ready local ones; zone hints are not looked at.
        assert_eq!(one(&svc, eps.clone(), &at("n1", "b")), ["10.1.0.1:8080"]);
        // No local endpoint: no backends, no fallback to other nodes.
        assert!(one(&svc, eps.clone(), &at("n3", "a")).is_empty());
        // Unknown node name: no backends, and a note says why.
        let sl = slice("a", "web", eps, json!([{"port": 8080}]));
        let t = translate([&svc], [&sl], &Options::default());
        assert!(t.services[0].backends.is_empty());
        assert!(
            t.notes[0].contains("node's name is unknown"),
            "{:?}",
            t.notes
        );
        // Only a draining local one: it is used, even though other nodes have ready ones.
        let eps = json!([
            ep_at("10.1.0.2", true, "n2", None),
            draining_on("10.1.0.4", "n1"),
        ]);
        assert_eq!(one(&svc, eps, &at("n1", "a")), ["10.1.0.4:8080"]);
    }

    #[test]
    fn loopback_and_link_local_endpoints_are_refused_unless_allowed() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let eps = json!([
            ep("127.0.0.1", None, None, None),
            ep("127.255.0.9", None, None, None),
            ep("169.254.1.1", None, None, None),
            ep("10.1.0.1", None, None, None),
            ep("169.255.0.1", None, None, None),
        ]);
        let sl = slice("a", "web", eps.clone(), json!([{"port": 8080}]));
        let t = translate([&svc], [&sl], &Options::default());
        assert_eq!(addrs(&t.services[0]), ["10.1.0.1:8080", "169.255.0.1:8080"]);
        assert!(
            t.notes[0].contains("3 loopback or link-local endpoint(s) refused"),
            "{:?}",
            t.notes
        );
        let allowed = Options {
            allow_loopback_backends: true,
            ..Options::default()
        };
        assert_eq!(one(&svc, eps, &allowed).len(), 5);
        for (ip, refused) in [
            ("::1", true),
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", false),
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.0.1", true),
            ("::ffff:10.0.0.1", false),
            ("fd00::1", false),
        ] {
            assert_eq!(
                is_loopback_or_link_local(ip.parse().unwrap()),
                refused,
                "{ip}"
            );
        }
    }

    #[test]
    fn services_beyond_the_cap_are_left_out_newest_first_and_endpoints_by_address() {
        let created = |ns: &str, name: &str, when: &str| {
            let mut s = service(ns, name, "10.96.0.10", json!([{"port": 80}]));
            s.metadata.creation_timestamp = Some(serde_json::from_value(json!(when)).unwrap());
            s
        };
        let old = created("z", "old", "2024-01-01T00:00:00Z");
        let new = created("a", "new", "2025-01-01T00:00:00Z");
        let same_a = created("m", "a", "2024-06-01T00:00:00Z");
        let same_b = created("m", "b", "2024-06-01T00:00:00Z");
        let headless = service("a", "h", "None", json!([{"port": 80}]));
        let options = Options {
            max_services: 2,
            max_endpoints_per_service: 2,
            ..Options::default()
        };
        let eps = json!([
            ep("10.1.0.3", None, None, None),
            ep("10.1.0.1", None, None, None),
            ep("10.1.0.2", None, None, None),
        ]);
        let sl = slice("z", "old", eps, json!([{"port": 8080}]));
        let t = translate([&new, &same_b, &headless, &old, &same_a], [&sl], &options);
        let names: Vec<&str> = t.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["m.a.80", "z.old.80"]);
        assert_eq!(addrs(&t.services[1]), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        let (services, endpoints) = (&t.limits[0], &t.limits[1]);
        assert_eq!(services.setting, "kubernetes.max_services");
        assert_eq!(
            (services.left_out, &services.examples[..]),
            (2, &["m/b".to_string(), "a/new".to_string()][..])
        );
        assert_eq!(endpoints.left_out, 1);
        assert_eq!(endpoints.examples, ["z/old port 80: 1 of 3"]);
    }

    #[test]
    fn a_selected_service_without_pod_selector_or_slices_is_noted() {
        let svc = service("a", "web", "10.96.0.10", json!([{"port": 80}]));
        let selected = Options {
            label_selector: true,
            ..Options::default()
        };
        let t = translate([&svc], [], &selected);
        assert!(t.notes[0].contains("no Pod selector"), "{:?}", t.notes);
        assert!(translate([&svc], [], &Options::default()).notes.is_empty());
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
