//! Pure: the config the data plane should follow: the file's services, each discovered service's
//! backends filled in from its source's last good answer, and the services Kubernetes reports.
//! Everything downstream (health, plan, reconcile) then treats them all alike.

use crate::config::{BackendConfig, Config, Protocol, ServiceConfig, VipClash};
use crate::installed::Installed;
use crate::plan::service_key;
use lb_common::{ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

/// Where the services and backends that the file does not list come from.
pub struct Sources<'a> {
    /// A discovered service's last good answer, `None` before its first one.
    pub discovered: &'a dyn Fn(&str) -> Option<&'a [BackendConfig]>,
    /// `None` when Kubernetes is not configured, `Some(None)` before its first full sync.
    pub kubernetes: Option<Option<&'a [ServiceConfig]>>,
}

/// A discovered service without an answer yet keeps what the maps hold for it (left by an
/// earlier agent), and so does every installed service while Kubernetes has not synced: starting
/// or restarting the agent never empties or removes a working service while a source is still
/// syncing.
///
/// The file wins over Kubernetes when both claim a VIP or a name. Backends from a source that
/// are VIPs (or whose health port is a VIP) are dropped, as config validation does for listed
/// ones. The returned messages say what was left out.
pub fn effective(
    config: &Config,
    sources: &Sources,
    installed: &Installed,
) -> (Config, Vec<String>) {
    let mut notes = Vec::new();
    let mut merged = config.clone();
    for service in merged.services.iter_mut().filter(|s| s.discovery.is_some()) {
        service.backends = match (sources.discovered)(&service.name) {
            Some(answer) => answer.to_vec(),
            None => in_maps(installed, service_key(service.vip, service.protocol)),
        };
    }
    let listed = merged.services.len();
    match sources.kubernetes {
        None => {}
        Some(Some(from_api)) => {
            for service in from_api {
                let clash = merged.services[..listed].iter().find(|s| {
                    (s.vip, s.protocol) == (service.vip, service.protocol) || s.name == service.name
                });
                match clash {
                    Some(owner) => notes.push(format!(
                        "kubernetes service {:?} ({}/{}) ignored: the config file's service {:?} has that VIP or name",
                        service.name,
                        service.vip,
                        service.protocol.as_str(),
                        owner.name
                    )),
                    None => merged.services.push(service.clone()),
                }
            }
        }
        Some(None) => {
            let known: HashSet<ServiceKey> = merged
                .services
                .iter()
                .map(|s| service_key(s.vip, s.protocol))
                .collect();
            for (key, service) in &installed.services {
                if known.contains(key) {
                    continue;
                }
                let Some((vip, protocol)) = vip_of(key) else {
                    continue;
                };
                merged.services.push(ServiceConfig {
                    name: service.name.clone(),
                    vip,
                    protocol,
                    backends: in_maps(installed, *key),
                    health: None,
                    fail_open: true,
                    panic_threshold: 0,
                    discovery: None,
                    balancing: service.mode.balancing(service.slot_count),
                    outlier: None,
                });
            }
        }
    }
    drop_vip_backends(&mut merged, listed, &mut notes);
    (merged, notes)
}

/// Applies the backend-is-not-a-VIP rule to every service whose backends came from a source.
fn drop_vip_backends(merged: &mut Config, listed: usize, notes: &mut Vec<String>) {
    let vips: HashMap<(SocketAddr, Protocol), String> = merged
        .services
        .iter()
        .map(|s| ((s.vip, s.protocol), s.name.clone()))
        .collect();
    for (i, service) in merged.services.iter_mut().enumerate() {
        if i < listed && service.discovery.is_none() {
            continue;
        }
        let health_port = service.health.as_ref().and_then(|h| h.port);
        let (name, protocol) = (service.name.clone(), service.protocol);
        let vip = service.vip;
        service.backends.retain(|b| {
            if b.address.is_ipv4() != vip.is_ipv4() {
                notes.push(format!(
                    "service {name:?}: discovered backend {} ignored: the VIP {vip} is of the other address family",
                    b.address
                ));
                return false;
            }
            let hit = VipClash::of(&vips, b.address, protocol, health_port).owner();
            if let Some(owner) = hit {
                notes.push(format!(
                    "service {name:?}: discovered backend {} ignored: it or its health port is the VIP of service {owner:?}",
                    b.address
                ));
            }
            hit.is_none()
        });
    }
}

