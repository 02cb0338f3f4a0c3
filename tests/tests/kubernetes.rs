//! Privileged end-to-end tests of the Kubernetes source: the real agent with its real kube-rs
//! client against `lb-testkit kube-mock` (the list/watch protocol for Services, EndpointSlices
//! and Pods; no API server can be installed here), checked with real connects.

use lb_testkit::config::{Config, Table};
use lb_testkit::kube_mock::{pod, service, slice, Endpoint};
use lb_testkit::procs::Proto;
use lb_testkit::stats::{agent_stats, backend_set};
use lb_testkit::{
    http_status, require_privileged, wait_backends, wait_for, KubeMock, Scenario, TestCgroup,
};
use lb_userspace::status::SourceState;
use serde_json::{json, Value};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.31:8080";
const B2: &str = "127.0.0.32:8080";
const B3: &str = "127.0.0.33:8080";
/// The agent's name for port "http" of Service shop/web.
const WEB: &str = "shop.web.http";
const HTTP: &str = "127.0.0.1:9901";
const WAIT: Duration = Duration::from_secs(15);

fn web() -> Value {
    service(
        "shop",
        "web",
        Some("10.96.0.10"),
        &[("http", 80, "TCP", json!("web"))],
    )
}

fn ip(addr: &str) -> &str {
    addr.split(':').next().unwrap()
}

fn ready(addr: &str) -> Endpoint<'_> {
    (ip(addr), Some(true), Some(true), Some(false))
}

fn draining(addr: &str) -> Endpoint<'_> {
    (ip(addr), Some(false), Some(true), Some(true))
}

fn not_ready(addr: &str) -> Endpoint<'_> {
    (ip(addr), Some(false), Some(false), Some(false))
}

fn web_slice(endpoints: &[Endpoint]) -> Value {
    slice(
        "shop",
        "web-abc",
        "web",
        endpoints,
        &[("http", 8080, "TCP")],
    )
}

/// A scenario with the mock running and an agent watching it, serving /readyz. The backends
/// are on 127/8, so loopback endpoints are allowed.
fn start(backends: &[&str], services: &[Value], slices: &[Value]) -> (Scenario, KubeMock) {
    let options = |t: Table| t.set("allow_loopback_backends", true);
    start_with(backends, services, slices, options)
}

/// `start` with the `[kubernetes]` table (kubeconfig set) shaped by `options`.
fn start_with(
    backends: &[&str],
    services: &[Value],
    slices: &[Value],
    options: impl Fn(Table) -> Table,
) -> (Scenario, KubeMock) {
    let mut s = Scenario::without_agent(backends, Proto::Tcp);
    let mock = KubeMock::start(&s.net);
    mock.set(services, slices);
    s.write_config(kube_config(&s, &mock, options));
    s.agent_args = vec!["--http-listen".into(), HTTP.into()];
    s.start_agent();
    (s, mock)
}

fn kube_config(s: &Scenario, mock: &KubeMock, options: impl Fn(Table) -> Table) -> Config {
    let kubeconfig = mock.kubeconfig(s.config.parent().unwrap());
    let source = Table::new().set("kubeconfig", kubeconfig.display().to_string());
    Config::new().kubernetes(options(source))
}

/// Sets `field` of endpoint `i` of a slice made by `slice`.
fn with_endpoint_field(mut slice: Value, i: usize, field: &str, value: Value) -> Value {
    slice["endpoints"][i][field] = value;
    slice
}

/// `None` while `stats` fails or shows no Kubernetes source.
fn kubernetes_state(s: &Scenario) -> Option<SourceState> {
    agent_stats(&s.pins)?.kubernetes.map(|k| k.state)
}

