//! Passive outlier ejection: decides from kernel-observed connect outcomes (the per-backend
//! failure streak and the established/failed counters) which backends to take out of a
//! service for a while. Pure over its inputs and the clock it is given, so the rules are unit
//! tested; the agent feeds it observations and leaves ejected backends out of the plan, as it
//! does unhealthy ones. Either health checks or ejection can remove a backend; it is back only
//! when both agree.

use crate::agent_metrics::AGENT;
use crate::catalog::Service;
use crate::config::OutlierConfig;
use crate::status::{Ejection, StatusFile};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What the kernel counted for one backend that is in the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    /// Failed connects in a row (reset by an established one).
    pub streak: u32,
    pub established: u64,
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Backend {
    ejections: u32,
    until: Option<Instant>,
    reason: String,
    window_start: Option<Instant>,
    /// Counters at the window's start: (established, failed).
    base: (u64, u64),
}

#[derive(Debug, Default)]
pub struct Outliers {
    services: BTreeMap<String, BTreeMap<SocketAddr, Backend>>,
}

impl Outliers {
    /// Applies one round of observations of `service`, whose configured backends number
    /// `backends`. Returns whether the set of ejected backends changed.
    pub fn observe(
        &mut self,
        now: Instant,
        service: &str,
        config: &OutlierConfig,
        backends: usize,
        seen: &[(SocketAddr, Observation)],
    ) -> bool {
        let states = self.services.entry(service.to_owned()).or_default();
        let mut changed = false;
        for b in states.values_mut() {
            if b.until.is_some_and(|t| t <= now) {
                b.until = None;
                b.window_start = None;
                changed = true;
            }
        }
        // Envoy's rule: the cap may always be rounded up to one backend.
        let cap = (backends * usize::from(config.max_ejection_percent) / 100).max(1);
        for (addr, obs) in seen {
            let b = states.entry(*addr).or_default();
            if b.until.is_some() {
                continue;
            }
            let counters = (obs.established, obs.failed);
            // A backend that just came back has a fresh id with zeroed counters.
            let start = match b.window_start {
                Some(t) if counters.0 >= b.base.0 && counters.1 >= b.base.1 => t,
                _ => {
                    b.window_start = Some(now);
                    b.base = counters;
                    now
                }
            };
            let mut reason = None;
            if config.consecutive_failures > 0 && obs.streak >= config.consecutive_failures {
                reason = Some(format!("{} connect failures in a row", obs.streak));
            } else if now.duration_since(start) >= config.interval {
                let (ok, failed) = (counters.0 - b.base.0, counters.1 - b.base.1);
                let total = ok + failed;
                let pct = u64::from(config.failure_percentage);
                if pct > 0 && total >= u64::from(config.min_requests) && failed * 100 >= pct * total
                {
                    reason = Some(format!("{failed} of {total} connects failed"));
                }
                b.window_start = Some(now);
                b.base = counters;
            }
            let Some(reason) = reason else {
                continue;
            };
            let ejected_now = states.values().filter(|s| s.until.is_some()).count();
            if ejected_now >= cap {
                continue;
            }
            let b = states.get_mut(addr).expect("inserted above");
            b.ejections += 1;
            let time = config
                .base_ejection_time
                .saturating_mul(b.ejections)
                .min(config.max_ejection_time);
            b.until = Some(now + time);
            b.reason = reason;
            changed = true;
        }
        changed
    }

    pub fn is_ejected(&self, service: &str, addr: &SocketAddr) -> bool {
        self.services
            .get(service)
            .and_then(|s| s.get(addr))
            .is_some_and(|b| b.until.is_some())
    }

    /// Ejected backends of `service`, by address.
    pub fn ejected(&self, now: Instant, service: &str) -> BTreeMap<String, Ejection> {
        let Some(states) = self.services.get(service) else {
            return BTreeMap::new();
        };
        states
            .iter()
            .filter_map(|(addr, b)| {
                let until = b.until?;
                Some((
                    addr.to_string(),
                    Ejection {
                        reason: b.reason.clone(),
                        count: b.ejections,
                        remaining_ms: until.saturating_duration_since(now).as_millis() as u64,
                    },
                ))
            })
            .collect()
    }

