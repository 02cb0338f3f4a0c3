//! How a service picks a backend: `algorithm` (random, Maglev or least connections), client
//! `affinity` with its timeout, and what identifies a client (`client_key`).

use super::checker::Checker;
use super::model::{Algorithm, Balancing, ClientKey};
use super::values::{check_choice, check_duration_in, check_integer};
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::{Table, Value};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Random,
    Maglev,
    LeastConnections,
}

const ALGORITHMS: &[(&str, Kind)] = &[
    ("random", Kind::Random),
    ("maglev", Kind::Maglev),
    ("least_connections", Kind::LeastConnections),
];
const AFFINITIES: &[(&str, bool)] = &[("none", false), ("client", true)];
const CLIENT_KEYS: &[(&str, ClientKey)] =
    &[("netns", ClientKey::Netns), ("cgroup", ClientKey::Cgroup)];
/// Kubernetes' default for `sessionAffinity: ClientIP`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// Kubernetes' bounds for `timeoutSeconds`.
pub const AFFINITY_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(86_400);

impl Checker {
    /// The balancing keys of one service table; `None` when one of them is invalid.
    pub(super) fn balancing(&mut self, scope: Option<&str>, table: &Table) -> Option<Balancing> {
        let kind = table
            .get("algorithm")
            .map_or(Ok(Kind::Random), |v| check_choice(v, ALGORITHMS));
        let kind = self.checked(scope, "algorithm", kind);
        let maglev = kind.map(|k| k == Kind::Maglev);
        let size = table.get("maglev_table_size").map(check_table_size);
        let size = self.dependent(
            scope,
            ("maglev_table_size", size, DEFAULT_TABLE_SIZE),
            (maglev, "algorithm = \"maglev\""),
        );
        let client = table
            .get("affinity")
            .map_or(Ok(false), |v| check_choice(v, AFFINITIES));
        let client = self.checked(scope, "affinity", client);
        let timeout = table
            .get("affinity_timeout")
            .map(|v| check_duration_in(v, AFFINITY_TIMEOUT_RANGE));
        let timeout = self.dependent(
            scope,
            ("affinity_timeout", timeout, DEFAULT_AFFINITY_TIMEOUT),
            (client, "affinity = \"client\""),
        );
        let client_key = table
            .get("client_key")
            .map_or(Ok(ClientKey::Netns), |v| check_choice(v, CLIENT_KEYS));
        let client_key = self.checked(scope, "client_key", client_key);
        let algorithm = match kind? {
            Kind::Maglev => Algorithm::Maglev { table_size: size? },
            Kind::Random => Algorithm::Random,
            Kind::LeastConnections => Algorithm::LeastConnections,
        };
        let (client, timeout) = (client?, timeout?);
        Some(Balancing {
            algorithm,
            affinity: client.then_some(timeout),
            client_key: client_key?,
        })
    }
}

impl Checker {
    /// A key that only means something when another key enables it: its checked value, its
    /// default when absent, and an error when set while the enabling key says no (a setting
    /// that would be silently ignored is a typo).
    fn dependent<T>(
        &mut self,
        scope: Option<&str>,
        (field, value, default): (&str, Option<Result<T, String>>, T),
        (enabled, enabler): (Option<bool>, &str),
    ) -> Option<T> {
        match (value, enabled) {
            (Some(Ok(_)), Some(false)) => {
                self.report(scope, field, format!("only used with {enabler}"));
                None
            }
            (Some(v), _) => self.checked(scope, field, v),
            (None, _) => Some(default),
        }
    }
}

fn check_table_size(raw: &Value) -> Result<u32, String> {
    let size: u32 = check_integer(raw, MIN_TABLE_SIZE..=DEFAULT_TABLE_SIZE)?;
    if !is_prime(size) {
        return Err(format!(
            "must be a prime (Maglev spreads each backend over the table only then), got {size}; \
             e.g. 1031, 4099, 16381 or 65537"
        ));
    }
    Ok(size)
}

