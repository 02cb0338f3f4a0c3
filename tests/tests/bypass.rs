//! Privileged end-to-end test of `[dataplane] bypass`: processes in a listed cgroup, and in
//! cgroups below it, reach the VIP untranslated (in the test namespace nothing routes the VIP,
//! so their connects fail with ENETUNREACH), while a sibling cgroup is balanced; the bypass
//! is counted per cgroup and follows config reloads.

use lb_testkit::config::{Config, Service, Table};
use lb_testkit::procs::Proto;
use lb_testkit::{agent_stats, require_privileged, Scenario, TestCgroup};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 2] = ["127.0.0.11:8080", "127.0.0.12:8080"];
const WAIT: Duration = Duration::from_secs(10);

fn config(bypass: &[String]) -> Config {
    let bypass: Vec<toml::Value> = bypass.iter().map(|p| p.clone().into()).collect();
    Config::new()
        .dataplane(Table::new().set("bypass", bypass))
        .service(Service::tcp("web", VIP).backends(&BACKENDS))
}

/// Connects from `cgroup`: (answered by a backend, failed with ENETUNREACH).
fn outcome(s: &Scenario, cgroup: &TestCgroup, count: u64) -> (u64, u64) {
    s.reached_or_untranslated(cgroup, VIP, count)
}

/// What `stats` counts for the bypassed cgroup at `path`.
fn bypassed_connects(s: &Scenario, path: &str) -> Option<u64> {
    let stats = agent_stats(&s.pins)?;
    let entry = stats.bypass.iter().find(|b| b.cgroup == path)?;
    Some(entry.connects)
}

#[test]
fn bypassed_cgroups_and_those_below_reach_the_vip_untranslated_siblings_are_balanced() {
    if !require_privileged() {
        return;
    }
    let mut s = Scenario::without_agent(&BACKENDS, Proto::Tcp);
    let mesh = s.cgroup.child();
    let below = mesh.child();
    let sibling = s.cgroup.child();
    // A glob (a character class around the name's last character), as an operator would
    // list a kind of workload.
    let name = mesh
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let parent = mesh.path.parent().unwrap().display().to_string();
    let (stem, last) = name.split_at(name.len() - 1);
    let pattern = format!("{parent}/{stem}[{last}]");
    s.write_config(config(std::slice::from_ref(&pattern)));
    s.start_agent();
    let mesh_path = mesh.path.display().to_string();

    assert_eq!(outcome(&s, &mesh, 20), (0, 20), "the bypassed cgroup");
    assert_eq!(outcome(&s, &below, 10), (0, 10), "a cgroup below it");
    assert_eq!(outcome(&s, &sibling, 20), (20, 0), "its sibling");
    assert_eq!(bypassed_connects(&s, &mesh_path), Some(30));
    assert_eq!(
        s.service_stats("web").connects,
        20,
        "only the sibling was translated"
    );

    // Dropping the pattern takes effect on reload: the cgroup is balanced again.
    s.write_config(config(&[]));
    s.agent().sighup();
    s.assert_bypass_ends(WAIT, "the bypass entry stayed after the reload");
    assert_eq!(outcome(&s, &mesh, 10), (10, 0), "no longer bypassed");
    assert_eq!(outcome(&s, &sibling, 10), (10, 0));
}