    /// When the next ejection ends, so the agent can wake up for it.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.services
            .values()
            .flat_map(|s| s.values().filter_map(|b| b.until))
            .min()
    }

    /// Ejections the previous agent published, resumed for what remained of them, so that a
    /// restart does not hand an ejected backend traffic again early. Only services that still
    /// ask for outlier detection (`watched`) resume theirs: nothing else would ever end them.
    pub fn resume(
        &mut self,
        now: Instant,
        previous: Option<&StatusFile>,
        watched: impl Fn(&str) -> bool,
    ) {
        let Some(previous) = previous else { return };
        for (service, status) in previous.services.iter().filter(|(s, _)| watched(s)) {
            for (addr, e) in &status.ejected {
                let Ok(addr) = addr.parse::<SocketAddr>() else {
                    continue;
                };
                let backend = self
                    .services
                    .entry(service.clone())
                    .or_default()
                    .entry(addr)
                    .or_default();
                backend.ejections = e.count;
                backend.reason = e.reason.clone();
                backend.until = Some(now + Duration::from_millis(e.remaining_ms));
            }
        }
    }

    /// Forgets services no longer configured with outlier detection.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.services.retain(|name, _| keep(name));
    }

    /// One pass over every service with `[service.outlier]`: feeds what the kernel counted for
    /// its backends in the data plane (`observed`) to the detector, logs each ejection and
    /// return, and forgets services that no longer have the setting. Returns the services
    /// where a backend was ejected or came back.
    pub fn check(
        &mut self,
        now: Instant,
        services: &[Service],
        observed: impl Fn(&Service) -> Vec<(SocketAddr, Observation)>,
    ) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for svc in services {
            let Some(settings) = &svc.admission.outlier else {
                continue;
            };
            let seen = observed(svc);
            let before = self.ejected(now, &svc.name);
            let backends = seen.len() + before.len();
            if self.observe(now, &svc.name, settings, backends, &seen) {
                changed.insert(svc.name.to_string());
                log_ejections(&svc.name, &before, &self.ejected(now, &svc.name));
            }
        }
        let names: BTreeSet<&str> = services
            .iter()
            .filter(|s| s.admission.outlier.is_some())
            .map(|s| &*s.name)
            .collect();
        self.retain(|name| names.contains(name));
        changed
    }
}

fn log_ejections(
    service: &str,
    before: &BTreeMap<String, Ejection>,
    after: &BTreeMap<String, Ejection>,
) {
    for (backend, e) in after.iter().filter(|(b, _)| !before.contains_key(*b)) {
        AGENT.ejected(service, backend);
        warn!(
            service,
            backend = %backend,
            reason = %e.reason,
            seconds = e.remaining_ms / 1000,
            ejections = e.count,
            "backend ejected as an outlier"
        );
    }
    for backend in before.keys().filter(|b| !after.contains_key(*b)) {
        info!(service, backend = %backend, "ejection over: backend back in service");
    }
}