#[test]
fn endpoint_conditions_drive_the_data_plane() {
    if !require_privileged() {
        return;
    }
    let headless = service("shop", "db", None, &[("", 5432, "TCP", json!(5432))]);
    let (s, mock) = start(
        &[B1, B2, B3],
        &[web(), headless],
        &[web_slice(&[ready(B1), ready(B2), not_ready(B3)])],
    );
    wait_backends(&s.pins, WEB, &[B1, B2], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);
    let stats = agent_stats(&s.pins).unwrap();
    assert_eq!(stats.services.len(), 1, "headless skipped: {stats:?}");
    assert!(wait_for(WAIT, || http_status(&s.net, HTTP, "/readyz") == Some(200)));
    assert_eq!(http_status(&s.net, HTTP, "/healthz"), Some(200));

    // B2 starts terminating: only ready endpoints get new connections.
    mock.set(
        &[web()],
        &[web_slice(&[ready(B1), draining(B2), not_ready(B3)])],
    );
    wait_backends(&s.pins, WEB, &[B1], WAIT);
    s.assert_balanced(VIP, &[B1]);

    // B1 gone, B2 still draining: with nothing ready, serving+terminating endpoints are used.
    mock.set(&[web()], &[web_slice(&[draining(B2), not_ready(B3)])]);
    wait_backends(&s.pins, WEB, &[B2], WAIT);
    s.assert_balanced(VIP, &[B2]);

    // Nothing serving: the service is empty and refuses connects.
    mock.set(&[web()], &[web_slice(&[not_ready(B3)])]);
    assert!(wait_for(WAIT, || s.service_stats(WEB).slots == 0));
    assert_eq!(s.client(VIP, 20, Proto::Tcp).failed("ECONNREFUSED"), 20);

    // A new ready pod.
    mock.set(&[web()], &[web_slice(&[ready(B3)])]);
    wait_backends(&s.pins, WEB, &[B3], WAIT);
    s.assert_balanced(VIP, &[B3]);

    // The Service deleted: its VIP is no longer translated.
    mock.set(&[], &[web_slice(&[ready(B3)])]);
    let gone = wait_for(WAIT, || {
        agent_stats(&s.pins).is_some_and(|st| backend_set(&st, WEB).is_none())
    });
    assert!(gone, "{:?}", agent_stats(&s.pins));
}

#[test]
fn dropped_watches_resume_and_expired_ones_relist() {
    if !require_privileged() {
        return;
    }
    let (s, mock) = start(&[B1, B2, B3], &[web()], &[web_slice(&[ready(B1)])]);
    wait_backends(&s.pins, WEB, &[B1], WAIT);
    let lists = |mock: &KubeMock| {
        mock.requests()
            .iter()
            .filter(|r| r.contains("endpointslices") && !r.contains("watch="))
            .count()
    };
    let lists_before = lists(&mock);

    // A dropped watch resumes from its last resourceVersion: no new list, changes still arrive.
    mock.disconnect_watches();
    mock.set(&[web()], &[web_slice(&[ready(B1), ready(B2)])]);
    wait_backends(&s.pins, WEB, &[B1, B2], WAIT);
    assert_eq!(
        lists(&mock),
        lists_before,
        "resume should not relist: {:#?}",
        mock.requests()
    );
    let resumed = mock
        .requests()
        .iter()
        .filter(|r| r.contains("endpointslices") && r.contains("watch=true"))
        .count();
    assert!(resumed >= 2, "{:#?}", mock.requests());

    // History compacted while the watch is down: the resume gets 410 Gone and relists, and a
    // change made meanwhile (B1 removed) is not lost.
    mock.outage(&[web()], &[web_slice(&[ready(B2), ready(B3)])]);
    wait_backends(&s.pins, WEB, &[B2, B3], WAIT);
    let relisted = wait_for(WAIT, || lists(&mock) > lists_before);
    assert!(relisted, "no relist after 410: {:#?}", mock.requests());
    s.assert_balanced(VIP, &[B2, B3]);
    assert_eq!(kubernetes_state(&s), Some(SourceState::Ok));
}

#[test]
fn restart_without_the_api_keeps_pinned_services_until_the_first_sync() {
    if !require_privileged() {
        return;
    }
    let (mut s, mock) = start(
        &[B1, B2, B3],
        &[web()],
        &[web_slice(&[ready(B1), ready(B2)])],
    );
    wait_backends(&s.pins, WEB, &[B1, B2], WAIT);

    // API server outage while running: the last known services stay and keep serving.
    drop(mock);
    let errored = wait_for(WAIT, || kubernetes_state(&s) == Some(SourceState::Error));
    assert!(errored, "{:?}", agent_stats(&s.pins));
    s.assert_balanced(VIP, &[B1, B2]);

    // A new agent with no API server at all keeps the pinned service and is not ready.
    s.agent().sigkill();
    s.start_agent();
    std::thread::sleep(Duration::from_millis(1500));
    let stats = agent_stats(&s.pins).unwrap();
    assert_eq!(backend_set(&stats, WEB).unwrap(), [B1, B2], "{stats:?}");
    assert_eq!(
        stats.kubernetes.as_ref().map(|k| k.state),
        Some(SourceState::Syncing),
        "{stats:?}"
    );
    s.assert_balanced(VIP, &[B1, B2]);
    assert_eq!(http_status(&s.net, HTTP, "/readyz"), Some(503));
    assert_eq!(http_status(&s.net, HTTP, "/healthz"), Some(200));

    // The API is back with a different view: after the first sync it replaces the pinned one.
    let mock = KubeMock::start(&s.net);
    mock.set(&[web()], &[web_slice(&[ready(B3)])]);
    wait_backends(&s.pins, WEB, &[B3], WAIT);
    assert!(wait_for(WAIT, || http_status(&s.net, HTTP, "/readyz") == Some(200)));
    s.assert_balanced(VIP, &[B3]);
}

