//! `lb-agent stats`: the pinned maps rendered for people (table) or programs (JSON). Reads the
//! maps directly, so it works with or without a running agent.

use crate::bpf_maps::PinnedMaps;
use crate::dataplane::read_installed;
use anyhow::Result;
use lb_common::{ipv4_from_raw, port_from_raw, ServiceKey, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(Debug, Serialize)]
pub struct Report {
    pub services: Vec<ServiceReport>,
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub id: u32,
    pub revision: u32,
    pub slots: u32,
    pub connects: u64,
    pub no_backend: u64,
    pub update_races: u64,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize)]
pub struct BackendReport {
    pub id: u32,
    pub address: String,
    /// Slots pointing at this backend: its effective weight.
    pub weight: u32,
    pub connects: u64,
}

pub fn collect(maps: &PinnedMaps) -> Result<Report> {
    let installed = read_installed(maps, false)?;
    let mut services = Vec::new();
    for (key, svc) in &installed.services {
        let counters = maps.service_counters(svc.id)?;
        let mut weights: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &svc.slots {
            *weights.entry(*id).or_default() += 1;
        }
        let mut backends = Vec::new();
        for (id, weight) in weights {
            let address = installed
                .backends
                .get(&id)
                .map_or("?".into(), |a| a.to_string());
            let connects = maps.backend_counters(id)?.connects;
            backends.push(BackendReport {
                id,
                address,
                weight,
                connects,
            });
        }
        backends.sort_by(|a, b| a.address.cmp(&b.address));
        services.push(ServiceReport {
            name: svc.name.clone(),
            vip: vip(key).to_string(),
            protocol: protocol(key.proto),
            id: svc.id,
            revision: svc.revision,
            slots: svc.slot_count,
            connects: counters.connects,
            no_backend: counters.no_backend,
            update_races: counters.update_races,
            backends,
        });
    }
    services.sort_by(|a, b| (&a.name, &a.vip).cmp(&(&b.name, &b.vip)));
    Ok(Report { services })
}

fn vip(key: &ServiceKey) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(ipv4_from_raw(key.addr)),
        port_from_raw(key.port),
    )
}

fn protocol(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        other => format!("proto-{other}"),
    }
}

pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    if report.services.is_empty() {
        out.push_str("no services installed\n");
    }
    for s in &report.services {
        let _ = writeln!(
            out,
            "{:<20} {:>21}/{:<3}  connects {:>10}  no-backend {:>8}  races {:>4}  rev {}",
            s.name, s.vip, s.protocol, s.connects, s.no_backend, s.update_races, s.revision
        );
        if s.backends.is_empty() {
            let _ = writeln!(
                out,
                "    (no backends: connects are refused with ECONNREFUSED)"
            );
        }
        for b in &s.backends {
            let share = if s.connects > 0 {
                100.0 * b.connects as f64 / s.connects as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "    {:<21}  weight {:>5}  connects {:>10}  {:>5.1}%",
                b.address, b.weight, b.connects, share
            );
        }
    }
    out
}
