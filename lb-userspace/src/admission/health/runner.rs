//! Active health checking: one tokio task per (service, backend) with a health block. Tasks
//! start spread over the first interval and keep `interval ± jitter` between probes, so probes
//! do not arrive in bursts; a semaphore bounds how many run at once. Each task owns its state
//! machine and reports transitions through a channel, which makes the agent reconcile.

use super::probe::probe;
use super::state::HealthState;
use crate::catalog::Service;
use crate::clock::now_ms;
use crate::config::{HealthConfig, InitialState};
use crate::jitter::Jitter;
use crate::status::{BackendHealth, StatusFile};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Probes in flight at once, across all backends.
const MAX_CONCURRENT_PROBES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: String,
    pub backend: SocketAddr,
}

pub type Shared = Arc<Mutex<BTreeMap<Target, BackendHealth>>>;

pub struct HealthRunner {
    tasks: HashMap<Target, (HealthConfig, JoinHandle<()>)>,
    shared: Shared,
    transitions: mpsc::UnboundedSender<String>,
    limit: Arc<Semaphore>,
    /// What the previous agent last knew of each target's health, used once as the target's
    /// starting state: a backend that was down when that agent stopped stays out until it
    /// passes `rise` probes, whatever `initial` says.
    remembered: HashMap<Target, bool>,
}

/// The health the previous agent published for each probed backend (`remembered` of `new`).
pub fn remembered(previous: Option<&StatusFile>) -> HashMap<Target, bool> {
    let services = previous.map(|p| &p.services).into_iter().flatten();
    services
        .flat_map(|(service, status)| {
            status.backends.iter().filter_map(move |(addr, health)| {
                let target = Target {
                    service: service.clone(),
                    backend: addr.parse().ok()?,
                };
                Some((target, health.healthy))
            })
        })
        .collect()
}

impl HealthRunner {
    pub fn new(
        transitions: mpsc::UnboundedSender<String>,
        remembered: HashMap<Target, bool>,
    ) -> Self {
        Self {
            tasks: HashMap::new(),
            shared: Arc::default(),
            transitions,
            limit: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
            remembered,
        }
    }

    /// Starts probing new targets and stops probing removed ones. A target whose health block
    /// is unchanged keeps its task and state across reloads. With `only`, `services` are those
    /// of these names, and targets of other services are left alone.
    pub fn sync<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        only: Option<&BTreeSet<String>>,
    ) {
        let wanted: HashMap<Target, HealthConfig> = services
            .into_iter()
            .filter_map(|s| s.admission.health.as_ref().map(|h| (s, h)))
            .flat_map(|(s, h)| {
                s.backends.iter().map(move |b| {
                    (
                        Target {
                            service: s.name.to_string(),
                            backend: b.address,
                        },
                        HealthConfig::clone(h),
                    )
                })
            })
            .collect();
        let shared = self.shared.clone();
        self.tasks.retain(|target, (hc, task)| {
            let outside = only.is_some_and(|names| !names.contains(&target.service));
            let keep = outside || wanted.get(target) == Some(hc);
            if !keep {
                task.abort();
                shared.lock().expect("health state lock").remove(target);
            }
            keep
        });
        for (target, hc) in wanted {
            if self.tasks.contains_key(&target) {
                continue;
            }
            let healthy = self
                .remembered
                .remove(&target)
                .unwrap_or(hc.initial == InitialState::Healthy);
            let initial = BackendHealth {
                healthy,
                ..BackendHealth::default()
            };
            self.shared
                .lock()
                .expect("health state lock")
                .insert(target.clone(), initial);
            let task = tokio::spawn(probe_loop(
                target.clone(),
                hc.clone(),
                healthy,
                self.shared.clone(),
                self.transitions.clone(),
                self.limit.clone(),
            ));
            self.tasks.insert(target, (hc, task));
        }
    }

    /// Backends without a health block count as healthy.
    pub fn is_healthy(&self, service: &str, backend: &SocketAddr) -> bool {
        let target = Target {
            service: service.to_string(),
            backend: *backend,
        };
        self.shared
            .lock()
            .expect("health state lock")
            .get(&target)
            .is_none_or(|h| h.healthy)
    }

    pub fn snapshot(&self) -> BTreeMap<Target, BackendHealth> {
        self.shared.lock().expect("health state lock").clone()
    }
}

impl Drop for HealthRunner {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Spreads probe schedules of different backends that start at the same moment.
fn jitter_for(target: &Target) -> Jitter {
    Jitter::seeded(
        now_ms()
            ^ ip_seed(target.backend.ip()) << 16
            ^ u64::from(target.backend.port())
            ^ target
                .service
                .bytes()
                .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)),
    )
}

fn ip_seed(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            (bits >> 64) as u64 ^ bits as u64
        }
    }
}