/// Default and largest table size (a prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Smallest table size accepted (a prime above the 1024 backends a service may have).
pub const MIN_TABLE_SIZE: u32 = 1_031;

/// Whether n is prime: Maglev tables must be (`maglev_table_size`).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    let n = u64::from(n);
    !n.is_multiple_of(2)
        && (3..)
            .step_by(2)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn service(extra: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"10.96.0.1:80\"\nbackends = []\n{extra}\n")
    }

    fn balancing(extra: &str) -> Balancing {
        parse(&service(extra), "lb.toml").unwrap().services[0].balancing
    }

    fn error(extra: &str) -> String {
        parse(&service(extra), "lb.toml").unwrap_err().to_string()
    }

    #[test]
    fn defaults_to_random_without_affinity() {
        assert_eq!(balancing(""), Balancing::default());
    }

    #[test]
    fn reads_maglev_affinity_and_client_key() {
        let b = balancing(
            "algorithm = \"maglev\"\nmaglev_table_size = 4099\naffinity = \"client\"\n\
             affinity_timeout = \"30s\"\nclient_key = \"cgroup\"",
        );
        assert_eq!(b.algorithm, Algorithm::Maglev { table_size: 4099 });
        assert_eq!(b.affinity, Some(Duration::from_secs(30)));
        assert_eq!(b.client_key, ClientKey::Cgroup);
        let b = balancing("algorithm = \"maglev\"\naffinity = \"client\"");
        assert_eq!(b.algorithm, Algorithm::Maglev { table_size: 65_537 });
        assert_eq!(b.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
    }

    #[test]
    fn reads_least_connections() {
        let b = balancing("algorithm = \"least_connections\"\naffinity = \"client\"");
        assert_eq!(b.algorithm, Algorithm::LeastConnections);
        assert!(b.affinity.is_some());
    }

    #[test]
    fn names_the_field_and_the_problem() {
        let cases = [
            (
                "algorithm = \"roundrobin\"",
                "algorithm: must be \"random\", \"maglev\" or \"least_connections\"",
            ),
            (
                "algorithm = \"least_connections\"\nmaglev_table_size = 65537",
                "maglev_table_size: only used with algorithm = \"maglev\"",
            ),
            (
                "algorithm = \"maglev\"\nmaglev_table_size = 65536",
                "must be a prime",
            ),
            (
                "algorithm = \"maglev\"\nmaglev_table_size = 7",
                "must be between 1031 and 65537",
            ),
            (
                "maglev_table_size = 65537",
                "maglev_table_size: only used with algorithm = \"maglev\"",
            ),
            (
                "affinity = \"ip\"",
                "affinity: must be \"none\" or \"client\"",
            ),
            (
                "affinity_timeout = \"10s\"",
                "affinity_timeout: only used with affinity = \"client\"",
            ),
            (
                "affinity = \"client\"\naffinity_timeout = \"2d\"",
                "affinity_timeout: expected a duration",
            ),
            (
                "affinity = \"client\"\naffinity_timeout = \"48h\"",
                "must be between 1s and 24h",
            ),
            (
                "client_key = \"ip\"",
                "client_key: must be \"netns\" or \"cgroup\"",
            ),
        ];
        for (extra, expected) in cases {
            let e = error(extra);
            assert!(e.contains(expected), "{extra}: {e}");
            assert!(e.contains("service \"web\""), "{e}");
        }
    }

    #[test]
    fn primes() {
        let naive = |n: u32| n > 1 && (2..n).all(|d| !n.is_multiple_of(d));
        assert!((0..3_000).all(|n| is_prime(n) == naive(n)));
        assert!(
            is_prime(MIN_TABLE_SIZE) && is_prime(DEFAULT_TABLE_SIZE) && is_prime(4_294_967_291)
        );
        assert!(!is_prime(65_535) && !is_prime(4_293_001_441) && !is_prime(u32::MAX));
    }
}
