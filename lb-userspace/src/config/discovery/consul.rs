//! `kind = "consul"`: backends from the healthy instances of a service in Consul's catalog.

use super::{check_http_url, url_host, TIMEOUT_RANGE};
use crate::config::checker::Checker;
use crate::config::model::ConsulConfig;
use crate::config::values::{check_duration_or, check_text, required, show};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::{Table, Value};

pub(super) const KEYS: &[&str] = &[
    "address",
    "service",
    "datacenter",
    "tag",
    "token_file",
    "ca_file",
    "tls_server_name",
    "wait",
    "timeout",
];
const DEFAULT_ADDRESS: &str = "http://127.0.0.1:8500";
const TLS_KEYS: &[&str] = &["ca_file", "tls_server_name"];
/// Consul caps blocking queries at 10 minutes.
const WAIT_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(600);

impl Checker {
    pub(super) fn consul(&mut self, scope: Option<&str>, table: &Table) -> Option<ConsulConfig> {
        let address = match (table.get("address"), &self.env.consul_addr) {
            (Some(v), _) => check_http_url(v, DEFAULT_ADDRESS),
            (None, Some(from_env)) => {
                // Consul's own tools accept a bare host:port here.
                let value = if from_env.contains("://") {
                    Value::String(from_env.clone())
                } else {
                    Value::String(format!("http://{from_env}"))
                };
                check_http_url(&value, DEFAULT_ADDRESS)
                    .map_err(|m| format!("from CONSUL_HTTP_ADDR: {m}"))
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
        let token_file = self.discovery_file(scope, table, "token_file");
        let ca_file = self.discovery_file(scope, table, "ca_file");
        let server_name = table
            .get("tls_server_name")
            .map(check_server_name)
            .transpose();
        let server_name = self.checked(scope, "discovery.tls_server_name", server_name);
        let wait = check_duration_or(table.get("wait"), Duration::from_secs(300), WAIT_RANGE);
        let wait = self.checked(scope, "discovery.wait", wait);
        let timeout = table.get("timeout");
        let timeout = check_duration_or(timeout, Duration::from_secs(5), TIMEOUT_RANGE);
        let timeout = self.checked(scope, "discovery.timeout", timeout);
        let address = address?;
        let https = address.starts_with("https://");
        let field = ("discovery.address", "the address");
        if !self.tls_needs_https(scope, table, TLS_KEYS, https, field) {
            return None;
        }
        let (ca_file, server_name) = (ca_file?, server_name?);
        if https && ca_file.is_none() {
            let message = "required with an https:// address: the CA bundle (PEM) that the \
                           Consul agent's certificate chains to";
            self.report(scope, "discovery.ca_file", message);
            return None;
        }
        if https && server_name.is_none() {
            if let Err(m) = check_server_name(&Value::String(url_host(&address).to_owned())) {
                let message =
                    format!("{m}; set discovery.tls_server_name to the certificate's name");
                self.report(scope, "discovery.address", message);
                return None;
            }
        }
        let token_file = token_file?;
        if !https && !is_loopback_host(url_host(&address)) {
            let token = match (&token_file, self.env.consul_token_set) {
                (Some(_), _) => Some(("discovery.token_file", "the token")),
                (None, true) => Some(("discovery.address", "CONSUL_HTTP_TOKEN")),
                (None, false) => None,
            };
            if let Some((field, what)) = token {
                let message = format!(
                    "{what} would travel in clear text to {address}, which is not a loopback \
                     address; use an https:// address (with discovery.ca_file) or a Consul \
                     agent on this node"
                );
                self.report(scope, field, message);
                return None;
            }
        }
        Some(ConsulConfig {
            address,
            ca_file,
            tls_server_name: server_name,
            service: service?,
            datacenter: datacenter?,
            tag: tag?,
            token_file,
            wait: wait?,
            timeout: timeout?,
        })
    }
}

/// A name TLS can check a certificate against: a DNS name or an IP address.
fn check_server_name(raw: &Value) -> Result<String, String> {
    let name = check_text(raw)?;
    rustls::pki_types::ServerName::try_from(name)
        .map_err(|_| format!("{} is not a DNS name or an IP address", show(name)))?;
    Ok(name.to_owned())
}

/// Plain http stays on the node only to a loopback address (or `localhost`).
fn is_loopback_host(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
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
    use crate::config::discovery::tests::{assert_errors, ok, ok_with, service};
    use crate::config::{parse_with_env, Env, SourceConfig};

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
            ..Env::default()
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
                "kind = \"consul\"\nservice = \"web\"\naddress = \"ftp://c:8501\"",
                "discovery.address: expected an http:// or https:// URL",
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

    #[test]
    fn https_needs_a_ca_file_and_tls_settings_need_https() {
        let web = "kind = \"consul\"\nservice = \"web\"\n";
        let d = ok(&format!(
            "{web}address = \"https://10.0.0.5:8501\"\nca_file = \"/etc/lb/consul-ca.pem\"\n\
             tls_server_name = \"server.dc1.consul\"\ntoken_file = \"/run/token\""
        ));
        let SourceConfig::Consul(c) = d.source else {
            panic!("not consul")
        };
        assert_eq!(c.address, "https://10.0.0.5:8501");
        assert_eq!(c.ca_file.unwrap().to_str(), Some("/etc/lb/consul-ca.pem"));
        assert_eq!(c.tls_server_name.as_deref(), Some("server.dc1.consul"));
        let cases = [
            (format!("{web}address = \"https://c:8501\""), "discovery.ca_file: required with an https:// address"),
            (format!("{web}ca_file = \"/ca.pem\""), "discovery.address: TLS settings are given (discovery.ca_file), so the address must be https://"),
            (format!("{web}address = \"http://c:8500\"\ntls_server_name = \"c\""), "discovery.address: TLS settings are given (discovery.tls_server_name), so the address"),
            (format!("{web}address = \"https://c:8501\"\nca_file = \"ca.pem\""), "discovery.ca_file: must be an absolute path"),
            (format!("{web}address = \"https://c:8501\"\nca_file = \"/ca.pem\"\ntls_server_name = \"a b\""), "discovery.tls_server_name: \"a b\" is not a DNS name or an IP address"),
        ];
        let cases: Vec<(&str, &str)> = cases.iter().map(|(t, e)| (t.as_str(), *e)).collect();
        assert_errors(&cases);
    }

    #[test]
    fn a_token_never_goes_in_clear_text_off_the_node() {
        let web = "kind = \"consul\"\nservice = \"web\"\ntoken_file = \"/run/token\"\n";
        for local in [
            "http://127.0.0.1:8500",
            "http://127.9.0.1:8500",
            "http://[::1]:8500",
            "http://localhost:8500",
            "http://[::ffff:127.0.0.1]:8500",
        ] {
            ok(&format!("{web}address = \"{local}\""));
        }
        ok(&format!(
            "{web}address = \"https://10.0.0.5:8501\"\nca_file = \"/ca.pem\""
        ));
        let cases = [
            (format!("{web}address = \"http://10.0.0.5:8500\""), "discovery.token_file: the token would travel in clear text to http://10.0.0.5:8500, which is not a loopback address; use an https:// address"),
            (format!("{web}address = \"http://consul.internal:8500\""), "discovery.token_file: the token would travel in clear text"),
            (format!("{web}address = \"http://[fe80::1]:8500\""), "discovery.token_file: the token would travel in clear text"),
        ];
        let cases: Vec<(&str, &str)> = cases.iter().map(|(t, e)| (t.as_str(), *e)).collect();
        assert_errors(&cases);
        // CONSUL_HTTP_TOKEN, sent when there is no token_file, follows the same rule.
        let env = || Env {
            consul_addr: Some("10.0.0.5:8500".into()),
            consul_token_set: true,
            ..Env::default()
        };
        let text = service("kind = \"consul\"\nservice = \"web\"");
        let e = parse_with_env(&text, "lb.toml", env())
            .expect_err("token in clear")
            .to_string();
        assert!(e.contains("discovery.address: CONSUL_HTTP_TOKEN would travel in clear text to http://10.0.0.5:8500"), "{e}");
        let local = Env {
            consul_addr: Some("127.0.0.1:8500".into()),
            ..env()
        };
        parse_with_env(&text, "lb.toml", local).expect("loopback");
        let no_token = Env {
            consul_token_set: false,
            ..env()
        };
        parse_with_env(&text, "lb.toml", no_token).expect("no token, no secret to leak");
    }
}
