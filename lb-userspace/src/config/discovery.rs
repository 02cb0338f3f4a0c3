//! `[service.discovery]`: where a service's backends come from when they are not listed in the
//! file. Only the shape of the block is checked here; reaching the source happens at run time.

use super::{
    check_between, check_choice, check_duration, check_integer, one_of, show, show_duration,
    type_error, Checker,
};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;
use toml::{Table, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub source: SourceConfig,
    /// Exponential backoff bounds between failed attempts.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Dns(DnsConfig),
    Etcd(EtcdConfig),
    Consul(ConsulConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Dns(_) => "dns",
            SourceConfig::Etcd(_) => "etcd",
            SourceConfig::Consul(_) => "consul",
        }
    }

    /// What is asked, for logs and `stats`: the name, the prefix or the Consul service.
    pub fn target(&self) -> String {
        match self {
            SourceConfig::Dns(d) => d.name.clone(),
            SourceConfig::Etcd(e) => e.prefix.clone(),
            SourceConfig::Consul(c) => c.service.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRecord {
    /// A (and AAAA) records; every address serves on `port`.
    Address { port: u16 },
    /// SRV records: each gives a target name, port and weight.
    Srv,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub name: String,
    pub record: DnsRecord,
    /// Empty: the system resolver configuration (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// The record TTL decides when to ask again, clamped to these bounds.
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://` or `https://` URLs. Empty in the file means "from `ETCD_ENDPOINTS`", which
    /// `load` resolves, so this is never empty in a loaded config.
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// `http://host:port` of a Consul agent.
    pub address: String,
    pub service: String,
    pub datacenter: Option<String>,
    pub tag: Option<String>,
    /// ACL token; when absent, `CONSUL_HTTP_TOKEN` is used if set.
    pub token_file: Option<PathBuf>,
    /// How long one blocking query may wait for a change.
    pub wait: Duration,
    pub timeout: Duration,
}

/// Values of the environment that a config may defer to.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub etcd_endpoints: Option<String>,
    pub consul_addr: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        Env {
            etcd_endpoints: std::env::var("ETCD_ENDPOINTS").ok(),
            consul_addr: std::env::var("CONSUL_HTTP_ADDR").ok(),
        }
    }
}

const KINDS: &[(&str, Kind)] = &[
    ("dns", Kind::Dns),
    ("etcd", Kind::Etcd),
    ("consul", Kind::Consul),
];
const RECORDS: &[(&str, bool)] = &[("a", false), ("srv", true)];
const COMMON_KEYS: &[&str] = &["kind", "retry_initial", "retry_max"];
const DNS_KEYS: &[&str] = &[
    "name",
    "record",
    "port",
    "nameservers",
    "min_refresh",
    "max_refresh",
    "timeout",
];
const ETCD_KEYS: &[&str] = &[
    "endpoints",
    "prefix",
    "username",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "timeout",
];
const CONSUL_KEYS: &[&str] = &[
    "address",
    "service",
    "datacenter",
    "tag",
    "token_file",
    "wait",
    "timeout",
];

const DEFAULT_CONSUL_ADDRESS: &str = "http://127.0.0.1:8500";
const REFRESH_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);
const TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(300);
const RETRY_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3_600);
/// Consul caps blocking queries at 10 minutes.
const WAIT_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(600);
const MAX_NAMESERVERS: usize = 8;
const MAX_ENDPOINTS: usize = 16;
const MAX_TEXT_LEN: usize = 1_024;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Dns,
    Etcd,
    Consul,
}

/// Reads one key of the discovery table, reporting failures under `discovery.<key>`.
struct Fields<'a, 'c> {
    checker: &'c mut Checker,
    scope: Option<&'a str>,
    table: &'a Table,
}

impl Fields<'_, '_> {
    fn get<T>(
        &mut self,
        key: &str,
        default: impl FnOnce() -> Result<T, String>,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let result = self.table.get(key).map_or_else(default, check);
        self.checker
            .checked(self.scope, &format!("discovery.{key}"), result)
    }

    fn required<T>(
        &mut self,
        key: &str,
        what: &str,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        self.get(key, || Err(format!("required ({what})")), check)
    }

