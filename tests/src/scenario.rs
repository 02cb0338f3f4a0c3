//! The usual test set-up in one value: a namespace with backends listening, a child cgroup for
//! clients, a pin folder and the real agent running a config. Fields drop in declaration order:
//! agent, backends, pins (detached), cgroup, namespace.

use crate::procs::{run_client, Agent, Backends, ClientReport, Proto, ServeMode, SteadyClient};
use crate::stats::ServiceReport;
use crate::{paths::unique_name, PinDir, TestCgroup, TestNet};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

pub struct Scenario {
    pub agent: Option<Agent>,
    /// One process per listen address, so a test can stop and restart single backends.
    backends: BTreeMap<String, Backends>,
    pub pins: PinDir,
    pub cgroup: TestCgroup,
    pub net: TestNet,
    pub config: PathBuf,
    /// Config-file poll interval given to the agent; 0 (the default) = only SIGHUP reloads.
    pub watch_ms: u64,
    /// Further `lb-agent run` flags for the next `start_agent`.
    pub agent_args: Vec<String>,
    /// How long `start_agent` waits for the agent to be ready (15 s unless a test loads a
    /// very large config).
    pub ready_timeout: Duration,
    /// The `lb-agent` the next `start_agent` runs: `paths::agent_bin()` unless a test sets
    /// another (an earlier release's, for upgrades).
    pub agent_bin: PathBuf,
    dir: PathBuf,
}

impl Scenario {
    /// `backends` are `ip:port` listeners; their IPs are added to the namespace's `lo`.
    /// `config` is usually a [`crate::config::Config`]; literal text is for TOML the builder
    /// would not write.
    pub fn start(backends: &[&str], proto: Proto, config: impl Display) -> Self {
        Self::start_in(TestNet::new(&Self::ips(backends)), backends, proto, config)
    }

    /// Namespace, backends, cgroup and pins, but no agent yet: for tests that start servers
    /// the agent's config points at, or pass it extra flags.
    pub fn without_agent(backends: &[&str], proto: Proto) -> Self {
        Self::without_agent_in(TestNet::new(&Self::ips(backends)), backends, proto)
    }

    /// As `start`, in a namespace where `crate::join::BLACKHOLE_NET` answers nothing.
    pub fn with_blackhole(backends: &[&str], proto: Proto, config: impl Display) -> Self {
        let net = TestNet::with_blackhole(&Self::ips(backends));
        Self::start_in(net, backends, proto, config)
    }

    fn start_in(net: TestNet, backends: &[&str], proto: Proto, config: impl Display) -> Self {
        let mut s = Self::without_agent_in(net, backends, proto);
        s.write_config(config);
        s.start_agent();
        s
    }

