//! Pure health state machine: HAProxy-style hysteresis. A healthy backend turns unhealthy after
//! `fall` consecutive failed probes, an unhealthy one healthy after `rise` consecutive passes;
//! anything in between changes only the counters, so one flapping probe moves nothing.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
}

impl HealthState {
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy,
            consecutive_ok: 0,
            consecutive_fail: 0,
        }
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.consecutive_ok = self.consecutive_ok.saturating_add(1);
            self.consecutive_fail = 0;
            if !self.healthy && self.consecutive_ok >= rise {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.consecutive_fail = self.consecutive_fail.saturating_add(1);
            self.consecutive_ok = 0;
            if self.healthy && self.consecutive_fail >= fall {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: &mut HealthState, results: &[bool], rise: u32, fall: u32) -> Vec<Option<bool>> {
        results
            .iter()
            .map(|ok| state.record(*ok, rise, fall))
            .collect()
    }

    #[test]
    fn falls_after_exactly_fall_failures() {
        let mut s = HealthState::new(true);
        assert_eq!(
            run(&mut s, &[false, false, false], 2, 3),
            [None, None, Some(false)]
        );
        assert!(!s.healthy);
        assert_eq!(
            run(&mut s, &[false], 2, 3),
            [None],
            "no repeated transition"
        );
    }

    #[test]
    fn rises_after_exactly_rise_successes() {
        let mut s = HealthState::new(false);
        assert_eq!(run(&mut s, &[true, true], 2, 3), [None, Some(true)]);
        assert_eq!(run(&mut s, &[true], 2, 3), [None]);
    }

    #[test]
    fn flapping_below_the_thresholds_changes_nothing() {
        let mut s = HealthState::new(true);
        let flaps = [false, false, true, false, false, true, false, false, true];
        assert!(run(&mut s, &flaps, 2, 3).iter().all(Option::is_none));
        assert!(s.healthy);
        let mut d = HealthState::new(false);
        assert!(run(&mut d, &[true, false, true, false], 2, 3)
            .iter()
            .all(Option::is_none));
        assert!(!d.healthy);
    }

    #[test]
    fn rise_and_fall_of_one_react_to_each_probe() {
        let mut s = HealthState::new(true);
        assert_eq!(
            run(&mut s, &[false, true, false], 1, 1),
            [Some(false), Some(true), Some(false)]
        );
    }

    #[test]
    fn a_timeout_is_a_failure_like_any_other() {
        // The prober reports timeouts as failures; the machine only sees the boolean.
        let mut s = HealthState::new(true);
        assert_eq!(run(&mut s, &[false, false], 2, 2), [None, Some(false)]);
        assert_eq!((s.consecutive_ok, s.consecutive_fail), (0, 2));
    }
}
