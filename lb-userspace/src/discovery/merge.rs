//! Pure: the config the data plane should follow, with each discovered service's backends
//! filled in from its source's last good answer. Everything downstream (health, plan,
//! reconcile) then treats discovered and listed backends alike.

use crate::config::{BackendConfig, Config, Protocol};
use crate::installed::Installed;
use crate::plan::service_key;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddrV4;

/// `discovered` gives a service's last good answer, `None` before the first one; such a service
/// keeps what the maps hold for it (left by an earlier agent), so that starting or restarting
/// the agent never empties a working service while its source is still syncing.
///
/// Discovered backends that are VIPs (or whose health port is a VIP) are dropped, as config
/// validation does for listed ones; the returned messages say which.
pub fn effective<'a>(
    config: &Config,
    discovered: &dyn Fn(&str) -> Option<&'a [BackendConfig]>,
    installed: &Installed,
) -> (Config, Vec<String>) {
    let vips: HashMap<(SocketAddrV4, Protocol), &str> = config
        .services
        .iter()
        .map(|s| ((s.vip, s.protocol), s.name.as_str()))
        .collect();
    let mut dropped = Vec::new();
    let mut merged = config.clone();
    for service in merged.services.iter_mut().filter(|s| s.discovery.is_some()) {
        let backends = match discovered(&service.name) {
            Some(answer) => answer.to_vec(),
            None => in_maps(installed, service_key(service.vip, service.protocol)),
        };
        let health_port = service.health.as_ref().and_then(|h| h.port);
        service.backends = backends
            .into_iter()
            .filter(|b| {
                let probed = health_port.map(|p| SocketAddrV4::new(*b.address.ip(), p));
                let hit = vips
                    .get(&(b.address, service.protocol))
                    .or_else(|| probed.and_then(|p| vips.get(&(p, Protocol::Tcp))));
                if let Some(owner) = hit {
                    dropped.push(format!(
                        "service {:?}: discovered backend {} ignored: it or its health port is the VIP of service {owner:?}",
                        service.name, b.address
                    ));
                }
                hit.is_none()
            })
            .collect();
    }
    (merged, dropped)
}

/// The backends a service's current slot table points at, weighted by their slot count.
fn in_maps(installed: &Installed, key: lb_common::ServiceKey) -> Vec<BackendConfig> {
    let Some(service) = installed.services.get(&key) else {
        return Vec::new();
    };
    let mut weights: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
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

    fn web(config: &Config) -> Vec<BackendConfig> {
        config.services[1].backends.clone()
    }

    #[test]
    fn answers_fill_discovered_services_only() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = vec![be("10.0.1.1:80", 1), be("10.0.1.2:80", 2)];
        let (merged, dropped) = effective(
            &config,
            &|s| (s == "web").then_some(&answer[..]),
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
        let (merged, _) = effective(&config, &|_| None, &installed);
        assert_eq!(web(&merged), [be("10.0.2.1:80", 1), be("10.0.2.2:80", 2)]);
        let (fresh, _) = effective(&config, &|_| None, &Installed::default());
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
        let (merged, _) = effective(&config, &|_| Some(&[]), &installed);
        assert!(web(&merged).is_empty());
    }

    #[test]
    fn discovered_vips_are_dropped_and_named() {
        let config = parse(CONFIG, "t").unwrap();
        let answer = [be("10.96.0.1:80", 1), be("10.0.1.1:80", 1)];
        let (merged, dropped) = effective(&config, &|_| Some(&answer[..]), &Installed::default());
        assert_eq!(web(&merged), [be("10.0.1.1:80", 1)]);
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].contains("10.96.0.1:80") && dropped[0].contains("\"api\""),
            "{dropped:?}"
        );
    }
}