async fn probe_loop(
    target: Target,
    hc: HealthConfig,
    healthy: bool,
    shared: Shared,
    transitions: mpsc::UnboundedSender<String>,
    limit: Arc<Semaphore>,
) {
    let addr = SocketAddr::new(
        target.backend.ip(),
        hc.port.unwrap_or(target.backend.port()),
    );
    let mut jitter = jitter_for(&target);
    let mut state = HealthState::new(healthy);
    tokio::time::sleep(jitter.below(hc.interval)).await;
    loop {
        let outcome = match limit.acquire().await {
            Ok(_permit) => {
                let start = std::time::Instant::now();
                let outcome = probe(addr, &hc.kind, hc.timeout).await;
                let seconds = start.elapsed().as_secs_f64();
                crate::agent_metrics::AGENT.probe_seconds.observe(seconds);
                outcome
            }
            Err(_) => return,
        };
        let change = state.record(outcome.is_ok(), hc.rise, hc.fall);
        let now = now_ms();
        if let Some(entry) = shared.lock().expect("health state lock").get_mut(&target) {
            entry.healthy = state.healthy;
            entry.last_result = outcome
                .as_ref()
                .err()
                .cloned()
                .unwrap_or_else(|| "ok".into());
            entry.last_probe_unix_ms = now;
            entry.consecutive_ok = state.consecutive_ok;
            entry.consecutive_fail = state.consecutive_fail;
            if change.is_some() {
                entry.last_change_unix_ms = now;
            }
        }
        match (change, &outcome) {
            (Some(true), _) => info!(service = %target.service, backend = %target.backend,
                "backend is healthy again after {} passing probes", hc.rise),
            (Some(false), Err(why)) => warn!(service = %target.service, backend = %target.backend,
                "backend is unhealthy after {} failed probes: {why}", hc.fall),
            _ => {}
        }
        if change.is_some() && transitions.send(target.service.clone()).is_err() {
            return;
        }
        // interval ± jitter, never below zero.
        let spread = jitter.below(hc.jitter * 2);
        let pause = (hc.interval + spread).saturating_sub(hc.jitter);
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn config(backends: &str, interval: &str) -> Vec<Service> {
        let text = format!(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nbackends = [{backends}]\n\
             [service.health]\nkind = \"tcp\"\ninterval = \"{interval}\"\ninitial = \"unhealthy\"\n"
        );
        crate::catalog::listed(&parse(&text, "test.toml").unwrap())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn sync_starts_keeps_and_stops_probe_targets() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut runner = HealthRunner::new(tx, HashMap::new());
        // Closed loopback ports and an hour-long interval: no probe can pass during the test.
        runner.sync(&config("\"127.0.0.1:1\", \"127.0.0.1:2\"", "1h"), None);
        assert_eq!(runner.snapshot().len(), 2);
        assert!(
            !runner.is_healthy("web", &addr("127.0.0.1:1")),
            "initial = unhealthy"
        );
        assert!(
            runner.is_healthy("other", &addr("127.0.0.1:1")),
            "unchecked counts as healthy"
        );

        runner
            .shared
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|h| h.consecutive_fail = 7);
        runner.sync(&config("\"127.0.0.1:1\"", "1h"), None);
        let snap = runner.snapshot();
        assert_eq!(snap.len(), 1, "removed backend no longer probed");
        assert_eq!(
            snap.values().next().unwrap().consecutive_fail,
            7,
            "unchanged target kept"
        );

        runner.sync(&config("\"127.0.0.1:1\"", "30m"), None);
        let snap = runner.snapshot();
        assert_eq!(
            snap.values().next().unwrap().consecutive_fail,
            0,
            "changed block restarts"
        );
    }

    #[tokio::test]
    async fn a_backend_down_at_the_last_stop_starts_down_once() {
        let mut previous = StatusFile::default();
        let web = previous.services.entry("web".into()).or_default();
        let down = BackendHealth {
            healthy: false,
            ..BackendHealth::default()
        };
        web.backends.insert("127.0.0.1:1".into(), down);
        web.backends
            .insert("not an address".into(), BackendHealth::default());
        let remembered = remembered(Some(&previous));
        assert_eq!(remembered.len(), 1);
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut runner = HealthRunner::new(tx, remembered);
        // `initial` is healthy in this config; the memory wins, once.
        let healthy_start = |b| {
            config(b, "1h").into_iter().map(|mut s| {
                s.admission.health.as_mut().unwrap().initial = InitialState::Healthy;
                s
            })
        };
        let services: Vec<Service> = healthy_start("\"127.0.0.1:1\", \"127.0.0.1:2\"").collect();
        runner.sync(&services, None);
        assert!(
            !runner.is_healthy("web", &addr("127.0.0.1:1")),
            "remembered down"
        );
        assert!(
            runner.is_healthy("web", &addr("127.0.0.1:2")),
            "not remembered"
        );
        runner.sync(&[] as &[Service], None);
        runner.sync(&services, None);
        assert!(
            runner.is_healthy("web", &addr("127.0.0.1:1")),
            "memory used once"
        );
    }
}
