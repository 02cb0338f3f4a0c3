//! `lb-agent stats --json`, read back into the agent's own report types, as the tests' window
//! into the data plane, and polling instead of sleeping.

use crate::{paths::agent_bin, PinDir};
pub use lb_userspace::observe::report::{BackendReport, Report, ServiceReport};
use std::process::Command;
use std::time::{Duration, Instant};

/// `None` when `stats` fails (nothing pinned yet, for one) or its output does not parse.
pub fn agent_stats(pins: &PinDir) -> Option<Report> {
    let out = Command::new(agent_bin())
        .args(["stats", "--json", "--interval", "0", "--pin-dir"])
        .arg(&pins.path)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
/// `lb-agent stats` as an operator reads it (one sample, no rates).
pub fn stats_table(pins: &PinDir) -> String {
    let out = Command::new(agent_bin())
        .args(["stats", "--interval", "0", "--pin-dir"])
        .arg(&pins.path)
        .output()
        .expect("run lb-agent stats");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The service named `name` in a stats report.
pub fn service<'a>(stats: &'a Report, name: &str) -> Option<&'a ServiceReport> {
    stats.services.iter().find(|s| s.name == name)
}

/// The backend listed under `addr`. For polling: a backend may be briefly absent while the
/// agent moves it out of the maps.
pub fn find_backend<'a>(svc: &'a ServiceReport, addr: &str) -> Option<&'a BackendReport> {
    svc.backends.iter().find(|b| b.address == addr)
}

/// The backend listed under `addr`; panics (failing the test) with the service if absent.
pub fn backend<'a>(svc: &'a ServiceReport, addr: &str) -> &'a BackendReport {
    find_backend(svc, addr).unwrap_or_else(|| panic!("no backend {addr} in {svc:?}"))
}

/// Addresses of the backends a service balances over (weight > 0; stats also lists backends a
/// health check took out, with weight 0), sorted.
pub fn backend_set(stats: &Report, name: &str) -> Option<Vec<String>> {
    let mut set: Vec<String> = service(stats, name)?
        .backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| b.address.clone())
        .collect();
    set.sort();
    Some(set)
}

/// Waits until the pinned maps show exactly `expected` as the backends of `name`: the sign that
/// the agent applied a config. Panics with the last report on timeout.
pub fn wait_backends(pins: &PinDir, name: &str, expected: &[&str], timeout: Duration) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut last = None;
    let ok = wait_for(timeout, || {
        last = agent_stats(pins);
        last.as_ref().and_then(|s| backend_set(s, name)).as_ref() == Some(&want)
    });
    assert!(
        ok,
        "service {name} never had backends {want:?}; last stats: {last:?}"
    );
}

/// Entries in the services, slots, backends and names maps, counted from the pinned maps
/// (strays included). The LRU maps are left out: their entries come and go with traffic.
pub fn map_entries(stats: &Report) -> [usize; 4] {
    let m = &stats.map_entries;
    [m.services, m.slots, m.backends, m.names]
}

/// Whether the pinned maps list `addr` among the backends `name` balances over.
pub fn has_backend(stats: &Report, name: &str, addr: &str) -> Option<bool> {
    Some(backend_set(stats, name)?.iter().any(|b| b == addr))
}

/// A backend's kernel connect counter in one service's stats entry (0 when not listed).
pub fn backend_connects(svc: &ServiceReport, addr: &str) -> u64 {
    find_backend(svc, addr).map_or(0, |b| b.connects)
}

/// The three witnesses of each backend agree: the kernel's counter in `svc`, what the backend
/// accepted and what the client saw answered by it.
pub fn assert_counts_agree(
    svc: &ServiceReport,
    accepted: &std::collections::HashMap<String, u64>,
    report: &crate::ClientReport,
    backends: &[&str],
) {
    for b in backends {
        let got = accepted.get(*b).copied().unwrap_or(0);
        assert_eq!(
            backend_connects(svc, b),
            got,
            "kernel counter vs backend for {b}"
        );
        assert_eq!(report.from(b), got, "client vs backend for {b}");
    }
}
