//! `kind = "dns"`: backends from the A and AAAA records of a name, or from its SRV records.

use super::TIMEOUT_RANGE;
use crate::config::checker::Checker;
use crate::config::model::{DnsConfig, DnsRecord};
use crate::config::values::{
    check_choice, check_duration_or, check_integer, check_str, required, show, type_error,
};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;
use toml::{Table, Value};

pub(super) const KEYS: &[&str] = &[
    "name",
    "record",
    "port",
    "nameservers",
    "min_refresh",
    "max_refresh",
    "timeout",
];
/// `true` for SRV, whose records carry the port.
const RECORDS: &[(&str, bool)] = &[("a", false), ("srv", true)];
const REFRESH_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);
const MAX_NAMESERVERS: usize = 8;

impl Checker {
    pub(super) fn dns(&mut self, scope: Option<&str>, table: &Table) -> Option<DnsConfig> {
        let name = required(table.get("name"), "the DNS name to resolve", check_dns_name);
        let name = self.checked(scope, "discovery.name", name);
        let srv = table
            .get("record")
            .map_or(Ok(false), |v| check_choice(v, RECORDS));
        let srv = self.checked(scope, "discovery.record", srv);
        let port = table
            .get("port")
            .map(|v| check_integer::<u16>(v, 1..=u16::MAX))
            .transpose();
        let port = self.checked(scope, "discovery.port", port);
        let record = match (srv?, port?) {
            (false, Some(port)) => DnsRecord::Address { port },
            (false, None) => {
                let message = "required with record = \"a\" (the port every address serves on)";
                self.report(scope, "discovery.port", message);
                return None;
            }
            (true, None) => DnsRecord::Srv,
            (true, Some(_)) => {
                let message = "not allowed with record = \"srv\" (SRV records carry the port)";
                self.report(scope, "discovery.port", message);
                return None;
            }
        };
        let nameservers = table
            .get("nameservers")
            .map_or(Ok(Vec::new()), check_nameservers);
        let nameservers = self.checked(scope, "discovery.nameservers", nameservers);
        let min_refresh = table.get("min_refresh");
        let min_refresh = check_duration_or(min_refresh, Duration::from_secs(5), REFRESH_RANGE);
        let min_refresh = self.checked(scope, "discovery.min_refresh", min_refresh);
        let max_refresh = table.get("max_refresh");
        let max_refresh = check_duration_or(max_refresh, Duration::from_secs(300), REFRESH_RANGE);
        let max_refresh = self.checked(scope, "discovery.max_refresh", max_refresh);
        let refresh = [("min_refresh", min_refresh), ("max_refresh", max_refresh)];
        if !self.in_order(scope, refresh) {
            return None;
        }
        let timeout = table.get("timeout");
        let timeout = check_duration_or(timeout, Duration::from_secs(2), TIMEOUT_RANGE);
        let timeout = self.checked(scope, "discovery.timeout", timeout);
        Some(DnsConfig {
            name: name?,
            record,
            nameservers: nameservers?,
            min_refresh: min_refresh?,
            max_refresh: max_refresh?,
            timeout: timeout?,
        })
    }
}

/// A DNS name as resolvers accept it: dot-separated labels of 1-63 letters, digits, '-' or '_'
/// (SRV names start with `_service._proto`), 253 bytes at most, an optional final dot.
fn check_dns_name(raw: &Value) -> Result<String, String> {
    let name = check_str(raw)?;
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("{} must be 1-253 bytes long", show(name)));
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{} has an empty or over-63-byte label", show(name)));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "{} contains {bad:?}; labels hold only ASCII letters, digits, '-' and '_'",
                show(name)
            ));
        }
    }
    Ok(name.to_owned())
}

fn check_nameservers(raw: &Value) -> Result<Vec<SocketAddr>, String> {
    let Value::Array(list) = raw else {
        return Err(type_error("an array of \"ip:port\" strings", raw));
    };
    if list.is_empty() || list.len() > MAX_NAMESERVERS {
        return Err(format!(
            "must list 1-{MAX_NAMESERVERS} servers (leave it out to use /etc/resolv.conf), got {}",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let text = check_str(v).map_err(|m| format!("[{i}]: {m}"))?;
            let addr: SocketAddr = text.parse().map_err(|_| {
                format!(
                    "[{i}]: expected \"ip:port\" such as \"127.0.0.1:53\", got {}",
                    show(text)
                )
            })?;
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(format!("[{i}]: {addr} cannot be queried"));
            }
            Ok(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::config::discovery::tests::{assert_errors, ok};
    use crate::config::{DnsRecord, SourceConfig};
    use std::time::Duration;

    #[test]
    fn dns_a_record_defaults() {
        let d = ok("kind = \"dns\"\nname = \"web.local\"\nport = 8080");
        assert_eq!(d.retry_initial, Duration::from_secs(1));
        assert_eq!(d.retry_max, Duration::from_secs(30));
        let SourceConfig::Dns(dns) = d.source else {
            panic!("not dns")
        };
        assert_eq!(dns.record, DnsRecord::Address { port: 8080 });
        assert!(dns.nameservers.is_empty());
        assert_eq!(dns.min_refresh, Duration::from_secs(5));
        assert_eq!(dns.max_refresh, Duration::from_secs(300));
    }

    #[test]
    fn dns_srv_with_nameserver_and_refresh_bounds() {
        let d = ok(
            "kind = \"dns\"\nname = \"_http._tcp.web.local.\"\nrecord = \"srv\"\n\
                    nameservers = [\"127.0.0.1:5353\"]\nmin_refresh = \"1s\"\nmax_refresh = \"1m\"",
        );
        let SourceConfig::Dns(dns) = d.source else {
            panic!("not dns")
        };
        assert_eq!(dns.record, DnsRecord::Srv);
        assert_eq!(dns.nameservers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(dns.max_refresh, Duration::from_secs(60));
    }

    #[test]
    fn dns_errors_name_the_field() {
        let cases = [
            ("kind = \"dns\"\nport = 80", "discovery.name: required (the DNS name to resolve)"),
            ("kind = \"dns\"\nname = \"web.local\"", "discovery.port: required with record = \"a\""),
            ("kind = \"dns\"\nname = \"_x._tcp.web\"\nrecord = \"srv\"\nport = 80", "discovery.port: not allowed with record = \"srv\""),
            ("kind = \"dns\"\nname = \"web..local\"\nport = 80", "discovery.name: \"web..local\" has an empty"),
            ("kind = \"dns\"\nname = \"web local\"\nport = 80", "discovery.name: \"web local\" contains ' '"),
            ("kind = \"dns\"\nname = \"web\"\nport = 0", "discovery.port: must be between 1 and 65535, got 0"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nrecord = \"aaaa\"", "discovery.record: must be \"a\" or \"srv\""),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nnameservers = []", "discovery.nameservers: must list 1-8 servers"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nnameservers = [\"127.0.0.1\"]", "discovery.nameservers: [0]: expected \"ip:port\""),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nmin_refresh = \"1m\"\nmax_refresh = \"1s\"", "discovery.max_refresh: must not be shorter than discovery.min_refresh (1m), got 1s"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nmin_refresh = \"1ms\"", "discovery.min_refresh: must be between 100ms and 24h"),
            ("kind = \"dns\"\nname = \"web\"\nport = 80\nprefix = \"/x/\"", "discovery.prefix: unknown key"),
        ];
        assert_errors(&cases);
    }
}
