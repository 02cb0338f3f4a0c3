//! Pure: the services the data plane should carry: the file's services, each discovered
//! service's backends filled in from its source's last good answer, the services Kubernetes
//! reports, and, while a source has not answered yet, what the maps already hold. Everything
//! downstream (admission, plan, reconcile) then treats them all alike.

use crate::config::{
    BackendConfig, Backends, Balancing, Config, HealthConfig, Name, OutlierConfig, Protocol,
    ServiceConfig, VipClash,
};
use crate::sources::kubernetes::translate::ClusterService;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

/// A service the data plane should carry, whatever it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: Name,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub backends: Backends,
    pub balancing: Balancing,
    pub admission: Admission,
}

/// How a service's backends are admitted (`admission/`). Only the file asks for checks;
/// services from Kubernetes or left in the maps get `Admission::default()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub health: Option<Box<HealthConfig>>,
    pub outlier: Option<Box<OutlierConfig>>,
    /// Balance over every backend when too few are admitted.
    pub fail_open: bool,
    /// "Too few": below this percentage of the backends (0: none at all).
    pub panic_threshold: u8,
}

/// No checks, so every backend is admitted, and failing open once none is: what a file service
/// without `[service.health]`, `[service.outlier]`, `fail_open` and `panic_threshold` gets.
impl Default for Admission {
    fn default() -> Self {
        Self {
            health: None,
            outlier: None,
            fail_open: true,
            panic_threshold: 0,
        }
    }
}

impl Service {
    /// A service as the file lists it; a discovered one's backends are filled in later.
    pub fn listed(s: &ServiceConfig) -> Self {
        Self {
            name: s.name.clone(),
            vip: s.vip,
            protocol: s.protocol,
            backends: s.backends.clone(),
            balancing: s.balancing,
            admission: Admission {
                health: s.health.clone(),
                outlier: s.outlier.clone(),
                fail_open: s.fail_open,
                panic_threshold: s.panic_threshold,
            },
        }
    }

    fn unchecked(
        name: &str,
        vip: SocketAddr,
        protocol: Protocol,
        backends: Backends,
        balancing: Balancing,
    ) -> Self {
        Self {
            name: name.into(),
            vip,
            protocol,
            backends,
            balancing,
            admission: Admission::default(),
        }
    }
}

/// The file's services as listed (tests and the no-source case).
pub fn listed(config: &Config) -> Vec<Service> {
    config.services.iter().map(Service::listed).collect()
}

/// What the maps hold for one service, in config terms (the data path reads it back,
/// `Installed::leftovers`): a restarted agent keeps it until the service's source answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Leftover {
    pub name: Name,
    /// The backends its current slot table points at, weighted by their slot count.
    pub backends: Backends,
    pub balancing: Balancing,
}

/// Leftovers by VIP and protocol.
pub type Leftovers = BTreeMap<(SocketAddr, Protocol), Leftover>;

/// What the maps hold, in config terms (`datapath::installed` implements it on what the maps
/// hold): looked up one service at a time, so that a change to one service never converts
/// all of them.
pub trait Held {
    fn leftover(&self, vip: SocketAddr, protocol: Protocol) -> Option<Leftover>;
    /// Every service held (needed only until Kubernetes has first synced).
    fn leftovers(&self) -> Leftovers;
}

impl Held for Leftovers {
    fn leftover(&self, vip: SocketAddr, protocol: Protocol) -> Option<Leftover> {
        self.get(&(vip, protocol)).cloned()
    }
    fn leftovers(&self) -> Leftovers {
        self.clone()
    }
}

/// Where the services and backends that the file does not list come from.
pub struct Sources<'a> {
    /// A discovered service's last good answer, `None` before its first one.
    pub discovered: &'a dyn Fn(&str) -> Option<&'a [BackendConfig]>,
    /// `None` when Kubernetes is not configured, `Some(None)` before its first full sync.
    pub kubernetes: Option<Option<&'a [ClusterService]>>,
}

/// Something left out of a service, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The service it concerns.
    pub service: String,
    pub text: String,
}

/// Every service's VIP, to keep sources from naming one as a backend.
pub type Vips = HashMap<(SocketAddr, Protocol), String>;

