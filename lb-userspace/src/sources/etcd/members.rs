//! Which etcd services share a connection and a watch, and which services a key belongs to.
//! Pure, so the grouping and the demultiplexing are unit-tested without a server.

use crate::config::{DiscoveryConfig, EtcdConfig, SourceConfig};
use crate::sources::Reporter;
use std::collections::BTreeMap;
use std::time::Duration;

/// What makes services' etcd sources one cluster, reached over one connection: their whole
/// discovery block except `prefix` (what each service reads) and `allow_loopback_backends`
/// (how each service validates what it reads). Credentials, TLS files and timeouts are part of
/// it because one connection authenticates and times out one way; the retry bounds because the
/// cluster retries as one. Two services that differ in any of these get two connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    /// The service's etcd settings with an empty prefix and the endpoints sorted, without
    /// repeats: the same servers listed in another order are one cluster.
    pub etcd: EtcdConfig,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// One service reading one prefix of its cluster.
#[derive(Clone)]
pub struct Member {
    pub prefix: String,
    pub allow_loopback: bool,
    pub reporter: Reporter,
}

impl PartialEq for Member {
    /// A restarted service has a new reporter generation: a new member, listed afresh.
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix
            && self.allow_loopback == other.allow_loopback
            && self.reporter.generation == other.reporter.generation
    }
}

/// A cluster's members by service name.
pub type Members = BTreeMap<String, Member>;

/// The cluster and the membership of a service discovered from etcd; `None` for other kinds.
pub fn membership(config: &DiscoveryConfig, reporter: &Reporter) -> Option<(ClusterKey, Member)> {
    let SourceConfig::Etcd(etcd) = &config.source else {
        return None;
    };
    let mut endpoints = etcd.endpoints.clone();
    endpoints.sort();
    endpoints.dedup();
    let key = ClusterKey {
        etcd: EtcdConfig {
            endpoints,
            prefix: String::new(),
            ..etcd.clone()
        },
        retry_initial: config.retry_initial,
        retry_max: config.retry_max,
    };
    let member = Member {
        prefix: etcd.prefix.clone(),
        allow_loopback: config.allow_loopback_backends,
        reporter: reporter.clone(),
    };
    Some((key, member))
}

/// The prefix roots a cluster's watch covers, one watch each. Prefixes are grouped by their
/// first segment (`/services/` of `/services/web/`) and each group is watched on its longest
/// common prefix. Not one root for the whole cluster: unrelated prefixes (`/a/web/`, `/b/db/`)
/// have `/` in common, and a watch on `/` would stream every other application's writes to the
/// agent, which the config refuses even for one service. Not one root per prefix: that is one
/// watch per service again. The common prefix, not just the first segment, keeps a single
/// service deep in a shared tree (`/registry/lb/web/`) from watching the whole tree.
pub fn roots<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut by_segment: BTreeMap<&str, &str> = BTreeMap::new();
    for prefix in prefixes {
        by_segment
            .entry(first_segment(prefix))
            .and_modify(|root| *root = common_prefix(root, prefix))
            .or_insert(prefix);
    }
    by_segment.into_values().map(str::to_owned).collect()
}

/// True when one of `roots` covers `prefix`, so a watch on it sees the prefix's changes.
pub fn covered(roots: &[String], prefix: &str) -> bool {
    roots.iter().any(|root| prefix.starts_with(root.as_str()))
}

/// `/services/` of `/services/web/`; the whole text when it has no second `/` (the config
/// requires prefixes that start and end with one, so that does not happen).
fn first_segment(prefix: &str) -> &str {
    match prefix.get(1..).and_then(|rest| rest.find('/')) {
        Some(end) => &prefix[..end + 2],
        None => prefix,
    }
}

/// The longest prefix of both, cut back to a character boundary.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let mut len = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(len) {
        len -= 1;
    }
    &a[..len]
}

/// Finds the services a key belongs to: every service whose prefix the key starts with. Nested
/// prefixes (`/s/web/` and `/s/web/canary/`) both get the key, as they would each with a
/// watch of their own.
#[derive(Default)]
pub struct Demux {
    by_prefix: BTreeMap<Vec<u8>, Vec<String>>,
}

impl Demux {
    pub fn insert(&mut self, service: &str, prefix: &str) {
        self.by_prefix
            .entry(prefix.as_bytes().to_vec())
            .or_default()
            .push(service.to_owned());
    }

    pub fn remove(&mut self, service: &str, prefix: &str) {
        if let Some(services) = self.by_prefix.get_mut(prefix.as_bytes()) {
            services.retain(|s| s != service);
            if services.is_empty() {
                self.by_prefix.remove(prefix.as_bytes());
            }
        }
    }

