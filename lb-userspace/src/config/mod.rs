//! The agent's TOML config: parsing and validation.
//!
//! TOML is first parsed into a generic `toml::Table` and then checked by hand instead of being
//! deserialized into `#[derive(Deserialize)]` structs: serde stops at the first error and its
//! messages lose the path of the offending field, while an operator should see every problem of
//! an edit at once, each named by file, service and field.
//!
//! This module reads the file and checks its top level; each section has a module of its own.
//! Modules are listed so that each uses only those above it.

/// What a checked config is: the types the rest of the agent reads.
mod model;
/// Helpers for the tests of the modules below.
#[cfg(test)]
mod testkit;
/// A rejected config: every problem, one per line.
mod error;
/// Checks of single values (integers, durations, addresses, text, ...) and their messages.
mod values;
/// A large file parsed a `[[service]]` at a time, the fast path of `parse_with_env`.
mod chunks;
/// What collects the problems, and how an optional section is read.
mod checker;
/// A service's `algorithm`, `affinity` and `client_key`.
mod balancing;
/// `[kubernetes]`.
mod kubernetes;
/// `[service.discovery]`, with a module for each kind of source.
mod discovery;
/// `[service.health]`.
mod health;
/// `[service.outlier]`.
mod outlier;
/// `[service.rebalance]`.
mod rebalance;
/// A service's `backends` list.
mod backends;
/// One `[[service]]`, made of the sections above.
mod service;
/// The rule across services that no backend is a VIP.
mod vip_clash;

pub use balancing::{
    is_prime, AFFINITY_TIMEOUT_RANGE, DEFAULT_AFFINITY_TIMEOUT, DEFAULT_TABLE_SIZE, MIN_TABLE_SIZE,
};
pub use checker::Env;
pub use error::ConfigError;
pub use kubernetes::is_node_name;
pub use model::{
    Algorithm, BackendConfig, Backends, Balancing, ClientKey, Config, ConsulConfig,
    DataplaneConfig, DiscoveryConfig, DnsConfig, DnsRecord, EtcdConfig, HealthConfig, InitialState,
    KubernetesConfig, Name, OutlierConfig, ProbeKind, Protocol, RebalanceConfig, ServiceConfig,
    SourceConfig, Terminate, DEFAULT_KUBE_MAX_SERVICES, MAX_BACKENDS_PER_SERVICE, MAX_NAME_LEN,
    MAX_SERVICES, MAX_WEIGHT,
};
pub use vip_clash::VipClash;

use checker::{Checker, Section};
use service::Seen;
use std::path::Path;
use toml::{Table, Value};
use values::{check_bool, check_integer, check_text, show, type_error};

/// Reads and validates a file. Errors name the file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    // Bounded: a config file named by mistake (a log, /dev/zero) is an error, not all memory.
    let bytes = crate::private_files::read_limited(path, crate::private_files::CONFIG_LIMIT)
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
    if let Some(config) = parse_in_pieces(text, &env) {
        return Ok(config);
    }
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
        env,
        ..Checker::default()
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

/// A valid file checked a service at a time (`chunks`); `None` for anything else, which the
/// whole-file path then reports exactly.
fn parse_in_pieces(text: &str, env: &Env) -> Option<Config> {
    let mut checker = Checker {
        env: env.clone(),
        ..Checker::default()
    };
    let mut seen = Seen::default();
    let mut services = Vec::new();
    let mut count = 0;
    let rest = chunks::parse(text, |i, raw| {
        count += 1;
        if let Some(service) = checker.service(i, raw, &mut seen) {
            services.push((i, service));
        }
    })?;
    let (kubernetes, dataplane) = checker.top_level(&rest);
    let config = checker.across_services(services, count, kubernetes, dataplane);
    checker.problems.is_empty().then_some(config)
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

impl Checker {
    /// The whole file: its top-level keys, every service, then the rules across services.
    fn config(&mut self, root: &Table) -> Config {
        let (kubernetes, dataplane) = self.top_level(root);
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
        let mut seen = Seen::default();
        let services: Vec<(usize, ServiceConfig)> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.service(i, s, &mut seen).map(|c| (i, c)))
            .collect();
        self.across_services(services, raw.len(), kubernetes, dataplane)
    }

    /// The top-level keys besides the services.
    fn top_level(&mut self, root: &Table) -> (Section<KubernetesConfig>, DataplaneConfig) {
        self.unknown_keys(None, "", root, &["service", "kubernetes", "dataplane"]);
        (
            self.kubernetes(root.get("kubernetes")),
            self.dataplane(root.get("dataplane")),
        )
    }

    /// The rules across services (`count` of them listed), and the config they make.
    fn across_services(
        &mut self,
        services: Vec<(usize, ServiceConfig)>,
        count: usize,
        kubernetes: Section<KubernetesConfig>,
        dataplane: DataplaneConfig,
    ) -> Config {
        let limit = self.service_limit.unwrap_or(MAX_SERVICES);
        if count > limit {
            let message = format!("{count} services, at most {limit} allowed");
            self.report(None, "service", message);
        }
        self.backends_are_not_vips(&services);
        let mut services: Vec<ServiceConfig> = services.into_iter().map(|(_, s)| s).collect();
        // The collect reuses the list's allocation, sized for (index, service) pairs and
        // grown by doubling: up to twice what the services need, held as long as the config.
        services.shrink_to_fit();
        Config {
            services,
            kubernetes: kubernetes.setting().flatten(),
            dataplane,
        }
    }

    fn dataplane(&mut self, raw: Option<&Value>) -> DataplaneConfig {
        let mut d = DataplaneConfig::default();
        let Section::Valid(table) = self.table(None, "dataplane", raw) else {
            return d;
        };
        let keys = ["count_bytes", "bypass", "max_terminations_per_second"];
        self.unknown_keys(None, "dataplane.", table, &keys);
        if let Some(v) = table.get("count_bytes") {
            if let Some(b) = self.checked(None, "dataplane.count_bytes", check_bool(v)) {
                d.count_bytes = b;
            }
        }
        if let Some(v) = table.get("bypass") {
            if let Some(patterns) = self.checked(None, "dataplane.bypass", check_bypass(v)) {
                d.bypass = patterns;
            }
        }
        if let Some(v) = table.get("max_terminations_per_second") {
            let rate = check_integer(v, 1..=1_000_000);
            let key = "dataplane.max_terminations_per_second";
            if let Some(rate) = self.checked(None, key, rate) {
                d.max_terminations_per_second = rate;
            }
        }
        d
    }
}

