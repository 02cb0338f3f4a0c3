//! The checker that every section's rules run in: it collects problems instead of returning at
//! the first one, so that an operator sees every problem of an edit at once.

use super::error::Problem;
use super::values::{show_key, type_error};
use toml::{Table, Value};

/// Values of the environment that a config may defer to.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub etcd_endpoints: Option<String>,
    pub consul_addr: Option<String>,
    /// `CONSUL_HTTP_TOKEN` is set: a Consul source without `token_file` sends it.
    pub consul_token_set: bool,
}

impl Env {
    pub fn from_process() -> Self {
        Env {
            etcd_endpoints: std::env::var("ETCD_ENDPOINTS").ok(),
            consul_addr: std::env::var("CONSUL_HTTP_ADDR").ok(),
            consul_token_set: std::env::var_os("CONSUL_HTTP_TOKEN").is_some(),
        }
    }
}

/// The `Config` it builds is only meaningful when no problem was found.
#[derive(Default)]
pub(super) struct Checker {
    pub(super) problems: Vec<Problem>,
    pub(super) env: Env,
    /// Tests lower the service limit (`MAX_SERVICES`) to check it without millions of services.
    pub(super) service_limit: Option<usize>,
}

/// An optional section of the config (such as `[service.health]`) after checking.
pub(super) enum Section<T> {
    /// Not in the file: the feature is off.
    Absent,
    Valid(T),
    /// In the file but wrong; its problems are reported.
    Invalid,
}

impl<T> Section<T> {
    /// The section's setting, `None` when it is invalid: `?` then drops the config that would
    /// hold it.
    pub(super) fn setting(self) -> Option<Option<T>> {
        match self {
            Section::Absent => Some(None),
            Section::Valid(value) => Some(Some(value)),
            Section::Invalid => None,
        }
    }

    /// Checks the contents of a present section; `None` from `check` makes it invalid.
    pub(super) fn and_then<U>(self, check: impl FnOnce(T) -> Option<U>) -> Section<U> {
        match self {
            Section::Absent => Section::Absent,
            Section::Valid(value) => check(value).map_or(Section::Invalid, Section::Valid),
            Section::Invalid => Section::Invalid,
        }
    }
}

impl Checker {
    pub(super) fn report(
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
    pub(super) fn checked<T>(
        &mut self,
        scope: Option<&str>,
        field: &str,
        result: Result<T, String>,
    ) -> Option<T> {
        result
            .map_err(|message| self.report(scope, field, message))
            .ok()
    }

    pub(super) fn unknown_keys(
        &mut self,
        scope: Option<&str>,
        prefix: &str,
        table: &Table,
        allowed: &[&str],
    ) {
        for key in table.keys().filter(|k| !allowed.contains(&k.as_str())) {
            let message = format!("unknown key (allowed: {})", allowed.join(", "));
            self.report(scope, format!("{prefix}{}", show_key(key)), message);
        }
    }

    /// The table of the section at `field`; anything else there is reported.
    pub(super) fn table<'v>(
        &mut self,
        scope: Option<&str>,
        field: &str,
        raw: Option<&'v Value>,
    ) -> Section<&'v Table> {
        match raw {
            None => Section::Absent,
            Some(Value::Table(table)) => Section::Valid(table),
            Some(other) => {
                self.report(scope, field, type_error("a table", other));
                Section::Invalid
            }
        }
    }
}
