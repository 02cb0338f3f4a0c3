//! Health-check measurements (`cargo xtask bench`): detection time from a backend's death to
//! its removal from the maps, and the agent's CPU and memory while probing many backends.
//! They print tables; nothing here asserts on time.

use crate::process::{require_root, usage};
use anyhow::{bail, Result};
use lb_testkit::procs::Proto;
use lb_testkit::stats::backend_set;
use lb_testkit::{agent_stats, wait_for, Scenario, ServeMode};
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10:80";

fn health_block(interval_ms: u64, fall: u32) -> String {
    format!(
        "[service.health]\nkind = \"tcp\"\ninterval = \"{interval_ms}ms\"\ntimeout = \"{}ms\"\n\
         rise = 2\nfall = {fall}\njitter = \"{}ms\"\n",
        (interval_ms / 2).min(500),
        interval_ms / 10
    )
}

fn has_backend(s: &Scenario, name: &str, addr: &str) -> bool {
    agent_stats(&s.pins)
        .and_then(|st| backend_set(&st, name))
        .is_some_and(|set| set.iter().any(|b| b == addr))
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Kills and restarts one of three backends `trials` times.
pub fn detection(trials: u32, interval_ms: u64, fall: u32) -> Result<()> {
    require_root()?;
    let backends = ["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"];
    let list = backends.map(|b| format!("\"{b}\"")).join(", ");
    let config = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nbackends = [ {list} ]\n{}",
        health_block(interval_ms, fall)
    );
    let mut s = Scenario::start(&backends, Proto::Tcp, &config);
    let victim = backends[2];
    let limit = Duration::from_millis(interval_ms * u64::from(fall + 5));
    let mut detect = Vec::new();
    println!("| trial | death → removed from maps (ms) | restart → back (ms) |\n|---|---|---|");
    for trial in 1..=trials {
        let t0 = Instant::now();
        s.stop_backend(victim);
        let gone = wait_for(limit, || !has_backend(&s, "web", victim));
        let d = t0.elapsed().as_millis();
        let t1 = Instant::now();
        s.start_backend(victim, Proto::Tcp, ServeMode::Answer);
        let back = wait_for(limit, || has_backend(&s, "web", victim));
        let r = t1.elapsed().as_millis();
        if !gone || !back {
            bail!("trial {trial}: backend removal or return not seen within {limit:?}");
        }
        println!("| {trial} | {d} | {r} |");
        detect.push(d);
    }
    detect.sort_unstable();
    println!(
        "\ninterval {interval_ms} ms, fall {fall}, {trials} trials: detection median {} ms, \
         p90 {} ms, max {} ms (bound fall × interval + interval = {} ms)",
        percentile(&detect, 0.5),
        percentile(&detect, 0.9),
        detect[detect.len() - 1],
        interval_ms * u64::from(fall + 1)
    );
    Ok(())
}

/// `backends` listeners probed every `interval_ms`, spread over services of 100 backends.
pub fn scale(backends: u32, interval_ms: u64, seconds: u64) -> Result<()> {
    require_root()?;
    let addrs: Vec<String> = (0..backends)
        .map(|i| format!("127.0.{}.{}:8080", 1 + i / 200, 1 + i % 200))
        .collect();
    let mut config = String::new();
    for (n, chunk) in addrs.chunks(100).enumerate() {
        let list = chunk
            .iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ");
        config += &format!(
            "[[service]]\nname = \"s{n}\"\nvip = \"10.96.1.{n}:80\"\nbackends = [ {list} ]\n{}\n",
            health_block(interval_ms, 3)
        );
    }
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut s = Scenario::start(&[], Proto::Tcp, "");
    for chunk in refs.chunks(250) {
        s.start_backend_group(chunk);
    }
    s.write_config(&config);
    s.agent().sighup();
    std::thread::sleep(Duration::from_millis(interval_ms * 3));
    let pid = s.agent().pid();
    let (cpu0, _) = usage(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, rss) = usage(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    println!("| backends | probe interval | agent CPU (% of one core) | agent RSS (MiB) |");
    println!("|---|---|---|---|");
    println!(
        "| {backends} | {interval_ms} ms | {:.2} | {:.1} |",
        100.0 * (cpu1 - cpu0) / wall,
        rss as f64 / 1024.0
    );
    Ok(())
}
