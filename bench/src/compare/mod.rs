//! `cargo xtask bench`'s side-by-side comparison: the same clients, backends and network for
//! direct connects, this project, nftables and iptables DNAT (kube-proxy's layouts) and HAProxy,
//! one after another in one run, at several numbers of installed services. Prints and writes a
//! markdown table and an SVG chart; nothing here asserts on speed.

mod contenders;
pub mod load;
mod report;
mod topo;

use anyhow::{Context, Result};
use contenders::{install, lb_changes, Contender, Outcome};
use lb_testkit::TestCgroup;
use load::Workload;
use report::{Row, Summary};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use topo::{vip, Topology};

/// This binary: backends and clients are copies of it run inside the namespaces.
pub fn bench_bin() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "lb-bench".into())
}

pub struct Plan {
    pub scales: Vec<usize>,
    pub seconds: f64,
    pub repeats: usize,
    pub budget: Duration,
    pub clients: usize,
    /// Discovery changes timed per size (lb).
    pub changes: usize,
    /// Contenders measured, by short name; empty: all.
    pub only: Vec<String>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                scales: vec![1, 1_000],
                seconds: 1.0,
                repeats: 1,
                budget: Duration::from_secs(20),
                clients: 32,
                changes: 20,
                only: Vec::new(),
            }
        } else {
            Plan {
                scales: vec![1, 1_000, 10_000, 250_000],
                seconds: 3.0,
                repeats: 3,
                budget: Duration::from_secs(90),
                clients: 32,
                changes: 100,
                only: Vec::new(),
            }
        }
    }
}

const BACKENDS: usize = 4;

pub fn run(quick: bool, out_dir: &Path, scales: &[usize], only: &[String]) -> Result<()> {
    let mut plan = Plan::new(quick);
    let partial = !scales.is_empty() || !only.is_empty();
    if !scales.is_empty() {
        plan.scales = scales.to_vec();
    }
    for name in only {
        anyhow::ensure!(
            Contender::ALL.iter().any(|c| c.short() == name),
            "--only: unknown contender {name:?}"
        );
    }
    plan.only = only.to_vec();
    let topo = Topology::build(BACKENDS)?;
    let _servers = start_backends(&topo)?;
    let cgroup = TestCgroup::new();
    let dir = std::env::temp_dir().join(lb_testkit::paths::unique_name());
    std::fs::create_dir_all(&dir)?;
    let result = measure(&plan, &topo, &cgroup, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = result?;
    let markdown = report::markdown(&summary, &plan, quick);
    println!("{markdown}");
    std::fs::create_dir_all(out_dir)?;
    let stem = match (partial, quick) {
        (true, _) => "partial",
        (false, true) => "latest-quick",
        (false, false) => "latest",
    };
    std::fs::write(out_dir.join(format!("{stem}.md")), &markdown)?;
    std::fs::write(out_dir.join(format!("{stem}.svg")), report::svg(&summary))?;
    println!("written: {}/{stem}.md and {stem}.svg", out_dir.display());
    Ok(())
}

/// Backend processes in the backend namespace; they stop when this is dropped.
struct Servers(std::process::Child);

impl Drop for Servers {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        lb_testkit::procs::wait_or_kill(&mut self.0);
    }
}

fn start_backends(topo: &Topology) -> Result<Servers> {
    let mut cmd = Command::new(bench_bin());
    cmd.args(["--netns", &topo.server.ns_path, "serve"]);
    for b in &topo.backends {
        cmd.args(["--listen", b]);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start lb-bench serve")?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
        &mut line,
    )?;
    anyhow::ensure!(line.trim() == "ready", "lb-bench serve did not start");
    Ok(Servers(child))
}

