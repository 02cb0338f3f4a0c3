//! `cargo xtask setup`: make this machine able to build the eBPF object.
//!
//! A Rust eBPF build needs `-Z build-std=core` for `bpfel-unknown-none`, hence a compiler with
//! the exactly matching library source, and bpf-linker built against the same LLVM major as that
//! compiler. Two toolchains qualify, tried in this order:
//! 1. rustup nightly with the `rust-src` component (the usual aya setup);
//! 2. Debian's `rustc-web` + `cargo-web` + `rust-web-src` (sysroot /usr), with
//!    `RUSTC_BOOTSTRAP=1` to allow `-Z build-std` on a stable compiler. Used where rustup cannot
//!    download `rust-src`, such as machines that reach only package registries.
//!
//! bpf-linker is installed under `LB_TOOLCHAIN_DIR` (default /opt/lb-toolchain), linked against
//! the compiler's own libLLVM, never mixed with a bpf-linker elsewhere on PATH.

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUST: [&str; 3] = ["rustc-web", "cargo-web", "rust-web-src"];
/// Tools the build, the privileged tests and the demo call: `ip` for netns set-up, `protoc` for
/// etcd-client's generated gRPC code, dnsmasq and etcdctl for the discovery tests.
const RUNTIME_PACKAGES: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("protoc", "protobuf-compiler"),
    ("dnsmasq", "dnsmasq-base"),
    ("etcdctl", "etcd-client"),
];
/// What the side-by-side benchmark compares against (`cargo xtask bench` only).
const BENCH_PACKAGES: [(&str, &str); 3] = [
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("haproxy", "haproxy"),
];
/// Debian's etcd server, unpacked rather than installed (see `ensure_etcd_server`).
const ETCD_PACKAGE: &str = "etcd-server";

#[derive(Debug, Clone)]
pub struct EbpfToolchain {
    pub label: &'static str,
    pub cargo: PathBuf,
    pub rustc: PathBuf,
    /// Stable compilers need RUSTC_BOOTSTRAP=1 for `-Z build-std`.
    pub bootstrap: bool,
    pub llvm_major: u32,
}

pub fn run() -> Result<()> {
    ensure_runtime_tools()?;
    ensure_etcd_server()?;
    let tc = ensure_toolchain()?;
    let linker = ensure_bpf_linker(&tc)?;
    eprintln!(
        "xtask: setup complete: eBPF toolchain {} ({}, LLVM {}), bpf-linker {}",
        tc.label,
        tc.rustc.display(),
        tc.llvm_major,
        linker.display()
    );
    Ok(())
}

pub fn detect_toolchain() -> Option<EbpfToolchain> {
    rustup_nightly().or_else(debian_rust)
}

fn rustup_nightly() -> Option<EbpfToolchain> {
    let which = |tool: &str| {
        cmd::output(Command::new("rustup").args(["which", tool, "--toolchain", "nightly"]))
            .map(|s| PathBuf::from(s.trim()))
    };
    let rustc = which("rustc")?;
    let cargo = which("cargo")?;
    has_library_source(&rustc).then_some(())?;
    Some(EbpfToolchain {
        label: "rustup nightly + rust-src",
        llvm_major: llvm_major(&rustc)?,
        cargo,
        rustc,
        bootstrap: false,
    })
}

fn debian_rust() -> Option<EbpfToolchain> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    (cargo.exists() && has_library_source(&rustc)).then_some(())?;
    Some(EbpfToolchain {
        label: "Debian rustc-web + rust-web-src",
        llvm_major: llvm_major(&rustc)?,
        cargo,
        rustc,
        bootstrap: true,
    })
}

fn has_library_source(rustc: &Path) -> bool {
    cmd::output(Command::new(rustc).args(["--print", "sysroot"]))
        .map(|s| {
            Path::new(s.trim())
                .join("lib/rustlib/src/rust/library/core/Cargo.toml")
                .exists()
        })
        .unwrap_or(false)
}

fn llvm_major(rustc: &Path) -> Option<u32> {
    let vv = cmd::output(Command::new(rustc).arg("-vV"))?;
    let version = vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    version.split('.').next()?.trim().parse().ok()
}

