//! `kind = "etcd"`: backends from the keys under a prefix, as instances register them.

use super::{check_http_url, TIMEOUT_RANGE};
use crate::config::checker::Checker;
use crate::config::model::EtcdConfig;
use crate::config::values::{check_duration_or, check_text, required, show, type_error};
use std::time::Duration;
use toml::{Table, Value};

pub(super) const KEYS: &[&str] = &[
    "endpoints",
    "prefix",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "timeout",
];
const TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file"];
const MAX_ENDPOINTS: usize = 16;

impl Checker {
    pub(super) fn etcd(&mut self, scope: Option<&str>, table: &Table) -> Option<EtcdConfig> {
        let endpoints = match (table.get("endpoints"), &self.env.etcd_endpoints) {
            (Some(v), _) => check_url_list(v),
            (None, Some(from_env)) => {
                let list = Value::Array(
                    from_env
                        .split(',')
                        .map(|s| Value::String(s.trim().to_owned()))
                        .collect(),
                );
                check_url_list(&list)
                    .map_err(|m| format!("from ETCD_ENDPOINTS={}: {m}", show(from_env)))
            }
            (None, None) => Err("required (a list such as [\"http://127.0.0.1:2379\"], \
                                 or set ETCD_ENDPOINTS)"
                .to_owned()),
        };
        let endpoints = self.checked(scope, "discovery.endpoints", endpoints);
        let prefix = required(
            table.get("prefix"),
            "the key prefix instances register under, e.g. \"/services/web/\"",
            check_prefix,
        );
        let prefix = self.checked(scope, "discovery.prefix", prefix);
        let username = table
            .get("username")
            .map(|v| check_text(v).map(str::to_owned))
            .transpose();
        let username = self.checked(scope, "discovery.username", username);
        let password_file = self.discovery_file(scope, table, "password_file");
        if let (Some(None), Some(Some(_))) = (&username, &password_file) {
            let message = "only valid together with discovery.username";
            self.report(scope, "discovery.password_file", message);
            return None;
        }
        let ca_file = self.discovery_file(scope, table, "ca_file");
        let cert_file = self.discovery_file(scope, table, "cert_file");
        let key_file = self.discovery_file(scope, table, "key_file");
        if let (Some(cert), Some(key)) = (&cert_file, &key_file) {
            if cert.is_some() != key.is_some() {
                let message =
                    "discovery.cert_file and discovery.key_file go together: give both or neither";
                self.report(scope, "discovery.cert_file", message);
                return None;
            }
        }
        let timeout = table.get("timeout");
        let timeout = check_duration_or(timeout, Duration::from_secs(5), TIMEOUT_RANGE);
        let timeout = self.checked(scope, "discovery.timeout", timeout);
        let endpoints: Vec<String> = endpoints?;
        let https = endpoints.iter().all(|e| e.starts_with("https://"));
        let field = ("discovery.endpoints", "every endpoint");
        if !self.tls_needs_https(scope, table, TLS_KEYS, https, field) {
            return None;
        }
        Some(EtcdConfig {
            endpoints,
            prefix: prefix?,
            username: username?,
            password_file: password_file?,
            ca_file: ca_file?,
            cert_file: cert_file?,
            key_file: key_file?,
            timeout: timeout?,
        })
    }
}

fn check_prefix(raw: &Value) -> Result<String, String> {
    let prefix = check_text(raw)?;
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "must start and end with '/' (so \"/services/web/\" cannot match \"/services/web2/...\"), got {}",
            show(prefix)
        ));
    }
    if prefix == "/" {
        return Err("must not be \"/\": that would read the whole keyspace".to_owned());
    }
    Ok(prefix.to_owned())
}

fn check_url_list(raw: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = raw else {
        return Err(type_error("an array of URLs", raw));
    };
    if list.is_empty() || list.len() > MAX_ENDPOINTS {
        return Err(format!(
            "must list 1-{MAX_ENDPOINTS} endpoints, got {}",
            list.len()
        ));
    }
    let urls = list
        .iter()
        .enumerate()
        .map(|(i, v)| check_http_url(v, "http://127.0.0.1:2379").map_err(|m| format!("[{i}]: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    let secure = urls.iter().filter(|u| u.starts_with("https://")).count();
    if secure != 0 && secure != urls.len() {
        return Err("mixes http:// and https:// endpoints; use one scheme".to_owned());
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use crate::config::discovery::tests::{assert_errors, ok, ok_with, service};
    use crate::config::{parse_with_env, Env, SourceConfig};
    use std::path::PathBuf;

    #[test]
    fn etcd_with_auth_and_tls() {
        let d = ok("kind = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\", \"https://etcd-2:2379/\"]\n\
                    prefix = \"/services/web/\"\nusername = \"lb\"\npassword_file = \"/run/secrets/etcd\"\n\
                    ca_file = \"/etc/ca.pem\"\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"");
        let SourceConfig::Etcd(etcd) = d.source else {
            panic!("not etcd")
        };
        assert_eq!(
            etcd.endpoints,
            ["https://10.0.0.1:2379", "https://etcd-2:2379"]
        );
        assert_eq!(etcd.username.as_deref(), Some("lb"));
        assert_eq!(etcd.key_file, Some(PathBuf::from("/etc/k.pem")));
    }

    #[test]
    fn etcd_endpoints_come_from_the_environment_when_not_listed() {
        let env = Env {
            etcd_endpoints: Some("http://127.0.0.1:2379, http://127.0.0.2:2379".into()),
            ..Env::default()
        };
        let d = ok_with("kind = \"etcd\"\nprefix = \"/s/web/\"", env);
        let SourceConfig::Etcd(etcd) = d.source else {
            panic!("not etcd")
        };
        assert_eq!(
            etcd.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
        );
        let bad = Env {
            etcd_endpoints: Some("127.0.0.1:2379".into()),
            ..Env::default()
        };
        let e = parse_with_env(&service("kind = \"etcd\"\nprefix = \"/s/web/\""), "f", bad)
            .expect_err("bad env")
            .to_string();
        assert!(e.contains("discovery.endpoints: from ETCD_ENDPOINTS=\"127.0.0.1:2379\": [0]: expected an http:// or https:// URL"), "{e}");
    }

    #[test]
    fn etcd_errors_name_the_field() {
        let cases = [
            ("kind = \"etcd\"\nprefix = \"/s/\"", "discovery.endpoints: required"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]", "discovery.prefix: required"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s\"", "discovery.prefix: must start and end with '/'"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/\"", "discovery.prefix: must not be \"/\""),
            ("kind = \"etcd\"\nendpoints = [\"http://a\"]\nprefix = \"/s/\"", "discovery.endpoints: [0]: expected an http:// or https:// URL"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\", \"https://b:1\"]\nprefix = \"/s/\"", "discovery.endpoints: mixes http:// and https://"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\nca_file = \"/ca\"", "discovery.endpoints: TLS settings are given (discovery.ca_file), so every endpoint must be https://"),
            ("kind = \"etcd\"\nendpoints = [\"https://a:1\"]\nprefix = \"/s/\"\ncert_file = \"/c\"", "discovery.cert_file: discovery.cert_file and discovery.key_file go together"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\npassword_file = \"/p\"", "discovery.password_file: only valid together with discovery.username"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\nusername = \"u\"\npassword_file = \"p\"", "discovery.password_file: must be an absolute path"),
        ];
        assert_errors(&cases);
    }
}
