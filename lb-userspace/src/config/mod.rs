//! The agent's TOML config: parsing and validation.
//!
//! TOML is first parsed into a generic `toml::Table` and then checked by hand instead of being
//! deserialized into `#[derive(Deserialize)]` structs: serde stops at the first error and its
//! messages lose the path of the offending field, while an operator should see every problem of
//! an edit at once, each named by file, service and field.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;
use toml::{Table, Value};

mod balancing;
mod discovery;
mod kubernetes;
mod outlier;
pub use balancing::{
    is_prime, Algorithm, Balancing, ClientKey, AFFINITY_TIMEOUT_RANGE, DEFAULT_AFFINITY_TIMEOUT,
    DEFAULT_TABLE_SIZE, MIN_TABLE_SIZE,
};
pub use discovery::{
    ConsulConfig, DiscoveryConfig, DnsConfig, DnsRecord, Env, EtcdConfig, SourceConfig,
};
pub use kubernetes::KubernetesConfig;
pub use outlier::OutlierConfig;

pub const MAX_SERVICES: usize = lb_common::MAX_SERVICES as usize;
pub const MAX_BACKENDS_PER_SERVICE: usize = 1_024;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_NAME_LEN: usize = lb_common::MAX_NAME_LEN;

/// A generated config that is wrong everywhere must not flood the log on every reload.
const MAX_LISTED: usize = 100;
/// Long values are cut in messages so that one huge string cannot swamp them.
const MAX_SHOWN_CHARS: usize = 64;

const SERVICE_KEYS: &[&str] = &[
    "name",
    "vip",
    "protocol",
    "backends",
    "fail_open",
    "panic_threshold",
    "health",
    "discovery",
    "algorithm",
    "maglev_table_size",
    "affinity",
    "affinity_timeout",
    "client_key",
    "outlier",
];
const BACKEND_KEYS: &[&str] = &["address", "weight"];
const HEALTH_KEYS: &[&str] = &[
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

const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
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
const MAX_HEALTH_PATH_LEN: usize = 1_024;
const DURATION_FORMS: &str =
    "a duration such as \"500ms\", \"2s\", \"1m\" or \"1h\" (an unsigned integer followed by ms, s, m or h)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<BackendConfig>,
    pub health: Option<HealthConfig>,
    /// When too few backends are healthy, balance over all configured backends instead of refusing connects.
    pub fail_open: bool,
    /// Percent 0..=100: fail open when the healthy share is below this (0 = only when no backend is healthy).
    pub panic_threshold: u8,
    /// Where `backends` come from at run time; `None` = the static list above.
    pub discovery: Option<DiscoveryConfig>,
    pub balancing: Balancing,
    /// Passive outlier detection from kernel-observed connect outcomes.
    pub outlier: Option<OutlierConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    /// `expect_status: None` = any 2xx.
    Http {
        path: String,
        expect_status: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: ProbeKind,
    /// Port to probe; None = the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub jitter: Duration,
    pub initial: InitialState,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub services: Vec<ServiceConfig>,
    /// Services from a Kubernetes API server, next to the listed ones.
    pub kubernetes: Option<KubernetesConfig>,
    pub dataplane: DataplaneConfig,
}

/// `[dataplane]`: switches for the kernel programs themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Count bytes and packets per backend: a program runs for every packet of the cgroup, so
    /// hosts that need no traffic counters can turn it off (its cost is in bench/README.md).
    pub count_bytes: bool,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self { count_bytes: true }
    }
}

/// Every problem found in one config source; never empty.
#[derive(Debug)]
pub struct ConfigError {
    origin: String,
    problems: Vec<Problem>,
}

#[derive(Debug)]
struct Problem {
    /// `service "web" (service[0])`, or `service[0]` while the service has no valid name.
    scope: Option<String>,
    /// Field path such as `backends[1].weight`, or a position for TOML syntax errors.
    field: String,
    message: String,
}

impl ConfigError {
    fn single(origin: &str, field: String, message: String) -> Self {
        ConfigError {
            origin: origin.to_owned(),
            problems: vec![Problem {
                scope: None,
                field,
                message,
            }],
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in [self.scope.as_deref().unwrap_or(""), &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.problems.len();
        if total > 1 {
            writeln!(f, "{}: {total} errors", self.origin)?;
        }
        // Each line repeats the origin so that it still makes sense when grepped out of a log.
        for (i, problem) in self.problems.iter().take(MAX_LISTED).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {problem}", self.origin)?;
        }
        if total > MAX_LISTED {
            write!(f, "\n{}: ... and {} more", self.origin, total - MAX_LISTED)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates a file. Errors name the file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::single(&origin, String::new(), format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        ConfigError::single(
            &origin,
            String::new(),
            format!("not valid UTF-8 (byte {at})"),
        )
    })?;
    parse_with_env(&text, &origin, Env::from_process())
}

/// Validates text; `origin` is what errors call the source (normally the file path).
/// Settings the file leaves to the environment stay unset.
#[cfg(test)]
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(text, origin, Env::default())
}

/// `parse`, taking settings the file leaves out from `env` (`ETCD_ENDPOINTS`, ...).
pub fn parse_with_env(text: &str, origin: &str, env: Env) -> Result<Config, ConfigError> {
    let root: Table = toml::from_str(text).map_err(|e| {
        let position = e.span().map_or_else(String::new, |span| {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}")
        });
        // toml's message may span several lines; one line per problem keeps logs greppable.
        let message: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        ConfigError::single(
            origin,
            position,
            format!("invalid TOML: {}", message.join("; ")),
        )
    })?;
    let mut checker = Checker {
        problems: Vec::new(),
        env,
    };
    let config = checker.config(&root);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            origin: origin.to_owned(),
            problems: checker.problems,
        })
    }
}

/// 1-based line and column (in characters) of a byte offset, without slicing `text` so that
/// an offset off a character boundary cannot panic.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, column)
}

/// Collects problems instead of returning at the first one. The `Config` it builds is only
/// meaningful when no problem was found.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    env: Env,
}

