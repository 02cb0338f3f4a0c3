//! One `[[service]]`: its name, VIP and protocol, the keys that need no table of their own, and
//! each of its sections.

use super::checker::Checker;
use super::model::{Name, Protocol, ServiceConfig, Terminate, MAX_NAME_LEN};
use super::values::{
    check_bool, check_choice, check_endpoint, check_integer, offenders, required, show, type_error,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use toml::Value;

const KEYS: &[&str] = &[
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
    "terminate_on_removal",
    "rebalance",
];
const TERMINATE: &[(&str, Terminate)] = &[
    ("udp", Terminate::Udp),
    ("all", Terminate::All),
    ("none", Terminate::None),
];
const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];

/// What earlier services claimed, so that a duplicate names both services. Names are the
/// services' own (`Name`), and a VIP's first claimant is kept as its index and name rather
/// than its label: 250,000 services then check in 20 MB less.
#[derive(Default)]
pub(super) struct Seen {
    names: HashMap<Name, usize>,
    vips: HashMap<(SocketAddr, Protocol), (usize, Option<Name>)>,
}

/// How messages name a service: by name when it has a valid one.
fn service_label(index: usize, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("service \"{name}\" (service[{index}])"),
        None => format!("service[{index}]"),
    }
}

impl Checker {
    pub(super) fn service(
        &mut self,
        index: usize,
        raw: &Value,
        seen: &mut Seen,
    ) -> Option<ServiceConfig> {
        let index_label = format!("service[{index}]");
        let Value::Table(table) = raw else {
            self.report(Some(&index_label), "", type_error("a table", raw));
            return None;
        };
        // The name is checked first because a valid one labels every other message.
        let name = check_service_name(table.get("name"));
        let label = service_label(index, name.as_ref().ok().copied());
        let scope = Some(label.as_str());
        // `own` is the service's name, valid though maybe taken, which labels it as a VIP's
        // first claimant; `name` is it unless taken.
        let (own, name) = match name {
            Ok(name) => {
                let own = Name::from(name);
                let unique = match seen.names.get(name) {
                    Some(first) => {
                        let message = format!("\"{name}\" is already used by service[{first}]");
                        self.report(scope, "name", message);
                        false
                    }
                    None => {
                        seen.names.insert(own.clone(), index);
                        true
                    }
                };
                (Some(own.clone()), unique.then_some(own))
            }
            Err(message) => {
                self.report(scope, "name", message);
                (None, None)
            }
        };
        let example = "address:port, e.g. \"10.96.0.10:80\" or \"[fd00::10]:80\"";
        let vip = required(table.get("vip"), example, check_endpoint);
        let vip = self.checked(scope, "vip", vip);
        let protocol = table
            .get("protocol")
            .map_or(Ok(Protocol::Tcp), |p| check_choice(p, PROTOCOLS));
        let protocol = self.checked(scope, "protocol", protocol);
        if let (Some(vip), Some(protocol)) = (vip, protocol) {
            match seen.vips.get(&(vip, protocol)) {
                Some((first, first_name)) => {
                    let first = service_label(*first, first_name.as_deref());
                    let message = format!("{vip}/{} is already used by {first}", protocol.as_str());
                    self.report(scope, "vip", message);
                }
                None => {
                    seen.vips.insert((vip, protocol), (index, own));
                }
            }
        }
        let discovery = self.discovery(scope, table.get("discovery"));
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
        let terminate = table
            .get("terminate_on_removal")
            .map_or(Ok(Terminate::default()), |v| check_choice(v, TERMINATE));
        let terminate = self.checked(scope, "terminate_on_removal", terminate);
        let health = self.health(scope, table.get("health"));
        let balancing = self.balancing(scope, table);
        let outlier = self.outlier(scope, table.get("outlier"), protocol);
        let rebalance = self.rebalance(scope, table.get("rebalance"), protocol);
        if let (Some(vip), Some(backends)) = (vip, &backends) {
            self.same_family(scope, vip, backends);
        }
        self.unknown_keys(scope, "", table, KEYS);
        Some(ServiceConfig {
            name: name?,
            vip: vip?,
            protocol: protocol?,
            backends: backends?.into(),
            health: health.setting()?.map(Box::new),
            fail_open: fail_open?,
            panic_threshold: panic_threshold?,
            terminate: terminate?,
            discovery: discovery.setting()?.map(Box::new),
            balancing: balancing?,
            outlier: outlier.setting()?.map(Box::new),
            rebalance: rebalance.setting()?.map(Box::new),
        })
    }
}