#[test]
fn loopback_endpoints_are_refused_unless_allowed() {
    if !require_privileged() {
        return;
    }
    let (mut s, mock) = start_with(&[B1], &[web()], &[web_slice(&[ready(B1)])], |t| t);
    let refused = wait_for(WAIT, || {
        agent_stats(&s.pins).is_some_and(|st| {
            backend_set(&st, WEB).is_some_and(|b| b.is_empty())
                && st.kubernetes.as_ref().is_some_and(|k| {
                    k.skipped_reasons
                        .iter()
                        .any(|r| r.contains("loopback or link-local endpoint(s) refused"))
                })
        })
    });
    assert!(refused, "{:?}", agent_stats(&s.pins));
    assert_eq!(s.client(VIP, 20, Proto::Tcp).failed("ECONNREFUSED"), 20);

    // Allowed in the config (re-read on SIGHUP): the same endpoint is used.
    s.write_config(kube_config(&s, &mock, |t| {
        t.set("allow_loopback_backends", true)
    }));
    s.agent().sighup();
    wait_backends(&s.pins, WEB, &[B1], WAIT);
    s.assert_balanced(VIP, &[B1]);
}

#[test]
fn internal_traffic_policy_local_keeps_to_this_nodes_endpoints_without_fallback() {
    if !require_privileged() {
        return;
    }
    let mut svc = web();
    svc["spec"]["internalTrafficPolicy"] = json!("Local");
    let on = |nodes: [&str; 3]| {
        let mut sl = web_slice(&[ready(B1), ready(B2), ready(B3)]);
        for (i, node) in nodes.iter().enumerate() {
            sl = with_endpoint_field(sl, i, "nodeName", json!(node));
        }
        sl
    };
    let (s, mock) = start_with(
        &[B1, B2, B3],
        std::slice::from_ref(&svc),
        &[on(["node-1", "node-2", "node-1"])],
        |t| {
            t.set("allow_loopback_backends", true)
                .set("node_name", "node-1")
        },
    );
    wait_backends(&s.pins, WEB, &[B1, B3], WAIT);
    s.assert_balanced(VIP, &[B1, B3]);

    // No endpoint on this node: no backends, although node-2 and node-3 have ready ones.
    mock.set(
        std::slice::from_ref(&svc),
        &[on(["node-2", "node-2", "node-3"])],
    );
    assert!(wait_for(WAIT, || s.service_stats(WEB).slots == 0));
    assert_eq!(s.client(VIP, 20, Proto::Tcp).failed("ECONNREFUSED"), 20);

    // internalTrafficPolicy back to Cluster: every ready endpoint.
    mock.set(&[web()], &[on(["node-2", "node-2", "node-3"])]);
    wait_backends(&s.pins, WEB, &[B1, B2, B3], WAIT);
    s.assert_balanced(VIP, &[B1, B2, B3]);
}

#[test]
fn zone_hints_keep_to_this_zone_and_fall_back_to_all_when_incomplete() {
    if !require_privileged() {
        return;
    }
    let mut svc = web();
    svc["spec"]["trafficDistribution"] = json!("PreferClose");
    let hinted = |zones: [Option<&str>; 3]| {
        let mut sl = web_slice(&[ready(B1), ready(B2), ready(B3)]);
        for (i, zone) in zones.iter().enumerate() {
            if let Some(zone) = zone {
                let hints = json!({"forZones": [{"name": zone}]});
                sl = with_endpoint_field(sl, i, "hints", hints);
                sl = with_endpoint_field(sl, i, "zone", json!(zone));
            }
        }
        sl
    };
    let (s, mock) = start_with(
        &[B1, B2, B3],
        std::slice::from_ref(&svc),
        &[hinted([Some("zone-a"), Some("zone-b"), Some("zone-a")])],
        |t| t.set("allow_loopback_backends", true).set("zone", "zone-a"),
    );
    wait_backends(&s.pins, WEB, &[B1, B3], WAIT);
    s.assert_balanced(VIP, &[B1, B3]);

    // One ready endpoint without a hint: all ready endpoints, as kube-proxy falls back.
    mock.set(
        std::slice::from_ref(&svc),
        &[hinted([Some("zone-a"), Some("zone-b"), None])],
    );
    wait_backends(&s.pins, WEB, &[B1, B2, B3], WAIT);
    s.assert_balanced(VIP, &[B1, B2, B3]);

    // No endpoint hinted for this zone: all of them too.
    mock.set(
        std::slice::from_ref(&svc),
        &[hinted([Some("zone-b"), Some("zone-b"), Some("zone-c")])],
    );
    wait_backends(&s.pins, WEB, &[B1, B2, B3], WAIT);
    mock.set(
        std::slice::from_ref(&svc),
        &[hinted([Some("zone-b"), Some("zone-a"), Some("zone-c")])],
    );
    wait_backends(&s.pins, WEB, &[B2], WAIT);
    s.assert_balanced(VIP, &[B2]);
}

