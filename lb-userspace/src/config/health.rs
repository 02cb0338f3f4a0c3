//! `[service.health]`: active health checks, a TCP connect or an HTTP request per backend.

use super::checker::{Checker, Section};
use super::model::{HealthConfig, InitialState, ProbeKind};
use super::values::{
    check_choice, check_duration, check_duration_or, check_integer, check_str, offenders, one_of,
    required, show, show_duration,
};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::{Table, Value};

const KEYS: &[&str] = &[
    "kind",
    "port",
    "path",
    "expect_status",
    "interval",
    "timeout",
    "rise",
    "fall",
    "jitter",
    "initial",
];
/// `true` for HTTP: the path and status of `ProbeKind::Http` are read separately.
const PROBE_KINDS: &[(&str, bool)] = &[("tcp", false), ("http", true)];
const INITIAL_STATES: &[(&str, InitialState)] = &[
    ("healthy", InitialState::Healthy),
    ("unhealthy", InitialState::Unhealthy),
];

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3_600);
/// Consecutive probe results needed to flip a backend's state (`rise` and `fall`).
const THRESHOLD_RANGE: RangeInclusive<u32> = 1..=100;
const MAX_HTTP_PATH_LEN: usize = 1_024;

impl Checker {
    pub(super) fn health(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
    ) -> Section<HealthConfig> {
        self.table(scope, "health", raw).and_then(|table| {
            self.unknown_keys(scope, "health.", table, KEYS);
            let http = required(table.get("kind"), &one_of(PROBE_KINDS), |v| {
                check_choice(v, PROBE_KINDS)
            });
            let http = self.checked(scope, "health.kind", http);
            let port = table
                .get("port")
                .map(|v| check_integer(v, 1..=u16::MAX))
                .transpose();
            let port = self.checked(scope, "health.port", port);
            let path = self.http_only(scope, table, "path", http, "/".to_owned(), check_http_path);
            let expect_status = self.http_only(scope, table, "expect_status", http, None, |v| {
                check_integer(v, 100..=599).map(Some)
            });
            let interval = table.get("interval");
            let interval = check_duration_or(interval, DEFAULT_INTERVAL, INTERVAL_RANGE);
            let interval = self.checked(scope, "health.interval", interval);
            let timeout = table.get("timeout").map_or(Ok(DEFAULT_TIMEOUT), |v| {
                let timeout = check_duration(v)?;
                if timeout.is_zero() {
                    return Err("must be longer than 0ms".to_owned());
                }
                Ok(timeout)
            });
            let timeout = self.checked(scope, "health.timeout", timeout);
            let timeout = self.shorter_than_interval(scope, table, "timeout", timeout, interval);
            let jitter = match table.get("jitter") {
                None => interval.map(|i| i / 10),
                Some(v) => self.checked(scope, "health.jitter", check_duration(v)),
            };
            let jitter = self.shorter_than_interval(scope, table, "jitter", jitter, interval);
            let threshold = |key, default| {
                let raw = table.get(key);
                raw.map_or(Ok(default), |v| check_integer(v, THRESHOLD_RANGE))
            };
            let rise = self.checked(scope, "health.rise", threshold("rise", 2));
            let fall = self.checked(scope, "health.fall", threshold("fall", 3));
            let initial = table.get("initial").map_or(Ok(InitialState::Healthy), |v| {
                check_choice(v, INITIAL_STATES)
            });
            let initial = self.checked(scope, "health.initial", initial);
            let kind = if http? {
                ProbeKind::Http {
                    path: path?,
                    expect_status: expect_status?,
                }
            } else {
                ProbeKind::Tcp
            };
            Some(HealthConfig {
                kind,
                port: port?,
                interval: interval?,
                timeout: timeout?,
                rise: rise?,
                fall: fall?,
                jitter: jitter?,
                initial: initial?,
            })
        })
    }

