//! Privileged end-to-end tests of the Kubernetes source: the real agent with its real kube-rs
//! client against `lb-testkit kube-mock` (the list/watch protocol for Services and
//! EndpointSlices; no API server can be installed here), checked with real connects.

use lb_testkit::config::{Config, Table};
use lb_testkit::kube_mock::{service, slice, Endpoint};
use lb_testkit::procs::Proto;
use lb_testkit::stats::{agent_stats, backend_set};
use lb_testkit::{http_status, require_privileged, wait_backends, wait_for, KubeMock, Scenario};
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

/// A scenario with the mock running and an agent watching it, serving /readyz.
fn start(backends: &[&str], services: &[Value], slices: &[Value]) -> (Scenario, KubeMock) {
    let mut s = Scenario::without_agent(backends, Proto::Tcp);
    let mock = KubeMock::start(&s.net);
    mock.set(services, slices);
    let kubeconfig = mock.kubeconfig(s.config.parent().unwrap());
    let source = Table::new().set("kubeconfig", kubeconfig.display().to_string());
    s.write_config(Config::new().kubernetes(source));
    s.agent_args = vec!["--http-listen".into(), HTTP.into()];
    s.start_agent();
    (s, mock)
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
    mock.compact();
    mock.set(&[web()], &[web_slice(&[ready(B2), ready(B3)])]);
    mock.disconnect_watches();
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
