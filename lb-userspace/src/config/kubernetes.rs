//! `[kubernetes]`: which API server, namespaces and Services to balance (`KubernetesConfig`).

use super::checker::{Checker, Section};
use super::model::{
    KubernetesConfig, DEFAULT_KUBE_MAX_SERVICES, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES,
};
use super::values::{absolute_path, check_bool, check_integer, check_str, show, type_error};
use std::net::Ipv6Addr;
use toml::Value;

const KEYS: &[&str] = &[
    "kubeconfig",
    "namespaces",
    "label_selector",
    "api_server",
    "node_name",
    "zone",
    "max_services",
    "max_endpoints_per_service",
    "allow_loopback_backends",
];
const MAX_NAMESPACES: usize = 256;

impl Checker {
    pub(super) fn kubernetes(&mut self, raw: Option<&Value>) -> Section<KubernetesConfig> {
        self.table(None, "kubernetes", raw).and_then(|table| {
            self.unknown_keys(None, "kubernetes.", table, KEYS);
            let kubeconfig = table
                .get("kubeconfig")
                .map(|v| check_str(v).and_then(absolute_path))
                .transpose();
            let kubeconfig = self.checked(None, "kubernetes.kubeconfig", kubeconfig);
            let namespaces = table
                .get("namespaces")
                .map_or(Ok(Vec::new()), check_namespaces);
            let namespaces = self.checked(None, "kubernetes.namespaces", namespaces);
            let selector = table.get("label_selector").map(check_selector).transpose();
            let selector = self.checked(None, "kubernetes.label_selector", selector);
            let api_server = table.get("api_server").map(check_api_server).transpose();
            let api_server = api_server.and_then(|url| match (&url, table.get("kubeconfig")) {
                (Some(_), Some(_)) => Err("cannot be combined with kubeconfig (it goes with the \
                     in-cluster service account; put the address in the kubeconfig instead)"
                    .to_owned()),
                _ => Ok(url),
            });
            let api_server = self.checked(None, "kubernetes.api_server", api_server);
            let node_name = table.get("node_name").map(check_node_name).transpose();
            let node_name = self.checked(None, "kubernetes.node_name", node_name);
            let zone = table.get("zone").map(check_zone).transpose();
            let zone = self.checked(None, "kubernetes.zone", zone);
            let max_services = table
                .get("max_services")
                .map_or(Ok(DEFAULT_KUBE_MAX_SERVICES), |v| {
                    check_integer(v, 1..=MAX_SERVICES)
                });
            let max_services = self.checked(None, "kubernetes.max_services", max_services);
            let max_endpoints = table
                .get("max_endpoints_per_service")
                .map_or(Ok(MAX_BACKENDS_PER_SERVICE), |v| {
                    check_integer(v, 1..=MAX_BACKENDS_PER_SERVICE)
                });
            let max_endpoints =
                self.checked(None, "kubernetes.max_endpoints_per_service", max_endpoints);
            let loopback = table
                .get("allow_loopback_backends")
                .map_or(Ok(false), check_bool);
            let loopback = self.checked(None, "kubernetes.allow_loopback_backends", loopback);
            Some(KubernetesConfig {
                kubeconfig: kubeconfig?,
                namespaces: namespaces?,
                label_selector: selector?,
                api_server: api_server?,
                node_name: node_name?,
                zone: zone?,
                max_services: max_services?,
                max_endpoints_per_service: max_endpoints?,
                allow_loopback_backends: loopback?,
            })
        })
    }
}

/// `https://host[:port]` or `http://host[:port]`, the host an IPv4 address, an IPv6 address in
/// brackets or a DNS name; nothing else (no user, path, query). Returned as
/// `scheme://host:port`, the port filled in from the scheme when left out.
fn check_api_server(raw: &Value) -> Result<String, String> {
    const EXPECTED: &str = "an https:// (or http://) URL with a host and optionally a port, \
                            such as \"https://10.0.0.1:6443\"";
    let url = check_str(raw)?;
    let bad = |why: &str| Err(format!("{why}: expected {EXPECTED}, got {}", show(url)));
    let Some((scheme, rest)) = url.split_once("://") else {
        return bad("no scheme");
    };
    let default_port = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return bad("the scheme must be https or http"),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return bad("no path, query or fragment");
    }
    if authority.contains('@') {
        return bad("no user or password (the service account's token is used)");
    }
    let (host, port) = if authority.starts_with('[') {
        let Some(end) = authority.find(']') else {
            return bad("unclosed [ in the host");
        };
        let ip = &authority[1..end];
        if ip.parse::<Ipv6Addr>().is_err() {
            return bad("not an IPv6 address in the brackets");
        }
        let port = match &authority[end + 1..] {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return bad("text after the IPv6 address"),
            },
        };
        (&authority[..=end], port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return bad("no host");
    }
    if !host.starts_with('[') && !dns_name(host) {
        return bad("the host is not an IPv4 address or a DNS name");
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return bad("the port must be 1-65535"),
        },
    };
    Ok(format!("{scheme}://{host}:{port}"))
}