fn vips(services: &[Service]) -> Vips {
    services
        .iter()
        .map(|s| ((s.vip, s.protocol), s.name.to_string()))
        .collect()
}

/// A discovered service without an answer yet keeps what the maps hold for it (left by an
/// earlier agent), and so does every installed service while Kubernetes has not synced: starting
/// or restarting the agent never empties or removes a working service while a source is still
/// syncing.
///
/// The file wins over Kubernetes when both claim a VIP or a name. Backends from a source that
/// are VIPs (or whose health port is a VIP) are dropped, as config validation does for listed
/// ones. The returned notes say what was left out.
///
/// The file's services come first, in the file's order. Also returns every VIP when some
/// service's backends came from a source (empty otherwise), for `refresh` and
/// `refresh_cluster`.
pub fn effective(
    config: &Config,
    sources: &Sources,
    held: &dyn Held,
) -> (Vec<Service>, Vec<Note>, Vips) {
    let mut notes = Vec::new();
    let mut merged: Vec<Service> = config
        .services
        .iter()
        .map(|file| with_answer(file, sources, held))
        .collect();
    let listed = merged.len();
    match sources.kubernetes {
        None => {}
        Some(Some(from_api)) => {
            for service in from_api {
                let clash = merged[..listed].iter().find(|s| {
                    (s.vip, s.protocol) == (service.vip, service.protocol)
                        || *s.name == *service.name
                });
                match clash {
                    Some(owner) => notes.push(Note {
                        service: service.name.clone(),
                        text: format!(
                            "kubernetes service {:?} ({}/{}) ignored: the config file's service {:?} has that VIP or name",
                            service.name,
                            service.vip,
                            service.protocol.as_str(),
                            owner.name
                        ),
                    }),
                    None => merged.push(from_cluster(service)),
                }
            }
        }
        Some(None) => {
            let known: HashSet<(SocketAddr, Protocol)> =
                merged.iter().map(|s| (s.vip, s.protocol)).collect();
            for ((vip, protocol), service) in held.leftovers() {
                if !known.contains(&(vip, protocol)) {
                    merged.push(Service::unchecked(
                        &service.name,
                        vip,
                        protocol,
                        service.backends,
                        service.balancing,
                    ));
                }
            }
        }
    }
    let from_source = |i: usize| config.services.get(i).is_none_or(|s| s.discovery.is_some());
    // Every VIP by name is a map as large as the services (250,000: 34 MB): only made when
    // some backends came from a source, and then handed back for refreshing those alone.
    let mut all = Vips::new();
    if (0..merged.len()).any(from_source) {
        all = vips(&merged);
        for (i, service) in merged.iter_mut().enumerate() {
            if from_source(i) {
                drop_vip_backends(service, &all, &mut notes);
            }
        }
    }
    (merged, notes, all)
}

/// One Kubernetes service anew, after a change to it alone: what `effective` gives for it
/// while the VIPs are `vips` (its own among them).
pub fn refresh_cluster(service: &ClusterService, vips: &Vips) -> (Service, Vec<Note>) {
    let mut service = from_cluster(service);
    let mut notes = Vec::new();
    drop_vip_backends(&mut service, vips, &mut notes);
    (service, notes)
}

fn from_cluster(service: &ClusterService) -> Service {
    Service::unchecked(
        &service.name,
        service.vip,
        service.protocol,
        service.backends.as_slice().into(),
        service.balancing,
    )
}

/// One file service anew, after its source answered: what `effective` gives for it while the
/// VIPs are `vips`.
pub fn refresh(
    file: &ServiceConfig,
    sources: &Sources,
    held: &dyn Held,
    vips: &Vips,
) -> (Service, Vec<Note>) {
    let mut service = with_answer(file, sources, held);
    let mut notes = Vec::new();
    if file.discovery.is_some() {
        drop_vip_backends(&mut service, vips, &mut notes);
    }
    (service, notes)
}

/// A file service, a discovered one with its source's last answer or else what the maps hold.
fn with_answer(file: &ServiceConfig, sources: &Sources, held: &dyn Held) -> Service {
    let mut service = Service::listed(file);
    if file.discovery.is_some() {
        service.backends = match (sources.discovered)(&service.name) {
            Some(answer) => answer.into(),
            None => held
                .leftover(service.vip, service.protocol)
                .map(|l| l.backends)
                .unwrap_or_default(),
        };
    }
    service
}

