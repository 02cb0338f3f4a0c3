//! How many services, backends and slots the maps hold. Chosen when an agent first creates the
//! maps (flags, or the config with room to grow), then fixed: the pinned maps carry their
//! sizes, and every later agent, `stats` and `detach` read them back from there.

use crate::config::{Algorithm, Config};
use anyhow::{bail, Result};
use lb_common::{
    LIMIT_AFFINITY, LIMIT_BACKENDS, LIMIT_SERVICES, LIMIT_SLOTS, MAX_AFFINITY, MAX_BACKENDS,
    MAX_RANDOM_SLOTS, MAX_SERVICES, MAX_SLOTS, SLOTS_PER_ENTRY,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    /// Remembered client choices of client-affinity services (an LRU map: when full, the
    /// least recently used choice is forgotten and that client chooses afresh).
    pub affinity: u32,
}

/// What `lb-agent run --max-services/--max-backends/--max-slots` asked for; each one given
/// replaces what the config would size.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requested {
    pub services: Option<u32>,
    pub backends: Option<u32>,
    pub slots: Option<u32>,
    pub affinity: Option<u32>,
}

/// Sizes are rounded up to this many entries, so that small config changes do not change them.
const STEP: u32 = 65_536;

impl Default for Capacity {
    /// The sizes compiled into the eBPF object.
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            slots: MAX_SLOTS,
            affinity: MAX_AFFINITY,
        }
    }
}

