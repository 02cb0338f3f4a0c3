//! Privileged end-to-end test at scale: a quarter of a million services of four backends each
//! (a million backend entries) load from empty, a connect through the last service reaches a
//! backend, and `stats` reports what the maps were sized for and the kernel memory they take.
//! How fast is the benchmark's business (`cargo xtask bench`); this checks that it works.

use lb_testkit::config::{Config, Service};
use lb_testkit::procs::Proto;
use lb_testkit::{agent_stats, require_privileged, Scenario};
use std::time::{Duration, Instant};

const SERVICES: u32 = 250_000;
/// Every service balances over the same four listeners: backend entries are per service, so
/// this is still a million of them.
const BACKENDS: [&str; 4] = [
    "127.0.0.11:8080",
    "127.0.0.12:8080",
    "127.0.0.13:8080",
    "127.0.0.14:8080",
];

/// Service `i`'s VIP: 10.96.0.0 onwards, one address per service.
fn vip(i: u32) -> String {
    let a = std::net::Ipv4Addr::from(0x0a60_0000 + i);
    format!("{a}:80")
}

#[test]
fn a_quarter_million_services_load_and_the_last_one_balances() {
    if !require_privileged() {
        return;
    }
    let config = (0..SERVICES).fold(Config::new(), |c, i| {
        c.service(Service::tcp(&format!("s{i}"), &vip(i)).backends(&BACKENDS))
    });
    let mut s = Scenario::without_agent(&BACKENDS, Proto::Tcp);
    s.write_config(config);
    // A debug build of the agent, on a busy 2-core machine: generous.
    s.ready_timeout = Duration::from_secs(300);
    let started = Instant::now();
    s.start_agent();
    let pid = s.agent().pid();
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = peak
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?");
    eprintln!(
        "{SERVICES} services x {} backends ready after {:.1} s; agent {peak}",
        BACKENDS.len(),
        started.elapsed().as_secs_f64()
    );

    let last = vip(SERVICES - 1);
    let report = s.client(&last, 40, Proto::Tcp);
    assert_eq!(report.ok, 40, "{report:?}");
    assert!(
        BACKENDS.iter().filter(|b| report.from(b) > 0).count() >= 2,
        "{report:?}"
    );
    let first = s.client(&vip(0), 4, Proto::Tcp);
    assert_eq!(first.ok, 4, "{first:?}");

    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    assert_eq!(stats.services.len(), SERVICES as usize);
    let entries = &stats.map_entries;
    assert_eq!(entries.services, SERVICES as usize, "{entries:?}");
    assert_eq!(entries.backends, 4 * SERVICES as usize, "{entries:?}");
    let memory = &stats.memory;
    assert!(memory.capacity.services >= SERVICES, "{memory:?}");
    assert!(memory.capacity.backends >= 4 * SERVICES, "{memory:?}");
    let counters = memory
        .kernel_bytes
        .get("LB_BACKEND_CTRS")
        .copied()
        .unwrap_or(0);
    assert!(
        counters >= 72 * u64::from(memory.capacity.backends),
        "the backend counters' memory is not reported: {memory:?}"
    );
    eprintln!(
        "kernel map memory {} MiB, capacity {:?}",
        memory.total() >> 20,
        memory.capacity
    );
}

/// A thousand Maglev services with tables of 16,381 entries: 16 million slots, in the slot
/// array the config sizes, written through the memory mapping.
#[test]
fn a_thousand_maglev_tables_of_16381_load_and_balance() {
    if !require_privileged() {
        return;
    }
    const MAGLEV: u32 = 1_000;
    let config = (0..MAGLEV).fold(Config::new(), |c, i| {
        let service = Service::tcp(&format!("m{i}"), &vip(i))
            .backends(&BACKENDS)
            .set("algorithm", "maglev")
            .set("maglev_table_size", 16_381);
        c.service(service)
    });
    let mut s = Scenario::without_agent(&BACKENDS, Proto::Tcp);
    s.write_config(config);
    s.ready_timeout = Duration::from_secs(300);
    let started = Instant::now();
    s.start_agent();
    eprintln!(
        "{MAGLEV} Maglev services (16,381 slots each) ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let report = s.client(&vip(MAGLEV - 1), 20, Proto::Tcp);
    assert_eq!(report.ok, 20, "{report:?}");
    let stats = agent_stats(&s.pins).expect("lb-agent stats --json");
    assert_eq!(stats.map_entries.slots, 16_381 * MAGLEV as usize);
    assert!(stats.memory.capacity.slots >= 2 * 16_381 * MAGLEV);
}
