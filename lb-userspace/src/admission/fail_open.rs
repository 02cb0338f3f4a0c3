//! Failing open: the last word on which backends a service balances over, once health checks
//! and outlier ejection have said which are up.

/// Which backends a service balances over. With `fail_open`, a service whose healthy share is
/// below `panic_threshold` percent (or has no healthy backend at all) uses every configured
/// backend: some will fail, but refusing every connect is worse. Returns (indices, panic).
pub fn select(healthy: &[bool], fail_open: bool, panic_threshold: u8) -> (Vec<usize>, bool) {
    let total = healthy.len();
    let up: Vec<usize> = (0..total).filter(|&i| healthy[i]).collect();
    let below = up.is_empty() || up.len() * 100 < usize::from(panic_threshold) * total;
    if total > 0 && fail_open && below {
        ((0..total).collect(), true)
    } else {
        (up, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_healthy_backends_only() {
        assert_eq!(select(&[true, false, true], true, 0), (vec![0, 2], false));
        assert_eq!(select(&[true, false, true], false, 0), (vec![0, 2], false));
    }

    #[test]
    fn all_down_fails_open_only_when_allowed() {
        assert_eq!(select(&[false, false], true, 0), (vec![0, 1], true));
        assert_eq!(select(&[false, false], false, 0), (vec![], false));
    }

    #[test]
    fn panic_threshold_edges() {
        // 1 of 4 healthy = 25%: below 26 panics, at 25 does not.
        assert!(select(&[true, false, false, false], true, 26).1);
        assert!(!select(&[true, false, false, false], true, 25).1);
        assert!(!select(&[true, true], true, 100).1);
        assert_eq!(select(&[], true, 100), (vec![], false));
    }
}
