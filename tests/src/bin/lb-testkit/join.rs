//! Entering the test's namespace and cgroup, and holding a fresh namespace open.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

pub fn netns(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a namespace fd we opened; this process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn cgroup(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("join cgroup {}", dir.display()))
}

/// Unshares a network namespace, brings `lo` up with the given /32s, says `ready` and waits
/// for stdin to close (the test ending, or dying).
pub fn hold(addrs: &[String]) -> Result<()> {
    // SAFETY: plain unshare(2) before any thread or socket exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    ip(&["link", "set", "lo", "up"])?;
    for a in addrs {
        if !a.starts_with("127.") {
            ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
    }
    println!("ready");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("run ip (iproute2)")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

pub fn exec(argv: &[String]) -> Result<()> {
    let err = Command::new(&argv[0]).args(&argv[1..]).exec();
    bail!("exec {}: {err}", argv[0])
}
