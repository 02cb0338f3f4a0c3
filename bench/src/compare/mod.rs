//! `cargo xtask bench`'s side-by-side comparison: the same clients, backends and network for
//! direct connects, this project, nftables and iptables DNAT (kube-proxy's layouts) and HAProxy,
//! interleaved in one run (each contender in its own client namespace, all installed at once;
//! every repeat runs every contender per workload, in a rotated order), at several numbers of
//! installed services. Prints and writes markdown tables and SVG charts; nothing
//! here asserts on speed.

mod contenders;
pub mod load;
mod plot;
mod report;
mod topo;

use anyhow::{Context, Result};
use contenders::{install, lb_changes, Contender, Outcome};
use load::Workload;
use report::{ProgramCost, Run, Summary};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use topo::{vip, vip6, Topology};

/// This binary: backends and clients are copies of it run inside the namespaces.
pub fn bench_bin() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "lb-bench".into())
}

pub struct Plan {
    pub scales: Vec<usize>,
    pub seconds: f64,
    /// Every repeat runs every contender once per workload, in an order rotated by one per
    /// repeat.
    pub repeats: usize,
    pub budget: Duration,
    pub clients: usize,
    /// Discovery changes timed per size (lb).
    pub changes: usize,
    /// Length of each run that samples BPF run-time statistics (lb, one service).
    pub cost_seconds: f64,
    /// Contenders measured, by short name; empty: all.
    pub only: Vec<String>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                scales: vec![1, 1_000],
                seconds: 0.5,
                repeats: 2,
                budget: Duration::from_secs(20),
                clients: 32,
                changes: 20,
                cost_seconds: 1.0,
                only: Vec::new(),
            }
        } else {
            Plan {
                scales: vec![1, 1_000, 10_000, 100_000, 250_000],
                seconds: 2.0,
                repeats: 5,
                budget: Duration::from_secs(90),
                clients: 32,
                changes: 100,
                cost_seconds: 2.0,
                only: Vec::new(),
            }
        }
    }
}

/// What one measurement runs: a workload against a target chosen by the contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Case {
    /// Short TCP connections to the middle one of the installed VIPs.
    Short,
    /// Short TCP connections to the last installed VIP (the end of iptables' chain); direct
    /// runs its short connections again, so each ratio has a direct run next to it.
    ShortEnd,
    Persistent,
    Bulk,
    /// UDP request/response, `sendto()` on an unconnected socket.
    Udp,
    /// UDP request/response on a connected socket.
    UdpConnected,
    /// Short TCP connections over IPv6.
    Short6,
}

impl Case {
    /// Everything measured with one service, in the tables' order.
    pub const ONE_SERVICE: [Case; 6] = [
        Case::Short,
        Case::Persistent,
        Case::Bulk,
        Case::Udp,
        Case::UdpConnected,
        Case::Short6,
    ];

    /// What runs with `n` services (with one, the middle VIP is also the last).
    pub fn at(n: usize) -> &'static [Case] {
        if n == 1 {
            &Case::ONE_SERVICE
        } else {
            &[Case::Short, Case::ShortEnd]
        }
    }

    pub fn workload(self) -> Workload {
        match self {
            Case::Short | Case::ShortEnd | Case::Short6 => Workload::Short,
            Case::Persistent => Workload::Persistent,
            Case::Bulk => Workload::Bulk,
            Case::Udp => Workload::Udp,
            Case::UdpConnected => Workload::UdpConnected,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Case::Short => "short TCP",
            Case::ShortEnd => "short TCP, last VIP",
            Case::Persistent => "persistent TCP",
            Case::Bulk => "bulk TCP",
            Case::Udp => "UDP sendto",
            Case::UdpConnected => "UDP connected",
            Case::Short6 => "short TCP, IPv6",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Case::Short | Case::ShortEnd | Case::Short6 => "conn/s",
            Case::Persistent | Case::Udp | Case::UdpConnected => "req/s",
            Case::Bulk => "MB/s",
        }
    }
}

/// `items` starting at index `r mod len`: repeat `r`'s order.
pub fn rotated<T: Copy>(items: &[T], r: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    let k = r % items.len();
    items[k..].iter().chain(&items[..k]).copied().collect()
}