impl Checker {
    fn report(
        &mut self,
        scope: Option<&str>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            scope: scope.map(str::to_owned),
            field: field.into(),
            message: message.into(),
        });
    }

    /// The value of a passed check; a failed one is reported at `field`.
    fn checked<T>(
        &mut self,
        scope: Option<&str>,
        field: &str,
        result: Result<T, String>,
    ) -> Option<T> {
        result
            .map_err(|message| self.report(scope, field, message))
            .ok()
    }

    fn unknown_keys(&mut self, scope: Option<&str>, prefix: &str, table: &Table, allowed: &[&str]) {
        for key in table.keys().filter(|k| !allowed.contains(&k.as_str())) {
            let message = format!("unknown key (allowed: {})", allowed.join(", "));
            self.report(scope, format!("{prefix}{}", show_key(key)), message);
        }
    }

    fn config(&mut self, root: &Table) -> Config {
        self.unknown_keys(None, "", root, &["service", "kubernetes", "dataplane"]);
        let kubernetes = self.kubernetes(root.get("kubernetes"));
        let dataplane = self.dataplane(root.get("dataplane"));
        let raw: &[Value] = match root.get("service") {
            None => &[],
            Some(Value::Array(services)) => services,
            Some(Value::Table(_)) => {
                self.report(
                    None,
                    "service",
                    "must be an array of tables: write [[service]], not [service]",
                );
                &[]
            }
            Some(other) => {
                self.report(
                    None,
                    "service",
                    type_error("an array of [[service]] tables", other),
                );
                &[]
            }
        };
        if raw.len() > MAX_SERVICES {
            let message = format!("{} services, at most {MAX_SERVICES} allowed", raw.len());
            self.report(None, "service", message);
        }
        let mut seen = Seen::default();
        let services: Vec<(usize, ServiceConfig)> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.service(i, s, &mut seen).map(|c| (i, c)))
            .collect();
        self.backends_are_not_vips(&services);
        Config {
            services: services.into_iter().map(|(_, s)| s).collect(),
            kubernetes: kubernetes.flatten(),
            dataplane,
        }
    }

    fn dataplane(&mut self, raw: Option<&Value>) -> DataplaneConfig {
        let mut d = DataplaneConfig::default();
        let table = match raw {
            None => return d,
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.report(None, "dataplane", type_error("a table", other));
                return d;
            }
        };
        self.unknown_keys(None, "dataplane.", table, &["count_bytes"]);
        if let Some(v) = table.get("count_bytes") {
            if let Some(b) = self.checked(None, "dataplane.count_bytes", check_bool(v)) {
                d.count_bytes = b;
            }
        }
        d
    }

    /// The `VipClash` rule for every listed backend, each problem reported at its field.
    fn backends_are_not_vips(&mut self, services: &[(usize, ServiceConfig)]) {
        let vips: HashMap<(SocketAddr, Protocol), &str> = services
            .iter()
            .map(|(_, s)| ((s.vip, s.protocol), s.name.as_str()))
            .collect();
        for (i, s) in services {
            let scope = format!("service \"{}\" (service[{i}])", s.name);
            for (j, b) in s.backends.iter().enumerate() {
                let health_port = s.health.as_ref().and_then(|h| h.port);
                let clash = VipClash::of(&vips, b.address, s.protocol, health_port);
                if let Some(owner) = clash.backend_is {
                    let message = format!(
                        "{} is the VIP of service \"{owner}\"; backends must be real addresses",
                        b.address
                    );
                    self.report(Some(&scope), format!("backends[{j}]"), message);
                }
                if let Some((probed, owner)) = clash.probe_hits {
                    let message = format!(
                        "probing backends[{j}] on {probed} would hit the VIP of service \"{owner}\""
                    );
                    self.report(Some(&scope), "health.port", message);
                }
            }
        }
    }

    fn service(&mut self, index: usize, raw: &Value, seen: &mut Seen) -> Option<ServiceConfig> {
        let index_label = format!("service[{index}]");
        let Value::Table(table) = raw else {
            self.report(Some(&index_label), "", type_error("a table", raw));
            return None;
        };
        // The name is checked first because a valid one labels every other message.
        let name = check_name(table.get("name"));
        let label = match &name {
            Ok(name) => format!("service \"{name}\" ({index_label})"),
            Err(_) => index_label,
        };
        let scope = Some(label.as_str());
        let name = match name {
            Ok(name) => match seen.names.get(name) {
                Some(first) => {
                    let message = format!("\"{name}\" is already used by service[{first}]");
                    self.report(scope, "name", message);
                    None
                }
                None => {
                    seen.names.insert(name.to_owned(), index);
                    Some(name)
                }
            },
            Err(message) => {
                self.report(scope, "name", message);
                None
            }
        };
        let vip = match table.get("vip") {
            None => Err(
                "required (address:port, e.g. \"10.96.0.10:80\" or \"[fd00::10]:80\")".to_owned(),
            ),
            Some(v) => check_endpoint(v),
        };
        let vip = vip
            .map_err(|message| self.report(scope, "vip", message))
            .ok();
        let protocol = check_protocol(table.get("protocol"));
        let protocol = protocol
            .map_err(|message| self.report(scope, "protocol", message))
            .ok();
        if let (Some(vip), Some(protocol)) = (vip, protocol) {
            match seen.vips.get(&(vip, protocol)) {
                Some(first) => {
                    let message = format!("{vip}/{} is already used by {first}", protocol.as_str());
                    self.report(scope, "vip", message);
                }
                None => {
                    seen.vips.insert((vip, protocol), label.clone());
                }
            }
        }
        let env = self.env.clone();
        let discovery = self.discovery(scope, table.get("discovery"), &env);
        let backends = match (table.get("backends"), table.contains_key("discovery")) {
            (Some(_), true) => {
                let message = "not allowed together with [service.discovery]: \
                               backends come either from the file or from a source";
                self.report(scope, "backends", message);
                None
            }
            (None, true) => Some(Vec::new()),
            (raw, false) => self.backends(scope, raw),
        };
        let fail_open = table.get("fail_open").map_or(Ok(true), check_bool);
        let fail_open = self.checked(scope, "fail_open", fail_open);
        let panic_threshold = table
            .get("panic_threshold")
            .map_or(Ok(0), |v| check_integer(v, 0..=100));
        let panic_threshold = self.checked(scope, "panic_threshold", panic_threshold);
        let health = self.health(scope, table.get("health"));
        let balancing = self.balancing(scope, table);
        let outlier = self.outlier(scope, table.get("outlier"), protocol);
        if let (Some(vip), Some(backends)) = (vip, &backends) {
            self.same_family(scope, vip, backends);
        }
        self.unknown_keys(scope, "", table, SERVICE_KEYS);
        Some(ServiceConfig {
            name: name?.to_owned(),
            vip: vip?,
            protocol: protocol?,
            backends: backends?,
            health: health?,
            fail_open: fail_open?,
            panic_threshold: panic_threshold?,
            discovery: discovery?,
            balancing: balancing?,
            outlier: outlier?,
        })
    }

    /// A socket of one family cannot be connected to an address of the other (an IPv4 VIP
    /// reached from an IPv6 socket is v4-mapped, and so is the backend it is sent to).
    fn same_family(&mut self, scope: Option<&str>, vip: SocketAddr, backends: &[BackendConfig]) {
        for (i, b) in backends.iter().enumerate() {
            if b.address.is_ipv4() != vip.is_ipv4() {
                let message = format!(
                    "{} and the VIP {vip} are of different address families; a service's \
                     backends must share its VIP's family",
                    b.address
                );
                self.report(scope, format!("backends[{i}]"), message);
            }
        }
    }

    /// `Some(None)` for a service without health checks, `None` when the table is invalid.
    fn health(&mut self, scope: Option<&str>, raw: Option<&Value>) -> Option<Option<HealthConfig>> {
        let table = match raw {
            None => return Some(None),
            Some(Value::Table(table)) => table,
            Some(other) => {
                self.report(scope, "health", type_error("a table", other));
                return None;
            }
        };
        self.unknown_keys(scope, "health.", table, HEALTH_KEYS);
        let http = match table.get("kind") {
            None => Err(format!("required ({})", one_of(PROBE_KINDS))),
            Some(v) => check_choice(v, PROBE_KINDS),
        };
        let http = self.checked(scope, "health.kind", http);
        let port = table
            .get("port")
            .map(|v| check_integer(v, 1..=u16::MAX))
            .transpose();
        let port = self.checked(scope, "health.port", port);
        let path = self.http_only(scope, table, "path", http).map(|path| {
            let path = path.map_or_else(|| Ok("/".to_owned()), check_path);
            self.checked(scope, "health.path", path)
        });
        let expect_status = self
            .http_only(scope, table, "expect_status", http)
            .map(|status| {
                let status = status.map(|v| check_integer(v, 100..=599)).transpose();
                self.checked(scope, "health.expect_status", status)
            });
        let interval = table.get("interval").map_or(Ok(DEFAULT_INTERVAL), |v| {
            check_duration(v).and_then(|d| check_between(d, INTERVAL_RANGE))
        });
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
                path: path??,
                expect_status: expect_status??,
            }
        } else {
            ProbeKind::Tcp
        };
        Some(Some(HealthConfig {
            kind,
            port: port?,
            interval: interval?,
            timeout: timeout?,
            rise: rise?,
            fall: fall?,
            jitter: jitter?,
            initial: initial?,
        }))
    }

    /// The raw value of an HTTP-only health key (`Some(None)` when absent); `None`, reported,
    /// when it is given for a TCP probe.
    fn http_only<'t>(
        &mut self,
        scope: Option<&str>,
        table: &'t Table,
        key: &str,
        http: Option<bool>,
    ) -> Option<Option<&'t Value>> {
        let value = table.get(key);
        if value.is_some() && http == Some(false) {
            let message = "only valid with kind = \"http\"";
            self.report(scope, format!("health.{key}"), message);
            return None;
        }
        Some(value)
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

    fn backends(&mut self, scope: Option<&str>, raw: Option<&Value>) -> Option<Vec<BackendConfig>> {
        let list = match raw {
            None => {
                // Required so that a misspelt key cannot silently create a service nobody serves.
                let message = "required (write backends = [] for a service without backends, \
                               or add a [service.discovery] block)";
                self.report(scope, "backends", message);
                return None;
            }
            Some(Value::Array(list)) => list,
            Some(other) => {
                self.report(scope, "backends", type_error("an array", other));
                return None;
            }
        };
        if list.len() > MAX_BACKENDS_PER_SERVICE {
            let message = format!(
                "{} backends, at most {MAX_BACKENDS_PER_SERVICE} allowed",
                list.len()
            );
            self.report(scope, "backends", message);
        }
        let mut first_index: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::with_capacity(list.len());
        for (i, raw) in list.iter().enumerate() {
            let Some((backend, field)) = self.backend(scope, i, raw) else {
                continue;
            };
            match first_index.get(&backend.address) {
                Some(first) => {
                    let message =
                        format!("{} is already listed as backends[{first}]", backend.address);
                    self.report(scope, field, message);
                }
                None => {
                    first_index.insert(backend.address, i);
                }
            }
            backends.push(backend);
        }
        Some(backends)
    }

    /// Returns the backend and the path of its address field, for duplicate reports.
    fn backend(
        &mut self,
        scope: Option<&str>,
        index: usize,
        raw: &Value,
    ) -> Option<(BackendConfig, String)> {
        let at = format!("backends[{index}]");
        match raw {
            Value::String(_) => match check_endpoint(raw) {
                Ok(address) => Some((BackendConfig { address, weight: 1 }, at)),
                Err(message) => {
                    self.report(scope, at, message);
                    None
                }
            },
            Value::Table(table) => {
                self.unknown_keys(scope, &format!("{at}."), table, BACKEND_KEYS);
                let field = format!("{at}.address");
                let address = match table.get("address") {
                    None => Err("required".to_owned()),
                    Some(v) => check_endpoint(v),
                };
                let address = address
                    .map_err(|message| self.report(scope, &*field, message))
                    .ok();
                let weight = check_weight(table.get("weight"));
                let weight = weight
                    .map_err(|message| self.report(scope, format!("{at}.weight"), message))
                    .ok();
                Some((
                    BackendConfig {
                        address: address?,
                        weight: weight?,
                    },
                    field,
                ))
            }
            other => {
                let expected = "an address string or a table { address, weight }";
                self.report(scope, at, type_error(expected, other));
                None
            }
        }
    }
}

