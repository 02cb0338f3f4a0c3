//! `lb-testkit demo`: the project in one screen, safely. Everything happens in a namespace and
//! a child cgroup this process creates and removes; nothing touches the host's network.

use anyhow::{bail, Result};
use lb_testkit::config::{Config, Service};
use lb_testkit::{procs::Proto, Scenario};
use std::process::Command;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];
/// The configured weights, in the order of `BACKENDS`.
const WEIGHTS: [u32; 3] = [1, 1, 2];
/// How far a backend's share of the connects may be from its weight's share before the demo
/// says the spread is wrong (a few thousand random picks land well within it).
const SHARE_TOLERANCE: f64 = 0.08;

/// Weight 1 is the default, and written as a plain address the printed config reads better.
fn config() -> Config {
    let web = BACKENDS
        .iter()
        .zip(WEIGHTS)
        .fold(Service::tcp("web", VIP), |web, (b, w)| match w {
            1 => web.backends(&[b]),
            w => web.weighted(b, w),
        });
    Config::new().service(web)
}

pub fn run(seconds: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root: it creates a network namespace and a cgroup and loads eBPF");
    }
    let config = config();
    println!(
        "demo: namespace with lo only, backends {BACKENDS:?} weighted {WEIGHTS:?}, VIP {VIP}\n\n\
         {config}"
    );
    let mut s = Scenario::start(&BACKENDS, Proto::Tcp, config);
    let client = s.steady_load(
        VIP,
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
    let complaints = s.agent().complaints();
    let accepted = s.stop_backends();
    println!(
        "\nclient: {} connects, {} answered, errors {:?}",
        report.attempts, report.ok, report.errors
    );
    let total: u32 = WEIGHTS.iter().sum();
    let mut problems = Vec::new();
    for (b, weight) in BACKENDS.iter().zip(WEIGHTS) {
        let got = accepted.get(*b).copied().unwrap_or(0);
        let share = got as f64 / report.ok.max(1) as f64;
        let wanted = f64::from(weight) / f64::from(total);
        println!(
            "  {b} (weight {weight}): backend accepted {got:>6} ({:>4.1}%, weight says {:.0}%), \
             client saw {:>6}",
            share * 100.0,
            wanted * 100.0,
            report.from(b)
        );
        if (share - wanted).abs() > SHARE_TOLERANCE {
            problems.push(format!("{b} got {:.1}% of the connects", share * 100.0));
        }
    }
    if report.ok == 0 || !report.errors.is_empty() {
        problems.push(format!("client errors {:?}", report.errors));
    }
    if !complaints.is_empty() {
        problems.push(format!("the agent warned:\n{}", complaints.join("\n")));
    }
    println!("\noutside the cgroup the VIP is not translated (no route in the namespace):");
    let outside = s.outside_client(VIP, 3, Proto::Tcp);
    println!("  errors {:?}", outside.errors);
    println!("cleaning up: agent stopped, pins detached, cgroup and namespace removed");
    if !problems.is_empty() {
        bail!("the demo did not go as it should: {}", problems.join("; "));
    }
    println!("demo: the spread follows the weights, and the agent logged no warning");
    Ok(())
}
