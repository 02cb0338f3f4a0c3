//! What is compared, each installed into the client namespace with `n` services (every
//! service over the same backends) and removed again before the next one.

use super::topo::{run_in, vip, Topology};
use anyhow::{bail, Context, Result};
use lb_testkit::paths::testkit_bin;
use lb_testkit::{Agent, ConsulMock, PinDir, TestCgroup};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Lb,
    /// lb with `[dataplane] count_bytes = false`: the per-packet cost of byte counting is the
    /// difference to `Lb`.
    LbNoBytes,
    Nftables,
    Iptables,
    Haproxy,
}

impl Contender {
    pub const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::Lb,
        Contender::LbNoBytes,
        Contender::Nftables,
        Contender::Iptables,
        Contender::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Lb => "lb (this project)",
            Contender::LbNoBytes => "lb, byte counting off",
            Contender::Nftables => "nftables DNAT",
            Contender::Iptables => "iptables DNAT",
            Contender::Haproxy => "HAProxy (tcp)",
        }
    }

    /// The name `lb-bench compare --only` takes.
    pub fn short(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Lb => "lb",
            Contender::LbNoBytes => "lb-nobytes",
            Contender::Nftables => "nftables",
            Contender::Iptables => "iptables",
            Contender::Haproxy => "haproxy",
        }
    }

    /// Bar colour in the chart: one per contender, so adding one cannot run out of colours.
    pub fn color(self) -> &'static str {
        match self {
            Contender::Direct => "#888888",
            Contender::Lb => "#2b8cbe",
            Contender::LbNoBytes => "#a6bddb",
            Contender::Nftables => "#e6550d",
            Contender::Iptables => "#756bb1",
            Contender::Haproxy => "#31a354",
        }
    }

    /// Direct has no services and HAProxy needs a listener per VIP: both are measured at one.
    pub fn scales(self) -> bool {
        matches!(
            self,
            Contender::Lb | Contender::Nftables | Contender::Iptables
        )
    }
}

/// A contender in place; dropping it removes it.
pub struct Installed {
    pub load: Duration,
    /// The agent's peak memory (VmHWM) and the kernel memory of its maps, after loading (lb
    /// only).
    pub rss_kib: Option<u64>,
    pub kernel_kib: Option<u64>,
    undo: Option<Box<dyn FnOnce()>>,
    pub agent: Option<Box<LbAgent>>,
}

/// lb's agent as installed, with its config file and the Consul mock its discovered service
/// (`CHANGED`) follows.
pub struct LbAgent {
    pub agent: Agent,
    pub pins: PinDir,
    config: PathBuf,
    consul: ConsulMock,
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.agent.take();
        if let Some(undo) = self.undo.take() {
            undo();
        }
    }
}

pub enum Outcome {
    Ready(Installed),
    /// Could not be loaded (too slow, over a limit): the reason goes in the table.
    NotLoaded(String),
}

fn temp_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::File::create(&path)?.write_all(text.as_bytes())?;
    Ok(path)
}

