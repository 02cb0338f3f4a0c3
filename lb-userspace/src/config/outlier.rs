//! `[service.outlier]`: passive outlier detection, Envoy's semantics applied to connect
//! outcomes the kernel observes. A backend is ejected after `consecutive_failures` failed
//! connects in a row, or when failures exceed `failure_percentage` of at least `min_requests`
//! connects within one `interval`; it comes back after `base_ejection_time` × the number of
//! times it was ejected (at most `max_ejection_time`). At most `max_ejection_percent` of a
//! service's backends are ejected at once (at least one may always be).

use super::{check_between, check_duration, check_integer, type_error, Checker, Protocol};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// 0 turns the rule off.
    pub consecutive_failures: u32,
    /// 0 turns the rule off.
    pub failure_percentage: u8,
    pub min_requests: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u8,
}

const KEYS: &[&str] = &[
    "consecutive_failures",
    "failure_percentage",
    "min_requests",
    "interval",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
];
const TIME_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);

impl Checker {
    /// `Some(None)` without an `[service.outlier]` table, `None` when it is invalid.
    pub(super) fn outlier(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
        protocol: Option<Protocol>,
    ) -> Option<Option<OutlierConfig>> {
        let table = match raw {
            None => return Some(None),
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.report(scope, "outlier", type_error("a table", other));
                return None;
            }
        };
        if protocol == Some(Protocol::Udp) {
            let message = "only for TCP services: connect outcomes are what it observes";
            self.report(scope, "outlier", message);
        }
        self.unknown_keys(scope, "outlier.", table, KEYS);
        let int = |key: &str, default: u32, range: RangeInclusive<u32>| {
            table
                .get(key)
                .map_or(Ok(default), |v| check_integer(v, range))
        };
        let time = |key: &str, default: u64| {
            table
                .get(key)
                .map_or(Ok(Duration::from_secs(default)), |v| {
                    check_duration(v).and_then(|d| check_between(d, TIME_RANGE))
                })
        };
        let consecutive = int("consecutive_failures", 5, 0..=1000);
        let consecutive = self.checked(scope, "outlier.consecutive_failures", consecutive);
        let percentage = int("failure_percentage", 0, 0..=100);
        let percentage = self.checked(scope, "outlier.failure_percentage", percentage);
        let min_requests = int("min_requests", 5, 1..=1_000_000);
        let min_requests = self.checked(scope, "outlier.min_requests", min_requests);
        let interval = self.checked(scope, "outlier.interval", time("interval", 10));
        let base = time("base_ejection_time", 30);
        let base = self.checked(scope, "outlier.base_ejection_time", base);
        let max = self.checked(
            scope,
            "outlier.max_ejection_time",
            time("max_ejection_time", 300),
        );
        let max_percent = int("max_ejection_percent", 10, 0..=100);
        let max_percent = self.checked(scope, "outlier.max_ejection_percent", max_percent);
        if let (Some(base), Some(max)) = (base, max) {
            if max < base {
                let message = "must not be shorter than base_ejection_time";
                self.report(scope, "outlier.max_ejection_time", message);
                return None;
            }
        }
        if (consecutive, percentage) == (Some(0), Some(0)) {
            let message = "consecutive_failures and failure_percentage are both 0: nothing \
                           would ever be ejected (remove the block instead)";
            self.report(scope, "outlier", message);
            return None;
        }
        Some(Some(OutlierConfig {
            consecutive_failures: consecutive?,
            failure_percentage: u8::try_from(percentage?).ok()?,
            min_requests: min_requests?,
            interval: interval?,
            base_ejection_time: base?,
            max_ejection_time: max?,
            max_ejection_percent: u8::try_from(max_percent?).ok()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn service(extra: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\nbackends = []\n{extra}\n")
    }

    #[test]
    fn defaults_follow_envoy() {
        let c = parse(&service("[service.outlier]"), "t").unwrap();
        let o = c.services[0].outlier.clone().unwrap();
        assert_eq!(o.consecutive_failures, 5);
        assert_eq!(o.failure_percentage, 0);
        assert_eq!(o.base_ejection_time, Duration::from_secs(30));
        assert_eq!(o.max_ejection_percent, 10);
        assert!(parse(&service(""), "t").unwrap().services[0]
            .outlier
            .is_none());
    }

    #[test]
    fn names_the_field_and_the_problem() {
        let cases = [
            (
                "consecutive_failures = -1",
                "outlier.consecutive_failures: must be between 0 and 1000",
            ),
            (
                "failure_percentage = 101",
                "outlier.failure_percentage: must be between 0 and 100",
            ),
            (
                "base_ejection_time = \"10\"",
                "outlier.base_ejection_time: expected a duration",
            ),
            (
                "base_ejection_time = \"60s\"\nmax_ejection_time = \"30s\"",
                "outlier.max_ejection_time: must not be shorter",
            ),
            ("consecutive_failures = 0", "nothing would ever be ejected"),
            (
                "interval = \"1ms\"",
                "outlier.interval: must be between 100ms and 24h",
            ),
            ("eject = true", "outlier.eject: unknown key"),
        ];
        for (body, expected) in cases {
            let e = parse(&service(&format!("[service.outlier]\n{body}")), "t").unwrap_err();
            assert!(e.to_string().contains(expected), "{body}: {e}");
        }
        let udp = service("protocol = \"udp\"\n[service.outlier]");
        let e = parse(&udp, "t").unwrap_err().to_string();
        assert!(e.contains("outlier: only for TCP services"), "{e}");
    }
}