    fn optional<T>(
        &mut self,
        key: &str,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<Option<T>> {
        self.get(key, || Ok(None), |v| check(v).map(Some))
    }

    fn duration(
        &mut self,
        key: &str,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Option<Duration> {
        self.get(
            key,
            || Ok(default),
            |v| check_duration(v).and_then(|d| check_between(d, range)),
        )
    }

    fn report(&mut self, key: &str, message: impl Into<String>) {
        self.checker
            .report(self.scope, format!("discovery.{key}"), message);
    }
}

impl Checker {
    /// `Some(None)` when the service has no discovery block, `None` when the block is invalid.
    pub(super) fn discovery(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
        env: &Env,
    ) -> Option<Option<DiscoveryConfig>> {
        let table = match raw {
            None => return Some(None),
            Some(Value::Table(table)) => table,
            Some(other) => {
                self.report(scope, "discovery", type_error("a table", other));
                return None;
            }
        };
        let kind = match table.get("kind") {
            None => Err(format!("required ({})", one_of(KINDS))),
            Some(v) => check_choice(v, KINDS),
        };
        let kind = self.checked(scope, "discovery.kind", kind);
        if let Some(kind) = kind {
            let specific = match kind {
                Kind::Dns => DNS_KEYS,
                Kind::Etcd => ETCD_KEYS,
                Kind::Consul => CONSUL_KEYS,
            };
            let allowed: Vec<&str> = COMMON_KEYS.iter().chain(specific).copied().collect();
            self.unknown_keys(scope, "discovery.", table, &allowed);
        }
        let mut f = Fields {
            checker: self,
            scope,
            table,
        };
        let retry_initial = f.duration("retry_initial", Duration::from_secs(1), RETRY_RANGE);
        let retry_max = f.duration("retry_max", Duration::from_secs(30), RETRY_RANGE);
        if let (Some(initial), Some(max)) = (retry_initial, retry_max) {
            if initial > max {
                let message = format!(
                    "must not be shorter than discovery.retry_initial ({}), got {}",
                    show_duration(initial),
                    show_duration(max)
                );
                f.report("retry_max", message);
                return None;
            }
        }
        let source = match kind? {
            Kind::Dns => f.dns().map(SourceConfig::Dns),
            Kind::Etcd => f.etcd(env).map(SourceConfig::Etcd),
            Kind::Consul => f.consul(env).map(SourceConfig::Consul),
        };
        Some(Some(DiscoveryConfig {
            source: source?,
            retry_initial: retry_initial?,
            retry_max: retry_max?,
        }))
    }
}

impl Fields<'_, '_> {
    fn dns(&mut self) -> Option<DnsConfig> {
        let name = self.required("name", "the DNS name to resolve", check_dns_name);
        let srv = self.get("record", || Ok(false), |v| check_choice(v, RECORDS));
        let port = self.optional("port", |v| check_integer::<u16>(v, 1..=u16::MAX));
        let record = match (srv?, port?) {
            (false, Some(port)) => DnsRecord::Address { port },
            (false, None) => {
                self.report(
                    "port",
                    "required with record = \"a\" (the port every address serves on)",
                );
                return None;
            }
            (true, None) => DnsRecord::Srv,
            (true, Some(_)) => {
                self.report(
                    "port",
                    "not allowed with record = \"srv\" (SRV records carry the port)",
                );
                return None;
            }
        };
        let nameservers = self.get("nameservers", || Ok(Vec::new()), check_nameservers);
        let min_refresh = self.duration("min_refresh", Duration::from_secs(5), REFRESH_RANGE);
        let max_refresh = self.duration("max_refresh", Duration::from_secs(300), REFRESH_RANGE);
        if let (Some(min), Some(max)) = (min_refresh, max_refresh) {
            if min > max {
                let message = format!(
                    "must not be shorter than discovery.min_refresh ({}), got {}",
                    show_duration(min),
                    show_duration(max)
                );
                self.report("max_refresh", message);
                return None;
            }
        }
        let timeout = self.duration("timeout", Duration::from_secs(2), TIMEOUT_RANGE);
        Some(DnsConfig {
            name: name?,
            record,
            nameservers: nameservers?,
            min_refresh: min_refresh?,
            max_refresh: max_refresh?,
            timeout: timeout?,
        })
    }

    fn etcd(&mut self, env: &Env) -> Option<EtcdConfig> {
        let endpoints = match (self.table.get("endpoints"), &env.etcd_endpoints) {
            (Some(v), _) => {
                self.checker
                    .checked(self.scope, "discovery.endpoints", check_endpoint_list(v))
            }
            (None, Some(from_env)) => {
                let list = Value::Array(
                    from_env
                        .split(',')
                        .map(|s| Value::String(s.trim().to_owned()))
                        .collect(),
                );
                let checked = check_endpoint_list(&list)
                    .map_err(|m| format!("from ETCD_ENDPOINTS={}: {m}", show(from_env)));
                self.checker
                    .checked(self.scope, "discovery.endpoints", checked)
            }
            (None, None) => {
                self.report(
                    "endpoints",
                    "required (a list such as [\"http://127.0.0.1:2379\"], or set ETCD_ENDPOINTS)",
                );
                None
            }
        };
        let prefix = self.required(
            "prefix",
            "the key prefix instances register under, e.g. \"/services/web/\"",
            check_prefix,
        );
        let username = self.optional("username", check_text);
        let password_file = self.optional("password_file", check_file);
        if let (Some(None), Some(Some(_))) = (&username, &password_file) {
            self.report(
                "password_file",
                "only valid together with discovery.username",
            );
            return None;
        }
        let ca_file = self.optional("ca_file", check_file);
        let cert_file = self.optional("cert_file", check_file);
        let key_file = self.optional("key_file", check_file);
        if let (Some(cert), Some(key)) = (&cert_file, &key_file) {
            if cert.is_some() != key.is_some() {
                self.report(
                    "cert_file",
                    "discovery.cert_file and discovery.key_file go together: give both or neither",
                );
                return None;
            }
        }
        let timeout = self.duration("timeout", Duration::from_secs(5), TIMEOUT_RANGE);
        let endpoints: Vec<String> = endpoints?;
        let tls_given = ca_file.as_ref().is_some_and(Option::is_some)
            || cert_file.as_ref().is_some_and(Option::is_some);
        if tls_given && !endpoints.iter().all(|e| e.starts_with("https://")) {
            self.report(
                "endpoints",
                "TLS files are given, so every endpoint must be https://",
            );
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

    fn consul(&mut self, env: &Env) -> Option<ConsulConfig> {
        let address = match (self.table.get("address"), &env.consul_addr) {
            (Some(v), _) => {
                self.checker
                    .checked(self.scope, "discovery.address", check_http_url(v, false))
            }
            (None, Some(from_env)) => {
                let value = Value::String(from_env.clone());
                // Consul's own tools accept a bare host:port here.
                let value = if from_env.contains("://") {
                    value
                } else {
                    Value::String(format!("http://{from_env}"))
                };
                let checked = check_http_url(&value, false)
                    .map_err(|m| format!("from CONSUL_HTTP_ADDR: {m}"));
                self.checker
                    .checked(self.scope, "discovery.address", checked)
            }
            (None, None) => Some(DEFAULT_CONSUL_ADDRESS.to_owned()),
        };
        let service = self.required("service", "the Consul service name", check_consul_name);
        let datacenter = self.optional("datacenter", check_consul_name);
        let tag = self.optional("tag", check_consul_name);
        let token_file = self.optional("token_file", check_file);
        let wait = self.duration("wait", Duration::from_secs(300), WAIT_RANGE);
        let timeout = self.duration("timeout", Duration::from_secs(5), TIMEOUT_RANGE);
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

fn string(raw: &Value) -> Result<&str, String> {
    match raw {
        Value::String(s) => Ok(s),
        other => Err(type_error("a string", other)),
    }
}

fn check_text(raw: &Value) -> Result<String, String> {
    let text = string(raw)?;
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(format!(
            "{} is longer than {MAX_TEXT_LEN} bytes",
            show(text)
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{} contains control characters", show(text)));
    }
    Ok(text.to_owned())
}

fn check_file(raw: &Value) -> Result<PathBuf, String> {
    let path = check_text(raw)?;
    if !path.starts_with('/') {
        return Err(format!("must be an absolute path, got {}", show(&path)));
    }
    Ok(PathBuf::from(path))
}

/// A DNS name as resolvers accept it: dot-separated labels of 1-63 letters, digits, '-' or '_'
/// (SRV names start with `_service._proto`), 253 bytes at most, an optional final dot.
fn check_dns_name(raw: &Value) -> Result<String, String> {
    let name = string(raw)?;
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("{} must be 1-253 bytes long", show(name)));
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{} has an empty or over-63-byte label", show(name)));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "{} contains {bad:?}; labels hold only ASCII letters, digits, '-' and '_'",
                show(name)
            ));
        }
    }
    Ok(name.to_owned())
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
            show(&name)
        ));
    }
    Ok(name)
}

