//! `lb-testkit demo`: the project in one screen, safely. Everything happens in a namespace and
//! a child cgroup this process creates and removes; nothing touches the host's network.

use anyhow::{bail, Result};
use lb_testkit::{procs::Proto, Scenario, SteadyClient};
use std::process::Command;
use std::time::{Duration, Instant};

const BACKENDS: [&str; 3] = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];
const CONFIG: &str = r#"# demo: weights 1:1:2
[[service]]
name = "web"
vip = "10.96.0.10:80"
protocol = "tcp"
backends = [ "127.0.0.11:8080", "127.0.0.12:8080", { address = "127.0.0.13:8080", weight = 2 } ]
"#;

pub fn run(seconds: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root: it creates a network namespace and a cgroup and loads eBPF");
    }
    println!("demo: namespace with lo only, backends {BACKENDS:?}, VIP 10.96.0.10:80\n{CONFIG}");
    let mut s = Scenario::start(&BACKENDS, Proto::Tcp, CONFIG);
    let client = SteadyClient::start(
        &s.net,
        &s.cgroup,
        "10.96.0.10:80",
        Duration::from_millis(5),
        Duration::from_secs(seconds + 5),
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(1));
        println!("--- lb-agent stats ({}s) ---", start.elapsed().as_secs());
        let _ = Command::new(lb_testkit::paths::agent_bin())
            .args(["stats", "--pin-dir"])
            .arg(&s.pins.path)
            .status();
    }
    let report = client.stop();
    let accepted = s.stop_backends();
    println!(
        "\nclient: {} connects, {} answered, errors {:?}",
        report.attempts, report.ok, report.errors
    );
    for b in BACKENDS {
        println!(
            "  {b}: backend accepted {:>6}, client saw {:>6}",
            accepted.get(b).copied().unwrap_or(0),
            report.from(b)
        );
    }
    println!("\noutside the cgroup the VIP is not translated (no route in the namespace):");
    let outside = s.outside_client("10.96.0.10:80", 3, Proto::Tcp);
    println!("  errors {:?}", outside.errors);
    println!("cleaning up: agent stopped, pins detached, cgroup and namespace removed");
    Ok(())
}
