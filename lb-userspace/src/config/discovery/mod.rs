//! `[service.discovery]`: where a service's backends come from when they are not listed in the
//! file. Only the shape of the block is checked here; reaching the source happens at run time.
//! The keys of each kind of source are checked in a module of its own.

mod dns;
mod etcd;
mod consul;

use super::checker::{Checker, Section};
use super::model::{DiscoveryConfig, SourceConfig};
use super::values::{
    check_bool, check_choice, check_duration_or, check_file_path, check_str, one_of, required,
    show, show_duration,
};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;
use toml::{Table, Value};

const KINDS: &[(&str, Kind)] = &[
    ("dns", Kind::Dns),
    ("etcd", Kind::Etcd),
    ("consul", Kind::Consul),
];
const COMMON_KEYS: &[&str] = &[
    "kind",
    "retry_initial",
    "retry_max",
    "allow_loopback_backends",
];
const TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(300);
const RETRY_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3_600);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Dns,
    Etcd,
    Consul,
}

impl Checker {
    pub(super) fn discovery(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
    ) -> Section<DiscoveryConfig> {
        self.table(scope, "discovery", raw).and_then(|table| {
            let kind = required(table.get("kind"), &one_of(KINDS), |v| {
                check_choice(v, KINDS)
            });
            let kind = self.checked(scope, "discovery.kind", kind);
            if let Some(kind) = kind {
                let specific = match kind {
                    Kind::Dns => dns::KEYS,
                    Kind::Etcd => etcd::KEYS,
                    Kind::Consul => consul::KEYS,
                };
                let allowed: Vec<&str> = COMMON_KEYS.iter().chain(specific).copied().collect();
                self.unknown_keys(scope, "discovery.", table, &allowed);
            }
            let retry_initial = table.get("retry_initial");
            let retry_initial =
                check_duration_or(retry_initial, Duration::from_secs(1), RETRY_RANGE);
            let retry_initial = self.checked(scope, "discovery.retry_initial", retry_initial);
            let retry_max = table.get("retry_max");
            let retry_max = check_duration_or(retry_max, Duration::from_secs(30), RETRY_RANGE);
            let retry_max = self.checked(scope, "discovery.retry_max", retry_max);
            let allow_loopback = table.get("allow_loopback_backends");
            let allow_loopback = allow_loopback.map_or(Ok(false), check_bool);
            let allow_loopback =
                self.checked(scope, "discovery.allow_loopback_backends", allow_loopback);
            let retry = [("retry_initial", retry_initial), ("retry_max", retry_max)];
            if !self.in_order(scope, retry) {
                return None;
            }
            let source = match kind? {
                Kind::Dns => self.dns(scope, table).map(SourceConfig::Dns),
                Kind::Etcd => self.etcd(scope, table).map(SourceConfig::Etcd),
                Kind::Consul => self.consul(scope, table).map(SourceConfig::Consul),
            };
            Some(DiscoveryConfig {
                source: source?,
                retry_initial: retry_initial?,
                retry_max: retry_max?,
                allow_loopback_backends: allow_loopback?,
            })
        })
    }

    /// Whether two durations that bound a range, each with its key, are in order (an invalid
    /// bound is already reported); if not, the upper one is reported.
    fn in_order(&mut self, scope: Option<&str>, bounds: [(&str, Option<Duration>); 2]) -> bool {
        let [(lower_key, Some(lower)), (upper_key, Some(upper))] = bounds else {
            return true;
        };
        if lower <= upper {
            return true;
        }
        let message = format!(
            "must not be shorter than discovery.{lower_key} ({}), got {}",
            show_duration(lower),
            show_duration(upper)
        );
        self.report(scope, format!("discovery.{upper_key}"), message);
        false
    }
}

impl Checker {
    /// An optional file named by `discovery.<key>`: `Some(None)` when absent, `None` when
    /// invalid (reported).
    fn discovery_file(
        &mut self,
        scope: Option<&str>,
        table: &Table,
        key: &str,
    ) -> Option<Option<PathBuf>> {
        let path = table.get(key).map(check_file_path).transpose();
        self.checked(scope, &format!("discovery.{key}"), path)
    }

