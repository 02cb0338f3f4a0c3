//! Turns what a source reported into backends the data plane can use. Entries that cannot be
//! used are skipped and named (the rest of the answer still counts); an answer too large to
//! install is an error, so the last good set stays.

use crate::config::{BackendConfig, MAX_BACKENDS_PER_SERVICE, MAX_WEIGHT};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Reasons kept per answer: enough to diagnose, bounded for a garbage answer of any size.
pub const MAX_REASONS: usize = 10;

/// One instance as a source reported it, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// Sorted by address, one entry per address.
    pub backends: Vec<BackendConfig>,
    /// How many reported entries were not used, and the first few reasons.
    pub skipped: usize,
    pub reasons: Vec<String>,
}

impl Answer {
    /// Records an entry the source itself could not parse (bad key, bad JSON value...).
    pub fn skip(&mut self, reason: String) {
        self.skipped += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(reason);
        }
    }
}

/// Validates `reported`, keeping the entries skipped earlier in `answer`. Loopback and
/// link-local addresses are skipped unless `allow_loopback` (the service's
/// `allow_loopback_backends`).
pub fn build(
    reported: impl IntoIterator<Item = Reported>,
    mut answer: Answer,
    allow_loopback: bool,
) -> Result<Answer, String> {
    let mut by_address: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for r in reported {
        match usable(&r, allow_loopback) {
            // Names that resolve to the same address twice are normal in DNS: keep the first.
            Ok(address) => {
                by_address.entry(address).or_insert(r.weight);
            }
            Err(reason) => answer.skip(reason),
        }
    }
    if by_address.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(format!(
            "answer has {} usable instances, at most {MAX_BACKENDS_PER_SERVICE} per service",
            by_address.len()
        ));
    }
    answer.backends = by_address
        .into_iter()
        .map(|(address, weight)| BackendConfig { address, weight })
        .collect();
    Ok(answer)
}

/// Both families are usable here; a backend of the other family than its service's VIP is
/// dropped where the VIP is known (`merge`).
fn usable(r: &Reported, allow_loopback: bool) -> Result<SocketAddr, String> {
    let ip = canonical(r.ip);
    let shown = SocketAddr::new(ip, r.port);
    if r.port == 0 {
        return Err(format!("{shown}: port 0"));
    }
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || broadcast || ip.is_multicast() {
        return Err(format!("{shown}: not a unicast address"));
    }
    if !allow_loopback && is_loopback_or_link_local(ip) {
        return Err(format!(
            "{shown}: a loopback or link-local address (allowed only with \
             allow_loopback_backends = true)"
        ));
    }
    if !(1..=MAX_WEIGHT).contains(&r.weight) {
        return Err(format!(
            "{shown}: weight {} is not between 1 and {MAX_WEIGHT}",
            r.weight
        ));
    }
    Ok(shown)
}

/// A v4-mapped IPv6 address is its IPv4 address; anything else is itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// True for addresses that mean "this node" or "this link" rather than a backend elsewhere:
/// loopback (127.0.0.0/8, ::1) and link-local (169.254.0.0/16, fe80::/10), v4-mapped forms
/// (`::ffff:127.0.0.1`) included. A source naming one would send clients to the node's own
/// ports (or a link neighbour), so sources may only name them when the service allows it.
pub fn is_loopback_or_link_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ip: &str, port: u16, weight: u32) -> Reported {
        Reported {
            ip: ip.parse().unwrap(),
            port,
            weight,
        }
    }

    #[test]
    fn keeps_good_entries_sorted_and_deduplicated() {
        let a = build(
            [
                r("10.0.0.2", 80, 1),
                r("10.0.0.1", 80, 3),
                r("10.0.0.2", 80, 5),
            ],
            Answer::default(),
            false,
        )
        .unwrap();
        let got: Vec<(String, u32)> = a
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        assert_eq!(got, [("10.0.0.1:80".into(), 3), ("10.0.0.2:80".into(), 1)]);
        assert_eq!(a.skipped, 0);
    }

    #[test]
    fn unusable_entries_are_skipped_with_a_reason() {
        let a = build(
            [
                r("10.0.0.1", 0, 1),
                r("0.0.0.0", 80, 1),
                r("224.0.0.1", 80, 1),
                r("255.255.255.255", 80, 1),
                r("fd00::1", 80, 1),
                r("10.0.0.1", 80, 0),
                r("10.0.0.1", 80, MAX_WEIGHT + 1),
                r("::ffff:10.0.0.9", 80, 1),
            ],
            Answer::default(),
            false,
        )
        .unwrap();
        // IPv6 is usable; a v4-mapped address is its IPv4 address.
        let kept: Vec<String> = a.backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(kept, ["10.0.0.9:80", "[fd00::1]:80"]);
        assert_eq!(a.skipped, 6);
        assert!(a.reasons[0].contains("port 0"), "{:?}", a.reasons);
        assert!(a.reasons[3].contains("not a unicast"), "{:?}", a.reasons);
    }

    #[test]
    fn ten_thousand_instances_are_an_error_not_a_truncation() {
        let many = (0..10_000u32).map(|i| Reported {
            ip: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            port: 80,
            weight: 1,
        });
        let e = build(many, Answer::default(), false).unwrap_err();
        assert!(e.contains("10000 usable instances, at most 1024"), "{e}");
    }

    #[test]
    fn reasons_are_bounded_but_every_skip_is_counted() {
        let bad = (0..5_000).map(|_| r("10.0.0.1", 0, 1));
        let a = build(bad, Answer::default(), false).unwrap();
        assert_eq!(a.skipped, 5_000);
        assert_eq!(a.reasons.len(), MAX_REASONS);
        assert!(a.backends.is_empty());
    }

    #[test]
    fn loopback_and_link_local_only_when_allowed() {
        let node_local = [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.2",
            "169.254.169.254",
            "fe80::1",
            "febf::1",
            "::ffff:169.254.0.1",
        ];
        for ip in node_local {
            assert!(is_loopback_or_link_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "128.0.0.1",
            "169.255.0.1",
            "fec0::1",
            "fd00::1",
            "::2",
        ] {
            assert!(!is_loopback_or_link_local(ip.parse().unwrap()), "{ip}");
        }
        let reported = || {
            node_local
                .iter()
                .map(|ip| r(ip, 80, 1))
                .chain([r("10.0.0.1", 80, 1)])
        };
        let refused = build(reported(), Answer::default(), false).unwrap();
        let kept: Vec<String> = refused
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(kept, ["10.0.0.1:80"]);
        assert_eq!(refused.skipped, node_local.len());
        assert!(
            refused.reasons[0].starts_with("127.0.0.1:80: a loopback or link-local address")
                && refused.reasons[0].contains("allow_loopback_backends = true"),
            "{:?}",
            refused.reasons
        );
        let allowed = build(reported(), Answer::default(), true).unwrap();
        // ::ffff:127.0.0.2 and ::ffff:169.254.0.1 are their IPv4 addresses.
        assert_eq!(allowed.backends.len(), node_local.len() + 1);
        assert_eq!(allowed.skipped, 0);
    }
}