/// Why a backend cannot serve a service: it is itself a VIP (it would be translated a second
/// time), or its health probes (always TCP) would hit a VIP and be balanced instead of reaching
/// the backend they judge. Both the config check and backends from sources apply this rule.
pub struct VipClash<'a> {
    /// The service whose VIP the backend is.
    pub backend_is: Option<&'a str>,
    /// The probed address and the service whose VIP it is.
    pub probe_hits: Option<(SocketAddr, &'a str)>,
}

impl<'a> VipClash<'a> {
    pub fn of<V: AsRef<str>>(
        vips: &'a HashMap<(SocketAddr, Protocol), V>,
        backend: SocketAddr,
        protocol: Protocol,
        health_port: Option<u16>,
    ) -> Self {
        let probe_hits = health_port.and_then(|port| {
            let probed = SocketAddr::new(backend.ip(), port);
            let owner = vips.get(&(probed, Protocol::Tcp))?;
            Some((probed, owner.as_ref()))
        });
        VipClash {
            backend_is: vips.get(&(backend, protocol)).map(AsRef::as_ref),
            probe_hits,
        }
    }

    /// The service whose VIP is hit, if any.
    pub fn owner(&self) -> Option<&'a str> {
        self.backend_is.or(self.probe_hits.map(|(_, owner)| owner))
    }
}

/// What earlier services claimed, so that a duplicate names both services.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    vips: HashMap<(SocketAddr, Protocol), String>,
}

fn check_name(raw: Option<&Value>) -> Result<&str, String> {
    let name = match raw {
        None => return Err("required".to_owned()),
        Some(Value::String(name)) => name,
        Some(other) => return Err(type_error("a string", other)),
    };
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if let Some(bad) = offenders(name, |c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }) {
        return Err(format!(
            "{} contains {bad}; only ASCII letters, digits, '.', '_' and '-' are allowed",
            show(name)
        ));
    }
    // Bytes, not characters: the name is stored in a fixed-size byte array for `stats`.
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{} is {} bytes long, at most {MAX_NAME_LEN} allowed",
            show(name),
            name.len()
        ));
    }
    Ok(name)
}

/// A few distinct characters of `text` for which `is_bad` holds, listed for a message.
fn offenders(text: &str, is_bad: impl Fn(char) -> bool) -> Option<String> {
    // A few distinct offenders are enough to point at the problem.
    let mut bad: Vec<String> = Vec::new();
    for shown in text
        .chars()
        .filter(|&c| is_bad(c))
        .map(|c| format!("{c:?}"))
    {
        if bad.len() == 8 {
            break;
        }
        if !bad.contains(&shown) {
            bad.push(shown);
        }
    }
    (!bad.is_empty()).then(|| bad.join(", "))
}

fn check_protocol(raw: Option<&Value>) -> Result<Protocol, String> {
    raw.map_or(Ok(Protocol::Tcp), |p| check_choice(p, PROTOCOLS))
}

fn check_weight(raw: Option<&Value>) -> Result<u32, String> {
    raw.map_or(Ok(1), |w| check_integer(w, 1..=MAX_WEIGHT))
}

/// One of the strings of `choices`, compared case-sensitively.
fn check_choice<T: Copy>(raw: &Value, choices: &[(&str, T)]) -> Result<T, String> {
    let Value::String(text) = raw else {
        return Err(type_error(&one_of(choices), raw));
    };
    match choices.iter().find(|(name, _)| name == text) {
        Some(&(_, value)) => Ok(value),
        None => Err(format!("must be {}, got {}", one_of(choices), show(text))),
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of<T>(choices: &[(&str, T)]) -> String {
    let quoted: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

fn check_integer<T>(raw: &Value, range: RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<i64> + PartialOrd + fmt::Display,
{
    let Value::Integer(n) = raw else {
        return Err(type_error("an integer", raw));
    };
    T::try_from(*n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            let (min, max) = (range.start(), range.end());
            format!("must be between {min} and {max}, got {n}")
        })
}

fn check_bool(raw: &Value) -> Result<bool, String> {
    match raw {
        Value::Boolean(b) => Ok(*b),
        other => Err(type_error("a boolean", other)),
    }
}

fn check_duration(raw: &Value) -> Result<Duration, String> {
    match raw {
        Value::String(text) => parse_duration(text),
        _ => None,
    }
    .ok_or_else(|| type_error(DURATION_FORMS, raw))
}

fn check_between(value: Duration, range: RangeInclusive<Duration>) -> Result<Duration, String> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "must be between {} and {}, got {}",
            show_duration(*range.start()),
            show_duration(*range.end()),
            show_duration(value)
        ))
    }
}

/// An unsigned integer directly followed by `ms`, `s`, `m` or `h`: no sign, fraction or space.
fn parse_duration(text: &str) -> Option<Duration> {
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    // `number` holds ASCII digits only, so this fails only when empty or too large.
    let number: u64 = number.parse().ok()?;
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
}

/// In the largest unit that shows it exactly, as written in the config: `1500ms`, `2s`, `1h`.
fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{d:?}");
    }
    match [(3_600_000, "h"), (60_000, "m"), (1_000, "s")]
        .into_iter()
        .find(|(per_unit, _)| ms.is_multiple_of(*per_unit))
    {
        Some((per_unit, unit)) => format!("{}{unit}", ms / per_unit),
        None => format!("{ms}ms"),
    }
}

/// An HTTP path sent verbatim in the probe's request line.
fn check_path(raw: &Value) -> Result<String, String> {
    let Value::String(path) = raw else {
        return Err(type_error("a string", raw));
    };
    if !path.starts_with('/') {
        return Err(format!("must start with '/', got {}", show(path)));
    }
    if let Some(bad) = offenders(path, |c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} contains {bad}; spaces and control characters are not allowed",
            show(path)
        ));
    }
    if path.len() > MAX_HEALTH_PATH_LEN {
        return Err(format!(
            "{} is {} bytes long, at most {MAX_HEALTH_PATH_LEN} allowed",
            show(path),
            path.len()
        ));
    }
    Ok(path.clone())
}

