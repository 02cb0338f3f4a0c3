//! `lb-agent stats` as a table for people: per service its counters and rates, then a row per
//! backend, then the source and health lines, the map sizes and the programs.

use crate::clock::now_ms;
use crate::observe::report::Report;
use crate::status::{BackendHealth, SourceState, SourceStatus};
use std::fmt::Write;

pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    if let Some(why) = &report.maps_out_of_date {
        let _ = writeln!(
            out,
            "MAPS OUT OF DATE: the last reconcile failed and is being retried ({why})"
        );
    }
    if let Some(why) = &report.termination_unavailable {
        let _ = writeln!(out, "SOCKET TERMINATION UNAVAILABLE on this kernel ({why})");
    }
    if let Some(why) = &report.rebalance_unavailable {
        let _ = writeln!(out, "REBALANCE UNAVAILABLE on this kernel ({why})");
    }
    if let Some(k) = &report.kubernetes {
        let _ = writeln!(out, "{}", source_line(k));
        for line in limit_lines(k) {
            let _ = writeln!(out, "    {line}");
        }
    }
    if report.services.is_empty() {
        out.push_str("no services installed\n");
    }
    for s in &report.services {
        let _ = writeln!(
            out,
            "{:<20} {:>21}/{:<3}  connects {:>10}  active {:>6}  no-backend {:>8}  races {:>4}  rev {}",
            s.name, s.vip, s.protocol, s.connects, s.active, s.no_backend, s.update_races, s.revision
        );
        for (backend, n) in &s.terminated {
            let _ = writeln!(
                out,
                "    terminated {n} sockets of removed backend {backend}"
            );
        }
        for (backend, n) in &s.rebalanced {
            let _ = writeln!(
                out,
                "    rebalanced {n} idle connections away from backend {backend}"
            );
        }
        if let Some(r) = &s.rates {
            let _ = writeln!(
                out,
                "    per second: connects {:.1}  failed {:.1}  no-backend {:.1}  to backends {}  from backends {}",
                r.connects, r.failed, r.no_backend, bytes(r.bytes_to), bytes(r.bytes_from)
            );
        }
        let affinity = match s.affinity_timeout_s {
            Some(t) => format!(", client affinity {t}s"),
            None => String::new(),
        };
        // Remembered choices exist only with client affinity or for unconnected UDP sockets.
        let remembered = if s.affinity_hits + s.affinity_new > 0 || s.affinity_timeout_s.is_some() {
            format!(
                "; remembered choices used {}, stored {}",
                s.affinity_hits, s.affinity_new
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "    {} over {} slots{affinity}{remembered}",
            s.algorithm, s.slots
        );
        if s.fail_open_active {
            let _ = writeln!(
                out,
                "    FAILING OPEN: too few healthy backends, using all of them"
            );
        }
        if let Some(source) = &s.discovery {
            let _ = writeln!(out, "    {}", source_line(source));
        }
        if s.slots == 0 {
            let _ = writeln!(
                out,
                "    (no backend in service: connects are refused with ECONNREFUSED)"
            );
        }
        for b in &s.backends {
            let share = if s.connects > 0 {
                100.0 * b.connects as f64 / s.connects as f64
            } else {
                0.0
            };
            let state = match &b.ejected {
                Some(why) => format!("EJECTED ({why})"),
                None => health_cell(b.health.as_ref()),
            };
            let line = format!(
                "    {:<21}  weight {:>5}  connects {:>10}  {:>5.1}%  {}",
                b.address, b.weight, b.connects, share, state
            );
            let _ = writeln!(out, "{}", line.trim_end());
            let _ = writeln!(
                out,
                "        established {}  failed {}  closed {}  active {}  to {} ({} pkts)  from {} ({} pkts)",
                b.established,
                b.failed,
                b.closed,
                b.active,
                bytes(b.bytes_to as f64),
                b.packets_to,
                bytes(b.bytes_from as f64),
                b.packets_from
            );
            if let Some(r) = &b.rates {
                let _ = writeln!(
                    out,
                    "        per second: connects {:.1}  failed {:.1}  to {}/s  from {}/s",
                    r.connects,
                    r.failed,
                    bytes(r.bytes_to),
                    bytes(r.bytes_from)
                );
            }
        }
    }
    let m = &report.map_entries;
    let c = &report.memory.capacity;
    let _ = writeln!(
        out,
        "map entries: services {}/{}  slots {}/{}  backends {}/{}  names {}  affinity {}/{}{}",
        m.services,
        c.services,
        m.slots,
        c.slots,
        m.backends,
        c.backends,
        m.names,
        m.affinity,
        c.affinity,
        affinity_full(m.affinity, c.affinity)
    );
    let mut largest: Vec<(&String, &u64)> = report.memory.kernel_bytes.iter().collect();
    largest.sort_by(|a, b| b.1.cmp(a.1));
    let parts: Vec<String> = largest
        .iter()
        .take(3)
        .map(|(name, b)| format!("{name} {}", bytes(**b as f64)))
        .collect();
    let _ = writeln!(
        out,
        "kernel map memory: {} ({})",
        bytes(report.memory.total() as f64),
        parts.join(", ")
    );
    if let Some(s) = &report.memory.socket_state {
        let _ = writeln!(
            out,
            "per-socket state: {} B a balanced socket, {} for the {} open TCP connections \
             (UDP sockets not counted), charged to the agent's memory cgroup",
            s.bytes_per_socket,
            bytes(s.bytes() as f64),
            s.open_tcp_connections
        );
    }
    for b in &report.bypass {
        let pod = b
            .pod
            .as_ref()
            .map(|p| format!(", pod {p}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "bypassed cgroup {} (id {}{pod}): {} connects untranslated",
            b.cgroup, b.id, b.connects
        );
    }
    for p in &report.programs {
        let cost = match (p.runs_per_s, p.ns_per_run) {
            (Some(r), Some(ns)) => format!("  {r:.0} runs/s, {ns:.0} ns/run"),
            (Some(_), None) => "  not run".to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "program {:<16} {:>5} insns verified  {:>6} B translated  {:>6} B jited{cost}",
            p.name, p.verified_insns, p.xlated_bytes, p.jited_bytes
        );
    }
    out
}

/// 1536 -> "1.5 KiB": byte counts people read at a glance.
/// Said when the affinity map is (nearly) full: from then on clients are being forgotten.
fn affinity_full(entries: usize, capacity: u32) -> &'static str {
    if entries as u64 * 100 >= u64::from(capacity) * 95 {
        " (FULL: the least recently used client choices are being forgotten; see --max-affinity)"
    } else {
        ""
    }
}

pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ago(unix_ms: Option<u64>) -> String {
    match unix_ms {
        None => "never".to_string(),
        Some(t) => format!("{}s ago", now_ms().saturating_sub(t) / 1000),
    }
}

fn source_line(s: &SourceStatus) -> String {
    let mut line = format!("source {} {:?}: ", s.kind, s.target);
    match s.state {
        SourceState::Ok => line += &format!("ok, last answer {}", ago(s.last_success_unix_ms)),
        SourceState::Syncing if s.last_error.is_some() => {
            line += &format!(
                "syncing, not reached yet ({}); keeping what the maps held",
                s.last_error.as_deref().unwrap_or("?")
            )
        }
        SourceState::Syncing => {
            line += "syncing (keeping what the maps held before the agent started)"
        }
        SourceState::Error => {
            line += &format!(
                "ERROR x{} ({}), serving the last known set; last success {}",
                s.consecutive_errors,
                s.last_error.as_deref().unwrap_or("?"),
                ago(s.last_success_unix_ms)
            );
        }
    }
    if s.skipped > 0 {
        line += &format!("; {} unusable entries skipped", s.skipped);
    }
    line
}

/// A line per limit of the source that leaves something out now.
fn limit_lines(s: &SourceStatus) -> Vec<String> {
    s.limits
        .iter()
        .filter(|l| l.left_out > 0)
        .map(|l| {
            format!(
                "LIMIT {} = {} reached: {} left out ({}{})",
                l.setting,
                l.limit,
                l.left_out,
                l.examples.join(", "),
                if l.left_out > l.examples.len() && !l.examples.is_empty() {
                    ", ..."
                } else {
                    ""
                }
            )
        })
        .collect()
}

fn health_cell(h: Option<&BackendHealth>) -> String {
    let Some(h) = h else {
        return String::new();
    };
    let since = match h.last_change_unix_ms {
        0 => "since agent start".to_string(),
        t => format!("changed {}s ago", now_ms().saturating_sub(t) / 1000),
    };
    if h.healthy {
        format!(
            "up ({}, {} ok in a row, {since})",
            h.last_result, h.consecutive_ok
        )
    } else {
        format!(
            "DOWN ({}, {} failed in a row, {since})",
            h.last_result, h.consecutive_fail
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{affinity_full, limit_lines};
    use crate::status::{LimitHit, SourceStatus};

    #[test]
    fn limits_that_leave_something_out_get_a_line() {
        let mut s = SourceStatus::default();
        let hit = |setting: &str, left_out, examples: &[&str]| LimitHit {
            setting: setting.into(),
            limit: 2,
            left_out,
            examples: examples.iter().map(|e| e.to_string()).collect(),
        };
        s.limits = vec![
            hit("kubernetes.max_services", 3, &["a/x", "b/y"]),
            hit("kubernetes.max_endpoints_per_service", 0, &[]),
        ];
        assert_eq!(
            limit_lines(&s),
            ["LIMIT kubernetes.max_services = 2 reached: 3 left out (a/x, b/y, ...)"]
        );
    }

    #[test]
    fn a_full_affinity_map_is_said_so() {
        assert_eq!(affinity_full(10, 65_536), "");
        assert!(affinity_full(65_536, 65_536).starts_with(" (FULL"));
        assert!(affinity_full(62_260, 65_536).starts_with(" (FULL"));
    }
}
