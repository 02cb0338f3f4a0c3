//! Privileged tests skip loudly when they cannot run; CI turns that skip into a failure.

use std::io::Write;
use std::path::Path;

/// True when this process can create namespaces, cgroups and load eBPF. Otherwise prints
/// `SKIPPED <test>: <why>` and returns false, or panics if `LB_REQUIRE_PRIVILEGED=1`. The test
/// is named by its thread, which the test harness names after the test.
pub fn require_privileged() -> bool {
    let Some(why) = missing_privilege() else {
        return true;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a privileged test");
    let msg = format!("SKIPPED {test}: {why}");
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{msg} (LB_REQUIRE_PRIVILEGED=1 makes this a failure)");
    }
    // Written to the stderr handle rather than with eprintln!, which the test harness captures
    // and hides for passing tests: a skip must be seen.
    let _ = writeln!(std::io::stderr(), "{msg}");
    false
}

fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into());
    }
    if crate::cgroup::cgroup2_mount().is_none() {
        return Some("no cgroup2 file system mounted".into());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        return Some("/sys/fs/bpf does not exist".into());
    }
    None
}