/// An `address:port` a connect can be sent to (IPv4, or IPv6 in brackets): the data plane
/// matches and rewrites exact destinations, so wildcard, broadcast and multicast addresses or
/// port 0 never make sense. A v4-mapped IPv6 address is the IPv4 address it maps.
fn check_endpoint(raw: &Value) -> Result<SocketAddr, String> {
    let Value::String(text) = raw else {
        return Err(type_error("an address:port string", raw));
    };
    let Ok(addr) = text.parse::<SocketAddr>() else {
        return Err(explain_bad_endpoint(text));
    };
    let addr = match addr {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => {
            return Err(format!(
                "a zone (%{}) is not allowed in {}: the data plane matches addresses only",
                v6.scope_id(),
                show(text)
            ))
        }
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    };
    let ip = addr.ip();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if addr.port() == 0 {
        Err(format!("port 0 is not allowed ({addr})"))
    } else if ip.is_unspecified() {
        Err(format!(
            "the unspecified address {ip} is not allowed ({addr})"
        ))
    } else if broadcast {
        Err(format!(
            "broadcast address 255.255.255.255 is not allowed ({addr})"
        ))
    } else if ip.is_multicast() {
        Err(format!("multicast address {ip} is not allowed ({addr})"))
    } else {
        Ok(addr)
    }
}

fn explain_bad_endpoint(text: &str) -> String {
    let example = "expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\"";
    if text.parse::<Ipv6Addr>().is_ok() {
        return format!(
            "missing port in {}; an IPv6 address goes in brackets: \"[{text}]:8080\"",
            show(text)
        );
    }
    if text.parse::<Ipv4Addr>().is_ok() {
        return format!("missing port in {}; {example}", show(text));
    }
    match text.rsplit_once(':') {
        Some((ip, port)) if ip.parse::<Ipv4Addr>().is_ok() => {
            format!(
                "invalid port {} in {}: must be a number 1-65535",
                show(port),
                show(text)
            )
        }
        _ => format!("{example}, got {}", show(text)),
    }
}

fn type_error(expected: &str, got: &Value) -> String {
    let got = match got {
        Value::String(s) => format!("string {}", show(s)),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_owned(),
    };
    format!("expected {expected}, got {got}")
}

/// Quoted and escaped so that control characters or newlines in a value cannot forge log lines.
fn show(value: &str) -> String {
    if value.chars().count() <= MAX_SHOWN_CHARS {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(MAX_SHOWN_CHARS).collect();
        format!("{cut:?}...")
    }
}

