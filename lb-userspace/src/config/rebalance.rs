//! `[service.rebalance]`: closing idle pooled connections so that clients reconnect and spread
//! (its semantics are on `RebalanceConfig`).

use super::checker::{Checker, Section};
use super::model::{Protocol, RebalanceConfig};
use super::values::{check_bool, check_duration_in, check_duration_or, check_integer};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::Value;

const KEYS: &[&str] = &[
    "max_connection_age",
    "age_jitter",
    "on_skew",
    "tolerance",
    "idle_after",
    "max_closes_per_second",
];
const AGE_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(604_800);
const IDLE_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3_600);

impl Checker {
    pub(super) fn rebalance(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
        protocol: Option<Protocol>,
    ) -> Section<RebalanceConfig> {
        self.table(scope, "rebalance", raw).and_then(|table| {
            if protocol == Some(Protocol::Udp) {
                let message = "only for TCP services: a connected UDP socket is moved by \
                               terminate_on_removal, an unconnected one re-chooses by itself";
                self.report(scope, "rebalance", message);
            }
            self.unknown_keys(scope, "rebalance.", table, KEYS);
            let age = table
                .get("max_connection_age")
                .map(|v| check_duration_in(v, AGE_RANGE))
                .transpose();
            let age = self.checked(scope, "rebalance.max_connection_age", age);
            let jitter = match (table.get("age_jitter"), age) {
                (Some(_), Some(None)) => {
                    let message = "needs max_connection_age";
                    self.report(scope, "rebalance.age_jitter", message);
                    None
                }
                (raw, Some(Some(age))) => {
                    let jitter = check_duration_or(raw, age / 10, Duration::ZERO..=age / 2);
                    self.checked(scope, "rebalance.age_jitter", jitter)
                }
                _ => Some(Duration::ZERO),
            };
            let on_skew = table.get("on_skew").map_or(Ok(true), check_bool);
            let on_skew = self.checked(scope, "rebalance.on_skew", on_skew);
            let tolerance = table
                .get("tolerance")
                .map_or(Ok(20), |v| check_integer(v, 0..=100));
            let tolerance = self.checked(scope, "rebalance.tolerance", tolerance);
            let idle =
                check_duration_or(table.get("idle_after"), Duration::from_secs(2), IDLE_RANGE);
            let idle = self.checked(scope, "rebalance.idle_after", idle);
            let rate = table
                .get("max_closes_per_second")
                .map_or(Ok(20), |v| check_integer(v, 1..=1000));
            let rate = self.checked(scope, "rebalance.max_closes_per_second", rate);
            if (age, on_skew) == (Some(None), Some(false)) {
                let message = "no max_connection_age and on_skew = false: nothing would ever \
                               be closed (remove the block instead)";
                self.report(scope, "rebalance", message);
                return None;
            }
            Some(RebalanceConfig {
                max_connection_age: age?,
                age_jitter: jitter?,
                on_skew: on_skew?,
                tolerance: u8::try_from(tolerance?).ok()?,
                idle_after: idle?,
                max_closes_per_second: rate?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn service(protocol: &str, extra: &str) -> String {
        format!(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\nprotocol = \"{protocol}\"\n\
             backends = []\n[service.rebalance]\n{extra}\n"
        )
    }

    #[test]
    fn defaults_rebalance_on_skew_only() {
        let c = parse(&service("tcp", ""), "t").unwrap();
        let r = *c.services[0].rebalance.clone().unwrap();
        assert_eq!(r.max_connection_age, None);
        assert!(r.on_skew);
        assert_eq!(r.tolerance, 20);
        assert_eq!(r.idle_after, Duration::from_secs(2));
        assert_eq!(r.max_closes_per_second, 20);
        let aged = parse(&service("tcp", "max_connection_age = \"10m\""), "t").unwrap();
        let r = *aged.services[0].rebalance.clone().unwrap();
        assert_eq!(r.max_connection_age, Some(Duration::from_secs(600)));
        assert_eq!(r.age_jitter, Duration::from_secs(60), "a tenth of the age");
    }

    #[test]
    fn names_the_field_and_the_problem() {
        let cases = [
            (
                "tcp",
                "max_connection_age = \"500ms\"",
                "rebalance.max_connection_age: must be between 1s",
            ),
            (
                "tcp",
                "age_jitter = \"1s\"",
                "rebalance.age_jitter: needs max_connection_age",
            ),
            (
                "tcp",
                "max_connection_age = \"10s\"\nage_jitter = \"6s\"",
                "rebalance.age_jitter: must be between 0ms and 5s",
            ),
            (
                "tcp",
                "tolerance = 101",
                "rebalance.tolerance: must be between 0 and 100",
            ),
            (
                "tcp",
                "idle_after = \"10ms\"",
                "rebalance.idle_after: must be between 100ms",
            ),
            (
                "tcp",
                "max_closes_per_second = 0",
                "rebalance.max_closes_per_second: must be",
            ),
            ("tcp", "on_skew = false", "nothing would ever be closed"),
            ("tcp", "every = \"1s\"", "rebalance.every"),
            ("udp", "", "rebalance: only for TCP services"),
        ];
        for (protocol, extra, want) in cases {
            let err = parse(&service(protocol, extra), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }
}