/// A DNS name (RFC 1123 labels, dots between) or a dotted IPv4 address, which is one too.
fn dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Node's name is a DNS subdomain: lowercase RFC 1123 labels. Also what `$NODE_NAME` must
/// be before it goes into a field selector, where a comma would add a term of its own.
pub fn is_node_name(name: &str) -> bool {
    dns_name(name) && !name.bytes().any(|b| b.is_ascii_uppercase())
}

fn check_node_name(raw: &Value) -> Result<String, String> {
    let name = check_str(raw)?;
    if !is_node_name(name) {
        return Err(format!(
            "{} is not a node name (lowercase DNS labels: a-z, 0-9, '-', dots between)",
            show(name)
        ));
    }
    Ok(name.to_owned())
}

/// A zone is a label value (`topology.kubernetes.io/zone`): 1-63 of [A-Za-z0-9-_.],
/// alphanumeric at both ends.
fn check_zone(raw: &Value) -> Result<String, String> {
    let zone = check_str(raw)?;
    let ok = !zone.is_empty()
        && zone.len() <= 63
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && zone.starts_with(|c: char| c.is_ascii_alphanumeric())
        && zone.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "{} is not a zone label value (1-63 of A-Z, a-z, 0-9, '-', '_', '.', alphanumeric \
             at both ends)",
            show(zone)
        ));
    }
    Ok(zone.to_owned())
}