/// Keys are shown bare, as written in TOML, unless they need quoting.
fn show_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        show(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "lb.toml";

    fn errors(text: &str) -> ConfigError {
        match parse(text, ORIGIN) {
            Ok(config) => panic!("accepted: {config:?}\n---\n{text}"),
            Err(e) => e,
        }
    }

    /// Display of a config that must have exactly one problem.
    fn single(text: &str) -> String {
        let e = errors(text);
        assert_eq!(e.problems.len(), 1, "expected one problem, got:\n{e}");
        e.to_string()
    }

    /// One `[[service]]` named "web" with the given body lines.
    fn web(body: &str) -> String {
        format!("[[service]]\nname = \"web\"\n{body}\n")
    }

    /// A valid service "web" with one field line replaced or added.
    fn web_with(line: &str) -> String {
        let key = line.split('=').next().unwrap().trim();
        let mut body: Vec<&str> = ["vip = \"10.96.0.10:80\"", "backends = [\"10.0.0.11:8080\"]"]
            .into_iter()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .collect();
        body.push(line);
        web(&body.join("\n"))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // ---- happy paths ----

    #[test]
    fn parses_mixed_backends_and_applies_defaults() {
        let text = r#"
            # comment
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = [ "10.0.0.11:8080", { address = "10.0.0.12:8080", weight = 3 }, { address = "10.0.0.13:8080" } ]

            [[service]]
            name = "dns.kube-system_1"
            vip = "10.96.0.10:53"
            protocol = "udp"
            backends = [{ address = "10.0.0.21:53", weight = 10000 }]
        "#;
        let config = parse(text, ORIGIN).unwrap();
        let expected = Config {
            services: vec![
                ServiceConfig {
                    name: "web".into(),
                    vip: addr("10.96.0.10:80"),
                    protocol: Protocol::Tcp,
                    backends: vec![
                        BackendConfig {
                            address: addr("10.0.0.11:8080"),
                            weight: 1,
                        },
                        BackendConfig {
                            address: addr("10.0.0.12:8080"),
                            weight: 3,
                        },
                        BackendConfig {
                            address: addr("10.0.0.13:8080"),
                            weight: 1,
                        },
                    ],
                    health: None,
                    fail_open: true,
                    panic_threshold: 0,
                    discovery: None,
                    balancing: Default::default(),
                    outlier: None,
                },
                ServiceConfig {
                    name: "dns.kube-system_1".into(),
                    vip: addr("10.96.0.10:53"),
                    protocol: Protocol::Udp,
                    backends: vec![BackendConfig {
                        address: addr("10.0.0.21:53"),
                        weight: 10_000,
                    }],
                    health: None,
                    fail_open: true,
                    panic_threshold: 0,
                    discovery: None,
                    balancing: Default::default(),
                    outlier: None,
                },
            ],
            kubernetes: None,
            dataplane: Default::default(),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn empty_and_service_less_files_have_zero_services() {
        for text in [
            "",
            "\n\n",
            "# only a comment\n",
            "  \t\n# x\n",
            "service = []",
        ] {
            assert_eq!(parse(text, ORIGIN).unwrap(), Config::default(), "{text:?}");
        }
    }

    #[test]
    fn empty_backends_is_a_valid_service() {
        let config = parse(&web("vip = \"10.96.0.10:80\"\nbackends = []"), ORIGIN).unwrap();
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.services[0].name, "web");
        assert!(config.services[0].backends.is_empty());
    }

    #[test]
    fn byte_order_mark_is_accepted() {
        let text = format!("\u{feff}{}", web_with("protocol = \"udp\""));
        assert_eq!(parse(&text, ORIGIN).unwrap().services[0].name, "web");
    }

    #[test]
    fn array_of_tables_backends_are_accepted() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            [[service.backends]]
            address = "10.0.0.11:8080"
            weight = 2
            [[service.backends]]
            address = "10.0.0.12:8080"
        "#;
        let config = parse(text, ORIGIN).unwrap();
        assert_eq!(
            config.services[0].backends,
            vec![
                BackendConfig {
                    address: addr("10.0.0.11:8080"),
                    weight: 2
                },
                BackendConfig {
                    address: addr("10.0.0.12:8080"),
                    weight: 1
                },
            ]
        );
    }

    #[test]
    fn same_vip_with_tcp_and_udp_is_fine() {
        let text = r#"
            [[service]]
            name = "dns-tcp"
            vip = "10.96.0.10:53"
            backends = []
            [[service]]
            name = "dns-udp"
            vip = "10.96.0.10:53"
            protocol = "udp"
            backends = []
        "#;
        let config = parse(text, ORIGIN).unwrap();
        let protocols: Vec<Protocol> = config.services.iter().map(|s| s.protocol).collect();
        assert_eq!(protocols, [Protocol::Tcp, Protocol::Udp]);
    }

    #[test]
    fn same_backend_in_two_services_is_fine() {
        let text = r#"
            [[service]]
            name = "a"
            vip = "10.96.0.1:80"
            backends = ["10.0.0.1:80"]
            [[service]]
            name = "b"
            vip = "10.96.0.2:80"
            backends = ["10.0.0.1:80"]
        "#;
        assert_eq!(parse(text, ORIGIN).unwrap().services.len(), 2);
    }

    #[test]
    fn protocol_as_str() {
        assert_eq!(Protocol::Tcp.as_str(), "tcp");
        assert_eq!(Protocol::Udp.as_str(), "udp");
    }

    // ---- TOML syntax ----

    #[test]
    fn syntax_error_names_origin_line_and_column() {
        let text = "[[service]]\nname = \"web\nvip = \"10.96.0.10:80\"\n";
        let e = single(text);
        assert!(e.starts_with("lb.toml: line 2, column "), "{e}");
        assert!(e.contains("invalid TOML"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn syntax_error_position_matches_the_toml_crate() {
        // Multi-byte characters before the error: columns count characters, like toml does.
        for text in [
            "a = 1\n\n  b = [1,\n 2, x]\n",
            "k = \"\u{e9}\u{e9}\" x\n",
            "a = 1\na = 2\n",
        ] {
            let ours = single(text);
            let theirs = toml::from_str::<Table>(text).unwrap_err().to_string();
            let position = ours.split(": ").nth(1).unwrap();
            assert!(theirs.contains(position), "ours: {ours}\ntheirs: {theirs}");
        }
    }

    #[test]
    fn duplicate_toml_key_is_reported_with_position() {
        let e = single(&web(
            "name = \"other\"\nvip = \"10.96.0.10:80\"\nbackends = []",
        ));
        assert!(
            e.starts_with("lb.toml: line 3, column 1: invalid TOML: duplicate key"),
            "{e}"
        );
    }

    #[test]
    fn a_backend_may_not_be_a_vip_of_the_same_protocol() {
        let text =
            "[[service]]\nname = \"a\"\nvip = \"10.96.0.1:80\"\nbackends = [\"10.0.0.1:80\"]\n\
                    [[service]]\nname = \"b\"\nvip = \"10.96.0.2:80\"\n\
                    backends = [\"10.0.0.2:80\", \"10.96.0.1:80\"]\n";
        assert_eq!(
            single(text),
            "lb.toml: service \"b\" (service[1]): backends[1]: 10.96.0.1:80 is the VIP of \
             service \"a\"; backends must be real addresses"
        );
        let probe = "[[service]]\nname = \"a\"\nvip = \"10.96.0.1:80\"\nbackends = []\n\
                     [[service]]\nname = \"b\"\nvip = \"10.96.0.2:80\"\n\
                     backends = [\"10.96.0.1:8080\"]\nhealth = { kind = \"tcp\", port = 80 }\n";
        assert_eq!(
            single(probe),
            "lb.toml: service \"b\" (service[1]): health.port: probing backends[0] on \
             10.96.0.1:80 would hit the VIP of service \"a\""
        );
        let udp = text.replace(
            "backends = [\"10.0.0.2:80\"",
            "protocol = \"udp\"\nbackends = [\"10.0.0.2:80\"",
        );
        assert!(
            parse(&udp, "lb.toml").is_ok(),
            "a udp backend on a tcp VIP's address is fine"
        );
    }

    // ---- unknown keys ----

    #[test]
    fn unknown_top_level_key() {
        assert_eq!(
            single("services = 1\n"),
            "lb.toml: services: unknown key (allowed: service, kubernetes, dataplane)"
        );
    }

    #[test]
    fn unknown_service_key() {
        let text = web("vip = \"10.96.0.10:80\"\nbackends = []\nprotocl = \"udp\"");
        assert_eq!(
            single(&text),
            "lb.toml: service \"web\" (service[0]): protocl: unknown key \
             (allowed: name, vip, protocol, backends, fail_open, panic_threshold, health, discovery, \
             algorithm, maglev_table_size, affinity, affinity_timeout, client_key, outlier)"
        );
    }

    #[test]
    fn misspelt_name_reports_the_key_and_the_missing_name() {
        let text = "[[service]]\nnmae = \"web\"\nvip = \"10.96.0.10:80\"\nbackends = []\n";
        let e = errors(text).to_string();
        assert!(e.starts_with("lb.toml: 2 errors\n"), "{e}");
        assert!(e.contains("lb.toml: service[0]: name: required"), "{e}");
        assert!(e.contains("lb.toml: service[0]: nmae: unknown key"), "{e}");
    }

    #[test]
    fn unknown_backend_key() {
        let e = single(&web_with(
            "backends = [{ address = \"10.0.0.1:80\", wieght = 2 }]",
        ));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): backends[0].wieght: unknown key \
             (allowed: address, weight)"
        );
    }

    #[test]
    fn odd_keys_are_quoted_and_escaped() {
        let e = single("\"bad\\nkey\" = 1\n");
        assert_eq!(
            e,
            "lb.toml: \"bad\\nkey\": unknown key (allowed: service, kubernetes, dataplane)"
        );
        assert_eq!(e.lines().count(), 1);
    }

    // ---- wrong types ----

    #[test]
    fn service_must_be_an_array_of_tables() {
        let e = single("[service]\nname = \"web\"\n");
        assert_eq!(
            e,
            "lb.toml: service: must be an array of tables: write [[service]], not [service]"
        );
        let e = single("service = \"web\"\n");
        assert_eq!(
            e,
            "lb.toml: service: expected an array of [[service]] tables, got string \"web\""
        );
        let e = single("service = [1]\n");
        assert_eq!(e, "lb.toml: service[0]: expected a table, got integer 1");
    }

    #[test]
    fn weight_as_string_is_a_type_error() {
        let e = single(&web_with(
            "backends = [{ address = \"10.0.0.1:80\", weight = \"3\" }]",
        ));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): backends[0].weight: \
             expected an integer, got string \"3\""
        );
    }

    #[test]
    fn weight_as_float_is_a_type_error() {
        let e = single(&web_with(
            "backends = [{ address = \"10.0.0.1:80\", weight = 2.5 }]",
        ));
        assert!(
            e.contains("backends[0].weight: expected an integer, got float 2.5"),
            "{e}"
        );
    }

    #[test]
    fn backends_as_string_is_a_type_error() {
        let e = single(&web_with("backends = \"x\""));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): backends: expected an array, got string \"x\""
        );
    }

    #[test]
    fn backend_entry_of_wrong_type() {
        let e = single(&web_with("backends = [42]"));
        assert!(
            e.contains("backends[0]: expected an address string or a table { address, weight }, got integer 42"),
            "{e}"
        );
        let e = single(&web_with("backends = [[\"10.0.0.1:80\"]]"));
        assert!(e.contains("backends[0]: expected an address string"), "{e}");
        assert!(e.ends_with("got array"), "{e}");
    }

    #[test]
    fn field_type_errors() {
        let e = single(&web_with("vip = 10"));
        assert!(
            e.contains("(service[0]): vip: expected an address:port string, got integer 10"),
            "{e}"
        );
        let e = single(&web_with("protocol = true"));
        assert!(
            e.contains("(service[0]): protocol: expected \"tcp\" or \"udp\", got boolean true"),
            "{e}"
        );
        let e = single(&web_with("backends = [{ address = 1979-05-27 }]"));
        assert!(
            e.contains("backends[0].address: expected an address:port string, got datetime"),
            "{e}"
        );
        let e = single("[[service]]\nname = 5\nvip = \"10.96.0.10:80\"\nbackends = []\n");
        assert_eq!(
            e,
            "lb.toml: service[0]: name: expected a string, got integer 5"
        );
    }

    // ---- name ----

    #[test]
    fn name_is_required() {
        let e = single("[[service]]\nvip = \"10.96.0.10:80\"\nbackends = []\n");
        assert_eq!(e, "lb.toml: service[0]: name: required");
    }

    #[test]
    fn name_must_not_be_empty() {
        let e = single("[[service]]\nname = \"\"\nvip = \"10.96.0.10:80\"\nbackends = []\n");
        assert_eq!(e, "lb.toml: service[0]: name: must not be empty");
    }

    #[test]
    fn name_length_limit_is_63_bytes() {
        let ok = "a".repeat(MAX_NAME_LEN);
        let text =
            format!("[[service]]\nname = \"{ok}\"\nvip = \"10.96.0.10:80\"\nbackends = []\n");
        assert_eq!(parse(&text, ORIGIN).unwrap().services[0].name, ok);

        let long = "a".repeat(MAX_NAME_LEN + 1);
        let text =
            format!("[[service]]\nname = \"{long}\"\nvip = \"10.96.0.10:80\"\nbackends = []\n");
        let e = single(&text);
        assert!(e.starts_with("lb.toml: service[0]: name: "), "{e}");
        assert!(e.ends_with("is 64 bytes long, at most 63 allowed"), "{e}");
    }

    #[test]
    fn name_characters_are_restricted() {
        for (name, offenders) in [
            ("web server", "' '"),
            ("w\u{e9}b", "'\u{e9}'"),
            ("a/b/c:d", "'/', ':'"),
            ("tab\\there", "'\\t'"),
        ] {
            let text =
                format!("[[service]]\nname = \"{name}\"\nvip = \"10.96.0.10:80\"\nbackends = []\n");
            let e = single(&text);
            assert!(e.starts_with("lb.toml: service[0]: name: "), "{e}");
            assert!(
                e.ends_with(&format!(
                    "contains {offenders}; only ASCII letters, digits, '.', '_' and '-' are allowed"
                )),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn invalid_name_is_not_used_as_label() {
        let text = "[[service]]\nname = \"bad name\"\nvip = \"10.96.0.10\"\nbackends = []\n";
        let e = errors(text).to_string();
        assert!(e.contains("lb.toml: service[0]: vip: missing port"), "{e}");
        assert!(!e.contains("service \"bad name\""), "{e}");
    }

    #[test]
    fn duplicate_names_name_both_services() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = []
            [[service]]
            name = "web"
            vip = "10.96.0.11:80"
            backends = []
        "#;
        assert_eq!(
            single(text),
            "lb.toml: service \"web\" (service[1]): name: \"web\" is already used by service[0]"
        );
    }

    // ---- vip ----

    /// The one error of `text`, without `prefix` (which it must start with).
    fn error_after(text: &str, prefix: &str) -> String {
        let e = single(text);
        assert!(e.starts_with(prefix), "{e}");
        e[prefix.len()..].to_owned()
    }

    fn vip_error(vip: &str) -> String {
        let text = web_with(&format!("vip = \"{vip}\""));
        error_after(&text, "lb.toml: service \"web\" (service[0]): vip: ")
    }

    #[test]
    fn vip_is_required() {
        let e = single(&web("backends = []"));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): vip: required \
             (address:port, e.g. \"10.96.0.10:80\" or \"[fd00::10]:80\")"
        );
    }

    #[test]
    fn ipv6_vips_are_accepted_and_checked() {
        let text = web("vip = \"[fd00::10]:80\"\nbackends = [\"[fd00::1]:8080\"]");
        let config = parse(&text, ORIGIN).unwrap();
        assert_eq!(config.services[0].vip, "[fd00::10]:80".parse().unwrap());
        // A v4-mapped address is the IPv4 address: that is what the kernel sees too.
        let config = parse(&web_with("vip = \"[::ffff:10.0.0.1]:80\""), ORIGIN).unwrap();
        assert_eq!(config.services[0].vip, "10.0.0.1:80".parse().unwrap());
        assert_eq!(
            vip_error("::1"),
            "missing port in \"::1\"; an IPv6 address goes in brackets: \"[::1]:8080\""
        );
        assert_eq!(
            vip_error("[fe80::1%2]:80"),
            "a zone (%2) is not allowed in \"[fe80::1%2]:80\": the data plane matches addresses only"
        );
        assert_eq!(
            vip_error("[::]:80"),
            "the unspecified address :: is not allowed ([::]:80)"
        );
        assert_eq!(
            vip_error("[ff02::1]:80"),
            "multicast address ff02::1 is not allowed ([ff02::1]:80)"
        );
        assert!(vip_error("[2001:db8::1]").starts_with("expected address:port like"));
    }

    #[test]
    fn backends_must_share_the_vip_family() {
        let e = single(&web_with("vip = \"[fd00::10]:80\""));
        assert!(
            e.ends_with(
                "backends[0]: 10.0.0.11:8080 and the VIP [fd00::10]:80 are of different address \
                 families; a service's backends must share its VIP's family"
            ),
            "{e}"
        );
    }

    #[test]
    fn vip_without_port() {
        assert_eq!(
            vip_error("10.96.0.10"),
            "missing port in \"10.96.0.10\"; expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\""
        );
    }

    #[test]
    fn vip_with_invalid_port() {
        assert_eq!(
            vip_error("10.96.0.10:70000"),
            "invalid port \"70000\" in \"10.96.0.10:70000\": must be a number 1-65535"
        );
        assert!(vip_error("10.96.0.10:http").starts_with("invalid port \"http\""));
        assert!(vip_error("10.96.0.10:").starts_with("invalid port \"\""));
        assert!(vip_error("10.96.0.10:80 ").starts_with("invalid port \"80 \""));
    }

    #[test]
    fn vip_rejects_port_zero_and_special_addresses() {
        assert_eq!(
            vip_error("10.96.0.10:0"),
            "port 0 is not allowed (10.96.0.10:0)"
        );
        assert_eq!(
            vip_error("0.0.0.0:80"),
            "the unspecified address 0.0.0.0 is not allowed (0.0.0.0:80)"
        );
        assert_eq!(
            vip_error("255.255.255.255:80"),
            "broadcast address 255.255.255.255 is not allowed (255.255.255.255:80)"
        );
        for ip in ["224.0.0.1", "239.255.255.255", "230.1.2.3"] {
            assert_eq!(
                vip_error(&format!("{ip}:80")),
                format!("multicast address {ip} is not allowed ({ip}:80)")
            );
        }
        // Just outside the multicast range.
        assert!(parse(&web_with("vip = \"223.255.255.255:80\""), ORIGIN).is_ok());
        assert!(parse(&web_with("vip = \"240.0.0.1:80\""), ORIGIN).is_ok());
    }

    #[test]
    fn vip_garbage() {
        for vip in [
            "",
            "web.local:80",
            "10.96.0:80",
            "10.96.0.256:80",
            " 10.96.0.10:80",
        ] {
            assert_eq!(
                vip_error(vip),
                format!("expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\", got {vip:?}"),
                "{vip:?}"
            );
        }
    }

    // ---- protocol ----

    #[test]
    fn protocol_is_case_sensitive_and_lists_allowed_values() {
        for p in ["TCP", "Udp", "sctp", ""] {
            let e = single(&web_with(&format!("protocol = \"{p}\"")));
            assert_eq!(
                e,
                format!(
                    "lb.toml: service \"web\" (service[0]): protocol: \
                     must be \"tcp\" or \"udp\", got \"{p}\""
                )
            );
        }
    }

    #[test]
    fn duplicate_vip_and_protocol_names_both_services() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = []
            [[service]]
            name = "web2"
            vip = "10.96.0.10:80"
            protocol = "tcp"
            backends = []
        "#;
        assert_eq!(
            single(text),
            "lb.toml: service \"web2\" (service[1]): vip: 10.96.0.10:80/tcp is already used by \
             service \"web\" (service[0])"
        );
    }

    // ---- backends ----

    fn backend_error(entry: &str) -> String {
        let text = web_with(&format!("backends = [\"10.0.0.1:80\", {entry}]"));
        error_after(&text, "lb.toml: service \"web\" (service[0]): ")
    }

    #[test]
    fn backends_are_required() {
        let e = single(&web("vip = \"10.96.0.10:80\""));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): backends: required \
             (write backends = [] for a service without backends, or add a [service.discovery] block)"
        );
    }

    #[test]
    fn backend_addresses_are_validated() {
        assert_eq!(
            backend_error("\"10.0.0.2\""),
            "backends[1]: missing port in \"10.0.0.2\"; expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\""
        );
        assert_eq!(
            backend_error("\"10.0.0.2:0\""),
            "backends[1]: port 0 is not allowed (10.0.0.2:0)"
        );
        assert_eq!(
            backend_error("{ address = \"0.0.0.0:80\" }"),
            "backends[1].address: the unspecified address 0.0.0.0 is not allowed (0.0.0.0:80)"
        );
        assert_eq!(
            backend_error("\"255.255.255.255:80\""),
            "backends[1]: broadcast address 255.255.255.255 is not allowed (255.255.255.255:80)"
        );
        assert_eq!(
            backend_error("{ address = \"239.1.1.1:80\", weight = 2 }"),
            "backends[1].address: multicast address 239.1.1.1 is not allowed (239.1.1.1:80)"
        );
        assert_eq!(
            backend_error("\"[fd00::1]:80\""),
            "backends[1]: [fd00::1]:80 and the VIP 10.96.0.10:80 are of different address families; a service's backends must share its VIP's family"
        );
        assert_eq!(
            backend_error("\"backend-1:80\""),
            "backends[1]: expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\", got \"backend-1:80\""
        );
        assert_eq!(
            backend_error("{ weight = 2 }"),
            "backends[1].address: required"
        );
    }

    #[test]
    fn duplicate_backend_addresses_are_rejected() {
        assert_eq!(
            backend_error("{ address = \"10.0.0.1:80\", weight = 5 }"),
            "backends[1].address: 10.0.0.1:80 is already listed as backends[0]"
        );
        assert_eq!(
            backend_error("\"10.0.0.1:80\""),
            "backends[1]: 10.0.0.1:80 is already listed as backends[0]"
        );
        // Same address, other port: a different backend.
        assert!(parse(
            &web_with("backends = [\"10.0.0.1:80\", \"10.0.0.1:81\"]"),
            ORIGIN
        )
        .is_ok());
    }

    #[test]
    fn weight_bounds() {
        for w in [0, -1, 10_001, i64::MAX, i64::MIN, 1 << 32] {
            assert_eq!(
                backend_error(&format!("{{ address = \"10.0.0.2:80\", weight = {w} }}")),
                format!("backends[1].weight: must be between 1 and 10000, got {w}")
            );
        }
        for w in [1, MAX_WEIGHT] {
            let text = web_with(&format!(
                "backends = [{{ address = \"10.0.0.2:80\", weight = {w} }}]"
            ));
            assert_eq!(
                parse(&text, ORIGIN).unwrap().services[0].backends[0].weight,
                w
            );
        }
    }

    #[test]
    fn weight_error_matches_the_documented_format() {
        let text = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = [ "10.0.0.11:8080", { address = "10.0.0.12:8080", weight = 0 } ]
        "#;
        assert_eq!(
            parse(text, "config.toml").unwrap_err().to_string(),
            "config.toml: service \"web\" (service[0]): backends[1].weight: must be between 1 and 10000, got 0"
        );
    }

    fn many_backends(n: usize) -> String {
        let list: Vec<String> = (0..n)
            .map(|i| format!("\"10.1.{}.{}:80\"", i / 256, i % 256))
            .collect();
        web_with(&format!("backends = [{}]", list.join(", ")))
    }

    #[test]
    fn at_most_1024_backends_per_service() {
        let config = parse(&many_backends(MAX_BACKENDS_PER_SERVICE), ORIGIN).unwrap();
        assert_eq!(config.services[0].backends.len(), 1024);
        assert_eq!(
            single(&many_backends(MAX_BACKENDS_PER_SERVICE + 1)),
            "lb.toml: service \"web\" (service[0]): backends: 1025 backends, at most 1024 allowed"
        );
    }

    /// Built as a table rather than text: parsing megabytes of TOML takes seconds in debug builds.
    fn many_services(n: usize) -> Table {
        let service = |i: usize| {
            let (a, b, c) = (i >> 16, (i >> 8) & 255, i & 255);
            let mut t = Table::new();
            t.insert("name".into(), Value::String(format!("s{i}")));
            t.insert("vip".into(), Value::String(format!("10.{a}.{b}.{c}:80")));
            t.insert("backends".into(), Value::Array(vec![]));
            Value::Table(t)
        };
        let mut root = Table::new();
        root.insert(
            "service".into(),
            Value::Array((0..n).map(service).collect()),
        );
        root
    }

    #[test]
    fn at_most_65536_services() {
        let mut checker = Checker::default();
        let config = checker.config(&many_services(MAX_SERVICES));
        assert!(
            checker.problems.is_empty(),
            "{:?}",
            checker.problems.first()
        );
        assert_eq!(config.services.len(), MAX_SERVICES);
        assert_eq!(config.services[65_535].vip, addr("10.0.255.255:80"));

        let mut checker = Checker::default();
        checker.config(&many_services(MAX_SERVICES + 1));
        let e = ConfigError {
            origin: ORIGIN.into(),
            problems: checker.problems,
        };
        assert_eq!(
            e.to_string(),
            "lb.toml: service: 65537 services, at most 65536 allowed"
        );
    }

    // ---- health checks and fail-open ----

    /// The `health` of service "web" with the given inline-table body.
    fn health(body: &str) -> Option<HealthConfig> {
        let text = web_with(&format!("health = {{ {body} }}"));
        parse(&text, ORIGIN).unwrap().services[0].health.clone()
    }

    /// The single problem of service "web" with the given inline `health` body, without the
    /// `lb.toml: service "web" (service[0]): ` prefix.
    fn health_error(body: &str) -> String {
        service_error(&format!("health = {{ {body} }}"))
    }

    /// The single problem of service "web" with one field line added, without the prefix.
    fn service_error(line: &str) -> String {
        let e = single(&web_with(line));
        let prefix = "lb.toml: service \"web\" (service[0]): ";
        assert!(e.starts_with(prefix), "{e}");
        e[prefix.len()..].to_owned()
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
            }],
            health: Some(HealthConfig {
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
            }),
            fail_open: false,
            panic_threshold: 50,
            discovery: None,
            balancing: Default::default(),
            outlier: None,
        };
        assert_eq!(config.services[1], expected);
    }

    #[test]
    fn services_without_health_fail_open_by_default() {
        let config = parse(&web_with("protocol = \"tcp\""), ORIGIN).unwrap();
        let service = &config.services[0];
        assert_eq!(service.health, None);
        assert!(service.fail_open);
        assert_eq!(service.panic_threshold, 0);
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
        let long = format!("/{}", "a".repeat(MAX_HEALTH_PATH_LEN));
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
        let ok = format!("/{}", "a".repeat(MAX_HEALTH_PATH_LEN - 1));
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
    fn fail_open_must_be_a_bool() {
        assert_eq!(
            service_error("fail_open = \"yes\""),
            "fail_open: expected a boolean, got string \"yes\""
        );
        assert_eq!(
            service_error("fail_open = 1"),
            "fail_open: expected a boolean, got integer 1"
        );
        let config = parse(&web_with("fail_open = false"), ORIGIN).unwrap();
        assert!(!config.services[0].fail_open);
    }

    #[test]
    fn panic_threshold_bounds() {
        for n in [101, -1, 256, i64::MIN] {
            assert_eq!(
                service_error(&format!("panic_threshold = {n}")),
                format!("panic_threshold: must be between 0 and 100, got {n}")
            );
        }
        assert_eq!(
            service_error("panic_threshold = \"50\""),
            "panic_threshold: expected an integer, got string \"50\""
        );
        assert_eq!(
            service_error("panic_threshold = 50.5"),
            "panic_threshold: expected an integer, got float 50.5"
        );
        for n in [0, 1, 100] {
            let config = parse(&web_with(&format!("panic_threshold = {n}")), ORIGIN).unwrap();
            assert_eq!(config.services[0].panic_threshold, n);
        }
    }

    #[test]
    fn health_durations_must_be_well_formed() {
        for key in ["interval", "timeout", "jitter"] {
            for bad in [
                "2",
                "1.5s",
                "-1s",
                "2 s",
                "",
                "10us",
                " 2s",
                "2s ",
                "+2s",
                "s",
                "2S",
                "2sec",
                "1d",
                "1m30s",
                "0x10s",
                "\u{0661}s",
                "99999999999999999999s",
                "18446744073709551615h",
            ] {
                assert_eq!(
                    health_error(&format!("kind = \"tcp\", {key} = {bad:?}")),
                    format!(
                        "health.{key}: expected a duration such as \"500ms\", \"2s\", \"1m\" or \
                         \"1h\" (an unsigned integer followed by ms, s, m or h), got string {}",
                        show(bad)
                    ),
                    "{key} = {bad:?}"
                );
            }
            assert_eq!(
                health_error(&format!("kind = \"tcp\", {key} = 2")),
                format!(
                    "health.{key}: expected a duration such as \"500ms\", \"2s\", \"1m\" or \
                     \"1h\" (an unsigned integer followed by ms, s, m or h), got integer 2"
                )
            );
        }
    }

    #[test]
    fn parse_duration_accepts_only_integer_and_unit() {
        for (text, ms) in [
            ("0ms", 0),
            ("500ms", 500),
            ("2s", 2_000),
            ("007s", 7_000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("18446744073709551615ms", u64::MAX),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for text in [
            "",
            "2",
            "ms",
            "1.5s",
            "-1s",
            "+1s",
            "2 s",
            "10us",
            "1ns",
            "1M",
            "1H",
            "2ms ",
            "1sm",
            "18446744073709551615s",
        ] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn show_duration_uses_the_largest_exact_unit() {
        for (ms, shown) in [
            (0, "0ms"),
            (1, "1ms"),
            (1_500, "1500ms"),
            (2_000, "2s"),
            (90_000, "90s"),
            (60_000, "1m"),
            (5_400_000, "90m"),
            (7_200_000, "2h"),
        ] {
            assert_eq!(show_duration(Duration::from_millis(ms)), shown);
        }
        assert_eq!(show_duration(Duration::from_micros(1_500)), "1.5ms");
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

    // ---- reporting ----

    #[test]
    fn all_problems_are_reported_together() {
        let text = r#"
            typo = 1
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = [ "10.0.0.11:8080", { address = "10.0.0.12:8080", weight = 0 } ]
            [[service]]
            name = "bad name"
            vip = "::1"
            protocol = "TCP"
            backends = "x"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            backends = []
        "#;
        let e = errors(text);
        let expected = [
            "lb.toml: 8 errors",
            "lb.toml: typo: unknown key (allowed: service, kubernetes, dataplane)",
            "lb.toml: service \"web\" (service[0]): backends[1].weight: must be between 1 and 10000, got 0",
            "lb.toml: service[1]: name: \"bad name\" contains ' '; only ASCII letters, digits, '.', '_' and '-' are allowed",
            "lb.toml: service[1]: vip: missing port in \"::1\"; an IPv6 address goes in brackets: \"[::1]:8080\"",
            "lb.toml: service[1]: protocol: must be \"tcp\" or \"udp\", got \"TCP\"",
            "lb.toml: service[1]: backends: expected an array, got string \"x\"",
            "lb.toml: service \"web\" (service[2]): name: \"web\" is already used by service[0]",
            "lb.toml: service \"web\" (service[2]): vip: 10.96.0.10:80/tcp is already used by service \"web\" (service[0])",
        ];
        assert_eq!(e.to_string(), expected.join("\n"));
    }

    #[test]
    fn long_lists_are_capped_but_counted() {
        let list: Vec<String> = (0..150).map(|i| format!("\"bad{i}\"")).collect();
        let e = errors(&web_with(&format!("backends = [{}]", list.join(", ")))).to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines[0], "lb.toml: 150 errors");
        assert_eq!(lines.len(), 1 + MAX_LISTED + 1);
        assert!(lines[1].contains("backends[0]: "), "{}", lines[1]);
        assert!(lines[100].contains("backends[99]: "), "{}", lines[100]);
        assert_eq!(lines[101], "lb.toml: ... and 50 more");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let huge = "x".repeat(100_000);
        let e = single(&web_with(&format!("vip = \"{huge}\"")));
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(
            e.ends_with(&format!("got \"{}\"...", "x".repeat(MAX_SHOWN_CHARS))),
            "{e}"
        );
    }

    #[test]
    fn config_error_works_with_anyhow() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>(_: &E) {}
        let e = errors("x = 1");
        assert_error(&e);
        assert!(std::error::Error::source(&e).is_none());
    }

    // ---- files ----

    /// A file in a folder of its own, removed again when the test passes.
    struct TempFile {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> Self {
            let dir =
                std::env::temp_dir().join(format!("lb-config-test-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            TempFile { dir, path }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn load_reads_a_valid_file() {
        let file = TempFile::new("ok.toml", web_with("protocol = \"udp\"").as_bytes());
        let config = load(&file.path).unwrap();
        assert_eq!(config.services[0].protocol, Protocol::Udp);
        assert_eq!(
            config.services[0].backends[0].address,
            addr("10.0.0.11:8080")
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let file = TempFile::new("bad.toml", web_with("protocol = \"TCP\"").as_bytes());
        let e = load(&file.path).unwrap_err().to_string();
        let prefix = format!(
            "{}: service \"web\" (service[0]): protocol:",
            file.path.display()
        );
        assert!(e.starts_with(&prefix), "{e}");

        let file = TempFile::new("syntax.toml", b"[[service]\n");
        let e = load(&file.path).unwrap_err().to_string();
        let prefix = format!("{}: line 1, column ", file.path.display());
        assert!(e.starts_with(&prefix), "{e}");

        let file = TempFile::new("binary.toml", b"name = \"\xff\xfe\"\n");
        let e = load(&file.path).unwrap_err().to_string();
        let expected = format!("{}: not valid UTF-8 (byte 8)", file.path.display());
        assert_eq!(e, expected);

        let missing = file.dir.join("does-not-exist.toml");
        let e = load(&missing).unwrap_err().to_string();
        let prefix = format!("{}: cannot read: ", missing.display());
        assert!(e.starts_with(&prefix), "{e}");
    }

    // ---- garbage ----

    #[test]
    fn garbage_does_not_panic() {
        let deep_array = format!("a = {}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_table = format!("a = {}{}", "{ b = ".repeat(10_000), "}".repeat(10_000));
        let deep_service = format!("service = {}{}", "[".repeat(50), "]".repeat(50));
        let binary: String = (0u8..=255).cycle().take(4096).map(char::from).collect();
        let inputs = [
            "\0\0\0",
            "[[service]]\n[[service]]\n[[service]]",
            "service = [[], {}, 1, \"x\", true, 1.5, 1979-05-27T07:32:00Z]",
            "[[service]]\nname = [[1]]\nvip = { a = 1 }\nprotocol = []\nbackends = [{}, [], {address = []}, {weight = {}}]",
            "[[service]]\nbackends = [{ address = \"1.2.3.4:5\", weight = nan }, { address = \"1.2.3.4:6\", weight = inf }]",
            "[service.backends]\nx = 1",
            "[[service.backends.address]]",
            "[[service]]\n[service.health]\nkind = []\ninterval = {}\n[service.health.x]\ny = 1",
            "[[service]]\nhealth = [{ kind = \"http\", path = { a = 1 } }]\nfail_open = []",
            "name = \"\\u0000\"\n[[service]]\nname = \"\\u0000\\u001b[31m\"",
            &deep_array,
            &deep_table,
            &deep_service,
            &binary,
        ];
        for text in inputs {
            let e = errors(text).to_string();
            assert!(e.starts_with("lb.toml: "), "{e}");
            for line in e.lines() {
                assert!(line.starts_with("lb.toml: "), "{line:?}");
                assert!(!line.contains('\0') && !line.contains('\u{1b}'), "{line:?}");
            }
        }
    }

    #[test]
    fn mutated_configs_do_not_panic() {
        let base = r#"
            [[service]]
            name = "web"
            vip = "10.96.0.10:80"
            protocol = "udp"
            backends = [ "10.0.0.11:8080", { address = "10.0.0.12:8080", weight = 3 } ]
        "#
        .as_bytes();
        let alphabet = b"[]{}\"'=,.:#\n 0129aZ\\\xc3\xa9";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..3000 {
            let mut bytes = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % bytes.len() as u64) as usize;
                let c = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 => bytes[at] = c,
                    1 => bytes.insert(at, c),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            match parse(&text, ORIGIN) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    rejected += 1;
                    assert!(e.to_string().starts_with("lb.toml: "));
                }
            }
        }
        assert!(
            accepted > 0 && rejected > 0,
            "{accepted} accepted, {rejected} rejected"
        );
    }
}