    /// An HTTP-only key, checked, or `default` when absent. Given for a TCP probe, which would
    /// silently ignore it, it is reported instead.
    fn http_only<T>(
        &mut self,
        scope: Option<&str>,
        table: &Table,
        key: &str,
        http: Option<bool>,
        default: T,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let field = format!("health.{key}");
        match table.get(key) {
            Some(_) if http == Some(false) => {
                self.report(scope, field, "only valid with kind = \"http\"");
                None
            }
            value => {
                let value = value.map_or(Ok(default), check);
                self.checked(scope, &field, value)
            }
        }
    }

    /// `value` unless it is not shorter than a valid `interval`, which is reported.
    fn shorter_than_interval(
        &mut self,
        scope: Option<&str>,
        table: &Table,
        key: &str,
        value: Option<Duration>,
        interval: Option<Duration>,
    ) -> Option<Duration> {
        let (value, interval) = match (value, interval) {
            (Some(value), Some(interval)) if value >= interval => (value, interval),
            _ => return value,
        };
        let default = if table.contains_key(key) {
            ""
        } else {
            " (the default)"
        };
        let message = format!(
            "must be shorter than health.interval ({}), got {}{default}",
            show_duration(interval),
            show_duration(value)
        );
        self.report(scope, format!("health.{key}"), message);
        None
    }
}