    /// IPv6 backends listen on ::1, which `lo` already has.
    fn ips<'a>(backends: &[&'a str]) -> Vec<&'a str> {
        backends
            .iter()
            .filter(|b| !b.starts_with('['))
            .filter_map(|b| b.split(':').next())
            .collect()
    }

    fn without_agent_in(net: TestNet, backends: &[&str], proto: Proto) -> Self {
        let listeners = backends
            .iter()
            .map(|b| (b.to_string(), Backends::start(&net, &[b], proto)))
            .collect();
        let dir = std::env::temp_dir().join(unique_name());
        std::fs::create_dir_all(&dir).expect("config dir");
        Self {
            agent: None,
            backends: listeners,
            pins: PinDir::new(),
            cgroup: TestCgroup::new(),
            net,
            config: dir.join("lb.toml"),
            watch_ms: 0,
            agent_args: Vec::new(),
            ready_timeout: Duration::from_secs(15),
            agent_bin: crate::paths::agent_bin(),
            dir,
        }
    }

    pub fn write_config(&self, config: impl Display) {
        std::fs::write(&self.config, config.to_string()).expect("write config");
    }

    /// Starts the agent on this scenario's pins and waits until it has applied its config.
    pub fn start_agent(&mut self) {
        let mut agent = Agent::start_bin(
            &self.agent_bin,
            &self.net,
            &self.cgroup,
            &self.pins,
            &self.config,
            self.watch_ms,
            &self.agent_args,
        );
        let ready = crate::wait_for(self.ready_timeout, || {
            agent.log().contains(" ready services=") || !agent.is_running()
        });
        assert!(
            ready && agent.is_running(),
            "agent did not become ready:\n{}",
            agent.log()
        );
        self.agent = Some(agent);
    }

    /// Starts an agent over pins an earlier one left, and checks it adopted them.
    pub fn start_agent_adopting(&mut self) {
        self.start_agent();
        let log = self.agent().log();
        assert!(log.contains("adopted=true"), "pins not adopted:\n{log}");
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    /// One service's entry in `lb-agent stats --json`; panics (failing the test) if absent.
    pub fn service_stats(&self, name: &str) -> ServiceReport {
        let mut stats = crate::agent_stats(&self.pins).expect("lb-agent stats --json");
        match stats.services.iter().position(|s| s.name == name) {
            Some(i) => stats.services.swap_remove(i),
            None => panic!("no service {name} in {stats:?}"),
        }
    }

    /// A steady connect load on `to` from the balanced cgroup: one connect every `every`, for
    /// at most `at_most` (it stops when dropped or stopped before).
    pub fn steady_load(&self, to: &str, every: Duration, at_most: Duration) -> SteadyClient {
        SteadyClient::start(&self.net, &self.cgroup, to, every, at_most)
    }

    /// A client inside the balanced cgroup.
    pub fn client(&self, to: &str, count: u64, proto: Proto) -> ClientReport {
        run_client(&self.net, Some(&self.cgroup), to, count, proto)
    }

    /// 120 connects through `vip` from the balanced cgroup: all succeed and land only on
    /// `expected`, each of which gets some.
    pub fn assert_balanced(&self, vip: &str, expected: &[&str]) {
        let report = self.client(vip, 120, Proto::Tcp);
        assert_eq!(report.ok, 120, "{report:?}");
        for b in expected {
            assert!(report.from(b) > 0, "{b} got nothing: {report:?}");
        }
        let landed: u64 = expected.iter().map(|b| report.from(b)).sum();
        assert_eq!(landed, 120, "connects outside {expected:?}: {report:?}");
    }

    /// `count` TCP connects to `to` from `cgroup` (the balanced one or below it): (answered by
    /// a backend, failed with ENETUNREACH, which an untranslated VIP gets in the test
    /// namespace). Any other outcome fails the test.
    pub fn reached_or_untranslated(&self, cgroup: &TestCgroup, to: &str, count: u64) -> (u64, u64) {
        let r = run_client(&self.net, Some(cgroup), to, count, Proto::Tcp);
        assert_eq!(r.ok + r.failed("ENETUNREACH"), count, "{r:?}");
        (r.ok, r.failed("ENETUNREACH"))
    }

    /// Waits until `stats` lists no bypassed cgroup; fails the test with `why` and the agent's
    /// log otherwise.
    pub fn assert_bypass_ends(&mut self, wait: Duration, why: &str) {
        let pins = &self.pins;
        let ended = crate::wait_for(wait, || {
            crate::agent_stats(pins).is_some_and(|r| r.bypass.is_empty())
        });
        assert!(ended, "{why}:\n{}", self.agent().log());
    }

    /// A client in the same namespace but outside the balanced cgroup.
    pub fn outside_client(&self, to: &str, count: u64, proto: Proto) -> ClientReport {
        run_client(&self.net, None, to, count, proto)
    }

    /// Stops the backends and returns what each accepted.
    pub fn stop_backends(&mut self) -> HashMap<String, u64> {
        std::mem::take(&mut self.backends)
            .into_values()
            .flat_map(Backends::stop)
            .collect()
    }

    /// Stops one backend (its port then refuses connections) and returns what it accepted.
    pub fn stop_backend(&mut self, addr: &str) -> u64 {
        let b = self.backends.remove(addr).expect("backend running");
        b.stop().values().sum()
    }

    /// Starts many answering listeners in one process (for scale benchmarks).
    pub fn start_backend_group(&mut self, addrs: &[&str]) {
        let b = Backends::start(&self.net, addrs, Proto::Tcp);
        self.backends.insert(addrs.join(","), b);
    }

    /// Starts (or restarts) one listener in this namespace.
    pub fn start_backend(&mut self, addr: &str, proto: Proto, mode: ServeMode) {
        let b = Backends::start_mode(&self.net, &[addr], proto, mode);
        if let Some(old) = self.backends.insert(addr.to_string(), b) {
            old.stop();
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // This runs before the fields drop: the agent goes first, so that a failing test
        // prints its log (which lives in `dir`) before the folder is removed.
        self.agent = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