/// Most patterns `[dataplane] bypass` may list (each matches any number of cgroups).
const MAX_BYPASS_PATTERNS: usize = 64;

/// Cgroup path patterns: glob syntax, no `..` (a pattern may not reach outside the cgroup
/// tree), not the root itself.
fn check_bypass(raw: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = raw else {
        return Err(type_error("an array of cgroup path patterns", raw));
    };
    if list.len() > MAX_BYPASS_PATTERNS {
        return Err(format!(
            "lists {} patterns, at most {MAX_BYPASS_PATTERNS}",
            list.len()
        ));
    }
    let mut patterns: Vec<String> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let text = check_text(v).map_err(|m| format!("[{i}]: {m}"))?;
        let problem = if text.trim_matches('/').is_empty() {
            Some("names the root cgroup, which would bypass every process".to_owned())
        } else if text.split('/').any(|part| part == "..") {
            Some("contains \"..\"; name cgroups below the cgroup2 mount".to_owned())
        } else if patterns.iter().any(|p| p == text) {
            Some("is listed twice".to_owned())
        } else {
            glob::Pattern::new(text)
                .err()
                .map(|e| format!("is not a valid pattern: {}", e.msg))
        };
        if let Some(problem) = problem {
            return Err(format!("[{i}]: {} {problem}", show(text)));
        }
        patterns.push(text.to_owned());
    }
    Ok(patterns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::{addr, errors, single, web, web_with, ORIGIN};

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
    fn byte_order_mark_is_accepted() {
        let text = format!("\u{feff}{}", web_with("protocol = \"udp\""));
        assert_eq!(&*parse(&text, ORIGIN).unwrap().services[0].name, "web");
    }

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
    fn unknown_top_level_key() {
        assert_eq!(
            single("services = 1\n"),
            "lb.toml: services: unknown key (allowed: service, kubernetes, dataplane)"
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
    fn a_quarter_million_services_pass_and_the_limit_is_enforced() {
        let mut checker = Checker::default();
        let config = checker.config(&many_services(250_000));
        assert!(
            checker.problems.is_empty(),
            "{:?}",
            checker.problems.first()
        );
        assert_eq!(config.services.len(), 250_000);
        assert_eq!(config.services[65_535].vip, addr("10.0.255.255:80"));
        assert_eq!(MAX_SERVICES, 4_194_304);

        let mut checker = Checker {
            service_limit: Some(3),
            ..Checker::default()
        };
        checker.config(&many_services(4));
        let e = ConfigError {
            origin: ORIGIN.into(),
            problems: checker.problems,
        };
        assert_eq!(
            e.to_string(),
            "lb.toml: service: 4 services, at most 3 allowed"
        );
    }

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

        let e = load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(
            e.starts_with("/dev/zero: cannot read: larger than 65536 KiB"),
            "{e}"
        );
    }

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

    #[test]
    fn bypass_patterns_are_checked_and_named() {
        let ok = parse(
            "[dataplane]\nbypass = [\"system.slice/mesh-*.service\", \"/sys/fs/cgroup/x\"]\n",
            ORIGIN,
        )
        .unwrap();
        assert_eq!(ok.dataplane.bypass.len(), 2);
        for (value, problem) in [
            ("\"mesh\"", "dataplane.bypass: expected an array"),
            (
                "[\"/\"]",
                "dataplane.bypass: [0]: \"/\" names the root cgroup",
            ),
            (
                "[\"a/../b\"]",
                "dataplane.bypass: [0]: \"a/../b\" contains \"..\"",
            ),
            (
                "[\"a\", \"a\"]",
                "dataplane.bypass: [1]: \"a\" is listed twice",
            ),
            (
                "[\"a[\"]",
                "dataplane.bypass: [0]: \"a[\" is not a valid pattern",
            ),
            ("[\"\"]", "dataplane.bypass: [0]: must not be empty"),
        ] {
            let text = single(&format!("[dataplane]\nbypass = {value}\n"));
            assert!(text.contains(problem), "{value}: {text}");
        }
    }

    #[test]
    fn termination_rate_defaults_to_a_thousand_and_is_checked() {
        assert_eq!(
            parse("", ORIGIN)
                .unwrap()
                .dataplane
                .max_terminations_per_second,
            1000
        );
        let set = parse("[dataplane]\nmax_terminations_per_second = 5\n", ORIGIN).unwrap();
        assert_eq!(set.dataplane.max_terminations_per_second, 5);
        for value in ["0", "1000001", "\"5\""] {
            let text = single(&format!(
                "[dataplane]\nmax_terminations_per_second = {value}\n"
            ));
            assert!(
                text.contains("dataplane.max_terminations_per_second:"),
                "{value}: {text}"
            );
        }
    }
}