/// One `lb-bench load` run from the client namespace (inside the balanced cgroup).
fn load(
    topo: &Topology,
    cgroup: &TestCgroup,
    targets: &[String],
    w: Workload,
    plan: &Plan,
) -> Result<load::LoadReport> {
    let clients = if w == Workload::Bulk { 1 } else { plan.clients };
    let mut cmd = Command::new(bench_bin());
    cmd.args(["--netns", &topo.client.ns_path, "--cgroup"])
        .arg(&cgroup.path)
        .arg("load");
    for t in targets {
        cmd.args(["--to", t]);
    }
    let workload = match w {
        Workload::Short => "short",
        Workload::Persistent => "persistent",
        Workload::Bulk => "bulk",
    };
    let out = cmd
        .args([
            "--workload",
            workload,
            "--seconds",
            &plan.seconds.to_string(),
        ])
        .args(["--clients", &clients.to_string()])
        .output()
        .context("run lb-bench load")?;
    anyhow::ensure!(
        out.status.success(),
        "lb-bench load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("lb-bench load output")
}

fn measure(plan: &Plan, topo: &Topology, cgroup: &TestCgroup, dir: &Path) -> Result<Summary> {
    let mut summary = Summary::default();
    let chosen = |c: &Contender| plan.only.is_empty() || plan.only.iter().any(|o| o == c.short());
    for c in Contender::ALL.into_iter().filter(chosen) {
        let scales: Vec<usize> = if c.scales() {
            plan.scales.clone()
        } else {
            vec![1]
        };
        for &n in &scales {
            eprintln!("bench: {} with {n} services", c.name());
            let mut installed = match install(c, topo, cgroup, n, dir, plan.budget)? {
                Outcome::Ready(i) => i,
                Outcome::NotLoaded(reason) => {
                    summary.not_loaded.push((c, n, reason));
                    continue;
                }
            };
            // The measured VIP sits in the middle of the installed ones.
            let targets: Vec<String> = match c {
                Contender::Direct => topo.backends.clone(),
                _ => vec![vip(n / 2)],
            };
            let workloads: &[Workload] = if n == 1 {
                &[Workload::Short, Workload::Persistent, Workload::Bulk]
            } else {
                &[Workload::Short]
            };
            for &w in workloads {
                let costs = (n == 1 && w == Workload::Persistent)
                    .then(|| {
                        installed
                            .agent
                            .as_ref()
                            .map(|lb| program_costs(&lb.pins, plan))
                    })
                    .flatten();
                let runs = (0..plan.repeats)
                    .map(|_| load(topo, cgroup, &targets, w, plan))
                    .collect::<Result<Vec<_>>>()?;
                if let Some(costs) = costs {
                    for (name, runs, ns) in costs.finish() {
                        summary.program_costs.push((c, name, runs, ns));
                    }
                }
                summary.rows.push(Row::new(c, n, w, runs));
            }
            summary.loads.push(report::Load {
                contender: c,
                services: n,
                time: installed.load,
                rss_kib: installed.rss_kib,
                kernel_kib: installed.kernel_kib,
            });
            if let (Contender::Lb, Some(lb)) = (c, installed.agent.as_mut()) {
                let changes = lb_changes(lb, &topo.backends, n, plan.changes, plan.budget);
                summary.changes.push((n, changes));
            }
        }
    }
    Ok(summary)
}

/// `lb-agent stats --json --interval` running while a workload runs: it turns BPF run-time
/// statistics on for its window and reports each program's runs per second and cost per run.
struct ProgramCosts(std::process::Child);

fn program_costs(pins: &lb_testkit::PinDir, plan: &Plan) -> ProgramCosts {
    let interval = (plan.seconds * 0.8).to_string();
    let child = Command::new(lb_testkit::paths::agent_bin())
        .args(["stats", "--json", "--interval", &interval, "--pin-dir"])
        .arg(&pins.path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    ProgramCosts(child.expect("spawn lb-agent stats"))
}

impl ProgramCosts {
    /// Programs that ran in the window: (name, runs/s, ns per run).
    fn finish(self) -> Vec<(String, f64, f64)> {
        let Ok(out) = self.0.wait_with_output() else {
            return Vec::new();
        };
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let programs = report["programs"].as_array().cloned().unwrap_or_default();
        programs
            .iter()
            .filter_map(|p| {
                let name = p["name"].as_str()?.to_string();
                Some((name, p["runs_per_s"].as_f64()?, p["ns_per_run"].as_f64()?))
            })
            .collect()
    }
}