#[test]
fn caps_leave_the_newest_service_out_and_say_so_while_the_others_keep_updating() {
    if !require_privileged() {
        return;
    }
    let labelled = |mut v: Value, created: &str| {
        v["metadata"]["labels"] = json!({"lb": "on"});
        v["metadata"]["creationTimestamp"] = json!(created);
        v
    };
    let web = labelled(web(), "2024-01-01T00:00:00Z");
    let api = service(
        "shop",
        "api",
        Some("10.96.0.11"),
        &[("http", 80, "TCP", json!(8080))],
    );
    // Older than web, but not selected: it counts for nothing.
    let unselected = service(
        "a",
        "old",
        Some("10.96.0.12"),
        &[("http", 80, "TCP", json!(8080))],
    );
    let unselected = {
        let mut v = unselected;
        v["metadata"]["creationTimestamp"] = json!("2020-01-01T00:00:00Z");
        v
    };
    let api = labelled(api, "2025-01-01T00:00:00Z");
    let slice_of = |name: &str, endpoints: &[Endpoint]| {
        let mut sl = slice(
            "shop",
            &format!("{name}-abc"),
            name,
            endpoints,
            &[("http", 8080, "TCP")],
        );
        sl["metadata"]["labels"]["lb"] = json!("on");
        sl
    };
    let other_slice = slice(
        "a",
        "old-abc",
        "old",
        &[ready(B1)],
        &[("http", 8080, "TCP")],
    );
    let services = [web.clone(), api.clone(), unselected.clone()];
    let (s, mock) = start_with(
        &[B1, B2, B3],
        &services,
        &[
            slice_of("web", &[ready(B1), ready(B2), ready(B3)]),
            slice_of("api", &[ready(B1)]),
            other_slice.clone(),
        ],
        |t| {
            t.set("allow_loopback_backends", true)
                .set("label_selector", "lb=on")
                .set("max_services", 1)
                .set("max_endpoints_per_service", 2)
        },
    );
    // web is the older selected Service; its first two endpoints by address.
    wait_backends(&s.pins, WEB, &[B1, B2], WAIT);
    s.assert_balanced(VIP, &[B1, B2]);
    let stats = agent_stats(&s.pins).unwrap();
    assert!(backend_set(&stats, "shop.api.http").is_none(), "{stats:?}");
    assert!(backend_set(&stats, "a.old.http").is_none(), "{stats:?}");
    let limits = &stats.kubernetes.as_ref().unwrap().limits;
    let left_out: Vec<(&str, usize)> = limits
        .iter()
        .map(|l| (l.setting.as_str(), l.left_out))
        .collect();
    assert_eq!(
        left_out,
        [
            ("kubernetes.max_services", 1),
            ("kubernetes.max_endpoints_per_service", 1)
        ]
    );
    assert_eq!(limits[0].examples, ["shop/api"]);
    let (_, metrics) = lb_testkit::http_get(&s.net, "127.0.0.1:9902", "/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("lb_source_left_out{") && l.contains("max_services"))
        .unwrap_or_else(|| panic!("no lb_source_left_out: {metrics}"));
    assert!(line.ends_with(" 1"), "{line}");

    // The kept Service keeps following its endpoints.
    mock.set(
        &services,
        &[
            slice_of("web", &[not_ready(B1), ready(B2), ready(B3)]),
            slice_of("api", &[ready(B1)]),
            other_slice,
        ],
    );
    wait_backends(&s.pins, WEB, &[B2, B3], WAIT);
    s.assert_balanced(VIP, &[B2, B3]);

    // EndpointSlices are listed and watched with the Services' selector only.
    let slice_requests: Vec<String> = mock
        .requests()
        .into_iter()
        .filter(|r| r.contains("endpointslices"))
        .collect();
    assert!(!slice_requests.is_empty());
    for r in &slice_requests {
        assert!(r.contains("labelSelector=lb%3Don"), "{r}");
    }
}

/// Connects from `cgroup` to the VIP: (answered by a backend, left untranslated).
fn outcome(s: &Scenario, cgroup: &TestCgroup, count: u64) -> (u64, u64) {
    s.reached_or_untranslated(cgroup, VIP, count)
}

#[test]
fn a_pod_annotated_bypass_reaches_the_vip_untranslated_until_the_annotation_goes() {
    if !require_privileged() {
        return;
    }
    const NODE: &str = "node-a";
    const PROXY: &str = "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b";
    const SIBLING: &str = "11111111-2222-4333-8444-555555555555";
    const ELSEWHERE: &str = "21111111-2222-4333-8444-555555555555";
    const ANNOTATION: &str = "lb-agent/bypass";
    let (mut s, mock) = start_with(
        &[B1, B2],
        &[web()],
        &[web_slice(&[ready(B1), ready(B2)])],
        |t| {
            t.set("allow_loopback_backends", true)
                .set("node_name", NODE)
        },
    );
    wait_backends(&s.pins, WEB, &[B1, B2], WAIT);
    // Pod cgroups as kubelet names them, below the test's own cgroup (which the agent is
    // attached to and searches): the systemd driver's for the annotated pod, with a
    // container's cgroup below it, the cgroupfs driver's for the others.
    let systemd_name =
        |uid: &str| format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
    let proxy = s.cgroup.child_named(&systemd_name(PROXY));
    let container = proxy.child();
    let sibling = s.cgroup.child_named(&format!("pod{SIBLING}"));
    let elsewhere = s.cgroup.child_named(&format!("pod{ELSEWHERE}"));
    let pods = |proxy_annotations: &[(&str, &str)]| {
        vec![
            pod("shop", "proxy", PROXY, NODE, proxy_annotations),
            // A value that is neither "true" nor "false": warned about once, not bypassed.
            pod("shop", "sibling", SIBLING, NODE, &[(ANNOTATION, "yes")]),
            // Annotated, but another node's pod: the agent never sees it.
            pod(
                "shop",
                "elsewhere",
                ELSEWHERE,
                "node-b",
                &[(ANNOTATION, "true")],
            ),
        ]
    };
    mock.set_pods(&pods(&[(ANNOTATION, "true")]));
    let proxy_path = proxy.path.display().to_string();
    // The proxy's entry in `stats`: (pod, connects left untranslated).
    let bypassed = |s: &Scenario| {
        let stats = agent_stats(&s.pins)?;
        let entry = stats.bypass.iter().find(|b| b.cgroup == proxy_path)?;
        Some((entry.pod.clone(), entry.connects))
    };
    assert!(
        wait_for(WAIT, || bypassed(&s).is_some()),
        "the annotated pod's cgroup was not bypassed:\n{}",
        s.agent().log()
    );

    assert_eq!(outcome(&s, &proxy, 20), (0, 20), "the annotated pod");
    assert_eq!(outcome(&s, &container, 10), (0, 10), "its container");
    assert_eq!(outcome(&s, &sibling, 20), (20, 0), "the sibling pod");
    assert_eq!(outcome(&s, &elsewhere, 20), (20, 0), "another node's pod");
    assert_eq!(bypassed(&s), Some((Some("shop/proxy".to_owned()), 30)));
    assert_eq!(agent_stats(&s.pins).unwrap().bypass.len(), 1);
    let log = s.agent().log();
    let warned = log
        .lines()
        .filter(|l| l.contains(r#"lb-agent/bypass is "yes""#));
    let warned: Vec<&str> = warned.collect();
    assert_eq!(warned.len(), 1, "warned once:\n{log}");
    assert!(warned[0].contains("shop/sibling"), "{}", warned[0]);

    // The annotation removed: the pod is balanced again.
    mock.set_pods(&pods(&[]));
    s.assert_bypass_ends(WAIT, "the pod stayed bypassed");
    assert_eq!(outcome(&s, &proxy, 10), (10, 0), "no longer bypassed");
    assert_eq!(outcome(&s, &container, 10), (10, 0));

    // Annotated again, then the pod deleted: bypassed, then not.
    mock.set_pods(&pods(&[(ANNOTATION, "true")]));
    assert!(wait_for(WAIT, || bypassed(&s).is_some()), "re-annotated");
    mock.set_pods(&pods(&[(ANNOTATION, "true")])[1..]);
    s.assert_bypass_ends(WAIT, "the deleted pod stayed bypassed");
    assert_eq!(outcome(&s, &proxy, 10), (10, 0), "deleted pod");
    let requests = mock.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:?}"
    );
}