fn ensure_toolchain() -> Result<EbpfToolchain> {
    if let Some(tc) = detect_toolchain() {
        eprintln!("xtask: eBPF toolchain present: {}", tc.label);
        return Ok(tc);
    }
    eprintln!("xtask: no Rust toolchain with library source for the eBPF build; installing one");
    if apt_available() {
        if let Err(e) = apt_install(&DEBIAN_RUST) {
            eprintln!(
                "xtask: Debian's Rust packages could not be installed ({e:#}); trying rustup"
            );
        }
    }
    if detect_toolchain().is_none()
        && cmd::output(Command::new("rustup").arg("--version")).is_some()
    {
        // Where rustup can download components (a normal internet connection) this is the
        // standard aya setup; on a registry-only network it fails fast.
        let _ = cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    detect_toolchain().context(
        "could not install a Rust toolchain with library source for the eBPF build. Either run \
         `cargo xtask setup` as root on Debian (installs rustc-web, cargo-web, rust-web-src), or \
         run `rustup toolchain install nightly --component rust-src` and try again",
    )
}

fn toolchain_dir() -> PathBuf {
    std::env::var_os("LB_TOOLCHAIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/lb-toolchain"))
}

/// Path of the bpf-linker to use; `None` if setup has not installed one for this LLVM.
pub fn bpf_linker(tc: &EbpfToolchain) -> Option<PathBuf> {
    let dir = toolchain_dir();
    let bin = dir.join("bin/bpf-linker");
    let built_for = std::fs::read_to_string(dir.join("bpf-linker.llvm")).ok()?;
    let works = cmd::output(Command::new(&bin).arg("--version")).is_some();
    (works && built_for.trim() == tc.llvm_major.to_string()).then_some(bin)
}

fn ensure_bpf_linker(tc: &EbpfToolchain) -> Result<PathBuf> {
    if let Some(bin) = bpf_linker(tc) {
        eprintln!("xtask: bpf-linker present for LLVM {}", tc.llvm_major);
        return Ok(bin);
    }
    let dir = toolchain_dir();
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {} into {} (1-2 minutes)",
        tc.llvm_major,
        dir.display()
    );
    let libllvm = find_libllvm(tc.llvm_major).or_else(|| {
        apt_available()
            .then(|| apt_install(&[&format!("libllvm{}", tc.llvm_major)]).ok())
            .flatten()
            .and_then(|_| find_libllvm(tc.llvm_major))
    });
    let Some(libllvm) = libllvm else {
        bail!(
            "libLLVM {} (the compiler's LLVM) is not installed; on Debian install libllvm{}",
            tc.llvm_major,
            tc.llvm_major
        );
    };
    // bpf-linker's build only needs `$LLVM_PREFIX/lib/libLLVM.so`; a folder with one symlink
    // avoids installing the whole llvm-dev package. The binary keeps an rpath to it.
    let prefix = dir.join(format!("llvm{}", tc.llvm_major));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)
        .with_context(|| format!("cannot create {} (run setup as root?)", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot create {}", link.display()))?;
    cmd::run(
        cmd::cargo()
            .current_dir(&dir)
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "--locked", "--force", "--no-default-features"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .arg("--features")
            .arg(format!("llvm-{}", tc.llvm_major))
            .arg("--root")
            .arg(&dir),
    )?;
    std::fs::write(dir.join("bpf-linker.llvm"), tc.llvm_major.to_string())?;
    bpf_linker(tc).context("bpf-linker was installed but does not run")
}

fn find_libllvm(major: u32) -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    let candidates = [
        format!("libLLVM.so.{major}.1"),
        format!("libLLVM-{major}.so"),
    ];
    dirs.filter_map(|d| d.ok())
        .flat_map(|d| candidates.iter().map(move |c| d.path().join(c)))
        .find(|p| p.exists())
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

fn missing_packages<'a>(wanted: &[(&str, &'a str)]) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|(tool, _)| cmd::output(Command::new("which").arg(tool)).is_none())
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
    let fetched = (|| {
        if cmd::output(Command::new("apt-cache").args(["show", ETCD_PACKAGE])).is_none() {
            cmd::run(Command::new("apt-get").arg("update"))?;
        }
        cmd::run(
            Command::new("apt-get")
                .current_dir(&download)
                .args(["download", ETCD_PACKAGE]),
        )?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download produced no .deb")?;
        cmd::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(toolchain_dir().join("etcd")),
        )
    })();
    let _ = std::fs::remove_dir_all(&download);
    fetched?;
    cmd::output(Command::new(&bin).arg("--version"))
        .map(|_| eprintln!("xtask: etcd server unpacked to {}", bin.display()))
        .context("etcd was unpacked but does not run")
}

fn apt_available() -> bool {
    Path::new("/usr/bin/apt-get").exists()
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "installing {} needs root: run `cargo xtask setup` as root (or install them yourself)",
            packages.join(" ")
        );
    }
    // A fresh machine has empty package lists; updating once is cheap next to a failed install.
    let known = packages
        .iter()
        .all(|p| cmd::output(Command::new("apt-cache").args(["show", p])).is_some());
    if !known {
        cmd::run(Command::new("apt-get").arg("update"))?;
    }
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}
