//! `[kubernetes]`: which API server, namespaces and Services to balance (`KubernetesConfig`).

use super::checker::{Checker, Section};
use super::model::KubernetesConfig;
use super::values::{absolute_path, check_str, show, type_error};
use toml::Value;

const KEYS: &[&str] = &["kubeconfig", "namespaces", "label_selector"];
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
            Some(KubernetesConfig {
                kubeconfig: kubeconfig?,
                namespaces: namespaces?,
                label_selector: selector?,
            })
        })
    }
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
    use crate::config::parse;

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
        ];
        for (text, expected) in cases {
            let e = error(text);
            assert!(e.contains(expected), "{text}\n got: {e}\nwant: {expected}");
        }
    }
}
