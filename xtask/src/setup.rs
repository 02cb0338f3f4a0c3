//! `cargo xtask setup`: install what the tests, the demo and the build need on this machine.
//!
//! Every requirement is a probe (a command on PATH or a file) and the Debian package that
//! provides it, so a machine that already has a tool from elsewhere installs nothing. The eBPF
//! toolchain is not among them: builds embed the committed kernel object, and only
//! `cargo xtask build-ebpf` needs a compiler for it (toolchain.rs).

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How setup tells that a requirement is already met.
enum Probe {
    /// A command found on PATH.
    Command(&'static str),
    /// A file that the package installs.
    File(&'static str),
}

/// Tools the build, the privileged tests and the demo call: `ip` for netns set-up, `protoc`
/// and the well-known `google/protobuf/*.proto` includes for etcd-client's generated gRPC code
/// (the includes are only a recommendation of protobuf-compiler, so `--no-install-recommends`
/// leaves them out), dnsmasq and etcdctl for the discovery tests, openssl for the certificates
/// the Consul https test makes, and Go and Python's urllib3 for the pooled clients of the
/// rebalance tests (Debian's own, at fixed paths: another `go` or `python3` may differ).
const RUNTIME_PACKAGES: [(Probe, &str); 8] = [
    (Probe::Command("ip"), "iproute2"),
    (Probe::Command("protoc"), "protobuf-compiler"),
    (
        Probe::File("/usr/include/google/protobuf/descriptor.proto"),
        "libprotobuf-dev",
    ),
    (Probe::Command("dnsmasq"), "dnsmasq-base"),
    (Probe::Command("etcdctl"), "etcd-client"),
    (Probe::Command("openssl"), "openssl"),
    (Probe::File("/usr/bin/go"), "golang-go"),
    (
        Probe::File("/usr/lib/python3/dist-packages/urllib3/__init__.py"),
        "python3-urllib3",
    ),
];
/// What the side-by-side benchmark compares against (`cargo xtask bench` only).
const BENCH_PACKAGES: [(Probe, &str); 3] = [
    (Probe::Command("nft"), "nftables"),
    (Probe::Command("iptables"), "iptables"),
    (Probe::Command("haproxy"), "haproxy"),
];
/// Debian's etcd server, unpacked rather than installed (see `ensure_etcd_server`).
const ETCD_PACKAGE: &str = "etcd-server";

pub fn run() -> Result<()> {
    ensure_runtime_tools()?;
    ensure_etcd_server()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// Where setup keeps what it builds or unpacks itself (bpf-linker, etcd).
pub fn toolchain_dir() -> PathBuf {
    std::env::var_os("LB_TOOLCHAIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/lb-toolchain"))
}

/// Installs the benchmark's contenders without starting their services: HAProxy's package
/// would otherwise start a system-wide haproxy from its init script.
pub fn ensure_bench_tools() -> Result<()> {
    let missing = missing_packages(&BENCH_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    if !apt_available() {
        bail!(
            "the benchmark compares against {}; install them",
            missing.join(" ")
        );
    }
    // policy-rc.d answering 101 is Debian's documented way to keep maintainer scripts from
    // starting services. One that already exists is left as it is.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask setup during an install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = apt_install(&missing);
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn missing_packages<'a>(wanted: &[(Probe, &'a str)]) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|(probe, _)| match probe {
            Probe::Command(tool) => cmd::output(Command::new("which").arg(tool)).is_none(),
            Probe::File(path) => !Path::new(path).exists(),
        })
        .map(|(_, pkg)| *pkg)
        .collect()
}

fn ensure_runtime_tools() -> Result<()> {
    let missing = missing_packages(&RUNTIME_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    if !apt_available() {
        bail!(
            "missing tools for the tests and demo; install: {}",
            missing.join(" ")
        );
    }
    apt_install(&missing)
}

/// Where the discovery tests find the etcd server binary.
pub fn etcd_bin() -> PathBuf {
    toolchain_dir().join("etcd/usr/bin/etcd")
}

/// Installing the `etcd-server` package would also start a system-wide etcd on
/// 127.0.0.1:2379 from its init script, which a build or test machine does not want: the
/// package is unpacked into the toolchain folder instead, and tests start their own servers.
fn ensure_etcd_server() -> Result<()> {
    let bin = etcd_bin();
    if cmd::output(Command::new(&bin).arg("--version")).is_some() {
        return Ok(());
    }
    if !apt_available() || !cmd::is_root() {
        bail!(
            "the etcd discovery tests need Debian's {ETCD_PACKAGE} unpacked into {} (run setup as root on Debian)",
            toolchain_dir().join("etcd").display()
        );
    }
    let download = std::env::temp_dir().join(format!("lb-etcd-download-{}", std::process::id()));
    std::fs::create_dir_all(&download)?;
    let target = toolchain_dir().join("etcd");
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let fetched = (|| {
        ensure_package_lists(&[ETCD_PACKAGE])?;
        cmd::run(
            Command::new("apt-get")
                .current_dir(&download)
                .args(["download", ETCD_PACKAGE]),
        )?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download produced no .deb")?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&target))
    })();
    let _ = std::fs::remove_dir_all(&download);
    fetched?;
    cmd::output(Command::new(&bin).arg("--version"))
        .map(|_| eprintln!("xtask: etcd server unpacked to {}", bin.display()))
        .context("etcd was unpacked but does not run")
}

pub fn apt_available() -> bool {
    Path::new("/usr/bin/apt-get").exists()
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "installing {} needs root: run `cargo xtask setup` as root (or install them yourself)",
            packages.join(" ")
        );
    }
    ensure_package_lists(packages)?;
    // apt's progress goes to stdout and is dropped, so setup's output stays readable; its
    // errors and warnings go to stderr and are kept.
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .stdout(Stdio::null()),
    )
}

/// A fresh machine has empty package lists; updating once is cheap next to a failed install.
fn ensure_package_lists(packages: &[&str]) -> Result<()> {
    let known = packages
        .iter()
        .all(|p| cmd::output(Command::new("apt-cache").args(["show", p])).is_some());
    if known {
        Ok(())
    } else {
        apt_update()
    }
}

pub fn apt_update() -> Result<()> {
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null()),
    )
}