/// Namespace names are DNS labels (RFC 1123): 1-63 of [a-z0-9-], alphanumeric at both ends.
fn check_namespaces(raw: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = raw else {
        return Err(type_error("an array of namespace names", raw));
    };
    if list.is_empty() || list.len() > MAX_NAMESPACES {
        return Err(format!(
            "must list 1-{MAX_NAMESPACES} namespaces (leave it out for all), got {}",
            list.len()
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let name = check_str(v).map_err(|m| format!("[{i}]: {m}"))?;
        let label = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label {
            return Err(format!(
                "[{i}]: {} is not a namespace name (1-63 of a-z, 0-9 and '-')",
                show(name)
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("[{i}]: {} is listed twice", show(name)));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// Equality-based selectors only (`k=v`, `k==v`, `k!=v`, `k`, `!k`), which the API server
/// checks again; this catches what would make every list fail.
fn check_selector(raw: &Value) -> Result<String, String> {
    let selector = check_str(raw)?;
    if selector.is_empty() || selector.len() > 1024 {
        return Err("must be 1-1024 bytes long".to_owned());
    }
    let label = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    for term in selector.split(',') {
        let term = term.trim();
        let (key, value) = if let Some(key) = term.strip_prefix('!') {
            (key, "")
        } else {
            let at = term.find(['=', '!']).unwrap_or(term.len());
            let (key, rest) = term.split_at(at);
            let value = ["!=", "==", "="]
                .iter()
                .find_map(|op| rest.strip_prefix(op))
                .unwrap_or(rest);
            (key, value)
        };
        if key.is_empty() || !label(key) || !label(value) {
            return Err(format!(
                "term {} is not k=v, k!=v, k or !k with label characters",
                show(term)
            ));
        }
    }
    Ok(selector.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, DEFAULT_KUBE_MAX_SERVICES, MAX_BACKENDS_PER_SERVICE};

    fn error(text: &str) -> String {
        parse(text, "lb.toml").expect_err(text).to_string()
    }

    #[test]
    fn defaults_and_options() {
        let c = parse("[kubernetes]\n", "t").unwrap();
        let k = c.kubernetes.expect("kubernetes");
        assert!(k.kubeconfig.is_none() && k.namespaces.is_empty() && k.label_selector.is_none());
        let c = parse(
            "[kubernetes]\nkubeconfig = \"/etc/k.yaml\"\nnamespaces = [\"default\", \"web-1\"]\n\
             label_selector = \"app=web,tier!=db,lb.example/on\"\n",
            "t",
        )
        .unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.namespaces, ["default", "web-1"]);
        assert_eq!(
            k.label_selector.as_deref(),
            Some("app=web,tier!=db,lb.example/on")
        );
        assert!(parse("", "t").unwrap().kubernetes.is_none());
    }

    #[test]
    fn topology_caps_loopback_and_api_server() {
        let k = parse("[kubernetes]\n", "t").unwrap().kubernetes.unwrap();
        assert_eq!(
            (k.api_server, k.node_name, k.zone),
            (None, None, None),
            "no defaults beyond the environment"
        );
        assert_eq!(k.max_services, DEFAULT_KUBE_MAX_SERVICES);
        assert_eq!(k.max_endpoints_per_service, MAX_BACKENDS_PER_SERVICE);
        assert!(!k.allow_loopback_backends);
        let k = parse(
            "[kubernetes]\napi_server = \"https://10.0.0.1:6443/\"\nnode_name = \"node-1.a\"\n\
             zone = \"eu-west-1a\"\nmax_services = 2\nmax_endpoints_per_service = 3\n\
             allow_loopback_backends = true\n",
            "t",
        )
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(k.api_server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(k.node_name.as_deref(), Some("node-1.a"));
        assert_eq!(k.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!((k.max_services, k.max_endpoints_per_service), (2, 3));
        assert!(k.allow_loopback_backends);
        for (given, normal) in [
            ("https://api.example.com", "https://api.example.com:443"),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("https://[fd00::1]:6443", "https://[fd00::1]:6443"),
            ("https://[fd00::1]", "https://[fd00::1]:443"),
        ] {
            let text = format!("[kubernetes]\napi_server = \"{given}\"\n");
            let k = parse(&text, "t").unwrap().kubernetes.unwrap();
            assert_eq!(k.api_server.as_deref(), Some(normal), "{given}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "kubernetes = 1",
                "kubernetes: expected a table, got integer 1",
            ),
            (
                "[kubernetes]\nnamespace = []",
                "kubernetes.namespace: unknown key",
            ),
            (
                "[kubernetes]\nkubeconfig = \"k.yaml\"",
                "kubernetes.kubeconfig: must be an absolute path",
            ),
            (
                "[kubernetes]\nnamespaces = []",
                "kubernetes.namespaces: must list 1-256",
            ),
            (
                "[kubernetes]\nnamespaces = [\"Default\"]",
                "kubernetes.namespaces: [0]: \"Default\" is not a namespace name",
            ),
            (
                "[kubernetes]\nnamespaces = [\"a\", \"a\"]",
                "kubernetes.namespaces: [1]: \"a\" is listed twice",
            ),
            (
                "[kubernetes]\nlabel_selector = \"app in (a,b)\"",
                "kubernetes.label_selector: term",
            ),
            (
                "[kubernetes]\nlabel_selector = \"=x\"",
                "kubernetes.label_selector: term",
            ),
            (
                "[kubernetes]\napi_server = \"10.0.0.1:6443\"",
                "kubernetes.api_server: no scheme",
            ),
            (
                "[kubernetes]\napi_server = \"ftp://10.0.0.1:6443\"",
                "kubernetes.api_server: the scheme must be https or http",
            ),
            (
                "[kubernetes]\napi_server = \"https://:6443\"",
                "kubernetes.api_server: no host",
            ),
            (
                "[kubernetes]\napi_server = \"https://10.0.0.1:0\"",
                "kubernetes.api_server: the port must be 1-65535",
            ),
            (
                "[kubernetes]\napi_server = \"https://10.0.0.1:99999\"",
                "kubernetes.api_server: the port must be 1-65535",
            ),
            (
                "[kubernetes]\napi_server = \"https://10.0.0.1:6443/api\"",
                "kubernetes.api_server: no path",
            ),
            (
                "[kubernetes]\napi_server = \"https://u:p@10.0.0.1\"",
                "kubernetes.api_server: no user or password",
            ),
            (
                "[kubernetes]\napi_server = \"https://[fd00::1:6443\"",
                "kubernetes.api_server: unclosed [",
            ),
            (
                "[kubernetes]\napi_server = \"https://fd00::1\"",
                "kubernetes.api_server: the port must be",
            ),
            (
                "[kubernetes]\napi_server = \"https://a_b:6443\"",
                "kubernetes.api_server: the host is not",
            ),
            (
                "[kubernetes]\napi_server = 6443",
                "kubernetes.api_server: expected a string",
            ),
            (
                "[kubernetes]\nkubeconfig = \"/k\"\napi_server = \"https://10.0.0.1\"",
                "kubernetes.api_server: cannot be combined with kubeconfig",
            ),
            (
                "[kubernetes]\nnode_name = \"Node_1\"",
                "kubernetes.node_name: \"Node_1\" is not a node name",
            ),
            (
                "[kubernetes]\nzone = \"-a\"",
                "kubernetes.zone: \"-a\" is not a zone",
            ),
            (
                "[kubernetes]\nmax_services = 0",
                "kubernetes.max_services: must be between 1 and",
            ),
            (
                "[kubernetes]\nmax_endpoints_per_service = 1025",
                "kubernetes.max_endpoints_per_service: must be between 1 and 1024",
            ),
            (
                "[kubernetes]\nallow_loopback_backends = \"yes\"",
                "kubernetes.allow_loopback_backends: expected a boolean",
            ),
        ];
        for (text, expected) in cases {
            let e = error(text);
            assert!(e.contains(expected), "{text}\n got: {e}\nwant: {expected}");
        }
    }
}