    /// Prefixes end with `/`, so only the key's parts up to each `/` can be one: a lookup per
    /// `/` in the key, whatever the number of services.
    pub fn owners<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a String> + 'a {
        key.iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'/')
            .filter_map(|(i, _)| self.by_prefix.get(&key[..=i]))
            .flatten()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::sync::mpsc;

    pub(crate) fn reporter(service: &str, generation: u64) -> Reporter {
        let (tx, _rx) = mpsc::unbounded_channel();
        Reporter {
            service: service.to_owned(),
            generation,
            tx,
        }
    }

    pub(crate) fn etcd(endpoints: &[&str], prefix: &str) -> DiscoveryConfig {
        DiscoveryConfig {
            source: SourceConfig::Etcd(EtcdConfig {
                endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
                prefix: prefix.to_owned(),
                username: None,
                password_file: None,
                ca_file: None,
                cert_file: None,
                key_file: None,
                timeout: Duration::from_secs(5),
            }),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            allow_loopback_backends: false,
        }
    }

    fn key_of(config: &DiscoveryConfig) -> ClusterKey {
        membership(config, &reporter("web", 1)).expect("etcd").0
    }

    #[test]
    fn a_cluster_is_its_settings_without_the_prefix() {
        let a = etcd(&["http://a:2379", "http://b:2379"], "/services/web/");
        let reordered = etcd(&["http://b:2379", "http://a:2379", "http://a:2379"], "/x/");
        assert_eq!(key_of(&a), key_of(&reordered));
        let mut loopback = a.clone();
        loopback.allow_loopback_backends = true;
        assert_eq!(key_of(&a), key_of(&loopback));

        let other_server = etcd(&["http://a:2379"], "/services/web/");
        assert_ne!(key_of(&a), key_of(&other_server));
        let mut user = a.clone();
        if let SourceConfig::Etcd(e) = &mut user.source {
            e.username = Some("lb".into());
        }
        assert_ne!(key_of(&a), key_of(&user));
        let mut retry = a.clone();
        retry.retry_max = Duration::from_secs(60);
        assert_ne!(key_of(&a), key_of(&retry));
    }

    #[test]
    fn other_kinds_are_no_members() {
        let dns = DiscoveryConfig {
            source: SourceConfig::Dns(crate::config::DnsConfig {
                name: "web.test".into(),
                record: crate::config::DnsRecord::Srv,
                nameservers: Vec::new(),
                min_refresh: Duration::from_secs(1),
                max_refresh: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
            }),
            ..etcd(&["http://a:2379"], "/s/")
        };
        assert!(membership(&dns, &reporter("web", 1)).is_none());
    }

    #[test]
    fn roots_are_common_prefixes_within_a_first_segment() {
        assert_eq!(roots(["/services/web/"]), ["/services/web/"]);
        assert_eq!(
            roots(["/services/web/", "/services/api/", "/services/web/canary/"]),
            ["/services/"]
        );
        assert_eq!(roots(["/svc/web1/", "/svc/web2/"]), ["/svc/web"]);
        assert_eq!(
            roots(["/a/web/", "/b/db/", "/a/api/"]),
            ["/a/", "/b/db/"],
            "unrelated trees are never joined into /"
        );
        assert_eq!(roots(["/é1/", "/é2/"]).len(), 2);
        assert_eq!(roots(["/s/\u{e9}a/", "/s/\u{e8}a/"]), ["/s/"]);
        assert!(roots([]).is_empty());
    }

    #[test]
    fn covered_by_a_watched_root() {
        let watched = roots(["/services/web/", "/services/api/"]);
        assert!(covered(&watched, "/services/db/"));
        assert!(!covered(&watched, "/other/db/"));
        let narrow = roots(["/services/web/"]);
        assert!(!covered(&narrow, "/services/api/"));
        assert!(covered(&narrow, "/services/web/canary/"));
    }

    #[test]
    fn keys_go_to_every_service_whose_prefix_they_start_with() {
        let members: Members = [
            ("web", "/s/web/"),
            ("canary", "/s/web/canary/"),
            ("web2", "/s/web2/"),
            ("api", "/s/api/"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (name, prefix))| {
            let member = Member {
                prefix: prefix.to_owned(),
                allow_loopback: false,
                reporter: reporter(name, i as u64),
            };
            (name.to_owned(), member)
        })
        .collect();
        let mut demux = Demux::default();
        for (service, member) in &members {
            demux.insert(service, &member.prefix);
        }
        fn owners(demux: &Demux, key: &[u8]) -> Vec<String> {
            let mut found: Vec<String> = demux.owners(key).cloned().collect();
            found.sort();
            found
        }
        assert_eq!(owners(&demux, b"/s/web/10.0.0.1:80"), ["web"]);
        assert_eq!(owners(&demux, b"/s/web2/10.0.0.1:80"), ["web2"]);
        assert_eq!(
            owners(&demux, b"/s/web/canary/10.0.0.1:80"),
            ["canary", "web"]
        );
        assert_eq!(owners(&demux, b"/s/db/10.0.0.1:80"), Vec::<String>::new());
        assert_eq!(owners(&demux, b"/s/web"), Vec::<String>::new());
        assert_eq!(owners(&demux, b"/s/api/\xff\xfe/"), ["api"]);
        assert_eq!(owners(&demux, b""), Vec::<String>::new());
        demux.remove("web", "/s/web/");
        assert_eq!(owners(&demux, b"/s/web/canary/10.0.0.1:80"), ["canary"]);
        demux.remove("canary", "/s/web/canary/");
        assert_eq!(
            owners(&demux, b"/s/web/canary/10.0.0.1:80"),
            Vec::<String>::new()
        );
        assert_eq!(owners(&demux, b"/s/api/10.0.0.1:80"), ["api"]);
    }

    #[test]
    fn a_restarted_service_is_a_new_member() {
        let member = |generation| Member {
            prefix: "/s/web/".into(),
            allow_loopback: false,
            reporter: reporter("web", generation),
        };
        assert!(member(1) == member(1));
        assert!(member(1) != member(2));
    }
}
