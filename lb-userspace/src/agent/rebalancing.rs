//! The agent's side of `[service.rebalance]`: every `EVERY`, a walk of the sockets reports the
//! connections, the rebalance chooses from them, and, when it chose some, a second walk closes
//! those that are still idle (the kernel checks again at that moment). The program is loaded
//! when a service first asks for it: reading the kernel's BTF and measuring its tick rate
//! cost every other agent nothing.

use crate::codec::service_key;
use crate::config::Config;
use crate::datapath::maps::Maps;
use crate::datapath::mirror::Mirror;
use crate::datapath::pinned::PinnedMaps;
use crate::datapath::survey::Surveyor;
use crate::rebalance::{Policy, Rebalancer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Rebalancing {
    /// Surveys and closes connections, or why it cannot on this kernel; `None` until a
    /// service asks for it.
    surveyor: Option<Result<Surveyor, String>>,
    rebalancer: Rebalancer,
    /// Connections closed so far, by service and backend.
    pub closed: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Rebalancing {
    /// Why rebalancing cannot work here, while some service asks for it (`wanted`).
    pub fn unavailable(&self, wanted: bool) -> Option<&str> {
        let why = self.surveyor.as_ref()?.as_ref().err()?;
        wanted.then_some(why.as_str())
    }

    /// One pass. `mirror` says which backends each service has now; without it (a failed
    /// reconcile awaiting its retry) the pass waits.
    pub fn pass(
        &mut self,
        config: &Config,
        mirror: Option<&Mirror>,
        maps: &PinnedMaps,
        cgroup: &Path,
    ) {
        let surveyor = self.surveyor.get_or_insert_with(|| {
            let loaded = (maps.sockets())
                .and_then(|sockets| Surveyor::load(&sockets))
                .map_err(|e| format!("{e:#}"));
            if let Err(why) = &loaded {
                warn!("connections cannot be rebalanced on this kernel: {why}");
            }
            loaded
        });
        let (Ok(surveyor), Some(mirror)) = (surveyor, mirror) else {
            return;
        };
        let (names, policies) = policies(config, mirror, maps);
        if policies.is_empty() {
            return;
        }
        if let Err(e) = surveyor.watch(&policies.keys().copied().collect()) {
            warn!("choosing the services to survey failed: {e:#}");
            return;
        }
        let seen = match surveyor.pass(cgroup, &BTreeMap::new()) {
            Ok(pass) => pass.connections,
            Err(e) => {
                warn!("surveying connections for the rebalance failed: {e:#}");
                return;
            }
        };
        let chosen = self.rebalancer.choose(Instant::now(), &seen, &policies);
        if chosen.is_empty() {
            return;
        }
        let close = (chosen.iter())
            .map(|(cookie, one)| (*cookie, one.idle_after))
            .collect();
        let closed = match surveyor.pass(cgroup, &close) {
            Ok(pass) => pass.closed,
            Err(e) => {
                warn!("closing connections for the rebalance failed: {e:#}");
                return;
            }
        };
        let mut logged: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for one in closed.iter().filter_map(|cookie| chosen.get(cookie)) {
            let service = names.get(&one.service_id).copied().unwrap_or_default();
            let backend = (mirror.installed.backends.get(one.backend_id))
                .map(|a| a.to_string())
                .unwrap_or_default();
            crate::agent_metrics::AGENT.rebalanced(service, &backend, one.reason.as_str());
            let by_backend = self.closed.entry(service.to_owned()).or_default();
            *by_backend.entry(backend).or_default() += 1;
            *logged.entry((service, one.reason.as_str())).or_default() += 1;
        }
        for ((service, reason), n) in logged {
            info!(
                service,
                reason,
                connections = n,
                "closed idle connections so that they reconnect"
            );
        }
    }
}

/// The services with `[service.rebalance]` that are installed, by service id: their names,
/// and their settings with their backends weighted by their share of the slot table.
fn policies<'c>(
    config: &'c Config,
    mirror: &Mirror,
    maps: &impl Maps,
) -> (HashMap<u32, &'c str>, HashMap<u32, Policy>) {
    let mut names = HashMap::new();
    let mut policies = HashMap::new();
    for svc in &config.services {
        let Some(rebalance) = svc.rebalance.as_deref().copied() else {
            continue;
        };
        let key = service_key(svc.vip, svc.protocol);
        let Some(installed) = mirror.installed.services.get(&key) else {
            continue;
        };
        // A Maglev table repeats each backend thousands of times: count first, then read each
        // backend's generation once.
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &installed.slots {
            *slots.entry(*id).or_default() += 1;
        }
        let backends = (slots.into_iter())
            .filter_map(|(id, n)| Some(((id, maps.backend_generation(id).ok()?), n)))
            .collect();
        names.insert(installed.id, &*svc.name);
        let policy = Policy {
            config: rebalance,
            backends,
        };
        policies.insert(installed.id, policy);
    }
    (names, policies)
}
