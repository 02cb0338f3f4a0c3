//! `kind = "consul"`: backends from the healthy instances of a service in Consul's catalog.

use super::{check_http_url, TIMEOUT_RANGE};
use crate::config::checker::Checker;
use crate::config::model::ConsulConfig;
use crate::config::values::{check_duration_or, check_file_path, check_text, required, show};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::{Table, Value};

pub(super) const KEYS: &[&str] = &[
    "address",
    "service",
    "datacenter",
    "tag",
    "token_file",
    "wait",
    "timeout",
];
const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";
/// Consul caps blocking queries at 10 minutes.
const WAIT_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(600);

impl Checker {
    pub(super) fn consul(&mut self, scope: Option<&str>, table: &Table) -> Option<ConsulConfig> {
        let address = match (table.get("address"), &self.env.consul_addr) {
            (Some(v), _) => check_http_url(v, false),
            (None, Some(from_env)) => {
                // Consul's own tools accept a bare host:port here.
                let value = if from_env.contains("://") {
                    Value::String(from_env.clone())
                } else {
                    Value::String(format!("http://{from_env}"))
                };
                check_http_url(&value, false).map_err(|m| format!("from CONSUL_HTTP_ADDR: {m}"))
            }
            (None, None) => Ok(DEFAULT_ADDRESS.to_owned()),
        };
        let address = self.checked(scope, "discovery.address", address);
        let service = required(
            table.get("service"),
            "the Consul service name",
            check_consul_name,
        );
        let service = self.checked(scope, "discovery.service", service);
        let datacenter = table.get("datacenter").map(check_consul_name).transpose();
        let datacenter = self.checked(scope, "discovery.datacenter", datacenter);
        let tag = table.get("tag").map(check_consul_name).transpose();
        let tag = self.checked(scope, "discovery.tag", tag);
        let token_file = table.get("token_file").map(check_file_path).transpose();
        let token_file = self.checked(scope, "discovery.token_file", token_file);
        let wait = check_duration_or(table.get("wait"), Duration::from_secs(300), WAIT_RANGE);
        let wait = self.checked(scope, "discovery.wait", wait);
        let timeout = table.get("timeout");
        let timeout = check_duration_or(timeout, Duration::from_secs(5), TIMEOUT_RANGE);
        let timeout = self.checked(scope, "discovery.timeout", timeout);
        Some(ConsulConfig {
            address: address?,
            service: service?,
            datacenter: datacenter?,
            tag: tag?,
            token_file: token_file?,
            wait: wait?,
            timeout: timeout?,
        })
    }
}

/// Consul service, tag and datacenter names travel in a URL: keep them to URL-safe characters.
fn check_consul_name(raw: &Value) -> Result<String, String> {
    let name = check_text(raw)?;
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{} contains {bad:?}; only ASCII letters, digits, '-', '_' and '.' are allowed",
            show(name)
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::discovery::tests::{assert_errors, ok, ok_with};
    use crate::config::{Env, SourceConfig};

    #[test]
    fn consul_defaults_and_options() {
        let d = ok("kind = \"consul\"\nservice = \"web\"");
        let SourceConfig::Consul(c) = d.source else {
            panic!("not consul")
        };
        assert_eq!(c.address, DEFAULT_ADDRESS);
        assert_eq!(c.wait, Duration::from_secs(300));
        let env = Env {
            etcd_endpoints: None,
            consul_addr: Some("127.0.0.1:18500".into()),
        };
        let d = ok_with(
            "kind = \"consul\"\nservice = \"web\"\ndatacenter = \"dc2\"\ntag = \"v2\"\n\
                         token_file = \"/run/token\"\nwait = \"30s\"",
            env,
        );
        let SourceConfig::Consul(c) = d.source else {
            panic!("not consul")
        };
        assert_eq!(c.address, "http://127.0.0.1:18500");
        assert_eq!(c.datacenter.as_deref(), Some("dc2"));
        assert_eq!(c.tag.as_deref(), Some("v2"));
        assert_eq!(c.wait, Duration::from_secs(30));
    }

    #[test]
    fn consul_errors_name_the_field() {
        let cases = [
            ("kind = \"consul\"", "discovery.service: required"),
            (
                "kind = \"consul\"\nservice = \"web/../x\"",
                "discovery.service: \"web/../x\" contains '/'",
            ),
            (
                "kind = \"consul\"\nservice = \"web\"\naddress = \"https://c:8501\"",
                "discovery.address: expected an http:// URL",
            ),
            (
                "kind = \"consul\"\nservice = \"web\"\nwait = \"11m\"",
                "discovery.wait: must be between 1s and 10m",
            ),
            (
                "kind = \"consul\"\nservice = \"web\"\ntag = \"\"",
                "discovery.tag: must not be empty",
            ),
        ];
        assert_errors(&cases);
    }
}
