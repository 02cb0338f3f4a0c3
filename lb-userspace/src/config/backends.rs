//! A service's listed `backends`: each an `address:port` string or a table with a weight.

use super::checker::Checker;
use super::model::{BackendConfig, MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT};
use super::values::{check_endpoint, check_integer, type_error};
use std::collections::HashMap;
use std::net::SocketAddr;
use toml::Value;

const KEYS: &[&str] = &["address", "weight"];

impl Checker {
    pub(super) fn backends(
        &mut self,
        scope: Option<&str>,
        raw: Option<&Value>,
    ) -> Option<Vec<BackendConfig>> {
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
                self.unknown_keys(scope, &format!("{at}."), table, KEYS);
                let field = format!("{at}.address");
                let address = table
                    .get("address")
                    .map_or_else(|| Err("required".to_owned()), check_endpoint);
                let address = self.checked(scope, &field, address);
                let weight = check_weight(table.get("weight"));
                let weight = self.checked(scope, &format!("{at}.weight"), weight);
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

    /// A socket of one family cannot be connected to an address of the other (an IPv4 VIP
    /// reached from an IPv6 socket is v4-mapped, and so is the backend it is sent to).
    pub(super) fn same_family(
        &mut self,
        scope: Option<&str>,
        vip: SocketAddr,
        backends: &[BackendConfig],
    ) {
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
}

fn check_weight(raw: Option<&Value>) -> Result<u32, String> {
    raw.map_or(Ok(1), |w| check_integer(w, 1..=MAX_WEIGHT))
}

#[cfg(test)]
mod tests {
    use crate::config::testkit::{addr, error_after, service, single, web, web_with, ORIGIN};
    use crate::config::{parse, BackendConfig, MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT};

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
            .into()
        );
    }

    #[test]
    fn same_backend_in_two_services_is_fine() {
        let backends = "backends = [\"10.0.0.1:80\"]";
        let text = service("a", &format!("vip = \"10.96.0.1:80\"\n{backends}"))
            + &service("b", &format!("vip = \"10.96.0.2:80\"\n{backends}"));
        assert_eq!(parse(&text, ORIGIN).unwrap().services.len(), 2);
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
}