impl Requested {
    /// Each flag given must be within its limit; the message names the flag.
    pub fn check(&self) -> Result<()> {
        let flags = [
            ("--max-services", self.services, LIMIT_SERVICES),
            ("--max-backends", self.backends, LIMIT_BACKENDS),
            ("--max-slots", self.slots, LIMIT_SLOTS),
            ("--max-affinity", self.affinity, LIMIT_AFFINITY),
        ];
        for (flag, value, limit) in flags {
            match value {
                Some(v) if v == 0 || v > limit => {
                    bail!("{flag} {v}: must be between 1 and {limit}")
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Capacity {
    /// Sizes read from pinned maps must be ones an agent could have chosen: a map planted or
    /// damaged with an absurd size is refused, not mapped into memory.
    pub fn within_limits(&self) -> Result<()> {
        let sizes = [
            ("services", self.services, LIMIT_SERVICES),
            ("backends", self.backends, LIMIT_BACKENDS),
            ("slots", self.slots, LIMIT_SLOTS),
            ("affinity", self.affinity, LIMIT_AFFINITY),
        ];
        for (what, size, limit) in sizes {
            if size == 0 || size > limit {
                bail!("the pinned maps hold {size} {what}; an agent sizes them 1 to {limit}");
            }
        }
        Ok(())
    }

    /// For maps created now: what was requested, else room for the config twice over
    /// (services and slots; a table being replaced exists twice for a moment) or half as much
    /// again (backends, whose counters are the largest per entry), and never less than the
    /// compiled sizes. Services from discovery sources and Kubernetes are not known yet: the
    /// compiled sizes leave them room, flags more.
    pub fn for_config(config: &Config, requested: &Requested) -> Self {
        let services = config.services.len() as u64;
        let backends: u64 = config
            .services
            .iter()
            .map(|s| s.backends.len() as u64)
            .sum();
        let slots: u64 = config.services.iter().map(table_size).sum();
        let sized = |need: u64, floor: u32, limit: u32| {
            let rounded = need.div_ceil(u64::from(STEP)) * u64::from(STEP);
            rounded.clamp(u64::from(floor), u64::from(limit)) as u32
        };
        Self {
            services: requested
                .services
                .unwrap_or_else(|| sized(2 * services, MAX_SERVICES, LIMIT_SERVICES)),
            backends: requested
                .backends
                .unwrap_or_else(|| sized(backends + backends / 2, MAX_BACKENDS, LIMIT_BACKENDS)),
            // The slot array holds two slots per element.
            slots: requested
                .slots
                .map(|s| s.next_multiple_of(SLOTS_PER_ENTRY))
                .unwrap_or_else(|| sized(2 * slots, MAX_SLOTS, LIMIT_SLOTS)),
            // How many clients there will be is nothing a config says.
            affinity: requested.affinity.unwrap_or(MAX_AFFINITY),
        }
    }
}

/// Slots a service's table takes at most.
fn table_size(service: &crate::config::ServiceConfig) -> u64 {
    match service.balancing.algorithm {
        Algorithm::Maglev { table_size } => u64::from(table_size),
        Algorithm::Random | Algorithm::LeastConnections => {
            let weights: u64 = service.backends.iter().map(|b| u64::from(b.weight)).sum();
            weights.clamp(1, u64::from(MAX_RANDOM_SLOTS))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checked config of `n` TCP services with `backends` backends each, built directly (a
    /// quarter of a million services would take a while through TOML in a unit test).
    pub fn many_services_with_backends(n: u32, backends: u32) -> crate::config::Config {
        let ip = |i: u32| std::net::Ipv4Addr::from(i);
        let services = (0..n)
            .map(|i| crate::config::ServiceConfig {
                name: format!("s{i}").into(),
                vip: std::net::SocketAddr::new(ip(0x0a60_0000 + i).into(), 80),
                protocol: crate::config::Protocol::Tcp,
                backends: (0..backends)
                    .map(|b| crate::config::BackendConfig {
                        address: std::net::SocketAddr::new(
                            ip(0x0a00_0000 + i * 8 + b).into(),
                            8080,
                        ),
                        weight: 1,
                    })
                    .collect(),
                health: None,
                fail_open: false,
                panic_threshold: 0,
                terminate: Default::default(),
                discovery: None,
                balancing: Default::default(),
                outlier: None,
                rebalance: None,
            })
            .collect();
        crate::config::Config {
            services,
            ..Default::default()
        }
    }

    #[test]
    fn a_small_config_gets_the_compiled_sizes() {
        let config = many_services_with_backends(10, 4);
        assert_eq!(
            Capacity::for_config(&config, &Requested::default()),
            Capacity::default()
        );
    }

    #[test]
    fn a_large_config_gets_room_to_grow_and_flags_win() {
        let config = many_services_with_backends(250_000, 4);
        let c = Capacity::for_config(&config, &Requested::default());
        assert_eq!(c.services, 524_288, "{c:?}");
        assert_eq!(c.backends, 1_507_328, "{c:?}");
        assert_eq!(c.slots, 2_031_616, "{c:?}");
        assert_eq!(c.affinity, 65_536, "{c:?}");
        let asked = Requested {
            services: Some(300_000),
            slots: Some(3),
            affinity: Some(1_000_000),
            ..Requested::default()
        };
        let c = Capacity::for_config(&config, &asked);
        assert_eq!((c.services, c.backends, c.slots), (300_000, 1_507_328, 4));
        assert_eq!(c.affinity, 1_000_000);
    }

    #[test]
    fn pinned_sizes_beyond_the_limits_are_refused() {
        assert!(Capacity::default().within_limits().is_ok());
        let planted = Capacity {
            slots: u32::MAX,
            ..Capacity::default()
        };
        let err = planted.within_limits().unwrap_err().to_string();
        assert!(err.contains("4294967295 slots"), "{err}");
    }

    #[test]
    fn flags_out_of_range_are_refused_by_name() {
        let zero = Requested {
            backends: Some(0),
            ..Requested::default()
        };
        let err = zero.check().unwrap_err().to_string();
        assert!(
            err.starts_with("--max-backends 0: must be between 1 and"),
            "{err}"
        );
        let huge = Requested {
            slots: Some(u32::MAX),
            ..Requested::default()
        };
        assert!(huge
            .check()
            .unwrap_err()
            .to_string()
            .contains("--max-slots"));
    }
}