/// An HTTP path sent verbatim in the probe's request line.
fn check_http_path(raw: &Value) -> Result<String, String> {
    let path = check_str(raw)?;
    if !path.starts_with('/') {
        return Err(format!("must start with '/', got {}", show(path)));
    }
    if let Some(bad) = offenders(path, |c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} contains {bad}; spaces and control characters are not allowed",
            show(path)
        ));
    }
    if path.len() > MAX_HTTP_PATH_LEN {
        return Err(format!(
            "{} is {} bytes long, at most {MAX_HTTP_PATH_LEN} allowed",
            show(path),
            path.len()
        ));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testkit::{
        addr, errors, health_error, service_error, single, web_with, ORIGIN,
    };
    use crate::config::values::DURATION_FORMS;
    use crate::config::{parse, BackendConfig, Protocol, ServiceConfig};

    /// The `health` of service "web" with the given inline-table body.
    fn health(body: &str) -> Option<HealthConfig> {
        let text = web_with(&format!("health = {{ {body} }}"));
        parse(&text, ORIGIN).unwrap().services[0]
            .health
            .clone()
            .map(|h| *h)
    }

    fn tcp_defaults() -> HealthConfig {
        HealthConfig {
            kind: ProbeKind::Tcp,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            jitter: Duration::from_millis(200),
            initial: InitialState::Healthy,
        }
    }

    #[test]
    fn parses_every_health_and_fail_open_field() {
        let text = r#"
            [[service]]
            name = "plain"
            vip = "10.96.0.9:80"
            backends = []

            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = ["10.0.0.11:8080"]
            fail_open = false
            panic_threshold = 50

            [service.health]
            kind = "http"
            port = 8081
            path = "/healthz?full=1"
            expect_status = 204
            interval = "1s"
            timeout = "500ms"
            rise = 4
            fall = 5
            jitter = "100ms"
            initial = "unhealthy"
        "#;
        let config = parse(text, ORIGIN).unwrap();
        // `[service.health]` belongs to the last `[[service]]` only.
        let plain = &config.services[0];
        assert_eq!(
            (&plain.health, plain.fail_open, plain.panic_threshold),
            (&None, true, 0)
        );
        let expected = ServiceConfig {
            name: "web".into(),
            vip: addr("10.96.0.10:80"),
            protocol: Protocol::Tcp,
            backends: vec![BackendConfig {
                address: addr("10.0.0.11:8080"),
                weight: 1,
            }]
            .into(),
            health: Some(Box::new(HealthConfig {
                kind: ProbeKind::Http {
                    path: "/healthz?full=1".into(),
                    expect_status: Some(204),
                },
                port: Some(8081),
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 4,
                fall: 5,
                jitter: Duration::from_millis(100),
                initial: InitialState::Unhealthy,
            })),
            fail_open: false,
            panic_threshold: 50,
            terminate: Default::default(),
            discovery: None,
            balancing: Default::default(),
            outlier: None,
            rebalance: None,
        };
        assert_eq!(config.services[1], expected);
    }

    #[test]
    fn minimal_health_table_gets_defaults() {
        assert_eq!(health("kind = \"tcp\""), Some(tcp_defaults()));
        let http = HealthConfig {
            kind: ProbeKind::Http {
                path: "/".into(),
                expect_status: None,
            },
            ..tcp_defaults()
        };
        assert_eq!(health("kind = \"http\""), Some(http));
        // The default jitter follows the interval.
        let h = health("kind = \"tcp\", interval = \"5s\"").unwrap();
        assert_eq!(h.jitter, Duration::from_millis(500));
        let h = health("kind = \"tcp\", interval = \"15ms\", timeout = \"10ms\"").unwrap();
        assert_eq!(h.jitter, Duration::from_micros(1_500));
    }

    #[test]
    fn table_and_inline_health_forms_are_equal() {
        let body = "kind = \"http\"\npath = \"/ready\"\nport = 9000\nrise = 1";
        let table = format!(
            "{}[service.health]\n{body}\n",
            web_with("protocol = \"tcp\"")
        );
        let inline = web_with(&format!("health = {{ {} }}", body.replace('\n', ", ")));
        let (table, inline) = (
            parse(&table, ORIGIN).unwrap(),
            parse(&inline, ORIGIN).unwrap(),
        );
        assert_eq!(table, inline);
        let h = table.services[0].health.as_ref().unwrap();
        assert_eq!(h.port, Some(9000));
        assert_eq!(h.rise, 1);
        assert_eq!(
            h.kind,
            ProbeKind::Http {
                path: "/ready".into(),
                expect_status: None
            }
        );
    }

    #[test]
    fn health_error_matches_the_documented_format() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = ["10.0.0.11:8080"]
            [service.health]
            kind = "tcp"
            interval = "1s"
            timeout = "2s"
        "#;
        assert_eq!(
            single(text),
            "lb.toml: service \"web\" (service[0]): health.timeout: \
             must be shorter than health.interval (1s), got 2s"
        );
    }

    #[test]
    fn health_must_be_a_table() {
        assert_eq!(
            service_error("health = \"tcp\""),
            "health: expected a table, got string \"tcp\""
        );
        let text = format!(
            "{}[[service.health]]\nkind = \"tcp\"\n",
            web_with("protocol = \"tcp\"")
        );
        assert_eq!(
            single(&text),
            "lb.toml: service \"web\" (service[0]): health: expected a table, got array"
        );
    }

    #[test]
    fn unknown_health_key_lists_allowed_keys() {
        assert_eq!(
            health_error("kind = \"tcp\", intreval = \"1s\""),
            "health.intreval: unknown key (allowed: kind, port, path, expect_status, interval, \
             timeout, rise, fall, jitter, initial)"
        );
    }

    #[test]
    fn health_kind_is_required_and_checked() {
        assert_eq!(
            health_error("port = 80"),
            "health.kind: required (\"tcp\" or \"http\")"
        );
        for kind in ["TCP", "https", "grpc", ""] {
            assert_eq!(
                health_error(&format!("kind = \"{kind}\"")),
                format!("health.kind: must be \"tcp\" or \"http\", got \"{kind}\"")
            );
        }
        assert_eq!(
            health_error("kind = 1"),
            "health.kind: expected \"tcp\" or \"http\", got integer 1"
        );
    }

    #[test]
    fn http_only_fields_are_rejected_for_tcp() {
        assert_eq!(
            health_error("kind = \"tcp\", path = \"/healthz\""),
            "health.path: only valid with kind = \"http\""
        );
        assert_eq!(
            health_error("kind = \"tcp\", expect_status = 200"),
            "health.expect_status: only valid with kind = \"http\""
        );
        let e = errors(&web_with(
            "health = { kind = \"tcp\", path = \"/\", expect_status = 200 }",
        ));
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn health_port_bounds() {
        for port in [0, -1, 65_536] {
            assert_eq!(
                health_error(&format!("kind = \"tcp\", port = {port}")),
                format!("health.port: must be between 1 and 65535, got {port}")
            );
        }
        assert_eq!(
            health_error("kind = \"tcp\", port = \"80\""),
            "health.port: expected an integer, got string \"80\""
        );
        for port in [1, 65_535] {
            let h = health(&format!("kind = \"tcp\", port = {port}")).unwrap();
            assert_eq!(h.port, Some(port));
        }
    }

    #[test]
    fn http_path_is_checked() {
        let http = |path: &str| health_error(&format!("kind = \"http\", path = {path:?}"));
        assert_eq!(
            http("healthz"),
            "health.path: must start with '/', got \"healthz\""
        );
        assert_eq!(http(""), "health.path: must start with '/', got \"\"");
        assert_eq!(
            http("/a b"),
            "health.path: \"/a b\" contains ' '; spaces and control characters are not allowed"
        );
        assert_eq!(
            http("/a\tb\r\nHost: x"),
            "health.path: \"/a\\tb\\r\\nHost: x\" contains '\\t', '\\r', '\\n', ' '; \
             spaces and control characters are not allowed"
        );
        let long = format!("/{}", "a".repeat(MAX_HTTP_PATH_LEN));
        let e = http(&long);
        assert!(e.starts_with("health.path: \"/aaa"), "{e}");
        assert!(
            e.ends_with("is 1025 bytes long, at most 1024 allowed"),
            "{e}"
        );
        assert_eq!(
            health_error("kind = \"http\", path = 1"),
            "health.path: expected a string, got integer 1"
        );
        let ok = format!("/{}", "a".repeat(MAX_HTTP_PATH_LEN - 1));
        for path in [ok.as_str(), "/", "/a/b?c=d&e=%20"] {
            let h = health(&format!("kind = \"http\", path = {path:?}")).unwrap();
            let ProbeKind::Http { path: got, .. } = h.kind else {
                panic!("{h:?}")
            };
            assert_eq!(got, path);
        }
    }

    #[test]
    fn http_expect_status_bounds() {
        for status in [0, 99, 600, -200] {
            assert_eq!(
                health_error(&format!("kind = \"http\", expect_status = {status}")),
                format!("health.expect_status: must be between 100 and 599, got {status}")
            );
        }
        assert_eq!(
            health_error("kind = \"http\", expect_status = \"200\""),
            "health.expect_status: expected an integer, got string \"200\""
        );
        for status in [100, 200, 599] {
            let h = health(&format!("kind = \"http\", expect_status = {status}")).unwrap();
            let ProbeKind::Http { expect_status, .. } = h.kind else {
                panic!("{h:?}")
            };
            assert_eq!(expect_status, Some(status));
        }
    }

    #[test]
    fn health_interval_bounds() {
        for interval in ["9ms", "0s", "61m", "2h"] {
            let shown = if interval == "0s" { "0ms" } else { interval };
            assert_eq!(
                health_error(&format!(
                    "kind = \"tcp\", interval = \"{interval}\", timeout = \"1ms\""
                )),
                format!("health.interval: must be between 10ms and 1h, got {shown}")
            );
        }
        for (interval, expected) in [("10ms", 10), ("60m", 3_600_000), ("1h", 3_600_000)] {
            let text = format!("kind = \"tcp\", interval = \"{interval}\", timeout = \"5ms\"");
            let h = health(&text).unwrap();
            assert_eq!(h.interval, Duration::from_millis(expected));
        }
    }

    #[test]
    fn health_timeout_and_jitter_must_be_shorter_than_interval() {
        assert_eq!(
            health_error("kind = \"tcp\", interval = \"1s\", timeout = \"1000ms\""),
            "health.timeout: must be shorter than health.interval (1s), got 1s"
        );
        assert_eq!(
            health_error("kind = \"tcp\", interval = \"500ms\""),
            "health.timeout: must be shorter than health.interval (500ms), got 1s (the default)"
        );
        assert_eq!(
            health_error("kind = \"tcp\", timeout = \"0ms\""),
            "health.timeout: must be longer than 0ms"
        );
        assert_eq!(
            health_error("kind = \"tcp\", jitter = \"2s\""),
            "health.jitter: must be shorter than health.interval (2s), got 2s"
        );
        assert_eq!(
            health_error("kind = \"tcp\", interval = \"1m\", jitter = \"90s\""),
            "health.jitter: must be shorter than health.interval (1m), got 90s"
        );
        let h = health("kind = \"tcp\", interval = \"1s\", timeout = \"999ms\", jitter = \"0s\"");
        let h = h.unwrap();
        assert_eq!(h.timeout, Duration::from_millis(999));
        assert_eq!(h.jitter, Duration::ZERO);
        // An invalid interval is reported alone, not again through timeout and jitter.
        assert_eq!(
            health_error("kind = \"tcp\", interval = \"5ms\", timeout = \"1s\", jitter = \"1s\""),
            "health.interval: must be between 10ms and 1h, got 5ms"
        );
    }

    #[test]
    fn health_rise_and_fall_bounds() {
        for key in ["rise", "fall"] {
            for n in [0, -1, 101, i64::MAX] {
                assert_eq!(
                    health_error(&format!("kind = \"tcp\", {key} = {n}")),
                    format!("health.{key}: must be between 1 and 100, got {n}")
                );
            }
            assert_eq!(
                health_error(&format!("kind = \"tcp\", {key} = 2.0")),
                format!("health.{key}: expected an integer, got float 2")
            );
        }
        let h = health("kind = \"tcp\", rise = 1, fall = 100").unwrap();
        assert_eq!((h.rise, h.fall), (1, 100));
    }

    #[test]
    fn health_initial_state() {
        let h = health("kind = \"tcp\", initial = \"unhealthy\"").unwrap();
        assert_eq!(h.initial, InitialState::Unhealthy);
        let h = health("kind = \"tcp\", initial = \"healthy\"").unwrap();
        assert_eq!(h.initial, InitialState::Healthy);
        for initial in ["up", "Healthy", ""] {
            assert_eq!(
                health_error(&format!("kind = \"tcp\", initial = \"{initial}\"")),
                format!("health.initial: must be \"healthy\" or \"unhealthy\", got \"{initial}\"")
            );
        }
        assert_eq!(
            health_error("kind = \"tcp\", initial = true"),
            "health.initial: expected \"healthy\" or \"unhealthy\", got boolean true"
        );
    }

    #[test]
    fn all_health_problems_are_reported_together() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = []
            fail_open = "no"
            panic_threshold = 101
            [service.health]
            kind = "tcp"
            port = 0
            path = "/x"
            interval = "1s"
            timeout = "1s"
            jitter = "1.5s"
            rise = 0
            fall = 101
            initial = "up"
            typo = 1
        "#;
        let e = errors(text);
        let scope = "lb.toml: service \"web\" (service[0])";
        let expected = [
            "lb.toml: 10 errors".to_owned(),
            format!("{scope}: fail_open: expected a boolean, got string \"no\""),
            format!("{scope}: panic_threshold: must be between 0 and 100, got 101"),
            format!(
                "{scope}: health.typo: unknown key (allowed: kind, port, path, expect_status, \
                 interval, timeout, rise, fall, jitter, initial)"
            ),
            format!("{scope}: health.port: must be between 1 and 65535, got 0"),
            format!("{scope}: health.path: only valid with kind = \"http\""),
            format!("{scope}: health.timeout: must be shorter than health.interval (1s), got 1s"),
            format!("{scope}: health.jitter: expected {DURATION_FORMS}, got string \"1.5s\""),
            format!("{scope}: health.rise: must be between 1 and 100, got 0"),
            format!("{scope}: health.fall: must be between 1 and 100, got 101"),
            format!("{scope}: health.initial: must be \"healthy\" or \"unhealthy\", got \"up\""),
        ];
        assert_eq!(e.to_string(), expected.join("\n"));
    }
}