/// Where `c`'s clients connect for `case` with `n` services installed.
fn targets(c: Contender, case: Case, n: usize, topo: &Topology) -> Vec<String> {
    match (c.is_direct(), case) {
        (true, Case::Short6) => topo.backends6.clone(),
        (true, _) => topo.backends.clone(),
        (false, Case::Short6) => vec![vip6(0)],
        // The measured VIP sits in the middle of the installed ones, or at their end.
        (false, Case::Short) => vec![vip(n / 2)],
        (false, Case::ShortEnd) => vec![vip(n - 1)],
        (false, _) => vec![vip(0)],
    }
}

/// `c`'s own client namespace and cgroup.
fn side(topo: &Topology, c: Contender) -> &topo::ClientSide {
    let k = Contender::ALL.iter().position(|&x| x == c).unwrap_or(0);
    &topo.clients[k]
}

const BACKENDS: usize = 4;

pub fn run(quick: bool, out_dir: &Path, scales: &[usize], only: &[String]) -> Result<()> {
    let mut plan = Plan::new(quick);
    let partial = !scales.is_empty() || !only.is_empty();
    if !scales.is_empty() {
        anyhow::ensure!(scales.iter().all(|&n| n > 0), "--scales: sizes start at 1");
        plan.scales = scales.to_vec();
    }
    for name in only {
        anyhow::ensure!(
            Contender::ALL.iter().any(|c| c.short() == name),
            "--only: unknown contender {name:?}"
        );
    }
    plan.only = only.to_vec();
    let started = std::time::Instant::now();
    let load_before = report::loadavg();
    let topo = Topology::build(BACKENDS, Contender::ALL.len())?;
    let _servers = start_backends(&topo)?;
    let dir = std::env::temp_dir().join(lb_testkit::paths::unique_name());
    std::fs::create_dir_all(&dir)?;
    let result = measure(&plan, &topo, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let mut summary = result?;
    summary.duration = started.elapsed();
    summary.loadavg = (load_before, report::loadavg());
    let stem = match (partial, quick) {
        (true, _) => "partial",
        (false, true) => "latest-quick",
        (false, false) => "latest",
    };
    let markdown = report::markdown(&summary, &plan, quick, stem);
    println!("{markdown}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join(format!("{stem}.md")), &markdown)?;
    for (name, svg) in plot::charts(&summary) {
        std::fs::write(out_dir.join(format!("{stem}-{name}.svg")), svg?)?;
    }
    println!(
        "written: {}/{stem}.md and {stem}-*.svg ({:.0} s)",
        out_dir.display(),
        summary.duration.as_secs_f64()
    );
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
    for b in topo.backends.iter().chain(&topo.backends6) {
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

/// One `lb-bench load` run: `c`'s clients (in its namespace and cgroup) against `c`'s
/// targets.
fn load(
    topo: &Topology,
    c: Contender,
    case: Case,
    n: usize,
    seconds: f64,
    plan: &Plan,
) -> Result<load::LoadReport> {
    let w = case.workload();
    let clients = if w == Workload::Bulk { 1 } else { plan.clients };
    let side = side(topo, c);
    let mut cmd = Command::new(bench_bin());
    cmd.args(["--netns", &side.net.ns_path, "--cgroup"])
        .arg(&side.cgroup.path)
        .arg("load");
    for t in targets(c, case, n, topo) {
        cmd.args(["--to", &t]);
    }
    let workload = match w {
        Workload::Short => "short",
        Workload::Persistent => "persistent",
        Workload::Bulk => "bulk",
        Workload::Udp => "udp",
        Workload::UdpConnected => "udp-connected",
    };
    let out = cmd
        .args(["--workload", workload, "--seconds", &seconds.to_string()])
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

/// Installs `c` with `n` services unless it failed to load at this size before, or a smaller
/// size's load time shows it cannot load this one within the budget.
fn try_install(
    c: Contender,
    n: usize,
    ctx: &Ctx,
    summary: &mut Summary,
) -> Result<Option<contenders::Installed>> {
    if summary
        .not_loaded
        .iter()
        .any(|(x, m, _)| *x == c && *m == n)
    {
        return Ok(None);
    }
    if let Some(why) = hopeless(c, n, &summary.loads, ctx.plan.budget) {
        summary.not_loaded.push((c, n, why));
        return Ok(None);
    }
    match install(c, ctx.topo, side(ctx.topo, c), n, ctx.dir, ctx.plan.budget)? {
        Outcome::Ready(i) => {
            summary.loads.push(report::Load {
                contender: c,
                services: n,
                time: i.load,
                rss_kib: i.rss_kib,
                anon_peak_kib: i.anon_peak_kib,
                kernel_kib: i.kernel_kib,
            });
            Ok(Some(i))
        }
        Outcome::NotLoaded(why) => {
            summary.not_loaded.push((c, n, why));
            Ok(None)
        }
    }
}

/// Loading rules costs at least linear time in their number: if the largest smaller size took
/// `t` (at least a second, so start-up costs do not dominate it), `n` services need at least
/// `t * n / m`. Over the budget, the attempt would only burn the budget.
fn hopeless(c: Contender, n: usize, loads: &[report::Load], budget: Duration) -> Option<String> {
    let (m, t) = loads
        .iter()
        .filter(|l| l.contender == c && l.services < n)
        .map(|l| (l.services, l.time))
        .max_by_key(|(m, _)| *m)?;
    let at_least = t.as_secs_f64() * n as f64 / m as f64;
    (t >= Duration::from_secs(1) && at_least > budget.as_secs_f64()).then(|| {
        format!(
            "not attempted: {m} services took {:.1} s to load, so {n} take at least {at_least:.0} s at linear cost, over the {} s budget",
            t.as_secs_f64(),
            budget.as_secs()
        )
    })
}

struct Ctx<'a> {
    plan: &'a Plan,
    topo: &'a Topology,
    dir: &'a Path,
}

impl Ctx<'_> {
    fn run(
        &self,
        summary: &mut Summary,
        c: Contender,
        case: Case,
        n: usize,
        repeat: usize,
    ) -> Result<()> {
        let report = load(self.topo, c, case, n, self.plan.seconds, self.plan)?;
        summary.runs.push(Run {
            contender: c,
            services: n,
            case,
            repeat,
            report,
        });
        Ok(())
    }
}

fn measure(plan: &Plan, topo: &Topology, dir: &Path) -> Result<Summary> {
    let mut summary = Summary::default();
    let ctx = Ctx { plan, topo, dir };
    let chosen = |c: &Contender| plan.only.is_empty() || plan.only.iter().any(|o| o == c.short());
    for c in Contender::ALL.into_iter().filter(chosen) {
        for case in Case::ONE_SERVICE {
            if let Some(why) = c.skips(case) {
                summary.not_measured.push((c, case, why.to_string()));
            }
        }
    }
    for &n in &plan.scales {
        let here: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(chosen)
            .filter(|&c| n == 1 || c.scales() || c == Contender::Direct)
            .collect();
        // Every contender in its own namespace: all stay installed for this size.
        let mut installed = Vec::new();
        for &c in &here {
            eprintln!("bench: {n} services: installing {}", c.name());
            if let Some(i) = try_install(c, n, &ctx, &mut summary)? {
                installed.push((c, i));
            }
        }
        let ready: Vec<Contender> = installed.iter().map(|(c, _)| *c).collect();
        for r in 0..plan.repeats {
            eprintln!("bench: {n} services: repeat {}/{}", r + 1, plan.repeats);
            for (i, &case) in Case::at(n).iter().enumerate() {
                let who: Vec<Contender> = ready
                    .iter()
                    .copied()
                    .filter(|c| c.skips(case).is_none())
                    .collect();
                // Each workload's block starts one further, too, so no contender is always
                // first after a change of workload.
                for c in rotated(&who, r + i) {
                    ctx.run(&mut summary, c, case, n, r)?;
                }
            }
        }
        for (c, i) in &installed {
            if n == 1 && matches!(c, Contender::Lb | Contender::LbNoBytes) {
                program_costs(&ctx, &mut summary, *c, i)?;
            }
        }
        for (c, i) in &mut installed {
            if *c == Contender::Lb {
                changes(&ctx, &mut summary, i, n);
            }
        }
    }
    Ok(summary)
}

fn changes(ctx: &Ctx, summary: &mut Summary, installed: &mut contenders::Installed, n: usize) {
    if let Some(lb) = installed.agent.as_mut() {
        let t = &ctx.topo;
        let c = lb_changes(
            lb,
            &t.backends,
            &t.backends6,
            ctx.plan.changes,
            ctx.plan.budget,
        );
        summary.changes.push((n, c));
    }
}

/// lb at one service, once more per workload with `lb-agent stats --interval` sampling BPF
/// run-time statistics inside the run (these runs are not in the rate tables: the
/// statistics add to every program run; they are global, so nothing else runs meanwhile).
fn program_costs(
    ctx: &Ctx,
    summary: &mut Summary,
    c: Contender,
    installed: &contenders::Installed,
) -> Result<()> {
    let Some(lb) = installed.agent.as_ref() else {
        return Ok(());
    };
    eprintln!("bench: cost per program run: {}", c.name());
    let seconds = ctx.plan.cost_seconds;
    let lead = 0.25;
    for case in Case::ONE_SERVICE {
        let costs = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                std::thread::sleep(Duration::from_secs_f64(lead));
                sample_programs(&lb.pins, seconds - 2.0 * lead)
            });
            let run = load(ctx.topo, c, case, 1, seconds, ctx.plan);
            let costs = sampler.join().unwrap_or_default();
            run.map(|_| costs)
        })?;
        for (name, runs, ns) in costs {
            summary.program_costs.push(ProgramCost {
                contender: c,
                case,
                program: name,
                runs_per_s: runs,
                ns_per_run: ns,
            });
        }
    }
    Ok(())
}