/// How long to wait between observations: often enough that a streak is acted on quickly,
/// rarely enough that reading counters costs nothing noticeable.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            failure_percentage: 50,
            min_requests: 10,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(90),
            max_ejection_percent: 10,
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn obs(streak: u32, established: u64, failed: u64) -> Observation {
        Observation {
            streak,
            established,
            failed,
        }
    }

    #[test]
    fn a_streak_ejects_for_the_base_time_then_longer_each_time_up_to_the_max() {
        let (mut o, c, t0) = (Outliers::default(), config(), Instant::now());
        assert!(!o.observe(t0, "web", &c, 4, &[(addr(1), obs(2, 5, 2))]));
        assert!(o.observe(t0, "web", &c, 4, &[(addr(1), obs(3, 5, 3))]));
        assert!(o.is_ejected("web", &addr(1)));
        let e = &o.ejected(t0, "web")["10.0.0.1:80"];
        assert_eq!((e.count, e.remaining_ms), (1, 30_000));
        assert!(e.reason.contains("3 connect failures in a row"), "{e:?}");
        // Back after 30 s (with a fresh id and zeroed counters), ejected again: 60 s.
        let t1 = t0 + Duration::from_secs(30);
        assert!(o.observe(t1, "web", &c, 4, &[]));
        assert!(!o.is_ejected("web", &addr(1)));
        assert!(o.observe(t1, "web", &c, 4, &[(addr(1), obs(3, 0, 3))]));
        assert_eq!(o.ejected(t1, "web")["10.0.0.1:80"].remaining_ms, 60_000);
        let t2 = t1 + Duration::from_secs(60);
        o.observe(t2, "web", &c, 4, &[]);
        o.observe(t2, "web", &c, 4, &[(addr(1), obs(3, 0, 3))]);
        assert_eq!(o.ejected(t2, "web")["10.0.0.1:80"].remaining_ms, 90_000);
        assert_eq!(o.ejected(t2, "web")["10.0.0.1:80"].count, 3);
    }

    #[test]
    fn failure_percentage_is_judged_per_interval_with_a_minimum_volume() {
        let mut c = config();
        c.consecutive_failures = 0;
        let (mut o, t0) = (Outliers::default(), Instant::now());
        o.observe(t0, "web", &c, 2, &[(addr(1), obs(0, 100, 0))]);
        // 4 of 8 failed: too few connects to judge.
        let t1 = t0 + Duration::from_secs(10);
        assert!(!o.observe(t1, "web", &c, 2, &[(addr(1), obs(0, 104, 4))]));
        // 6 of 10 failed in the next interval: ejected.
        let t2 = t1 + Duration::from_secs(10);
        assert!(o.observe(t2, "web", &c, 2, &[(addr(1), obs(0, 108, 10))]));
        let e = &o.ejected(t2, "web")["10.0.0.1:80"];
        assert!(e.reason.contains("6 of 10 connects failed"), "{e:?}");
    }

    #[test]
    fn at_most_the_max_percent_but_always_one_backend_is_ejected() {
        let (mut o, c, t0) = (Outliers::default(), config(), Instant::now());
        let bad: Vec<_> = (1..=3).map(|i| (addr(i), obs(5, 0, 5))).collect();
        assert!(o.observe(t0, "web", &c, 3, &bad));
        assert_eq!(o.ejected(t0, "web").len(), 1, "10% of 3 rounds up to one");
        let mut c20 = config();
        c20.max_ejection_percent = 50;
        let many: Vec<_> = (1..=10).map(|i| (addr(i), obs(5, 0, 5))).collect();
        o.observe(t0, "api", &c20, 10, &many);
        assert_eq!(o.ejected(t0, "api").len(), 5);
    }

    #[test]
    fn healthy_backends_are_left_alone_and_services_can_be_forgotten() {
        let (mut o, c, t0) = (Outliers::default(), config(), Instant::now());
        let t1 = t0 + Duration::from_secs(11);
        o.observe(t0, "web", &c, 2, &[(addr(1), obs(0, 0, 0))]);
        assert!(!o.observe(t1, "web", &c, 2, &[(addr(1), obs(0, 500, 2))]));
        o.observe(t1, "api", &c, 2, &[(addr(2), obs(9, 0, 9))]);
        assert!(o.next_expiry().is_some());
        o.retain(|s| s == "web");
        assert!(!o.is_ejected("api", &addr(2)));
        assert!(o.next_expiry().is_none());
    }

    #[test]
    fn a_restart_resumes_what_remained_of_watched_ejections_only() {
        let mut previous = StatusFile::default();
        for service in ["web", "gone"] {
            let ejection = Ejection {
                reason: "3 failures in a row".into(),
                count: 2,
                remaining_ms: 5_000,
            };
            let status = previous.services.entry(service.into()).or_default();
            status.ejected.insert(addr(1).to_string(), ejection);
        }
        let now = Instant::now();
        let mut outliers = Outliers::default();
        outliers.resume(now, Some(&previous), |s| s == "web");
        assert!(outliers.is_ejected("web", &addr(1)));
        assert!(
            !outliers.is_ejected("gone", &addr(1)),
            "not watched any more"
        );
        let resumed = &outliers.ejected(now, "web")[&addr(1).to_string()];
        assert_eq!((resumed.count, resumed.remaining_ms), (2, 5_000));
        assert_eq!(outliers.next_expiry(), Some(now + Duration::from_secs(5)));
    }
}
