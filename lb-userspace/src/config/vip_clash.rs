//! A rule across services: no backend may be a VIP, nor be probed on one. Backends that
//! sources find at run time are held to the same rule, so it is public.

use super::checker::Checker;
use super::model::{Protocol, ServiceConfig};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Why a backend cannot serve a service: it is itself a VIP (it would be translated a second
/// time), or its health probes (always TCP) would hit a VIP and be balanced instead of reaching
/// the backend they judge. Both the config check and backends from sources apply this rule.
pub struct VipClash<'a> {
    /// The service whose VIP the backend is.
    pub backend_is: Option<&'a str>,
    /// The probed address and the service whose VIP it is.
    pub probe_hits: Option<(SocketAddr, &'a str)>,
}

impl<'a> VipClash<'a> {
    pub fn of<V: AsRef<str>>(
        vips: &'a HashMap<(SocketAddr, Protocol), V>,
        backend: SocketAddr,
        protocol: Protocol,
        health_port: Option<u16>,
    ) -> Self {
        let probe_hits = health_port.and_then(|port| {
            let probed = SocketAddr::new(backend.ip(), port);
            let owner = vips.get(&(probed, Protocol::Tcp))?;
            Some((probed, owner.as_ref()))
        });
        VipClash {
            backend_is: vips.get(&(backend, protocol)).map(AsRef::as_ref),
            probe_hits,
        }
    }

    /// The service whose VIP is hit, if any.
    pub fn owner(&self) -> Option<&'a str> {
        self.backend_is.or(self.probe_hits.map(|(_, owner)| owner))
    }
}

impl Checker {
    /// The `VipClash` rule for every listed backend, each problem reported at its field.
    pub(super) fn backends_are_not_vips(&mut self, services: &[(usize, ServiceConfig)]) {
        let vips: HashMap<(SocketAddr, Protocol), &str> = services
            .iter()
            .map(|(_, s)| ((s.vip, s.protocol), &*s.name))
            .collect();
        for (i, s) in services {
            let scope = format!("service \"{}\" (service[{i}])", s.name);
            for (j, b) in s.backends.iter().enumerate() {
                let health_port = s.health.as_ref().and_then(|h| h.port);
                let clash = VipClash::of(&vips, b.address, s.protocol, health_port);
                if let Some(owner) = clash.backend_is {
                    let message = format!(
                        "{} is the VIP of service \"{owner}\"; backends must be real addresses",
                        b.address
                    );
                    self.report(Some(&scope), format!("backends[{j}]"), message);
                }
                if let Some((probed, owner)) = clash.probe_hits {
                    let message = format!(
                        "probing backends[{j}] on {probed} would hit the VIP of service \"{owner}\""
                    );
                    self.report(Some(&scope), "health.port", message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use crate::config::testkit::single;

    #[test]
    fn a_backend_may_not_be_a_vip_of_the_same_protocol() {
        let text =
            "[[service]]\nname = \"a\"\nvip = \"10.96.0.1:80\"\nbackends = [\"10.0.0.1:80\"]\n\
                    [[service]]\nname = \"b\"\nvip = \"10.96.0.2:80\"\n\
                    backends = [\"10.0.0.2:80\", \"10.96.0.1:80\"]\n";
        assert_eq!(
            single(text),
            "lb.toml: service \"b\" (service[1]): backends[1]: 10.96.0.1:80 is the VIP of \
             service \"a\"; backends must be real addresses"
        );
        let probe = "[[service]]\nname = \"a\"\nvip = \"10.96.0.1:80\"\nbackends = []\n\
                     [[service]]\nname = \"b\"\nvip = \"10.96.0.2:80\"\n\
                     backends = [\"10.96.0.1:8080\"]\nhealth = { kind = \"tcp\", port = 80 }\n";
        assert_eq!(
            single(probe),
            "lb.toml: service \"b\" (service[1]): health.port: probing backends[0] on \
             10.96.0.1:80 would hit the VIP of service \"a\""
        );
        let udp = text.replace(
            "backends = [\"10.0.0.2:80\"",
            "protocol = \"udp\"\nbackends = [\"10.0.0.2:80\"",
        );
        assert!(
            parse(&udp, "lb.toml").is_ok(),
            "a udp backend on a tcp VIP's address is fine"
        );
    }
}
