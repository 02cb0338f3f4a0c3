//! How a rejected config is reported: every problem of one source, each on a line of its own.

use std::fmt;

/// A generated config that is wrong everywhere must not flood the log on every reload.
const MAX_LISTED: usize = 100;

/// Every problem found in one config source; never empty.
#[derive(Debug)]
pub struct ConfigError {
    pub(super) origin: String,
    pub(super) problems: Vec<Problem>,
}

#[derive(Debug)]
pub(super) struct Problem {
    /// `service "web" (service[0])`, or `service[0]` while the service has no valid name.
    pub(super) scope: Option<String>,
    /// Field path such as `backends[1].weight`, or a position for TOML syntax errors.
    pub(super) field: String,
    pub(super) message: String,
}

impl ConfigError {
    pub(super) fn single(origin: &str, field: String, message: String) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testkit::{errors, web_with};

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
    fn config_error_works_with_anyhow() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>(_: &E) {}
        let e = errors("x = 1");
        assert_error(&e);
        assert!(std::error::Error::source(&e).is_none());
    }
}