    /// TLS settings mean nothing over plain http: when any of `keys` is given and the source
    /// is not reached over https, `field` (which decides the scheme) is reported, naming them.
    /// True when fine.
    fn tls_needs_https(
        &mut self,
        scope: Option<&str>,
        table: &Table,
        keys: &[&str],
        https: bool,
        (field, what): (&str, &str),
    ) -> bool {
        let given: Vec<String> = keys
            .iter()
            .filter(|key| table.contains_key(**key))
            .map(|key| format!("discovery.{key}"))
            .collect();
        if https || given.is_empty() {
            return true;
        }
        let message = format!(
            "TLS settings are given ({}), so {what} must be https://",
            given.join(", ")
        );
        self.report(scope, field, message);
        false
    }
}

/// `http://host:port` or `https://host:port`, with nothing after the authority; `example`
/// shows one in the error.
fn check_http_url(raw: &Value, example: &str) -> Result<String, String> {
    let url = check_str(raw)?;
    let expected = format!("an http:// or https:// URL such as \"{example}\"");
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let Some(authority) = rest else {
        return Err(format!("expected {expected}, got {}", show(url)));
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let port = authority
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|port| *port != 0);
    let clean = authority
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if port.is_none() || !clean {
        return Err(format!(
            "expected {expected} with a host and a port, got {}",
            show(url)
        ));
    }
    let scheme = if url.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{authority}"))
}

/// The host of a URL `check_http_url` accepted, without brackets around an IPv6 address.
fn url_host(url: &str) -> &str {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Helpers for the tests of each kind of source too.
#[cfg(test)]
mod tests {
    use crate::config::testkit::error_after;
    use crate::config::{parse, parse_with_env, Config, DiscoveryConfig, Env};

    pub(super) fn service(discovery: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n[service.discovery]\n{discovery}\n")
    }

    pub(super) fn ok_with(discovery: &str, env: Env) -> DiscoveryConfig {
        let config: Config = parse_with_env(&service(discovery), "lb.toml", env)
            .unwrap_or_else(|e| panic!("{discovery}: {e}"));
        *config.services[0].discovery.clone().expect("discovery")
    }

    pub(super) fn ok(discovery: &str) -> DiscoveryConfig {
        ok_with(discovery, Env::default())
    }

    /// Each config snippet has exactly one problem, which starts with the expected text after
    /// the file and service prefix.
    pub(super) fn assert_errors(cases: &[(&str, &str)]) {
        for (text, expected) in cases {
            let e = error_after(&service(text), "lb.toml: service \"web\" (service[0]): ");
            assert!(
                e.starts_with(expected),
                "{text}\n got: {e}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn common_errors() {
        let cases = [
            ("name = \"web\"", "discovery.kind: required (\"dns\", \"etcd\" or \"consul\")"),
            ("kind = \"k8s\"", "discovery.kind: must be \"dns\", \"etcd\" or \"consul\""),
            ("kind = \"consul\"\nservice = \"w\"\nretry_initial = \"1m\"\nretry_max = \"1s\"", "discovery.retry_max: must not be shorter than discovery.retry_initial (1m), got 1s"),
            ("kind = \"dns\"\nname = \"a\"\nport = 1\nallow_loopback_backends = \"yes\"", "discovery.allow_loopback_backends: expected a boolean"),
        ];
        assert_errors(&cases);
    }

    #[test]
    fn loopback_backends_are_off_unless_allowed() {
        let dns = "kind = \"dns\"\nname = \"web.test\"\nport = 80";
        assert!(!ok(dns).allow_loopback_backends);
        let allowed = ok(&format!("{dns}\nallow_loopback_backends = true"));
        assert!(allowed.allow_loopback_backends);
    }

    #[test]
    fn backends_and_discovery_are_exclusive() {
        let text = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nbackends = []\n\
                    [service.discovery]\nkind = \"consul\"\nservice = \"web\"\n";
        let e = parse(text, "lb.toml").expect_err("both").to_string();
        assert!(
            e.contains("backends: not allowed together with [service.discovery]"),
            "{e}"
        );
        let text = "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\ndiscovery = 1\n";
        let e = parse(text, "lb.toml").expect_err("not a table").to_string();
        assert!(
            e.contains("discovery: expected a table, got integer 1"),
            "{e}"
        );
    }
}