fn check_service_name(raw: Option<&Value>) -> Result<&str, String> {
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

#[cfg(test)]
mod tests {
    use crate::config::testkit::{
        addr, errors, service, service_error, single, web, web_with, ORIGIN,
    };
    use crate::config::{parse, BackendConfig, Config, Protocol, ServiceConfig, MAX_NAME_LEN};

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
                    ]
                    .into(),
                    health: None,
                    fail_open: true,
                    panic_threshold: 0,
                    terminate: Default::default(),
                    discovery: None,
                    balancing: Default::default(),
                    outlier: None,
                    rebalance: None,
                },
                ServiceConfig {
                    name: "dns.kube-system_1".into(),
                    vip: addr("10.96.0.10:53"),
                    protocol: Protocol::Udp,
                    backends: vec![BackendConfig {
                        address: addr("10.0.0.21:53"),
                        weight: 10_000,
                    }]
                    .into(),
                    health: None,
                    fail_open: true,
                    panic_threshold: 0,
                    terminate: Default::default(),
                    discovery: None,
                    balancing: Default::default(),
                    outlier: None,
                    rebalance: None,
                },
            ],
            kubernetes: None,
            dataplane: Default::default(),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn empty_backends_is_a_valid_service() {
        let config = parse(&web("vip = \"10.96.0.10:80\"\nbackends = []"), ORIGIN).unwrap();
        assert_eq!(config.services.len(), 1);
        assert_eq!(&*config.services[0].name, "web");
        assert!(config.services[0].backends.is_empty());
    }

    #[test]
    fn same_vip_with_tcp_and_udp_is_fine() {
        let text = service("dns-tcp", "vip = \"10.96.0.10:53\"\nbackends = []")
            + &service(
                "dns-udp",
                "vip = \"10.96.0.10:53\"\nprotocol = \"udp\"\nbackends = []",
            );
        let config = parse(&text, ORIGIN).unwrap();
        let protocols: Vec<Protocol> = config.services.iter().map(|s| s.protocol).collect();
        assert_eq!(protocols, [Protocol::Tcp, Protocol::Udp]);
    }

    #[test]
    fn unknown_service_key() {
        let text = web("vip = \"10.96.0.10:80\"\nbackends = []\nprotocl = \"udp\"");
        assert_eq!(
            single(&text),
            "lb.toml: service \"web\" (service[0]): protocl: unknown key \
             (allowed: name, vip, protocol, backends, fail_open, panic_threshold, health, discovery, \
             algorithm, maglev_table_size, affinity, affinity_timeout, client_key, outlier, \
             terminate_on_removal, rebalance)"
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
        assert_eq!(&*parse(&text, ORIGIN).unwrap().services[0].name, ok);

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
        let text = web("vip = \"10.96.0.10:80\"\nbackends = []")
            + &web("vip = \"10.96.0.11:80\"\nbackends = []");
        assert_eq!(
            single(&text),
            "lb.toml: service \"web\" (service[1]): name: \"web\" is already used by service[0]"
        );
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
        let text = web("vip = \"10.96.0.10:80\"\nbackends = []")
            + &service(
                "web2",
                "vip = \"10.96.0.10:80\"\nprotocol = \"tcp\"\nbackends = []",
            );
        assert_eq!(
            single(&text),
            "lb.toml: service \"web2\" (service[1]): vip: 10.96.0.10:80/tcp is already used by \
             service \"web\" (service[0])"
        );
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
}