fn vip_of(key: &ServiceKey) -> Option<(SocketAddr, Protocol)> {
    let protocol = match key.proto {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some((crate::dataplane::endpoint(&key.addr, key.port), protocol))
}

/// The backends a service's current slot table points at, weighted by their slot count.
fn in_maps(installed: &Installed, key: ServiceKey) -> Vec<BackendConfig> {
    let Some(service) = installed.services.get(&key) else {
        return Vec::new();
    };
    let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for id in &service.slots {
        if let Some(address) = installed.backends.get(id) {
            *weights.entry(*address).or_default() += 1;
        }
    }
    weights
        .into_iter()
        .map(|(address, weight)| BackendConfig { address, weight })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::installed::InstalledService;

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

    fn web(config: &Config) -> Vec<BackendConfig> {
        config.services[1].backends.clone()
    }

    #[test]
    fn answers_fill_discovered_services_only() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = vec![be("10.0.1.1:80", 1), be("10.0.1.2:80", 2)];
        let (merged, dropped) = effective(
            &config,
            &only(&|s| (s == "web").then_some(&answer[..])),
            &Installed::default(),
        );
        assert_eq!(web(&merged), answer);
        assert_eq!(merged.services[0], config.services[0]);
        assert!(dropped.is_empty());
    }

    #[test]
    fn before_the_first_answer_the_installed_set_is_kept() {
        let config = parse(CONFIG, "t").unwrap();
        let mut installed = Installed::default();
        installed.backends.insert(7, "10.0.2.1:80".parse().unwrap());
        installed.backends.insert(8, "10.0.2.2:80".parse().unwrap());
        installed.services.insert(
            service_key("10.96.0.2:80".parse().unwrap(), Protocol::Tcp),
            InstalledService {
                slots: vec![7, 8, 8],
                complete: true,
                ..InstalledService::default()
            },
        );
        let (merged, _) = effective(&config, &only(&|_| None), &installed);
        assert_eq!(web(&merged), [be("10.0.2.1:80", 1), be("10.0.2.2:80", 2)]);
        let (fresh, _) = effective(&config, &only(&|_| None), &Installed::default());
        assert!(web(&fresh).is_empty());
    }

    #[test]
    fn an_empty_answer_empties_the_service() {
        let config = parse(CONFIG, "t").unwrap();
        let mut installed = Installed::default();
        installed.backends.insert(7, "10.0.2.1:80".parse().unwrap());
        installed.services.insert(
            service_key("10.96.0.2:80".parse().unwrap(), Protocol::Tcp),
            InstalledService {
                slots: vec![7],
                complete: true,
                ..InstalledService::default()
            },
        );
        let (merged, _) = effective(&config, &only(&|_| Some(&[])), &installed);
        assert!(web(&merged).is_empty());
    }

    #[test]
    fn discovered_vips_are_dropped_and_named() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = [be("10.96.0.1:80", 1), be("10.0.1.1:80", 1)];
        let (merged, dropped) = effective(
            &config,
            &only(&|_| Some(&answer[..])),
            &Installed::default(),
        );
        assert_eq!(web(&merged), [be("10.0.1.1:80", 1)]);
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].contains("10.96.0.1:80") && dropped[0].contains("\"api\""),
            "{dropped:?}"
        );
    }

    fn installed_service(
        installed: &mut Installed,
        name: &str,
        vip: &str,
        backends: &[(u32, &str)],
    ) {
        for (id, addr) in backends {
            installed.backends.insert(*id, addr.parse().unwrap());
        }
        installed.services.insert(
            service_key(vip.parse().unwrap(), Protocol::Tcp),
            InstalledService {
                name: name.into(),
                slots: backends.iter().map(|(id, _)| *id).collect(),
                complete: true,
                ..InstalledService::default()
            },
        );
    }

    fn kube_service(name: &str, vip: &str, backends: &[&str]) -> ServiceConfig {
        let mut s = parse(
            &format!("[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nbackends = []\n"),
            "t",
        )
        .unwrap()
        .services
        .remove(0);
        s.backends = backends.iter().map(|b| be(b, 1)).collect();
        s
    }

    #[test]
    fn before_kubernetes_syncs_every_installed_service_is_kept() {
        let config = parse("[kubernetes]\n", "t").unwrap();
        let mut installed = Installed::default();
        installed_service(
            &mut installed,
            "shop.web.http",
            "10.96.5.5:80",
            &[(1, "10.1.0.1:8080")],
        );
        let sources = Sources {
            discovered: &|_| None,
            kubernetes: Some(None),
        };
        let (merged, _) = effective(&config, &sources, &installed);
        assert_eq!(merged.services.len(), 1);
        assert_eq!(merged.services[0].name, "shop.web.http");
        assert_eq!(merged.services[0].vip.to_string(), "10.96.5.5:80");
        assert_eq!(merged.services[0].backends, [be("10.1.0.1:8080", 1)]);
        // Once synced, the API's view replaces it, including removals.
        let sources = Sources {
            discovered: &|_| None,
            kubernetes: Some(Some(&[])),
        };
        let (merged, _) = effective(&config, &sources, &installed);
        assert!(merged.services.is_empty());
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
        let (merged, notes) = effective(&config, &sources, &Installed::default());
        let names: Vec<&str> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "web", "a.ok.80"]);
        assert_eq!(merged.services[2].backends, [be("10.2.0.2:80", 1)]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].contains("\"a.clash.80\"") && notes[0].contains("\"api\""),
            "{notes:?}"
        );
    }
}
