//! Privileged end-to-end test that the DaemonSet's capability list is enough, and that each
//! capability in it is needed: the real agent, run through `setpriv` with a bounding set of
//! exactly the capabilities `deploy/kubernetes/40-daemonset.yaml` adds, loads, attaches and
//! balances; with any one of them taken away it refuses to start.

use lb_testkit::paths::agent_bin;
use lb_testkit::procs::Proto;
use lb_testkit::{require_privileged, wait_for, Scenario};
use std::process::{Child, Stdio};
use std::time::Duration;

const VIP: &str = "10.96.0.10:80";
const B1: &str = "127.0.0.11:8080";
const CONFIG: &str = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n\
                      backends = [\"127.0.0.11:8080\"]\n";

/// The capabilities the DaemonSet's container adds (it drops all others).
fn daemonset_capabilities() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/40-daemonset.yaml"
    );
    let text = std::fs::read_to_string(path).expect("the DaemonSet manifest");
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_lowercase())
        .collect();
    assert!(!caps.is_empty(), "no capabilities in {path}");
    caps
}

/// The agent, inside the test's namespace, with only `caps` in its bounding set (as root
/// without file capabilities, that is exactly what it holds). Killed when dropped.
struct LimitedAgent(Child, std::path::PathBuf);

impl LimitedAgent {
    fn start(s: &Scenario, caps: &[String]) -> Self {
        let log = s.config.with_extension("limited-agent.log");
        let bounding = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let child = s
            .net
            .testkit(None)
            .args(["exec", "--", "setpriv", "--bounding-set", &bounding])
            .args(["--inh-caps", "-all", "--"])
            .arg(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&s.config)
            .arg("--cgroup")
            .arg(&s.cgroup.path)
            .arg("--pin-dir")
            .arg(&s.pins.path)
            .args(["--metrics-listen", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn setpriv");
        Self(child, log)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Ready, or exited: whichever comes first (bounded).
    fn settle(&mut self) -> bool {
        wait_for(Duration::from_secs(15), || {
            self.log().contains(" ready services=") || !matches!(self.0.try_wait(), Ok(None))
        });
        self.log().contains(" ready services=")
    }
}

impl Drop for LimitedAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    if !require_privileged() {
        return;
    }
    let caps = daemonset_capabilities();
    let s = Scenario::without_agent(&[B1], Proto::Tcp);
    s.write_config(CONFIG);
    let mut agent = LimitedAgent::start(&s, &caps);
    assert!(agent.settle(), "with {caps:?} only:\n{}", agent.log());
    assert_eq!(s.client(VIP, 20, Proto::Tcp).ok, 20);
    drop(agent);

    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let s = Scenario::without_agent(&[B1], Proto::Tcp);
        s.write_config(CONFIG);
        let mut agent = LimitedAgent::start(&s, &fewer);
        assert!(
            !agent.settle(),
            "the agent runs without {missing}: the DaemonSet need not add it"
        );
    }
}
