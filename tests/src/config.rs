//! Agent config files built from values, so that a test states the services it wants and the
//! TOML layout (`[[service]]`, its sub-tables, quoting) is written in one place. Values are
//! rendered by the `toml` crate, which escapes them; tests that feed the agent broken or unusual
//! TOML on purpose write it literally instead.
//!
//! ```
//! use lb_testkit::config::{Config, Service, Table};
//! let config = Config::new().service(
//!     Service::tcp("web", "10.96.0.10:80")
//!         .backends(&["127.0.0.11:8080"])
//!         .weighted("127.0.0.12:8080", 3)
//!         .health(Table::new().set("kind", "tcp")),
//! );
//! assert_eq!(
//!     config.to_string(),
//!     "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nprotocol = \"tcp\"\n\
//!      backends = [\"127.0.0.11:8080\", { address = \"127.0.0.12:8080\", weight = 3 }]\n\
//!      \n[service.health]\nkind = \"tcp\"\n"
//! );
//! ```

use std::fmt;
use toml::Value;

/// A whole config file: top-level sections such as `[dataplane]`, then the services.
#[derive(Clone, Debug, Default)]
pub struct Config {
    sections: Vec<(&'static str, Table)>,
    services: Vec<Service>,
}

impl Config {
    /// No services and no sections: the agent runs and balances nothing.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// `[kubernetes]`: services from the Kubernetes API.
    pub fn kubernetes(self, table: Table) -> Self {
        self.section("kubernetes", table)
    }

    /// `[dataplane]`: settings of the eBPF programs.
    pub fn dataplane(self, table: Table) -> Self {
        self.section("dataplane", table)
    }

    fn section(mut self, name: &'static str, table: Table) -> Self {
        self.sections.push((name, table));
        self
    }
}

/// One `[[service]]` entry.
#[derive(Clone, Debug)]
pub struct Service {
    /// name, vip and protocol, written first so that a service reads as what it is.
    identity: Table,
    backends: Vec<Value>,
    keys: Table,
    /// `[service.health]`, `[service.discovery]`, `[service.outlier]`.
    tables: Vec<(&'static str, Table)>,
}

impl Service {
    pub fn tcp(name: &str, vip: &str) -> Self {
        Self::new(name, vip, "tcp")
    }

    pub fn udp(name: &str, vip: &str) -> Self {
        Self::new(name, vip, "udp")
    }

    fn new(name: &str, vip: &str, protocol: &str) -> Self {
        Self {
            identity: Table::new()
                .set("name", name)
                .set("vip", vip)
                .set("protocol", protocol),
            backends: Vec::new(),
            keys: Table::new(),
            tables: Vec::new(),
        }
    }

    /// Adds backends of the default weight.
    pub fn backends(mut self, addrs: &[&str]) -> Self {
        self.backends.extend(addrs.iter().map(|a| Value::from(*a)));
        self
    }

    /// Adds one backend with its own weight.
    pub fn weighted(mut self, addr: &str, weight: u32) -> Self {
        let entry = [
            ("address", Value::from(addr)),
            ("weight", Value::from(weight)),
        ];
        let entry = entry.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.backends.push(Value::Table(entry));
        self
    }

    /// Any further key of the service: `algorithm`, `affinity`, `fail_open`, …
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.keys = self.keys.set(key, value);
        self
    }

    pub fn health(self, table: Table) -> Self {
        self.table("health", table)
    }

    /// Backends from a discovery source instead of a list.
    pub fn discovery(self, table: Table) -> Self {
        self.table("discovery", table)
    }

    pub fn outlier(self, table: Table) -> Self {
        self.table("outlier", table)
    }

    pub fn rebalance(self, table: Table) -> Self {
        self.table("rebalance", table)
    }

    fn table(mut self, name: &'static str, table: Table) -> Self {
        self.tables.push((name, table));
        self
    }

    /// The agent wants either a backend list (`[]` for a service without backends) or a
    /// discovery source; one with both is written as it is, for the agent to refuse.
    fn lists_backends(&self) -> bool {
        !self.backends.is_empty() || !self.tables.iter().any(|(name, _)| *name == "discovery")
    }
}

/// The keys of one TOML table, written in the order they were set.
#[derive(Clone, Debug, Default)]
pub struct Table(Vec<(String, Value)>);

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys are written bare, as all of the agent's are.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{key:?} is not a bare TOML key"
        );
        self.0.push((key.to_string(), value.into()));
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .iter()
            .try_for_each(|(key, value)| writeln!(f, "{key} = {value}"))
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[[service]]\n{}", self.identity)?;
        if self.lists_backends() {
            writeln!(f, "backends = {}", Value::Array(self.backends.clone()))?;
        }
        write!(f, "{}", self.keys)?;
        self.tables
            .iter()
            .try_for_each(|(name, table)| write!(f, "\n[service.{name}]\n{table}"))
    }
}

/// Sections first, then the services, a blank line between any two.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sections = self.sections.iter().map(|(n, t)| format!("[{n}]\n{t}"));
        let blocks: Vec<String> = sections
            .chain(self.services.iter().map(Service::to_string))
            .collect();
        write!(f, "{}", blocks.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_services_and_the_backends_rule() {
        let config = Config::new()
            .service(Service::udp("empty", "10.96.0.53:53"))
            .service(
                Service::tcp("found", "10.96.0.10:80")
                    .set("algorithm", "maglev")
                    .discovery(Table::new().set("kind", "dns").set("port", 8080)),
            )
            .dataplane(Table::new().set("count_bytes", false));
        let text = config.to_string();
        assert_eq!(
            text,
            "[dataplane]\ncount_bytes = false\n\
             \n[[service]]\nname = \"empty\"\nvip = \"10.96.0.53:53\"\nprotocol = \"udp\"\n\
             backends = []\n\
             \n[[service]]\nname = \"found\"\nvip = \"10.96.0.10:80\"\nprotocol = \"tcp\"\n\
             algorithm = \"maglev\"\n\
             \n[service.discovery]\nkind = \"dns\"\nport = 8080\n"
        );
        let parsed: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(
            parsed["service"][1]["discovery"]["port"].as_integer(),
            Some(8080)
        );
    }

    #[test]
    fn strings_are_escaped() {
        let text = Config::new()
            .kubernetes(Table::new().set("kubeconfig", "/tmp/a \"b\"\\c"))
            .to_string();
        let parsed: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(
            parsed["kubernetes"]["kubeconfig"].as_str(),
            Some("/tmp/a \"b\"\\c")
        );
    }
}