/// Runs `argv` in the client namespace, killing it if it outlasts `budget`.
fn run_bounded(topo: &Topology, argv: &[&str], budget: Duration) -> Result<Option<Duration>> {
    let t0 = Instant::now();
    let mut child = Command::new(testkit_bin())
        .args(["--netns", &topo.client.ns_path, "exec", "--"])
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                use std::io::Read;
                child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                bail!("{argv:?}: {}", err.trim());
            }
            return Ok(Some(t0.elapsed()));
        }
        if t0.elapsed() > budget {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn install(
    c: Contender,
    topo: &Topology,
    cgroup: &TestCgroup,
    n: usize,
    dir: &Path,
    budget: Duration,
) -> Result<Outcome> {
    let backends = &topo.backends;
    match c {
        Contender::Direct => Ok(Outcome::Ready(Installed {
            load: Duration::ZERO,
            rss_kib: None,
            kernel_kib: None,
            undo: None,
            agent: None,
        })),
        Contender::Nftables => {
            let ruleset = nft_ruleset(n, backends);
            let file = temp_file(dir, "bench.nft", &ruleset)?;
            topo.route_vips(true)?;
            let loaded = run_bounded(topo, &["nft", "-f", file.to_str().unwrap()], budget);
            ready_or_not(
                topo,
                loaded,
                budget,
                &["nft", "delete", "table", "ip", "lbbench"],
            )
        }
        Contender::Iptables => {
            let rules = iptables_rules(n, backends);
            let file = temp_file(dir, "bench.iptables", &rules)?;
            topo.route_vips(true)?;
            let loaded = run_bounded(
                topo,
                &[
                    "sh",
                    "-c",
                    &format!("iptables-restore --noflush < {}", file.display()),
                ],
                budget,
            );
            ready_or_not(
                topo,
                loaded,
                budget,
                &["sh", "-c", "iptables -t nat -F && iptables -t nat -X"],
            )
        }
        Contender::Haproxy => {
            let front = vip(0);
            let ip = front.split(':').next().unwrap().to_string();
            run_in(
                &topo.client,
                &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"],
            )?;
            let cfg = temp_file(dir, "haproxy.cfg", &haproxy_config(&front, backends))?;
            let t0 = Instant::now();
            let mut child = Command::new(testkit_bin())
                .args([
                    "--netns",
                    &topo.client.ns_path,
                    "exec",
                    "--",
                    "haproxy",
                    "-db",
                    "-f",
                ])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start haproxy")?;
            let up = wait_listening(topo, &front, budget);
            let load = t0.elapsed();
            let ns = topo.client.ns_path.clone();
            let mut undo = move || {
                let _ = child.kill();
                let _ = child.wait();
                exec_quietly(
                    &ns,
                    &["ip", "addr", "del", &format!("{ip}/32"), "dev", "lo"],
                );
            };
            if !up {
                undo();
                return Ok(Outcome::NotLoaded("haproxy did not listen in time".into()));
            }
            Ok(Outcome::Ready(Installed {
                load,
                rss_kib: None,
                kernel_kib: None,
                undo: Some(Box::new(undo)),
                agent: None,
            }))
        }
        Contender::Lb => install_lb(topo, cgroup, n, dir, budget, true),
        Contender::LbNoBytes => install_lb(topo, cgroup, n, dir, budget, false),
    }
}

fn ready_or_not(
    topo: &Topology,
    loaded: Result<Option<Duration>>,
    budget: Duration,
    undo_argv: &[&str],
) -> Result<Outcome> {
    let ns = topo.client.ns_path.clone();
    let argv: Vec<String> = undo_argv.iter().map(|s| s.to_string()).collect();
    let undo = move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        exec_quietly(&ns, &argv);
        exec_quietly(&ns, &["ip", "route", "del", super::topo::VIP_RANGE]);
    };
    match loaded {
        Ok(Some(load)) => Ok(Outcome::Ready(Installed {
            load,
            rss_kib: None,
            kernel_kib: None,
            undo: Some(Box::new(undo)),
            agent: None,
        })),
        Ok(None) => {
            undo();
            Ok(Outcome::NotLoaded(format!(
                "not loaded within {}s",
                budget.as_secs()
            )))
        }
        Err(e) => {
            undo();
            let first = format!("{e:#}")
                .lines()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Ok(Outcome::NotLoaded(format!("load failed: {first}")))
        }
    }
}