/// `lb-agent stats --json --interval`: it turns BPF run-time statistics on for its window and
/// reports each program's runs per second and cost per run. Programs that ran in the window:
/// (name, runs/s, ns per run).
fn sample_programs(pins: &lb_testkit::PinDir, interval: f64) -> Vec<(String, f64, f64)> {
    let out = Command::new(lb_testkit::paths::agent_bin())
        .args([
            "stats",
            "--json",
            "--interval",
            &interval.to_string(),
            "--pin-dir",
        ])
        .arg(&pins.path)
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
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
        .filter(|(_, runs, _)| *runs > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_repeat_starts_one_further() {
        let k = [1, 2, 3];
        assert_eq!(rotated(&k, 0), vec![1, 2, 3]);
        assert_eq!(rotated(&k, 1), vec![2, 3, 1]);
        assert_eq!(rotated(&k, 2), vec![3, 1, 2]);
        assert_eq!(rotated(&k, 4), vec![2, 3, 1]);
        assert!(rotated::<u8>(&[], 3).is_empty());
        // Over k repeats every item takes every position once.
        for pos in 0..3 {
            let mut seen: Vec<i32> = (0..3).map(|r| rotated(&k, r)[pos]).collect();
            seen.sort();
            assert_eq!(seen, k);
        }
    }

    #[test]
    fn a_size_is_hopeless_only_past_the_budget_at_linear_cost() {
        let load = |c, services, secs| report::Load {
            contender: c,
            services,
            time: Duration::from_secs_f64(secs),
            rss_kib: None,
            anon_peak_kib: None,
            kernel_kib: None,
        };
        let budget = Duration::from_secs(90);
        let loads = [
            load(Contender::Nftables, 1_000, 0.14),
            load(Contender::Nftables, 10_000, 9.3),
            load(Contender::Iptables, 10_000, 1.9),
        ];
        let why = hopeless(Contender::Nftables, 250_000, &loads, budget).unwrap();
        assert!(why.contains("10000 services took 9.3 s"), "{why}");
        assert!(why.contains("at least 232 s"), "{why}");
        // 1.9 s × 25 = 47 s: within the budget, so it is tried.
        assert_eq!(hopeless(Contender::Iptables, 250_000, &loads, budget), None);
        // Under a second, start-up dominates: no extrapolation.
        assert_eq!(
            hopeless(Contender::Nftables, 5_000, &loads[..1], budget),
            None
        );
        assert_eq!(hopeless(Contender::Lb, 250_000, &loads, budget), None);
    }
}