/// The backend-is-not-a-VIP rule for a service whose backends came from a source (the config
/// check has applied it to the listed ones).
fn drop_vip_backends(service: &mut Service, vips: &Vips, notes: &mut Vec<Note>) {
    let health_port = service.admission.health.as_ref().and_then(|h| h.port);
    let (name, protocol) = (service.name.clone(), service.protocol);
    let vip = service.vip;
    let kept: Vec<BackendConfig> = service.backends.iter().filter(|b| {
        let text = if b.address.is_ipv4() != vip.is_ipv4() {
            format!(
                "service {name:?}: discovered backend {} ignored: the VIP {vip} is of the other address family",
                b.address
            )
        } else if let Some(owner) = VipClash::of(vips, b.address, protocol, health_port).owner() {
            format!(
                "service {name:?}: discovered backend {} ignored: it or its health port is the VIP of service {owner:?}",
                b.address
            )
        } else {
            return true;
        };
        notes.push(Note {
            service: name.to_string(),
            text,
        });
        false
    }).cloned().collect();
    if kept.len() < service.backends.len() {
        service.backends = kept.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const CONFIG: &str = r#"
[[service]]
name = "api"
vip = "10.96.0.1:80"
backends = ["10.0.0.1:80"]

[[service]]
name = "web"
vip = "10.96.0.2:80"
[service.discovery]
kind = "consul"
service = "web"
"#;

    fn be(addr: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            address: addr.parse().unwrap(),
            weight,
        }
    }

    /// Sources with discovery answers only (no Kubernetes).
    fn only<'a>(discovered: &'a dyn Fn(&str) -> Option<&'a [BackendConfig]>) -> Sources<'a> {
        Sources {
            discovered,
            kubernetes: None,
        }
    }

    fn web(services: &[Service]) -> Vec<BackendConfig> {
        services[1].backends.to_vec()
    }

    #[test]
    fn answers_fill_discovered_services_only() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = vec![be("10.0.1.1:80", 1), be("10.0.1.2:80", 2)];
        let (merged, dropped, _) = effective(
            &config,
            &only(&|s| (s == "web").then_some(&answer[..])),
            &Leftovers::new(),
        );
        assert_eq!(web(&merged), answer);
        assert_eq!(merged[0], Service::listed(&config.services[0]));
        assert!(dropped.is_empty());
    }

    #[test]
    fn before_the_first_answer_the_installed_set_is_kept() {
        let config = parse(CONFIG, "t").unwrap();
        let mut leftovers = Leftovers::new();
        let kept = [be("10.0.2.1:80", 1), be("10.0.2.2:80", 2)];
        leftover(&mut leftovers, "web", "10.96.0.2:80", &kept);
        let (merged, _, _) = effective(&config, &only(&|_| None), &leftovers);
        assert_eq!(web(&merged), kept);
        let (fresh, _, _) = effective(&config, &only(&|_| None), &Leftovers::new());
        assert!(web(&fresh).is_empty());
    }

    #[test]
    fn an_empty_answer_empties_the_service() {
        let config = parse(CONFIG, "t").unwrap();
        let mut leftovers = Leftovers::new();
        leftover(
            &mut leftovers,
            "web",
            "10.96.0.2:80",
            &[be("10.0.2.1:80", 1)],
        );
        let (merged, _, _) = effective(&config, &only(&|_| Some(&[])), &leftovers);
        assert!(web(&merged).is_empty());
    }

    #[test]
    fn discovered_vips_are_dropped_and_named() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = [be("10.96.0.1:80", 1), be("10.0.1.1:80", 1)];
        let answered = |_: &str| Some(&answer[..]);
        let sources = only(&answered);
        let (merged, dropped, vips) = effective(&config, &sources, &Leftovers::new());
        assert_eq!(web(&merged), [be("10.0.1.1:80", 1)]);
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].text.contains("10.96.0.1:80") && dropped[0].text.contains("\"api\""),
            "{dropped:?}"
        );
        // The VIPs handed back serve a later refresh of the discovered service alone.
        assert_eq!(vips.len(), merged.len());
        let (again, dropped) = refresh(&config.services[1], &sources, &Leftovers::new(), &vips);
        assert_eq!(*again.backends, [be("10.0.1.1:80", 1)]);
        assert_eq!(dropped.len(), 1);
        // Nothing from a source: no VIP map is made.
        let listed = parse(
            CONFIG
                .split("\n[[service]]\nname = \"web\"")
                .next()
                .unwrap(),
            "t",
        );
        let (_, _, none) = effective(&listed.unwrap(), &sources, &Leftovers::new());
        assert!(none.is_empty());
    }

    fn leftover(leftovers: &mut Leftovers, name: &str, vip: &str, backends: &[BackendConfig]) {
        let balancing = parse(CONFIG, "t").unwrap().services[0].balancing;
        let service = Leftover {
            name: name.into(),
            backends: backends.into(),
            balancing,
        };
        leftovers.insert((vip.parse().unwrap(), Protocol::Tcp), service);
    }

    fn kube_service(name: &str, vip: &str, backends: &[&str]) -> ClusterService {
        ClusterService {
            name: name.into(),
            vip: vip.parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: backends.iter().map(|b| be(b, 1)).collect(),
            balancing: parse(CONFIG, "t").unwrap().services[0].balancing,
        }
    }

    #[test]
    fn before_kubernetes_syncs_every_installed_service_is_kept() {
        let config = parse("[kubernetes]\n", "t").unwrap();
        let mut leftovers = Leftovers::new();
        let kept = [be("10.1.0.1:8080", 1)];
        leftover(&mut leftovers, "shop.web.http", "10.96.5.5:80", &kept);
        let sources = Sources {
            discovered: &|_| None,
            kubernetes: Some(None),
        };
        let (merged, _, _) = effective(&config, &sources, &leftovers);
        assert_eq!(merged.len(), 1);
        assert_eq!(&*merged[0].name, "shop.web.http");
        assert_eq!(merged[0].vip.to_string(), "10.96.5.5:80");
        assert_eq!(*merged[0].backends, [be("10.1.0.1:8080", 1)]);
        // Once synced, the API's view replaces it, including removals.
        let sources = Sources {
            discovered: &|_| None,
            kubernetes: Some(Some(&[])),
        };
        let (merged, _, _) = effective(&config, &sources, &leftovers);
        assert!(merged.is_empty());
    }

    /// The services planned hold the file's names and backend lists, not copies, and so does
    /// a discovered one from its answer when no backend is dropped.
    #[test]
    fn names_and_listed_backends_are_shared_with_the_file_not_copied() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = [be("10.3.0.1:80", 1)];
        let sources = Sources {
            discovered: &|_| Some(&answer),
            kubernetes: None,
        };
        let (merged, _, _) = effective(&config, &sources, &Leftovers::new());
        let file = &config.services[0].backends;
        assert!(std::sync::Arc::ptr_eq(&merged[0].backends, file));
        assert!(std::sync::Arc::ptr_eq(
            &merged[1].name,
            &config.services[1].name
        ));
        let (again, _) = refresh(
            &config.services[0],
            &sources,
            &Leftovers::new(),
            &vips(&merged),
        );
        assert!(std::sync::Arc::ptr_eq(&again.backends, file));
        let (web, _) = refresh(
            &config.services[1],
            &sources,
            &Leftovers::new(),
            &vips(&merged),
        );
        assert_eq!(*web.backends, answer);
    }

    #[test]
    fn the_file_wins_over_kubernetes_and_api_backends_may_not_be_vips() {
        let config = parse(CONFIG, "t").unwrap();
        let from_api = [
            kube_service("a.clash.80", "10.96.0.1:80", &["10.2.0.1:80"]),
            kube_service("a.ok.80", "10.96.9.9:80", &["10.2.0.2:80", "10.96.0.2:80"]),
        ];
        let sources = Sources {
            discovered: &|_| Some(&[]),
            kubernetes: Some(Some(&from_api)),
        };
        let (merged, notes, _) = effective(&config, &sources, &Leftovers::new());
        let names: Vec<&str> = merged.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["api", "web", "a.ok.80"]);
        assert_eq!(*merged[2].backends, [be("10.2.0.2:80", 1)]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].text.contains("\"a.clash.80\"") && notes[0].text.contains("\"api\""),
            "{notes:?}"
        );
    }
}
