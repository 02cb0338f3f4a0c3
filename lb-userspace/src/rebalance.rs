//! Which idle connections to close so that pooled clients reconnect and spread: a connect-time
//! balancer places a connection once, and a Go or gRPC client keeps it for hours, so backends
//! added later get nothing. Each pass (`datapath::survey`) reports the translated TCP
//! connections; this picks, per service with `[service.rebalance]`:
//! - those older than `max_connection_age` ± a jitter of their own (age counts from the first
//!   survey that saw the connection, so it is at most one pass short);
//! - with `on_skew`, when some backend's count differs from its fair share (by weight) by more
//!   than the tolerance, enough of the most loaded backends' connections to bring each down
//!   to its share: the clients reconnect through the VIP and the algorithm places them again.
//!
//! Only idle connections are picked, and at most `max_closes_per_second` per service (a token
//! bucket), so a rebalance never becomes a reconnect storm.

use crate::config::RebalanceConfig;
use crate::datapath::survey::Connection;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// A service's setting and its live backends, by service id.
#[derive(Clone, Debug)]
pub struct Policy {
    pub config: RebalanceConfig,
    /// (backend id, generation) → weight (its share of the slot table).
    pub backends: BTreeMap<(u32, u32), u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Age,
    Skew,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Age => "age",
            Reason::Skew => "skew",
        }
    }
}

/// A connection chosen to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub service_id: u32,
    pub backend_id: u32,
    pub reason: Reason,
    /// The quiet time it must still have when closed.
    pub idle_after: Duration,
}

/// What the rebalance remembers between passes.
#[derive(Default)]
pub struct Rebalancer {
    first_seen: HashMap<u64, Instant>,
    /// Per service id: tokens left and when they were last refilled.
    budget: HashMap<u32, (f64, Instant)>,
}

