//! Helpers for the tests of every config module. They go through `parse`, as the agent does, so
//! that a test sees the messages an operator would.

use super::{parse, ConfigError};

pub const ORIGIN: &str = "lb.toml";

pub fn errors(text: &str) -> ConfigError {
    match parse(text, ORIGIN) {
        Ok(config) => panic!("accepted: {config:?}\n---\n{text}"),
        Err(e) => e,
    }
}

/// Display of a config that must have exactly one problem.
pub fn single(text: &str) -> String {
    let e = errors(text);
    assert_eq!(e.problems.len(), 1, "expected one problem, got:\n{e}");
    e.to_string()
}

/// The one error of `text`, without `prefix` (which it must start with).
pub fn error_after(text: &str, prefix: &str) -> String {
    let e = single(text);
    assert!(e.starts_with(prefix), "{e}");
    e[prefix.len()..].to_owned()
}

/// One `[[service]]` with the given name and body lines.
pub fn service(name: &str, body: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\n{body}\n")
}

/// One `[[service]]` named "web" with the given body lines.
pub fn web(body: &str) -> String {
    service("web", body)
}

/// A valid service "web" with one field line replaced or added.
pub fn web_with(line: &str) -> String {
    let key = line.split('=').next().unwrap().trim();
    let mut body: Vec<&str> = ["vip = \"10.96.0.10:80\"", "backends = [\"10.0.0.11:8080\"]"]
        .into_iter()
        .filter(|l| !l.starts_with(&format!("{key} =")))
        .collect();
    body.push(line);
    web(&body.join("\n"))
}

/// The single problem of service "web" with one field line added, without the
/// `lb.toml: service "web" (service[0]): ` prefix.
pub fn service_error(line: &str) -> String {
    error_after(&web_with(line), "lb.toml: service \"web\" (service[0]): ")
}

/// The single problem of service "web" with the given inline `health` body, without the prefix.
pub fn health_error(body: &str) -> String {
    service_error(&format!("health = {{ {body} }}"))
}

pub fn addr(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}
