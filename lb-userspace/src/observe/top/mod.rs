//! `lb-agent top`: the pinned counters as a live view, refreshed every second. Reads the maps
//! and the agent's status file directly (like `stats`), keeps the previous sample to turn
//! counters into rates, and hands the result to the terminal UI.

pub mod ui;

use crate::observe::report::{self, BackendReport, Report};
use crate::status;
use anyhow::Result;
use std::path::Path;
use std::time::{Duration, Instant};
use ui::{TopBackend, TopService, TopState};

pub fn run(pin_dir: &Path, refresh: Duration) -> Result<()> {
    let maps = report::open(pin_dir)?;
    let mut previous: Option<(Instant, Report)> = None;
    ui::run(
        || {
            let now = Instant::now();
            let status = status::read(pin_dir);
            let mut report = report::collect(&maps, status.as_ref())?;
            let mut age = None;
            if let Some((then, earlier)) = &previous {
                let secs = now.duration_since(*then).as_secs_f64();
                report::add_rates(earlier, &mut report, secs);
                age = Some(secs);
            }
            let agent = status.map_or("no agent status".into(), |s| {
                format!("agent pid {}", s.agent_pid)
            });
            let rates = age.map_or("rates from the next refresh".into(), |s| {
                format!("rates over {s:.1}s")
            });
            let header = format!(
                "pins {}  {agent}  {rates}{}",
                pin_dir.display(),
                lifecycle(&report)
            );
            let state = view(&report, header);
            previous = Some((now, report));
            Ok(state)
        },
        refresh,
    )
}

/// What the agent did to connections since it started, when it did anything: sockets of
/// removed backends terminated, idle connections rebalanced, connects left untranslated.
fn lifecycle(report: &Report) -> String {
    let sum = |f: fn(&report::ServiceReport) -> u64| report.services.iter().map(f).sum::<u64>();
    let terminated = sum(|s| s.terminated.values().sum());
    let rebalanced = sum(|s| s.rebalanced.values().sum());
    let bypassed: u64 = report.bypass.iter().map(|b| b.connects).sum();
    let parts = [
        ("terminated", terminated),
        ("rebalanced", rebalanced),
        ("bypassed", bypassed),
    ];
    (parts.iter())
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("  {what} {n}"))
        .collect()
}

/// The report as the UI shows it.
fn view(report: &Report, header: String) -> TopState {
    let services = report
        .services
        .iter()
        .map(|s| {
            let r = s.rates.clone().unwrap_or_default();
            TopService {
                name: s.name.clone(),
                vip: s.vip.clone(),
                protocol: s.protocol.clone(),
                algorithm: s.algorithm.clone(),
                connects_per_s: r.connects,
                active: s.active,
                failed_per_s: r.failed,
                no_backend_per_s: r.no_backend,
                backends: s.backends.iter().map(backend).collect(),
            }
        })
        .collect();
    TopState { header, services }
}

fn backend(b: &BackendReport) -> TopBackend {
    let r = b.rates.clone().unwrap_or_default();
    let state = match (&b.ejected, &b.health) {
        (Some(_), _) => "ejected",
        (None, Some(h)) if h.healthy => "up",
        (None, Some(_)) => "DOWN",
        (None, None) => "-",
    };
    TopBackend {
        address: b.address.clone(),
        weight: b.weight,
        state: state.into(),
        connects_per_s: r.connects,
        active: b.active,
        failed_total: b.failed,
        failed_per_s: r.failed,
        bytes_in_per_s: r.bytes_from,
        bytes_out_per_s: r.bytes_to,
    }
}
