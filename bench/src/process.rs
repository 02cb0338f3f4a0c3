//! The benchmarks' view of the machine and of the agent process they run.

use anyhow::{bail, Context, Result};
use lb_testkit::procs::status_kib;

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("benchmarks need root: they create a namespace and a cgroup and load eBPF");
    }
    Ok(())
}

/// CPU seconds (user + system) and resident memory (KiB) of a process.
pub fn usage(pid: i32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("agent stat")?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| -> Result<u64> {
        let f = fields.get(i).context("short /proc stat")?;
        Ok(f.parse()?)
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let rss_kib = status_kib(pid, &["VmRSS"]).map_or(0, |v| v[0]);
    Ok((ticks as f64 / hz, rss_kib))
}

/// `micros=` of each of the agent's `reconciled` lines, in order: how long each reconcile took
/// by its own clock, from the change reaching it to the maps holding it.
pub fn reconcile_micros(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(" reconciled "))
        .filter_map(|l| {
            let field = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("micros="))?;
            field.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reconcile_times_come_from_the_reconciled_lines() {
        let log = "2026-11-29T05:00:00.1Z  INFO lb_userspace::agent: ready services=0\n\
                   2026-11-29T05:00:00.2Z  INFO lb_userspace::agent: reconciled added=1 \
                   updated=0 removed=0 unchanged=9 map_ops=4 micros=812\n\
                   garbage reconciled micros=x\n\
                   2026-11-29T05:00:00.3Z  INFO lb_userspace::agent: reconciled added=0 \
                   updated=1 removed=0 unchanged=9 map_ops=3 micros=95\n";
        assert_eq!(super::reconcile_micros(log), [812, 95]);
        assert!(super::reconcile_micros("").is_empty());
    }
}
