//! Privileged end-to-end test of a reconcile that fails: the agent keeps the data plane as it
//! was, says so (`/readyz` 503, `stats`, `/metrics`), retries with backoff, and is ready again
//! once a reconcile succeeds.

use lb_testkit::procs::Proto;
use lb_testkit::{http_get, http_status, require_privileged, wait_for, Scenario};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const HTTP: &str = "127.0.0.1:9901";
const WAIT: Duration = Duration::from_secs(10);
const GOOD: &str = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                    backends = [\"127.0.0.11:8080\"]\n";

/// Valid to the config check, but 17 Maglev tables of 65,537 slots need more than the slot
/// map's 1,048,576 entries, so every reconcile of it fails.
fn too_big() -> String {
    let mut text = GOOD.to_string();
    for i in 0..17 {
        text += &format!(
            "[[service]]\nname = \"m{i}\"\nvip = \"10.96.1.{i}:80\"\n\
             backends = [\"127.0.0.11:8080\"]\nalgorithm = \"maglev\"\n"
        );
    }
    text
}

fn stats_table(s: &Scenario) -> String {
    lb_testkit::stats::stats_table(&s.pins)
}

#[test]
fn a_failed_reconcile_is_reported_retried_and_recovered() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&[B1], Proto::Tcp);
    s.write_config(GOOD);
    s.agent_args = vec!["--http-listen".into(), HTTP.into()];
    s.start_agent();
    let ready = |s: &Scenario| http_status(&s.net, HTTP, "/readyz") == Some(200);
    assert!(
        wait_for(WAIT, || ready(&s)),
        "never ready with a good config"
    );

    s.write_config(too_big());
    s.agent().sighup();
    let unready = wait_for(WAIT, || http_status(&s.net, HTTP, "/readyz") == Some(503));
    assert!(
        unready,
        "/readyz stayed 200 while the maps differ from the plan"
    );
    let table = stats_table(&s);
    assert!(
        table.contains("MAPS OUT OF DATE") && table.contains("slot"),
        "stats does not say why:\n{table}"
    );
    let (_, metrics) = http_get(&s.net, "127.0.0.1:9902", "/metrics").expect("/metrics");
    assert!(
        metrics.contains("lb_maps_out_of_date 1"),
        "/metrics does not say so"
    );
    // The data plane keeps what it had: the first service still balances.
    assert_eq!(s.client(VIP, 20, Proto::Tcp).ok, 20);
    let retried = wait_for(WAIT, || {
        let log = s.agent.as_ref().map(|a| a.log()).unwrap_or_default();
        log.matches("retrying the failed reconcile").count() >= 2
    });
    assert!(retried, "no retries:\n{}", s.agent().log());

    s.write_config(GOOD);
    s.agent().sighup();
    assert!(
        wait_for(WAIT, || ready(&s)),
        "not ready again after a good config"
    );
    assert!(!stats_table(&s).contains("MAPS OUT OF DATE"));
}
