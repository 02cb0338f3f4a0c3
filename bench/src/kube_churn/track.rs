//! Matching: when each change reached the agent (the mock's log of its watch writes) and when
//! the maps first held it (reads of the changed services' entries), and the latencies between.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

/// The changes sent and not yet seen in the maps, by service.
#[derive(Default)]
pub struct Tracker {
    /// Per service: (change index, the backends it leads to), oldest first.
    pending: BTreeMap<usize, VecDeque<(usize, BTreeSet<SocketAddr>)>>,
    /// When each change was first seen in the maps (CLOCK_MONOTONIC µs), by index.
    seen: BTreeMap<usize, u64>,
    count: usize,
}

impl Tracker {
    pub fn sent(&mut self, index: usize, service: usize, backends: BTreeSet<SocketAddr>) {
        self.pending
            .entry(service)
            .or_default()
            .push_back((index, backends));
        self.count += 1;
    }

    /// Services with a change not seen yet.
    pub fn services(&self) -> Vec<usize> {
        self.pending.keys().copied().collect()
    }

    pub fn pending(&self) -> usize {
        self.count
    }

    /// The maps held `held` for `service` at `at`. If that is what a pending change leads
    /// to, it and the older changes of the service (which the set includes, having been made
    /// on top of them) count as applied at `at`.
    pub fn observe(&mut self, service: usize, held: &BTreeSet<SocketAddr>, at: u64) {
        let Some(queue) = self.pending.get_mut(&service) else {
            return;
        };
        let Some(pos) = queue.iter().rposition(|(_, b)| b == held) else {
            return;
        };
        for (index, _) in queue.drain(..=pos) {
            self.seen.insert(index, at);
            self.count -= 1;
        }
        if queue.is_empty() {
            self.pending.remove(&service);
        }
    }

    pub fn seen(&self) -> &BTreeMap<usize, u64> {
        &self.seen
    }
}

/// What became of the changes of a run.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub sent: usize,
    /// Written to the agent's watch by the mock.
    pub emitted: usize,
    /// Emitted and then seen in the maps.
    pub applied: usize,
    /// Emission to maps, sorted (µs).
    pub latencies: Vec<u64>,
}

impl Outcome {
    /// `emitted`: the mock's log, `(tag, µs)` with the change index as the tag (a change
    /// written to several watches counts from the first); `seen`: `Tracker::seen`.
    pub fn of(sent: usize, emitted: &[(String, u64)], seen: &BTreeMap<usize, u64>) -> Self {
        let mut first: BTreeMap<usize, u64> = BTreeMap::new();
        for (tag, at) in emitted {
            if let Ok(i) = tag.parse::<usize>() {
                let t = first.entry(i).or_insert(*at);
                *t = (*t).min(*at);
            }
        }
        let mut latencies: Vec<u64> = first
            .iter()
            .filter_map(|(i, emit)| Some(seen.get(i)?.saturating_sub(*emit)))
            .collect();
        latencies.sort_unstable();
        Outcome {
            sent,
            emitted: first.len(),
            applied: latencies.len(),
            latencies,
        }
    }

    /// The `p` quantile (0..=1) in µs, nearest rank; None without latencies.
    pub fn quantile(&self, p: f64) -> Option<u64> {
        let last = self.latencies.len().checked_sub(1)?;
        let rank = (last as f64 * p.clamp(0.0, 1.0)).round() as usize;
        self.latencies.get(rank).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([10, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn a_set_applies_its_change_and_the_older_ones_of_its_service() {
        let mut t = Tracker::default();
        t.sent(0, 7, set(&[1, 2]));
        t.sent(1, 9, set(&[5]));
        t.sent(2, 7, set(&[2, 3]));
        assert_eq!(t.services(), [7, 9]);
        // What the maps held before any change: nothing applies.
        t.observe(7, &set(&[1]), 10);
        assert_eq!(t.pending(), 3);
        // Both changes of service 7 were batched: the newest set shows them both.
        t.observe(7, &set(&[2, 3]), 20);
        assert_eq!(t.pending(), 1);
        assert_eq!(t.services(), [9]);
        // Another service's set never applies a change.
        t.observe(7, &set(&[5]), 25);
        t.observe(9, &set(&[5]), 30);
        assert_eq!(t.pending(), 0);
        let seen: Vec<_> = t.seen().iter().map(|(i, at)| (*i, *at)).collect();
        assert_eq!(seen, [(0, 20), (1, 30), (2, 20)]);
        // Seen again later: the first time stays.
        t.observe(9, &set(&[5]), 40);
        assert_eq!(t.seen()[&1], 30);
    }

    #[test]
    fn latency_runs_from_the_first_emission_to_the_first_sight() {
        let emitted = [
            ("0".to_string(), 100),
            ("1".to_string(), 150),
            ("0".to_string(), 90), // a second watch, written earlier
            ("2".to_string(), 300),
            ("x".to_string(), 1), // not a change of this run
        ];
        let seen: BTreeMap<usize, u64> = [(0, 1_090), (1, 160), (3, 999)].into();
        let o = Outcome::of(4, &emitted, &seen);
        assert_eq!(o.sent, 4);
        assert_eq!(o.emitted, 3);
        // Change 2 was emitted and never seen; change 3 seen without an emission record.
        assert_eq!(o.applied, 2);
        assert_eq!(o.latencies, [10, 1_000]);
        assert_eq!(o.quantile(0.0), Some(10));
        assert_eq!(o.quantile(0.5), Some(1_000));
        assert_eq!(o.quantile(1.0), Some(1_000));
        assert_eq!(Outcome::of(0, &[], &BTreeMap::new()).quantile(0.99), None);
    }
}