fn check_prefix(raw: &Value) -> Result<String, String> {
    let prefix = check_text(raw)?;
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "must start and end with '/' (so \"/services/web/\" cannot match \"/services/web2/...\"), got {}",
            show(&prefix)
        ));
    }
    if prefix == "/" {
        return Err("must not be \"/\": that would read the whole keyspace".to_owned());
    }
    Ok(prefix)
}

fn check_nameservers(raw: &Value) -> Result<Vec<SocketAddr>, String> {
    let Value::Array(list) = raw else {
        return Err(type_error("an array of \"ip:port\" strings", raw));
    };
    if list.is_empty() || list.len() > MAX_NAMESERVERS {
        return Err(format!(
            "must list 1-{MAX_NAMESERVERS} servers (leave it out to use /etc/resolv.conf), got {}",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let text = string(v).map_err(|m| format!("[{i}]: {m}"))?;
            let addr: SocketAddr = text.parse().map_err(|_| {
                format!(
                    "[{i}]: expected \"ip:port\" such as \"127.0.0.1:53\", got {}",
                    show(text)
                )
            })?;
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(format!("[{i}]: {addr} cannot be queried"));
            }
            Ok(addr)
        })
        .collect()
}

fn check_endpoint_list(raw: &Value) -> Result<Vec<String>, String> {
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
        .map(|(i, v)| check_http_url(v, true).map_err(|m| format!("[{i}]: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    let secure = urls.iter().filter(|u| u.starts_with("https://")).count();
    if secure != 0 && secure != urls.len() {
        return Err("mixes http:// and https:// endpoints; use one scheme".to_owned());
    }
    Ok(urls)
}

/// `http://host:port` (or `https://` when allowed), with nothing after the authority.
fn check_http_url(raw: &Value, https_allowed: bool) -> Result<String, String> {
    let url = string(raw)?;
    let expected = if https_allowed {
        "an http:// or https:// URL such as \"http://127.0.0.1:2379\""
    } else {
        "an http:// URL such as \"http://127.0.0.1:8500\" (https is not supported yet)"
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://").filter(|_| https_allowed));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, parse_with_env, Config};

    fn service(discovery: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\n[service.discovery]\n{discovery}\n")
    }

    fn ok_with(discovery: &str, env: Env) -> DiscoveryConfig {
        let config: Config = parse_with_env(&service(discovery), "lb.toml", env)
            .unwrap_or_else(|e| panic!("{discovery}: {e}"));
        config.services[0].discovery.clone().expect("discovery")
    }

    fn ok(discovery: &str) -> DiscoveryConfig {
        ok_with(discovery, Env::default())
    }

    /// The single problem, without the file and service prefix.
    fn error(discovery: &str) -> String {
        let e = parse(&service(discovery), "lb.toml")
            .expect_err(discovery)
            .to_string();
        let prefix = "lb.toml: service \"web\" (service[0]): ";
        assert!(e.starts_with(prefix) && !e.contains('\n'), "{e}");
        e[prefix.len()..].to_owned()
    }

    /// Each config snippet has exactly one problem, which starts with the expected text.
    fn assert_errors(cases: &[(&str, &str)]) {
        for (text, expected) in cases {
            let e = error(text);
            assert!(
                e.starts_with(expected),
                "{text}\n got: {e}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn dns_a_record_defaults() {
        let d = ok("kind = \"dns\"\nname = \"web.local\"\nport = 8080");
        assert_eq!(d.retry_initial, Duration::from_secs(1));
        assert_eq!(d.retry_max, Duration::from_secs(30));
        let SourceConfig::Dns(dns) = d.source else {
            panic!("not dns")
        };
        assert_eq!(dns.record, DnsRecord::Address { port: 8080 });
        assert!(dns.nameservers.is_empty());
        assert_eq!(dns.min_refresh, Duration::from_secs(5));
        assert_eq!(dns.max_refresh, Duration::from_secs(300));
    }

    #[test]
    fn dns_srv_with_nameserver_and_refresh_bounds() {
        let d = ok(
            "kind = \"dns\"\nname = \"_http._tcp.web.local.\"\nrecord = \"srv\"\n\
                    nameservers = [\"127.0.0.1:5353\"]\nmin_refresh = \"1s\"\nmax_refresh = \"1m\"",
        );
        let SourceConfig::Dns(dns) = d.source else {
            panic!("not dns")
        };
        assert_eq!(dns.record, DnsRecord::Srv);
        assert_eq!(dns.nameservers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(dns.max_refresh, Duration::from_secs(60));
    }

    #[test]
    fn dns_errors_name_the_field() {
        let cases = [
            ("kind = \"dns\"\nport = 80", "discovery.name: required (the DNS name to resolve)"),
            ("kind = \"dns\"\nname = \"web.local\"", "discovery.port: required with record = \"a\""),
            ("kind = \"dns\"\nname = \"_x._tcp.web\"\nrecord = \"srv\"\nport = 80", "discovery.port: not allowed with record = \"srv\""),
            ("kind = \"dns\"\nname = \"web..local\"\nport = 80", "discovery.name: \"web..local\" has an empty"),
            ("kind = \"dns\"\nname = \"web local\"\nport = 80", "discovery.name: \"web local\" contains ' '"),
            ("kind = \"dns\"\nname = \"web\"\nport = 0", "discovery.port: must be between 1 and 65535, got 0"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nrecord = \"aaaa\"", "discovery.record: must be \"a\" or \"srv\""),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nnameservers = []", "discovery.nameservers: must list 1-8 servers"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nnameservers = [\"127.0.0.1\"]", "discovery.nameservers: [0]: expected \"ip:port\""),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nmin_refresh = \"1m\"\nmax_refresh = \"1s\"", "discovery.max_refresh: must not be shorter than discovery.min_refresh (1m), got 1s"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nmin_refresh = \"1ms\"", "discovery.min_refresh: must be between 100ms and 24h"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nprefix = \"/x/\"", "discovery.prefix: unknown key"),
        ];
        assert_errors(&cases);
    }

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
            consul_addr: None,
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
            consul_addr: None,
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
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\nca_file = \"/ca\"", "discovery.endpoints: TLS files are given"),
            ("kind = \"etcd\"\nendpoints = [\"https://a:1\"]\nprefix = \"/s/\"\ncert_file = \"/c\"", "discovery.cert_file: discovery.cert_file and discovery.key_file go together"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\npassword_file = \"/p\"", "discovery.password_file: only valid together with discovery.username"),
            ("kind = \"etcd\"\nendpoints = [\"http://a:1\"]\nprefix = \"/s/\"\nusername = \"u\"\npassword_file = \"p\"", "discovery.password_file: must be an absolute path"),
        ];
        assert_errors(&cases);
    }

    #[test]
    fn consul_defaults_and_options() {
        let d = ok("kind = \"consul\"\nservice = \"web\"");
        let SourceConfig::Consul(c) = d.source else {
            panic!("not consul")
        };
        assert_eq!(c.address, DEFAULT_CONSUL_ADDRESS);
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

    #[test]
    fn common_errors() {
        let cases = [
            ("name = \"web\"", "discovery.kind: required (\"dns\", \"etcd\" or \"consul\")"),
            ("kind = \"k8s\"", "discovery.kind: must be \"dns\", \"etcd\" or \"consul\""),
            ("kind = \"consul\"\nservice = \"w\"\nretry_initial = \"1m\"\nretry_max = \"1s\"", "discovery.retry_max: must not be shorter than discovery.retry_initial (1m), got 1s"),
        ];
        assert_errors(&cases);
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