/// Best-effort clean-up inside the namespace at `ns` (it disappears with the run anyway).
fn exec_quietly(ns: &str, argv: &[&str]) {
    let _ = Command::new(testkit_bin())
        .args(["--netns", ns, "exec", "--"])
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_listening(topo: &Topology, addr: &str, budget: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < budget {
        let probe = Command::new(super::bench_bin())
            .args(["--netns", &topo.client.ns_path, "load", "--to", addr])
            .args(["--workload", "short", "--seconds", "0.1", "--clients", "1"])
            .output();
        if let Ok(out) = probe {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if report["ops"].as_u64() > Some(0) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn lb_config(n: usize, backends: &[String], drop_last_of_first: bool, bytes: bool) -> String {
    let mut text = String::with_capacity(n * 120);
    if !bytes {
        text += "[dataplane]\ncount_bytes = false\n\n";
    }
    for i in 0..n {
        let list: Vec<String> = backends
            .iter()
            .take(if i == 0 && drop_last_of_first {
                backends.len() - 1
            } else {
                backends.len()
            })
            .map(|b| format!("\"{b}\""))
            .collect();
        text += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"{}\"\nbackends = [{}]\n",
            vip(i),
            list.join(", ")
        );
    }
    text += &format!(
        "[[service]]\nname = \"{CHANGED}\"\nvip = \"{}\"\n[service.discovery]\nkind = \"consul\"\n\
         address = \"http://127.0.0.1:8500\"\nservice = \"{CHANGED}\"\n",
        vip(n)
    );
    text
}

/// The discovered service whose backends the change measurement flips, after the `n` listed.
const CHANGED: &str = "changed";

/// The Consul mock's state: `CHANGED` with `backends`, at `index`.
fn consul_state(index: u64, backends: &[String]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = backends
        .iter()
        .map(|b| {
            let (ip, port) = b.split_once(':').unwrap();
            serde_json::json!({"node": format!("node-{ip}"), "node_address": ip, "address": "",
                               "port": port.parse::<u16>().unwrap(), "weight": 1,
                               "status": "passing", "tags": []})
        })
        .collect();
    serde_json::json!({"index": index, "services": {CHANGED: list}, "raw_body": null,
                       "raw_status": 200})
}

fn install_lb(
    topo: &Topology,
    cgroup: &TestCgroup,
    n: usize,
    dir: &Path,
    budget: Duration,
    count_bytes: bool,
) -> Result<Outcome> {
    let text = lb_config(n, &topo.backends, false, count_bytes);
    let config = temp_file(dir, "lb.toml", &text)?;
    let consul = ConsulMock::start(&topo.client, &consul_state(1, &topo.backends));
    let pins = PinDir::new();
    let t0 = Instant::now();
    let mut agent = Agent::start(&topo.client, cgroup, &pins, &config, 0, &[]);
    let ready = lb_testkit::wait_for(budget, || {
        agent.log().contains(" ready services=") || !agent.is_running()
    });
    let load = t0.elapsed();
    if !ready || !agent.is_running() {
        let log = agent.log();
        let reason = log
            .lines()
            .rev()
            .find(|l| l.contains("error") || l.contains("ERROR"))
            .map_or_else(
                || format!("not ready within {}s", budget.as_secs()),
                |l| {
                    l.rsplit("lb.toml: ")
                        .next()
                        .unwrap_or(l)
                        .trim()
                        .chars()
                        .take(160)
                        .collect()
                },
            );
        return Ok(Outcome::NotLoaded(reason));
    }
    let rss_kib = rss_kib(agent.pid());
    let kernel_kib = lb_testkit::agent_stats(&pins).map(|r| r.memory.total() >> 10);
    Ok(Outcome::Ready(Installed {
        load,
        rss_kib,
        kernel_kib,
        undo: None,
        agent: Some(Box::new(LbAgent {
            agent,
            pins,
            config,
            consul,
        })),
    }))
}

/// Peak resident memory: what a memory limit must allow (loading a large config peaks above
/// what stays).
pub fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How long lb takes to apply one backend change at a size.
pub struct Changes {
    /// A config edit: SIGHUP to reconciled, parsing the whole file included.
    pub reload: Option<Duration>,
    /// A discovery answer flipping one backend of `CHANGED`: from the answer reaching the
    /// agent to the maps holding it, by the agent's own clock (its `reconciled` log line).
    pub answers: Vec<Duration>,
    /// Answers not applied within the budget.
    pub missed: usize,
}

/// `count` discovery changes of one backend each, then one config edit (service 0 loses a
/// backend).
pub fn lb_changes(
    lb: &mut LbAgent,
    backends: &[String],
    n: usize,
    count: usize,
    budget: Duration,
) -> Changes {
    let reconciles = |a: &Agent| a.log().matches(" reconciled ").count();
    // The first answer (all backends) is in the maps before the first change is timed.
    let answered =
        lb_testkit::wait_for(budget, || lb.agent.log().contains("discovered set changed"));
    let mut changes = Changes {
        reload: None,
        answers: Vec::new(),
        missed: 0,
    };
    if answered {
        std::thread::sleep(Duration::from_millis(300));
        for k in 0..count {
            let before = reconciles(&lb.agent);
            // The first drops a backend: the mock starts with all of them.
            let set = &backends[..backends.len() - (k + 1) % 2];
            lb.consul.set(&consul_state(2 + k as u64, set));
            let applied =
                lb_testkit::wait_for(Duration::from_secs(5), || reconciles(&lb.agent) > before);
            match last_reconcile_micros(&lb.agent.log()).filter(|_| applied) {
                Some(us) => changes.answers.push(Duration::from_micros(us)),
                None => changes.missed += 1,
            }
        }
    } else {
        changes.missed = count;
    }
    let before = reconciles(&lb.agent);
    if std::fs::write(&lb.config, lb_config(n, backends, true, true)).is_ok() {
        let t0 = Instant::now();
        lb.agent.sighup();
        changes.reload =
            lb_testkit::wait_for(budget, || reconciles(&lb.agent) > before).then(|| t0.elapsed());
    }
    changes
}

/// `micros=` of the agent's last `reconciled` line.
fn last_reconcile_micros(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(" reconciled "))?;
    let field = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("micros="))?;
    field.parse().ok()
}

/// kube-proxy's nftables layout: a verdict map from VIP and port to a service chain that picks
/// an endpoint chain at random, which DNATs.
fn nft_ruleset(n: usize, backends: &[String]) -> String {
    let mut t = String::with_capacity(n * 200);
    t += "table ip lbbench {\n";
    for (k, b) in backends.iter().enumerate() {
        let (ip, port) = b.split_once(':').unwrap();
        t += &format!("  chain ep{k} {{\n    meta l4proto tcp dnat to {ip}:{port}\n  }}\n");
    }
    let picks: Vec<String> = (0..backends.len())
        .map(|k| format!("{k} : goto ep{k}"))
        .collect();
    for i in 0..n {
        t += &format!(
            "  chain svc{i} {{\n    numgen random mod {} vmap {{ {} }}\n  }}\n",
            backends.len(),
            picks.join(", ")
        );
    }
    t += "  map services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n";
    if n > 0 {
        t += "    elements = {\n";
        for i in 0..n {
            let v = vip(i);
            let (ip, port) = v.split_once(':').unwrap();
            t += &format!("      {ip} . tcp . {port} : goto svc{i},\n");
        }
        t += "    }\n";
    }
    t += "  }\n";
    t += "  chain output {\n    type nat hook output priority -100; policy accept;\n";
    t += "    ip daddr . meta l4proto . th dport vmap @services\n  }\n";
    t += "}\n";
    t
}

/// kube-proxy's iptables layout: one rule per service in a services chain (matched in order),
/// a service chain choosing an endpoint with `statistic --mode random`, an endpoint chain
/// that DNATs.
fn iptables_rules(n: usize, backends: &[String]) -> String {
    let mut t = String::with_capacity(n * 400);
    t += "*nat\n:LBB-SERVICES - [0:0]\n";
    for k in 0..backends.len() {
        t += &format!(":LBB-EP-{k} - [0:0]\n");
    }
    for i in 0..n {
        t += &format!(":LBB-SVC-{i} - [0:0]\n");
    }
    t += "-A OUTPUT -j LBB-SERVICES\n";
    for (k, b) in backends.iter().enumerate() {
        t += &format!("-A LBB-EP-{k} -p tcp -j DNAT --to-destination {b}\n");
    }
    let m = backends.len();
    for i in 0..n {
        let v = vip(i);
        let (ip, port) = v.split_once(':').unwrap();
        t += &format!("-A LBB-SERVICES -d {ip}/32 -p tcp --dport {port} -j LBB-SVC-{i}\n");
        for k in 0..m {
            if k + 1 < m {
                let p = 1.0 / (m - k) as f64;
                t += &format!(
                    "-A LBB-SVC-{i} -m statistic --mode random --probability {p:.5} -j LBB-EP-{k}\n"
                );
            } else {
                t += &format!("-A LBB-SVC-{i} -j LBB-EP-{k}\n");
            }
        }
    }
    t += "COMMIT\n";
    t
}

fn haproxy_config(front: &str, backends: &[String]) -> String {
    let mut t = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\n",
    );
    t += &format!("frontend bench\n  bind {front}\n  default_backend pool\n\nbackend pool\n  balance random\n");
    for (k, b) in backends.iter().enumerate() {
        t += &format!("  server b{k} {b}\n");
    }
    t
}
