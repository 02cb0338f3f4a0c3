//! What is compared, each installed into its own client namespace with `n` services (every
//! service over the same backends) and removed again after that size. With one service,
//! each contender also gets that service over UDP and an IPv6 service (`vip6(0)`) where it
//! can.

use super::topo::{run_in, vip, vip6, ClientSide, Topology};
use super::Case;
use crate::process::reconcile_micros;
use anyhow::{bail, Context, Result};
use lb_testkit::paths::testkit_bin;
use lb_testkit::procs::status_kib;
use lb_testkit::{Agent, ConsulMock, PinDir};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// Straight to the backends (nothing installed in its namespace).
    Direct,
    /// The same as `Direct` from another namespace: against `Direct`, the noise floor of a
    /// comparison (the same path measured twice).
    DirectTwin,
    Lb,
    /// lb with `[dataplane] count_bytes = false`: the per-packet cost of byte counting is the
    /// difference to `Lb`.
    LbNoBytes,
    Nftables,
    Iptables,
    Haproxy,
}

impl Contender {
    pub const ALL: [Contender; 7] = [
        Contender::Direct,
        Contender::DirectTwin,
        Contender::Lb,
        Contender::LbNoBytes,
        Contender::Nftables,
        Contender::Iptables,
        Contender::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::DirectTwin => "direct again (A/A check)",
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
            Contender::DirectTwin => "direct-twin",
            Contender::Lb => "lb",
            Contender::LbNoBytes => "lb-nobytes",
            Contender::Nftables => "nftables",
            Contender::Iptables => "iptables",
            Contender::Haproxy => "haproxy",
        }
    }

    /// Colour in the charts: one per contender, so adding one cannot run out of colours.
    pub fn color(self) -> (u8, u8, u8) {
        match self {
            Contender::Direct => (0x55, 0x55, 0x55),
            Contender::DirectTwin => (0xaa, 0xaa, 0xaa),
            Contender::Lb => (0x2b, 0x8c, 0xbe),
            Contender::LbNoBytes => (0x9e, 0xca, 0xe1),
            Contender::Nftables => (0xe6, 0x55, 0x0d),
            Contender::Iptables => (0x75, 0x6b, 0xb1),
            Contender::Haproxy => (0x31, 0xa3, 0x54),
        }
    }

    /// Connects straight to the backends (no VIP).
    pub fn is_direct(self) -> bool {
        matches!(self, Contender::Direct | Contender::DirectTwin)
    }

    /// Why this contender is not measured under `case`, if it is not.
    pub fn skips(self, case: Case) -> Option<&'static str> {
        match (self, case) {
            (Contender::Haproxy, Case::Udp | Case::UdpConnected) => {
                Some("HAProxy has no UDP proxy mode (its UDP is QUIC only)")
            }
            _ => None,
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
    /// The anonymous (the agent's own) part of that peak (`anon_peak_kib`).
    pub anon_peak_kib: Option<u64>,
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
    setup: LbSetup,
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

/// Runs `argv` in a client namespace, killing it if it outlasts `budget`.
fn run_bounded(side: &ClientSide, argv: &[&str], budget: Duration) -> Result<Option<Duration>> {
    let t0 = Instant::now();
    let mut child = Command::new(testkit_bin())
        .args(["--netns", &side.net.ns_path, "exec", "--"])
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

/// Installs `c` into its client side `side`; temporary files go to `dir`.
pub fn install(
    c: Contender,
    topo: &Topology,
    side: &ClientSide,
    n: usize,
    dir: &Path,
    budget: Duration,
) -> Result<Outcome> {
    let backends = &topo.backends;
    // UDP and IPv6 are measured with one service only.
    let extra = n == 1;
    let dir = &dir.join(c.short());
    std::fs::create_dir_all(dir)?;
    match c {
        Contender::Direct | Contender::DirectTwin => Ok(Outcome::Ready(Installed {
            load: Duration::ZERO,
            rss_kib: None,
            anon_peak_kib: None,
            kernel_kib: None,
            undo: None,
            agent: None,
        })),
        Contender::Nftables => {
            let mut ruleset = nft_ruleset(n, backends, extra, false);
            if extra {
                ruleset += &nft_ruleset(1, &topo.backends6, false, true);
            }
            let file = temp_file(dir, "bench.nft", &ruleset)?;
            side.route_vips(true)?;
            let loaded = run_bounded(side, &["nft", "-f", file.to_str().unwrap()], budget);
            // The client namespace holds no other nftables table.
            ready_or_not(side, loaded, budget, &["nft", "flush", "ruleset"])
        }
        Contender::Iptables => {
            let rules = iptables_rules(n, backends, extra, false);
            let file = temp_file(dir, "bench.iptables", &rules)?;
            let mut script = format!("iptables-restore --noflush < {}", file.display());
            if extra {
                let file6 = temp_file(
                    dir,
                    "bench.ip6tables",
                    &iptables_rules(1, &topo.backends6, false, true),
                )?;
                script += &format!(" && ip6tables-restore --noflush < {}", file6.display());
            }
            side.route_vips(true)?;
            let loaded = run_bounded(side, &["sh", "-c", &script], budget);
            ready_or_not(
                side,
                loaded,
                budget,
                &[
                    "sh",
                    "-c",
                    "iptables -t nat -F; iptables -t nat -X; ip6tables -t nat -F; ip6tables -t nat -X",
                ],
            )
        }
        Contender::Haproxy => {
            let front = vip(0);
            let ip = front.split(':').next().unwrap().to_string();
            let front6 = vip6(0);
            let ip6 = host_of(&front6).to_string();
            run_in(
                &side.net,
                &["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"],
            )?;
            run_in(
                &side.net,
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ],
            )?;
            let cfg = temp_file(
                dir,
                "haproxy.cfg",
                &haproxy_config(&front, backends, &front6, &topo.backends6),
            )?;
            let t0 = Instant::now();
            let mut child = Command::new(testkit_bin())
                .args([
                    "--netns",
                    &side.net.ns_path,
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
            let up = wait_listening(side, &front, budget) && wait_listening(side, &front6, budget);
            let load = t0.elapsed();
            let ns = side.net.ns_path.clone();
            let mut undo = move || {
                let _ = child.kill();
                let _ = child.wait();
                exec_quietly(
                    &ns,
                    &["ip", "addr", "del", &format!("{ip}/32"), "dev", "lo"],
                );
                exec_quietly(
                    &ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "del",
                        &format!("{ip6}/128"),
                        "dev",
                        "lo",
                    ],
                );
            };
            if !up {
                undo();
                return Ok(Outcome::NotLoaded("haproxy did not listen in time".into()));
            }
            Ok(Outcome::Ready(Installed {
                load,
                rss_kib: None,
                anon_peak_kib: None,
                kernel_kib: None,
                undo: Some(Box::new(undo)),
                agent: None,
            }))
        }
        Contender::Lb => install_lb(topo, side, n, dir, budget, true),
        Contender::LbNoBytes => install_lb(topo, side, n, dir, budget, false),
    }
}

fn ready_or_not(
    side: &ClientSide,
    loaded: Result<Option<Duration>>,
    budget: Duration,
    undo_argv: &[&str],
) -> Result<Outcome> {
    let ns = side.net.ns_path.clone();
    let argv: Vec<String> = undo_argv.iter().map(|s| s.to_string()).collect();
    let undo = move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        exec_quietly(&ns, &argv);
        exec_quietly(&ns, &["ip", "route", "del", super::topo::VIP_RANGE]);
        exec_quietly(&ns, &["ip", "-6", "route", "del", super::topo::VIP6_RANGE]);
    };
    match loaded {
        Ok(Some(load)) => Ok(Outcome::Ready(Installed {
            load,
            rss_kib: None,
            anon_peak_kib: None,
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

fn wait_listening(side: &ClientSide, addr: &str, budget: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < budget {
        let probe = Command::new(super::bench_bin())
            .args(["--netns", &side.net.ns_path, "load", "--to", addr])
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

/// What lb is configured with: `n` TCP services over the IPv4 backends, the discovered
/// service `CHANGED`, and with one service (`extra`) the same VIP over UDP and an IPv6 service.
#[derive(Clone, Copy)]
pub struct LbSetup {
    pub n: usize,
    pub count_bytes: bool,
    pub extra: bool,
}

pub fn lb_config(
    setup: LbSetup,
    backends: &[String],
    backends6: &[String],
    drop_last_of_first: bool,
) -> String {
    let LbSetup {
        n,
        count_bytes: bytes,
        extra,
    } = setup;
    let mut text = String::with_capacity(n * 120);
    if !bytes {
        text += "[dataplane]\ncount_bytes = false\n\n";
    }
    let quoted = |list: &[String]| -> String {
        list.iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if extra {
        text += &format!(
            "[[service]]\nname = \"udp0\"\nvip = \"{}\"\nprotocol = \"udp\"\nbackends = [{}]\n",
            vip(0),
            quoted(backends)
        );
        text += &format!(
            "[[service]]\nname = \"v6-0\"\nvip = \"{}\"\nbackends = [{}]\n",
            vip6(0),
            quoted(backends6)
        );
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
    side: &ClientSide,
    n: usize,
    dir: &Path,
    budget: Duration,
    count_bytes: bool,
) -> Result<Outcome> {
    let setup = LbSetup {
        n,
        count_bytes,
        extra: n == 1,
    };
    let text = lb_config(setup, &topo.backends, &topo.backends6, false);
    let config = temp_file(dir, "lb.toml", &text)?;
    let consul = ConsulMock::start(&side.net, &consul_state(1, &topo.backends));
    let pins = PinDir::new();
    let t0 = Instant::now();
    let mut agent = Agent::start(&side.net, &side.cgroup, &pins, &config, 0, &[]);
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
    let anon_peak_kib = anon_peak_kib(agent.pid());
    let kernel_kib = lb_testkit::agent_stats(&pins).map(|r| r.memory.total() >> 10);
    Ok(Outcome::Ready(Installed {
        load,
        rss_kib,
        anon_peak_kib,
        kernel_kib,
        undo: None,
        agent: Some(Box::new(LbAgent {
            agent,
            pins,
            config,
            setup,
            consul,
        })),
    }))
}

/// Peak resident memory: what a memory limit must allow (loading a large config peaks above
/// what stays).
pub fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, &["VmHWM"]).map(|v| v[0])
}

/// The agent's own part of that peak: VmHWM less its file-backed and shared pages, which are
/// mostly the BPF arrays it maps (the kernel map memory, counted again there) and which stay
/// as they are once loaded.
pub fn anon_peak_kib(pid: i32) -> Option<u64> {
    let v = status_kib(pid, &["VmHWM", "RssFile", "RssShmem"])?;
    Some(v[0].saturating_sub(v[1] + v[2]))
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
    backends6: &[String],
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
            match reconcile_micros(&lb.agent.log())
                .last()
                .copied()
                .filter(|_| applied)
            {
                Some(us) => changes.answers.push(Duration::from_micros(us)),
                None => changes.missed += 1,
            }
        }
    } else {
        changes.missed = count;
    }
    let before = reconciles(&lb.agent);
    let edited = lb_config(lb.setup, backends, backends6, true);
    if std::fs::write(&lb.config, edited).is_ok() {
        let t0 = Instant::now();
        lb.agent.sighup();
        changes.reload =
            lb_testkit::wait_for(budget, || reconciles(&lb.agent) > before).then(|| t0.elapsed());
    }
    changes
}

/// `host:port` or `[host]:port` → host.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("", |(_, p)| p)
}

/// kube-proxy's nftables layout: a verdict map from VIP and port to a service chain that picks
/// an endpoint chain at random, which DNATs. `udp`: VIP 0 over UDP too (the same service
/// chain); `v6`: the IPv6 table (`vip6`) instead of the IPv4 one (`vip`).
fn nft_ruleset(n: usize, backends: &[String], udp: bool, v6: bool) -> String {
    let (family, addr_type, daddr) = if v6 {
        ("ip6", "ipv6_addr", "ip6 daddr")
    } else {
        ("ip", "ipv4_addr", "ip daddr")
    };
    let vip_at = |i: usize| if v6 { vip6(i) } else { vip(i) };
    let mut t = String::with_capacity(n * 200);
    t += &format!("table {family} lbbench {{\n");
    for (k, b) in backends.iter().enumerate() {
        t += &format!("  chain ep{k} {{\n    meta l4proto tcp dnat to {b}\n");
        if udp {
            t += &format!("    meta l4proto udp dnat to {b}\n");
        }
        t += "  }\n";
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
    t +=
        &format!("  map services {{\n    type {addr_type} . inet_proto . inet_service : verdict\n");
    if n > 0 {
        t += "    elements = {\n";
        for i in 0..n {
            let v = vip_at(i);
            t += &format!(
                "      {} . tcp . {} : goto svc{i},\n",
                host_of(&v),
                port_of(&v)
            );
        }
        if udp {
            let v = vip_at(0);
            t += &format!(
                "      {} . udp . {} : goto svc0,\n",
                host_of(&v),
                port_of(&v)
            );
        }
        t += "    }\n";
    }
    t += "  }\n";
    t += "  chain output {\n    type nat hook output priority -100; policy accept;\n";
    t += &format!("    {daddr} . meta l4proto . th dport vmap @services\n  }}\n");
    t += "}\n";
    t
}

/// kube-proxy's iptables layout: one rule per service in a services chain (matched in order),
/// a service chain choosing an endpoint with `statistic --mode random`, an endpoint chain
/// that DNATs. `udp` and `v6` as for `nft_ruleset` (`v6`: for ip6tables-restore).
fn iptables_rules(n: usize, backends: &[String], udp: bool, v6: bool) -> String {
    let vip_at = |i: usize| if v6 { vip6(i) } else { vip(i) };
    let prefix = if v6 { 128 } else { 32 };
    let mut t = String::with_capacity(n * 400);
    t += "*nat\n:LBB-SERVICES - [0:0]\n";
    for k in 0..backends.len() {
        t += &format!(":LBB-EP-{k} - [0:0]\n");
    }
    for i in 0..n {
        t += &format!(":LBB-SVC-{i} - [0:0]\n");
    }
    t += "-A OUTPUT -j LBB-SERVICES\n";
    let protocols: &[&str] = if udp { &["tcp", "udp"] } else { &["tcp"] };
    for (k, b) in backends.iter().enumerate() {
        for p in protocols {
            t += &format!("-A LBB-EP-{k} -p {p} -j DNAT --to-destination {b}\n");
        }
    }
    let m = backends.len();
    let rule = |t: &mut String, i: usize, p: &str| {
        let v = vip_at(i);
        *t += &format!(
            "-A LBB-SERVICES -d {}/{prefix} -p {p} --dport {} -j LBB-SVC-{i}\n",
            host_of(&v),
            port_of(&v)
        );
    };
    for i in 0..n {
        rule(&mut t, i, "tcp");
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
    if udp && n > 0 {
        // After the TCP rules: the UDP service is the chain's last.
        rule(&mut t, 0, "udp");
    }
    t += "COMMIT\n";
    t
}

/// Two TCP frontends, the IPv4 VIP 0 and the IPv6 VIP 0, each over its family's backends.
fn haproxy_config(front: &str, backends: &[String], front6: &str, backends6: &[String]) -> String {
    let mut t = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\n",
    );
    // HAProxy's IPv6 syntax: `ipv6@ADDR:PORT`, the port after the last colon, no brackets.
    let v6 = |a: &str| format!("ipv6@{}:{}", host_of(a), port_of(a));
    t += &format!("frontend bench\n  bind {front}\n  default_backend pool\n\n");
    t += &format!(
        "frontend bench6\n  bind {}\n  default_backend pool6\n\n",
        v6(front6)
    );
    t += "backend pool\n  balance random\n";
    for (k, b) in backends.iter().enumerate() {
        t += &format!("  server b{k} {b}\n");
    }
    t += "\nbackend pool6\n  balance random\n";
    for (k, b) in backends6.iter().enumerate() {
        t += &format!("  server b{k} {}\n", v6(b));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four(v6: bool) -> Vec<String> {
        (1..=4)
            .map(|k| {
                if v6 {
                    format!("[fd00:201::{k}]:8080")
                } else {
                    format!("10.200.1.{k}:8080")
                }
            })
            .collect()
    }

    #[test]
    fn addresses_split_into_host_and_port() {
        assert_eq!(host_of("10.96.0.1:80"), "10.96.0.1");
        assert_eq!(host_of("[fd00:96::1]:80"), "fd00:96::1");
        assert_eq!(port_of("[fd00:96::1]:80"), "80");
    }

    #[test]
    fn nft_ruleset_maps_udp_and_ipv6() {
        let t = nft_ruleset(2, &four(false), true, false);
        assert!(t.starts_with("table ip lbbench {"));
        assert!(t.contains("10.96.0.2 . tcp . 80 : goto svc1,"));
        assert!(t.contains("10.96.0.1 . udp . 80 : goto svc0,"));
        assert!(t.contains("meta l4proto udp dnat to 10.200.1.4:8080"));
        let t6 = nft_ruleset(1, &four(true), false, true);
        assert!(t6.starts_with("table ip6 lbbench {"));
        assert!(t6.contains("fd00:96::1 . tcp . 80 : goto svc0,"));
        assert!(t6.contains("dnat to [fd00:201::1]:8080"));
        assert!(t6.contains("ip6 daddr . meta l4proto . th dport vmap @services"));
        assert!(!t6.contains(" udp "));
    }

    #[test]
    fn iptables_services_are_in_vip_order_with_udp_last() {
        let t = iptables_rules(3, &four(false), true, false);
        let services: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A LBB-SERVICES"))
            .collect();
        assert_eq!(services.len(), 4);
        assert!(services[2].contains("-d 10.96.0.3/32 -p tcp"));
        assert!(services[3].contains("-d 10.96.0.1/32 -p udp --dport 80 -j LBB-SVC-0"));
        let t6 = iptables_rules(1, &four(true), false, true);
        assert!(t6.contains("-d fd00:96::1/128 -p tcp --dport 80 -j LBB-SVC-0"));
        assert!(t6.contains("--to-destination [fd00:201::2]:8080"));
    }

    #[test]
    fn haproxy_writes_ipv6_without_brackets() {
        let t = haproxy_config("10.96.0.1:80", &four(false), "[fd00:96::1]:80", &four(true));
        assert!(t.contains("bind ipv6@fd00:96::1:80"));
        assert!(t.contains("server b3 ipv6@fd00:201::4:8080"));
        assert!(t.contains("server b0 10.200.1.1:8080"));
    }

    #[test]
    fn lb_config_adds_udp_and_ipv6_with_one_service() {
        let setup = LbSetup {
            n: 1,
            count_bytes: false,
            extra: true,
        };
        let t = lb_config(setup, &four(false), &four(true), false);
        assert!(t.starts_with("[dataplane]\ncount_bytes = false"));
        assert!(t.contains("protocol = \"udp\""));
        assert!(t.contains("vip = \"[fd00:96::1]:80\""));
        assert_eq!(t.matches("[[service]]").count(), 4);
    }
}
