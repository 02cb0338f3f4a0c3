//! Privileged end-to-end tests of what a discovery source may cost the agent: a huge secret
//! file and huge Consul answers each give an error naming what was refused, and the agent's
//! peak memory (VmHWM, reset before each step) stays low. The real agent runs against the
//! Consul-contract mock inside the test's namespace.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::Proto;
use lb_testkit::stats::backend_set;
use lb_testkit::{
    agent_stats, consul_raw, consul_state, require_privileged, wait_backends, wait_for, ConsulMock,
    Scenario,
};
use lb_userspace::status::{SourceState, SourceStatus};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.21:8080";
const B2: &str = "127.0.0.22:8080";
const WAIT: Duration = Duration::from_secs(20);
/// Generous: the agent reads at most 16 MiB of an answer and keeps a few fields of it.
const PEAK_GROWTH_LIMIT_KIB: u64 = 64 << 10;

fn consul_service(consul: &ConsulMock, token_file: Option<&std::path::Path>) -> Config {
    let mut discovery = Table::new()
        .set("kind", "consul")
        .set("address", consul.addr.clone())
        .set("service", "web")
        .set("wait", "2s")
        .set("retry_initial", "100ms")
        .set("retry_max", "500ms")
        .set("allow_loopback_backends", true);
    if let Some(token) = token_file {
        discovery = discovery.set("token_file", token.display().to_string());
    }
    Config::new().service(Service::tcp("web", VIP).discovery(discovery))
}

fn source(s: &Scenario) -> Option<SourceStatus> {
    s.service_stats("web").discovery
}

/// Waits until the source reports an error containing every one of `parts` (its state is
/// `syncing` until a first answer, `error` after one).
fn wait_error(s: &Scenario, parts: &[&str]) -> String {
    let ok = wait_for(WAIT, || {
        source(s).is_some_and(|src| {
            let error = src.last_error.unwrap_or_default();
            src.state != SourceState::Ok && parts.iter().all(|p| error.contains(p))
        })
    });
    let src = source(s);
    assert!(ok, "no error with {parts:?}: {src:?}");
    src.and_then(|src| src.last_error).unwrap_or_default()
}

/// Peak growth since `baseline_kib` (from `reset_peak_rss`), printed for the record.
fn peak_growth_kib(s: &Scenario, baseline_kib: u64, what: &str) -> u64 {
    let peak = s.agent.as_ref().expect("agent").peak_rss_kib();
    let growth = peak.saturating_sub(baseline_kib);
    eprintln!("{what}: RSS {baseline_kib} KiB before, peak {peak} KiB (+{growth} KiB)");
    growth
}

#[test]
fn a_100_mib_token_file_is_refused_with_its_name_and_costs_no_memory() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[B1, B2], Proto::Tcp);
    let consul = ConsulMock::start(&s.net, &consul_state(3, &[(B1, "passing")]));
    // 100 MiB without writing them: a sparse file reads as zeros.
    let token = s.config.with_extension("token");
    std::fs::File::create(&token)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    s.write_config(consul_service(&consul, Some(&token)));
    s.start_agent();
    let baseline = s.agent.as_ref().expect("agent").reset_peak_rss();
    // Retried with backoff, each time refused the same way.
    let retried = wait_for(WAIT, || {
        source(&s).is_some_and(|src| src.consecutive_errors >= 3)
    });
    assert!(retried, "{:?}", source(&s));
    let growth = peak_growth_kib(&s, baseline, "100 MiB token file");
    let error = wait_error(&s, &["discovery.token_file", "larger than 64 KiB"]);
    assert!(error.contains(&token.display().to_string()), "{error}");
    let table = lb_testkit::stats::stats_table(&s.pins);
    assert!(
        table.contains("source consul \"web\": syncing, not reached yet (discovery.token_file"),
        "{table}"
    );
    assert!(growth < PEAK_GROWTH_LIMIT_KIB, "peak grew by {growth} KiB");
    // No request left without its token.
    assert!(consul.requests().is_empty(), "{:?}", consul.requests());

    // A usable token is picked up on the next attempt.
    std::fs::write(&token, "s3cret\n").unwrap();
    wait_backends(&s.pins, "web", &[B1], WAIT);
    assert!(consul
        .requests()
        .iter()
        .all(|r| r.ends_with("token=s3cret")));
}

/// A well-formed answer of about `mib` MiB that gives `B1` and `B2`: Consul's shape, with each
/// instance carrying a long list of tags (tiny JSON values, the most a parser could balloon).
fn padded_answer(mib: usize) -> String {
    let tags_each = (mib << 20) / 2 / 4;
    let tags = vec!["\"t\""; tags_each].join(",");
    let instance = |addr: &str| {
        let (ip, port) = addr.split_once(':').unwrap();
        format!(
            r#"{{"Node":{{"Node":"n-{ip}","Address":"{ip}"}},"Service":{{"Service":"web","Address":"","Port":{port},"Tags":[{tags}],"Weights":{{"Passing":1,"Warning":1}}}},"Checks":[]}}"#
        )
    };
    format!("[{},{}]", instance(B1), instance(B2))
}

#[test]
fn a_20_mib_consul_answer_is_refused_and_15_mib_ones_stay_small() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[B1, B2], Proto::Tcp);
    let consul = ConsulMock::start(&s.net, &consul_state(3, &[(B1, "passing")]));
    s.write_config(consul_service(&consul, None));
    s.start_agent();
    wait_backends(&s.pins, "web", &[B1], WAIT);
    let baseline = s.agent.as_ref().expect("agent").reset_peak_rss();

    // Over the cap: an error naming it; the last good set keeps serving.
    let huge = padded_answer(20);
    assert!(huge.len() > 20 << 20, "{} bytes", huge.len());
    consul.set(&consul_raw(10, &huge));
    let error = wait_error(&s, &["answer is larger than 16 MiB"]);
    assert!(
        error.contains(&format!("({} bytes)", huge.len())),
        "{error}"
    );
    let stats = agent_stats(&s.pins).unwrap();
    assert_eq!(backend_set(&stats, "web").unwrap(), [B1], "{stats:?}");
    let growth = peak_growth_kib(&s, baseline, "20 MiB answer");
    assert!(growth < PEAK_GROWTH_LIMIT_KIB, "peak grew by {growth} KiB");

    // Under the cap: used, without the answer's millions of values costing memory.
    let large = padded_answer(15);
    assert!(
        large.len() > 15 << 20 && large.len() < 16 << 20,
        "{} bytes",
        large.len()
    );
    consul.set(&consul_raw(11, &large));
    wait_backends(&s.pins, "web", &[B1, B2], WAIT);
    let ok = wait_for(WAIT, || {
        source(&s).is_some_and(|src| src.state == SourceState::Ok)
    });
    assert!(ok, "{:?}", source(&s));
    let growth = peak_growth_kib(&s, baseline, "15 MiB answer");
    assert!(growth < PEAK_GROWTH_LIMIT_KIB, "peak grew by {growth} KiB");
}
