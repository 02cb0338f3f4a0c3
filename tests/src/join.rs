//! Entering the test's namespace and cgroup, and holding a fresh namespace open.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a helper process runs: `--netns` and `--cgroup`, entered before it creates any
/// socket. Every helper binary (`lb-testkit`, `lb-bench`) takes them.
#[derive(clap::Args)]
pub struct Place {
    /// Network namespace file to enter first (e.g. /proc/PID/ns/net).
    #[arg(long, global = true)]
    pub netns: Option<PathBuf>,
    /// cgroup v2 folder to move this process into first.
    #[arg(long, global = true)]
    pub cgroup: Option<PathBuf>,
}

impl Place {
    /// Ties this process to its parent, then enters the namespace and cgroup. `needs_netns`
    /// names the command when it may only run inside a test namespace, so that it can never put
    /// traffic on the host's network.
    pub fn enter(&self, needs_netns: Option<&str>) -> Result<()> {
        die_with_parent();
        if let (Some(what), None) = (needs_netns, &self.netns) {
            bail!("{what} only runs inside a test namespace: pass --netns");
        }
        if let Some(ns) = &self.netns {
            netns(ns)?;
        }
        if let Some(cg) = &self.cgroup {
            cgroup(cg)?;
        }
        Ok(())
    }
}

// A helper binary's command line: where it runs, then what it does. (A plain comment: a doc
// comment would become every binary's `--help` text.)
#[derive(clap::Parser)]
pub struct HelperCli<C: clap::Subcommand> {
    #[command(flatten)]
    pub place: Place,
    #[command(subcommand)]
    pub command: C,
}

impl<C: clap::Subcommand> HelperCli<C> {
    /// The command line of the binary `program`, which `about` describes in `--help`.
    pub fn parse_for(program: &'static str, about: &'static str) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().name(program).about(about).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// Ends a helper process: silently on success, else with the error and exit status 2.
pub fn exit_on_error(program: &str, result: Result<()>) {
    if let Err(e) = result {
        eprintln!("{program}: error: {e:#}");
        std::process::exit(2);
    }
}

/// Dies with the process that started us (the test, the demo or the bench), so nothing of a
/// crashed test keeps running; the setting survives `exec`, so it also covers the agent.
pub fn die_with_parent() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

fn current_netns() -> Result<std::fs::Metadata> {
    std::fs::metadata("/proc/self/ns/net").context("stat /proc/self/ns/net")
}

/// Enters the test's namespace and checks that it really is another namespace than the one we
/// started in: a holder pid reused by an unrelated process must never put test traffic on the
/// host's network.
pub fn netns(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let before = current_netns()?.ino();
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a namespace fd we opened; this process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    if current_netns()?.ino() == before {
        bail!(
            "{} is the namespace we started in, not a test namespace",
            path.display()
        );
    }
    Ok(())
}

/// Only cgroups the harness created (`lbtest-*`), or that a test made below one (named as
/// kubelet names a pod's, say), are ever joined; a `..` could climb out of one, so none is
/// allowed.
pub fn cgroup(dir: &Path) -> Result<()> {
    use std::path::Component;
    let climbs = dir.components().any(|c| c == Component::ParentDir);
    let below_ours = dir.components().any(|c| match c {
        Component::Normal(n) => n.to_str().is_some_and(|n| n.starts_with("lbtest-")),
        _ => false,
    });
    let ours = below_ours && !climbs;
    if !ours {
        bail!(
            "refusing to join {}: not a cgroup the test harness created",
            dir.display()
        );
    }
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("join cgroup {}", dir.display()))
}

/// Unshares a network namespace, brings `lo` up with the given /32s, says `ready` and waits
/// for stdin to close (the test ending, or dying).
/// The subnet `hold --blackhole` routes to a veth link whose peer has no address, with a
/// permanent neighbour entry for every host (no ARP, whose failure would end the connect with
/// EHOSTUNREACH): a SYN there is never answered and the connect stays in SYN_SENT until its
/// timeout. Both ends are inside the namespace; nothing leaves it.
pub const BLACKHOLE_NET: &str = "10.255.255.0/24";

pub fn hold(addrs: &[String], blackhole: bool) -> Result<()> {
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
    if blackhole {
        ip(&[
            "link", "add", "void0", "type", "veth", "peer", "name", "void1",
        ])?;
        ip(&["link", "set", "void0", "up"])?;
        ip(&["link", "set", "void1", "up"])?;
        ip(&["addr", "add", "10.255.255.1/24", "dev", "void0"])?;
        for host in 2..=9 {
            let addr = format!("10.255.255.{host}");
            let mac = format!("02:00:00:00:00:{host:02x}");
            let neigh = ["neigh", "add", &addr, "lladdr", &mac, "dev", "void0"];
            ip(&[&neigh[..], &["nud", "permanent"]].concat())?;
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
