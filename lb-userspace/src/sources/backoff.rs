//! Retry pacing after a failed discovery attempt: exponential, capped, with jitter so that
//! many agents that lost the same source at the same moment do not return in lockstep.

use crate::jitter::Jitter;
use std::time::Duration;

pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
    jitter: Jitter,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max,
            failures: 0,
            jitter: Jitter::seeded(seed),
        }
    }

    /// The pause before the next attempt: `initial × 2^failures` capped at `max`, of which the
    /// upper half is random ("equal jitter": never shorter than half the step).
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .initial
            .saturating_mul(1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + self.jitter.below(step - half + Duration::from_millis(1))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_half_step_jitter() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut b = Backoff::new(initial, max, 42);
        for step_ms in [100u64, 200, 400, 800, 1000, 1000, 1000] {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                (step_ms / 2..=step_ms).contains(&d),
                "step {step_ms}ms gave {d}ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= initial);
    }

    #[test]
    fn delays_are_spread_between_seeds() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10), seed);
                b.next_delay()
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600), 7);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
    }
}
