//! The agent's TOML config: parsing and validation.
//!
//! TOML is first parsed into a generic `toml::Table` and then checked by hand instead of being
//! deserialized into `#[derive(Deserialize)]` structs: serde stops at the first error and its
//! messages lose the path of the offending field, while an operator should see every problem of
//! an edit at once, each named by file, service and field.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use toml::{Table, Value};

pub const MAX_SERVICES: usize = lb_common::MAX_SERVICES as usize;
pub const MAX_BACKENDS_PER_SERVICE: usize = 1_024;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_NAME_LEN: usize = lb_common::MAX_NAME_LEN;

/// A generated config that is wrong everywhere must not flood the log on every reload.
const MAX_LISTED: usize = 100;
/// Long values are cut in messages so that one huge string cannot swamp them.
const MAX_SHOWN_CHARS: usize = 64;

const SERVICE_KEYS: &[&str] = &["name", "vip", "protocol", "backends"];
const BACKEND_KEYS: &[&str] = &["address", "weight"];

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
    pub address: SocketAddrV4,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub services: Vec<ServiceConfig>,
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
    parse(&text, &origin)
}

/// Validates text; `origin` is what errors call the source (normally the file path).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
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
    let mut checker = Checker::default();
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

    fn unknown_keys(&mut self, scope: Option<&str>, prefix: &str, table: &Table, allowed: &[&str]) {
        for key in table.keys().filter(|k| !allowed.contains(&k.as_str())) {
            let message = format!("unknown key (allowed: {})", allowed.join(", "));
            self.report(scope, format!("{prefix}{}", show_key(key)), message);
        }
    }

    fn config(&mut self, root: &Table) -> Config {
        self.unknown_keys(None, "", root, &["service"]);
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
        let services = raw
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.service(i, s, &mut seen));
        Config {
            services: services.collect(),
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
            None => Err("required (IPv4 address:port, e.g. \"10.96.0.10:80\")".to_owned()),
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
        let backends = self.backends(scope, table.get("backends"));
        self.unknown_keys(scope, "", table, SERVICE_KEYS);
        Some(ServiceConfig {
            name: name?.to_owned(),
            vip: vip?,
            protocol: protocol?,
            backends: backends?,
        })
    }

    fn backends(&mut self, scope: Option<&str>, raw: Option<&Value>) -> Option<Vec<BackendConfig>> {
        let list = match raw {
            None => {
                // Required so that a misspelt key cannot silently create a service nobody serves.
                let message = "required (write backends = [] for a service without backends)";
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
        let mut first_index: HashMap<SocketAddrV4, usize> = HashMap::new();
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

/// What earlier services claimed, so that a duplicate names both services.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    vips: HashMap<(SocketAddrV4, Protocol), String>,
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
    // A few distinct offenders are enough to point at the problem.
    let mut bad: Vec<String> = Vec::new();
    let offenders = name
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    for shown in offenders.map(|c| format!("{c:?}")) {
        if bad.len() == 8 {
            break;
        }
        if !bad.contains(&shown) {
            bad.push(shown);
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} contains {}; only ASCII letters, digits, '.', '_' and '-' are allowed",
            show(name),
            bad.join(", ")
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

fn check_protocol(raw: Option<&Value>) -> Result<Protocol, String> {
    match raw {
        None => Ok(Protocol::Tcp),
        Some(Value::String(p)) if p == "tcp" => Ok(Protocol::Tcp),
        Some(Value::String(p)) if p == "udp" => Ok(Protocol::Udp),
        Some(Value::String(p)) => Err(format!("must be \"tcp\" or \"udp\", got {}", show(p))),
        Some(other) => Err(type_error("\"tcp\" or \"udp\"", other)),
    }
}

fn check_weight(raw: Option<&Value>) -> Result<u32, String> {
    match raw {
        None => Ok(1),
        Some(Value::Integer(w)) => u32::try_from(*w)
            .ok()
            .filter(|w| (1..=MAX_WEIGHT).contains(w))
            .ok_or_else(|| format!("must be between 1 and {MAX_WEIGHT}, got {w}")),
        Some(other) => Err(type_error("an integer", other)),
    }
}

/// An IPv4 `address:port` a connect can be sent to: the data plane matches and rewrites exact
/// destinations, so wildcard, broadcast and multicast addresses or port 0 never make sense.
fn check_endpoint(raw: &Value) -> Result<SocketAddrV4, String> {
    let Value::String(text) = raw else {
        return Err(type_error("an IPv4 address:port string", raw));
    };
    let Ok(addr) = text.parse::<SocketAddrV4>() else {
        return Err(explain_bad_endpoint(text));
    };
    let ip = addr.ip();
    if addr.port() == 0 {
        Err(format!("port 0 is not allowed ({addr})"))
    } else if ip.is_unspecified() {
        Err(format!("address 0.0.0.0 is not allowed ({addr})"))
    } else if ip.is_broadcast() {
        Err(format!(
            "broadcast address 255.255.255.255 is not allowed ({addr})"
        ))
    } else if ip.is_multicast() {
        Err(format!(
            "multicast address {ip} (224.0.0.0/4) is not allowed ({addr})"
        ))
    } else {
        Ok(addr)
    }
}

fn explain_bad_endpoint(text: &str) -> String {
    let example = "expected IPv4 address:port like \"10.0.0.1:8080\"";
    let is_ipv6 = text.starts_with('[')
        || text.parse::<SocketAddr>().is_ok()
        || text.parse::<Ipv6Addr>().is_ok();
    if is_ipv6 {
        return format!("IPv6 is not supported yet, got {}", show(text));
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

    fn addr(s: &str) -> SocketAddrV4 {
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
                },
                ServiceConfig {
                    name: "dns.kube-system_1".into(),
                    vip: addr("10.96.0.10:53"),
                    protocol: Protocol::Udp,
                    backends: vec![BackendConfig {
                        address: addr("10.0.0.21:53"),
                        weight: 10_000,
                    }],
                },
            ],
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

    // ---- unknown keys ----

    #[test]
    fn unknown_top_level_key() {
        assert_eq!(
            single("services = 1\n"),
            "lb.toml: services: unknown key (allowed: service)"
        );
    }

    #[test]
    fn unknown_service_key() {
        let text = web("vip = \"10.96.0.10:80\"\nbackends = []\nprotocl = \"udp\"");
        assert_eq!(
            single(&text),
            "lb.toml: service \"web\" (service[0]): protocl: unknown key \
             (allowed: name, vip, protocol, backends)"
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
        assert_eq!(e, "lb.toml: \"bad\\nkey\": unknown key (allowed: service)");
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
            e.contains("(service[0]): vip: expected an IPv4 address:port string, got integer 10"),
            "{e}"
        );
        let e = single(&web_with("protocol = true"));
        assert!(
            e.contains("(service[0]): protocol: expected \"tcp\" or \"udp\", got boolean true"),
            "{e}"
        );
        let e = single(&web_with("backends = [{ address = 1979-05-27 }]"));
        assert!(
            e.contains("backends[0].address: expected an IPv4 address:port string, got datetime"),
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

    fn vip_error(vip: &str) -> String {
        let e = single(&web_with(&format!("vip = \"{vip}\"")));
        let prefix = "lb.toml: service \"web\" (service[0]): vip: ";
        assert!(e.starts_with(prefix), "{e}");
        e[prefix.len()..].to_owned()
    }

    #[test]
    fn vip_is_required() {
        let e = single(&web("backends = []"));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): vip: required \
             (IPv4 address:port, e.g. \"10.96.0.10:80\")"
        );
    }

    #[test]
    fn ipv6_vip_has_a_specific_message() {
        for vip in [
            "[::1]:80",
            "::1",
            "fe80::1",
            "[2001:db8::1]",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(
                vip_error(vip),
                format!("IPv6 is not supported yet, got \"{vip}\"")
            );
        }
    }

    #[test]
    fn vip_without_port() {
        assert_eq!(
            vip_error("10.96.0.10"),
            "missing port in \"10.96.0.10\"; expected IPv4 address:port like \"10.0.0.1:8080\""
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
            "address 0.0.0.0 is not allowed (0.0.0.0:80)"
        );
        assert_eq!(
            vip_error("255.255.255.255:80"),
            "broadcast address 255.255.255.255 is not allowed (255.255.255.255:80)"
        );
        for ip in ["224.0.0.1", "239.255.255.255", "230.1.2.3"] {
            assert_eq!(
                vip_error(&format!("{ip}:80")),
                format!("multicast address {ip} (224.0.0.0/4) is not allowed ({ip}:80)")
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
                format!("expected IPv4 address:port like \"10.0.0.1:8080\", got {vip:?}"),
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
        let e = single(&web_with(&format!("backends = [\"10.0.0.1:80\", {entry}]")));
        let prefix = "lb.toml: service \"web\" (service[0]): ";
        assert!(e.starts_with(prefix), "{e}");
        e[prefix.len()..].to_owned()
    }

    #[test]
    fn backends_are_required() {
        let e = single(&web("vip = \"10.96.0.10:80\""));
        assert_eq!(
            e,
            "lb.toml: service \"web\" (service[0]): backends: required \
             (write backends = [] for a service without backends)"
        );
    }

    #[test]
    fn backend_addresses_are_validated() {
        assert_eq!(
            backend_error("\"10.0.0.2\""),
            "backends[1]: missing port in \"10.0.0.2\"; expected IPv4 address:port like \"10.0.0.1:8080\""
        );
        assert_eq!(
            backend_error("\"10.0.0.2:0\""),
            "backends[1]: port 0 is not allowed (10.0.0.2:0)"
        );
        assert_eq!(
            backend_error("{ address = \"0.0.0.0:80\" }"),
            "backends[1].address: address 0.0.0.0 is not allowed (0.0.0.0:80)"
        );
        assert_eq!(
            backend_error("\"255.255.255.255:80\""),
            "backends[1]: broadcast address 255.255.255.255 is not allowed (255.255.255.255:80)"
        );
        assert_eq!(
            backend_error("{ address = \"239.1.1.1:80\", weight = 2 }"),
            "backends[1].address: multicast address 239.1.1.1 (224.0.0.0/4) is not allowed (239.1.1.1:80)"
        );
        assert_eq!(
            backend_error("\"[fd00::1]:80\""),
            "backends[1]: IPv6 is not supported yet, got \"[fd00::1]:80\""
        );
        assert_eq!(
            backend_error("\"backend-1:80\""),
            "backends[1]: expected IPv4 address:port like \"10.0.0.1:8080\", got \"backend-1:80\""
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
            "lb.toml: typo: unknown key (allowed: service)",
            "lb.toml: service \"web\" (service[0]): backends[1].weight: must be between 1 and 10000, got 0",
            "lb.toml: service[1]: name: \"bad name\" contains ' '; only ASCII letters, digits, '.', '_' and '-' are allowed",
            "lb.toml: service[1]: vip: IPv6 is not supported yet, got \"::1\"",
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
