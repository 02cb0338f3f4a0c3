//! `[service.outlier]`: passive outlier detection (its semantics are on `OutlierConfig`).

use super::checker::{Checker, Section};
use super::model::{OutlierConfig, Protocol};
use super::values::{check_duration_or, check_integer};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::Value;

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
    pub(super) fn outlier(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
        protocol: Option<Protocol>,
    ) -> Section<OutlierConfig> {
        self.table(scope, "outlier", raw).and_then(|table| {
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
                check_duration_or(table.get(key), Duration::from_secs(default), TIME_RANGE)
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
            Some(OutlierConfig {
                consecutive_failures: consecutive?,
                failure_percentage: u8::try_from(percentage?).ok()?,
                min_requests: min_requests?,
                interval: interval?,
                base_ejection_time: base?,
                max_ejection_time: max?,
                max_ejection_percent: u8::try_from(max_percent?).ok()?,
            })
        })
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