impl Rebalancer {
    /// The connections to close now, by cookie, from what the last survey saw.
    pub fn choose(
        &mut self,
        now: Instant,
        seen: &[Connection],
        policies: &HashMap<u32, Policy>,
    ) -> BTreeMap<u64, Chosen> {
        let cookies: HashSet<u64> = seen.iter().map(|c| c.cookie).collect();
        self.first_seen.retain(|cookie, _| cookies.contains(cookie));
        for c in seen {
            self.first_seen.entry(c.cookie).or_insert(now);
        }
        self.budget.retain(|id, _| policies.contains_key(id));
        let mut by_service: BTreeMap<u32, Vec<&Connection>> = BTreeMap::new();
        for c in seen.iter().filter(|c| policies.contains_key(&c.service_id)) {
            by_service.entry(c.service_id).or_default().push(c);
        }
        let mut chosen = BTreeMap::new();
        for (service_id, connections) in by_service {
            let policy = &policies[&service_id];
            let rate = f64::from(policy.config.max_closes_per_second);
            let (tokens, at) = self.budget.entry(service_id).or_insert((rate, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
            *at = now;
            let mut left = tokens.floor() as usize;
            let mut pick = |c: &Connection, reason: Reason| {
                if left == 0 || chosen.contains_key(&c.cookie) {
                    return false;
                }
                left -= 1;
                let one = Chosen {
                    service_id,
                    backend_id: c.backend_id,
                    reason,
                    idle_after: policy.config.idle_after,
                };
                chosen.insert(c.cookie, one);
                true
            };
            let idle = |c: &Connection| !c.awaiting && c.quiet >= policy.config.idle_after;
            if let Some(age) = policy.config.max_connection_age {
                for c in connections.iter().filter(|c| idle(c)) {
                    let limit = jittered(age, policy.config.age_jitter, c.cookie);
                    if now.duration_since(self.first_seen[&c.cookie]) >= limit {
                        pick(c, Reason::Age);
                    }
                }
            }
            if policy.config.on_skew {
                for (backend, excess) in excess(policy, &connections) {
                    let mut of_backend: Vec<&Connection> = (connections.iter().copied())
                        .filter(|c| (c.backend_id, c.generation) == backend && idle(c))
                        .collect();
                    // The oldest first: they have had their share of the backend.
                    of_backend.sort_by_key(|c| (self.first_seen[&c.cookie], c.cookie));
                    let mut closed = 0;
                    for c in of_backend {
                        if closed == excess {
                            break;
                        }
                        if pick(c, Reason::Skew) {
                            closed += 1;
                        }
                    }
                }
            }
            let used = tokens.floor() as usize - left;
            *tokens -= used as f64;
        }
        chosen
    }
}

/// How many connections each backend holds beyond its fair share, when the service is skewed
/// (some backend, loaded or not, is off its share by more than the tolerance): the most
/// loaded first.
fn excess(policy: &Policy, connections: &[&Connection]) -> Vec<((u32, u32), usize)> {
    let mut counts: BTreeMap<(u32, u32), usize> = policy.backends.keys().map(|b| (*b, 0)).collect();
    for c in connections {
        if let Some(n) = counts.get_mut(&(c.backend_id, c.generation)) {
            *n += 1;
        }
    }
    let total: usize = counts.values().sum();
    let weights: u64 = policy.backends.values().map(|w| u64::from(*w)).sum();
    if total == 0 || weights == 0 {
        return Vec::new();
    }
    let fair = |b: &(u32, u32)| total as f64 * f64::from(policy.backends[b]) / weights as f64;
    let tolerance = f64::from(policy.config.tolerance) / 100.0;
    let skewed = counts.iter().any(|(b, n)| {
        let share = fair(b);
        (*n as f64 - share).abs() > (share * tolerance).max(1.0)
    });
    if !skewed {
        return Vec::new();
    }
    let mut over: Vec<((u32, u32), usize)> = counts
        .iter()
        .map(|(b, n)| (*b, n.saturating_sub(fair(b).ceil() as usize)))
        .filter(|(_, excess)| *excess > 0)
        .collect();
    over.sort_by_key(|(b, excess)| (std::cmp::Reverse(*excess), *b));
    over
}

/// `age` moved by up to ±`jitter`, by an amount fixed for the connection.
fn jittered(age: Duration, jitter: Duration, cookie: u64) -> Duration {
    if jitter.is_zero() {
        return age;
    }
    // A multiplicative hash spreads consecutive cookies over the whole range.
    let spread = cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let unit = spread as f64 / (1u64 << 53) as f64;
    let offset = jitter.as_secs_f64() * (2.0 * unit - 1.0);
    Duration::from_secs_f64((age.as_secs_f64() + offset).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RebalanceConfig {
        RebalanceConfig {
            max_connection_age: None,
            age_jitter: Duration::ZERO,
            on_skew: true,
            tolerance: 0,
            idle_after: Duration::from_secs(1),
            max_closes_per_second: 1000,
        }
    }

    fn policy(config: RebalanceConfig, backends: &[(u32, u32)]) -> HashMap<u32, Policy> {
        let backends = backends.iter().map(|(id, w)| ((*id, 0), *w)).collect();
        HashMap::from([(1, Policy { config, backends })])
    }

    /// `counts[i]` idle connections on backend i + 1, cookies numbered from `first`.
    fn connections(counts: &[usize], first: u64) -> Vec<Connection> {
        let mut out = Vec::new();
        for (i, n) in counts.iter().enumerate() {
            for _ in 0..*n {
                out.push(Connection {
                    cookie: first + out.len() as u64,
                    service_id: 1,
                    backend_id: i as u32 + 1,
                    generation: 0,
                    quiet: Duration::from_secs(5),
                    awaiting: false,
                });
            }
        }
        out
    }

    fn per_backend(chosen: &BTreeMap<u64, Chosen>) -> BTreeMap<u32, usize> {
        let mut n = BTreeMap::new();
        for c in chosen.values() {
            *n.entry(c.backend_id).or_default() += 1;
        }
        n
    }

    #[test]
    fn two_backends_added_to_two_loaded_ones_take_their_share_from_both() {
        let p = policy(config(), &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        let seen = connections(&[16, 16, 0, 0], 1);
        let chosen = Rebalancer::default().choose(Instant::now(), &seen, &p);
        assert_eq!(per_backend(&chosen), BTreeMap::from([(1, 8), (2, 8)]));
        assert!(chosen.values().all(|c| c.reason == Reason::Skew));
    }

    #[test]
    fn a_spread_within_the_tolerance_or_by_weight_is_left_alone() {
        let mut c = config();
        c.tolerance = 20;
        let even = policy(c, &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        let seen = connections(&[9, 9, 7, 7], 1);
        assert!(Rebalancer::default()
            .choose(Instant::now(), &seen, &even)
            .is_empty());
        let weighted = policy(config(), &[(1, 3), (2, 1)]);
        let seen = connections(&[24, 8], 1);
        assert!(Rebalancer::default()
            .choose(Instant::now(), &seen, &weighted)
            .is_empty());
    }

    #[test]
    fn busy_or_recently_active_connections_are_never_chosen() {
        let p = policy(config(), &[(1, 1), (2, 1)]);
        let mut seen = connections(&[4, 0], 1);
        seen[0].awaiting = true;
        seen[1].quiet = Duration::from_millis(500);
        let chosen = Rebalancer::default().choose(Instant::now(), &seen, &p);
        assert_eq!(chosen.keys().copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(chosen[&3].idle_after, Duration::from_secs(1));
    }

    #[test]
    fn closes_are_bounded_per_second_and_the_budget_refills() {
        let mut c = config();
        c.max_closes_per_second = 3;
        let p = policy(c, &[(1, 1), (2, 1)]);
        let seen = connections(&[20, 0], 1);
        let mut r = Rebalancer::default();
        let start = Instant::now();
        assert_eq!(r.choose(start, &seen, &p).len(), 3);
        assert_eq!(r.choose(start, &seen, &p).len(), 0, "spent");
        let later = start + Duration::from_millis(700);
        assert_eq!(r.choose(later, &seen, &p).len(), 2, "0.7 s refills 2.1");
    }

    #[test]
    fn connections_past_their_age_go_and_their_ages_count_from_first_seen() {
        let mut c = config();
        c.on_skew = false;
        c.max_connection_age = Some(Duration::from_secs(10));
        c.age_jitter = Duration::from_secs(2);
        let p = policy(c, &[(1, 1)]);
        let seen = connections(&[50], 1);
        let mut r = Rebalancer::default();
        let start = Instant::now();
        assert!(r.choose(start, &seen, &p).is_empty());
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(r.choose(at(7), &seen, &p).is_empty(), "before age - jitter");
        let some = r.choose(at(10), &seen, &p).len();
        assert!(
            some > 5 && some < 45,
            "the jitter spreads them: {some} of 50"
        );
        assert_eq!(r.choose(at(13), &seen, &p).len(), 50, "after age + jitter");
        let newcomer = connections(&[1], 1000);
        assert!(
            r.choose(at(14), &newcomer, &p).is_empty(),
            "a new one starts at 0"
        );
    }

    #[test]
    fn other_services_and_stale_generations_are_not_counted() {
        let p = policy(config(), &[(1, 1), (2, 1)]);
        let mut seen = connections(&[2, 2], 1);
        seen[0].service_id = 9;
        seen[1].generation = 5;
        seen[2].generation = 5;
        // What is left: backend 2 holds one, backend 1 none: off by one, within "at least 1".
        assert!(Rebalancer::default()
            .choose(Instant::now(), &seen, &p)
            .is_empty());
    }
}
