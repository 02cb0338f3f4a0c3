//! The eBPF toolchain, needed only to rebuild the kernel object (`cargo xtask build-ebpf`).
//!
//! Builds, tests and the demo embed the committed object (`lb-ebpf/prebuilt/`), so nothing here
//! runs on a newcomer's path. A Rust eBPF build needs `-Z build-std=core` for
//! `bpfel-unknown-none`, hence a compiler with the exactly matching library source, new enough
//! for the aya crates, and a bpf-linker built against that compiler's LLVM major. Two
//! toolchains qualify, tried in this order:
//! 1. rustup nightly with the `rust-src` component (the usual aya setup);
//! 2. Debian's `rustc-web` + `cargo-web` + `rust-web-src` (sysroot /usr), with
//!    `RUSTC_BOOTSTRAP=1` to allow `-Z build-std` on a stable compiler. Debian's suites serve
//!    different versions (bookworm: 1.85 with LLVM 19; bookworm-security: 1.96 with LLVM 22, on
//!    2026-11-28), so the newest served version that the aya crates accept is installed by
//!    exact version, never whatever `apt-get install` picks that week.
//!
//! bpf-linker goes under `LB_TOOLCHAIN_DIR` (default /opt/lb-toolchain), linked against the
//! compiler's own libLLVM, never mixed with a bpf-linker elsewhere on PATH.

use crate::{cmd, setup};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// aya-ebpf 0.2.1, aya-log-ebpf 0.2.0 and aya-build 0.2.0 declare rust-version 1.87 and use
/// what 1.87 stabilised; older compilers fail on them.
const MIN_RUSTC: (u32, u32) = (1, 87);
const DEBIAN_RUST: [&str; 3] = ["rustc-web", "cargo-web", "rust-web-src"];

/// Which bpf-linker release supports which LLVM majors. 0.13.0 links with a plain libLLVM.so
/// (no llvm-dev package) and writes BTF this kernel accepts. LLVM 19/20 would need bpf-linker
/// 0.9.x, but no compiler with those LLVMs is new enough for the aya crates.
const BPF_LINKERS: [(u32, &str); 3] = [(21, "0.13.0"), (22, "0.13.0"), (23, "0.13.0")];

#[derive(Debug, Clone)]
pub struct EbpfToolchain {
    pub label: &'static str,
    pub cargo: PathBuf,
    pub rustc: PathBuf,
    /// Stable compilers need RUSTC_BOOTSTRAP=1 for `-Z build-std`.
    pub bootstrap: bool,
    pub version: String,
    pub llvm_major: u32,
}

/// A toolchain and its bpf-linker, installing what is missing.
pub fn ensure() -> Result<(EbpfToolchain, PathBuf)> {
    let tc = ensure_compiler()?;
    let linker = ensure_bpf_linker(&tc)?;
    eprintln!(
        "xtask: eBPF toolchain {} ({}, LLVM {}), bpf-linker {}",
        tc.label,
        tc.version,
        tc.llvm_major,
        linker.display()
    );
    Ok((tc, linker))
}

fn detect() -> Option<EbpfToolchain> {
    rustup_nightly().or_else(debian_rust)
}

fn rustup_nightly() -> Option<EbpfToolchain> {
    let which = |tool: &str| {
        cmd::output(Command::new("rustup").args(["which", tool, "--toolchain", "nightly"]))
            .map(|s| PathBuf::from(s.trim()))
    };
    describe(
        "rustup nightly + rust-src",
        which("cargo")?,
        which("rustc")?,
        false,
    )
}

fn debian_rust() -> Option<EbpfToolchain> {
    let (cargo, rustc) = (
        PathBuf::from("/usr/bin/cargo"),
        PathBuf::from("/usr/bin/rustc"),
    );
    cargo.exists().then_some(())?;
    describe("Debian rustc-web + rust-web-src", cargo, rustc, true)
}

/// A toolchain that qualifies: library source present, new enough, LLVM major known.
fn describe(
    label: &'static str,
    cargo: PathBuf,
    rustc: PathBuf,
    bootstrap: bool,
) -> Option<EbpfToolchain> {
    has_library_source(&rustc).then_some(())?;
    let vv = cmd::output(Command::new(&rustc).arg("-vV"))?;
    let version = vv.lines().find_map(|l| l.strip_prefix("release: "))?.trim();
    (rust_version(version)? >= MIN_RUSTC).then_some(())?;
    let llvm = vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    Some(EbpfToolchain {
        label,
        cargo,
        llvm_major: llvm.split('.').next()?.trim().parse().ok()?,
        version: version.to_owned(),
        rustc,
        bootstrap,
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

/// `(major, minor)` of `1.96.0`, `1.96.0-nightly` or Debian's `1.96.0+dfsg1-1~deb12u2`.
fn rust_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split(['.', '+', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn ensure_compiler() -> Result<EbpfToolchain> {
    if let Some(tc) = detect() {
        return Ok(tc);
    }
    eprintln!("xtask: no Rust toolchain with library source for the eBPF build; installing one");
    let debian = match newest_debian_rust() {
        Ok(version) => {
            let pinned: Vec<String> = DEBIAN_RUST
                .iter()
                .map(|p| format!("{p}={version}"))
                .collect();
            let pinned: Vec<&str> = pinned.iter().map(String::as_str).collect();
            setup::apt_install(&pinned).map_err(|e| e.context("installing Debian's Rust"))
        }
        Err(e) => Err(e),
    };
    if detect().is_none() && cmd::output(Command::new("rustup").arg("--version")).is_some() {
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
    detect().with_context(|| {
        let why = debian.err().map(|e| format!("{e:#}")).unwrap_or_default();
        format!(
            "no Rust toolchain can build the eBPF object here: it needs rustc >= {}.{} with its \
             library source. Debian: {why}. Otherwise: `rustup toolchain install nightly \
             --component rust-src`. Builds and tests do not need this: they embed the committed \
             object in lb-ebpf/prebuilt/",
            MIN_RUSTC.0, MIN_RUSTC.1
        )
    })
}

/// The newest `rustc-web` version any configured suite serves, if the aya crates accept it.
fn newest_debian_rust() -> Result<String> {
    if !setup::apt_available() {
        bail!("apt-get is not available");
    }
    let madison = || cmd::output(Command::new("apt-cache").args(["madison", DEBIAN_RUST[0]]));
    let listed = match madison().filter(|s| !s.trim().is_empty()) {
        Some(s) => s,
        None => {
            setup::apt_update()?;
            madison().unwrap_or_default()
        }
    };
    let served: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(str::trim))
        .collect();
    newest_accepted(&served)
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "the package archive serves rustc-web {}, older than {}.{} (bookworm-security \
             carried 1.96 on 2026-11-28; is it in the apt sources?)",
                if served.is_empty() {
                    "in no version".into()
                } else {
                    served.join(", ")
                },
                MIN_RUSTC.0,
                MIN_RUSTC.1
            )
        })
}

fn newest_accepted<'a>(served: &[&'a str]) -> Option<&'a str> {
    served
        .iter()
        .filter_map(|v| Some((rust_version(v)?, *v)))
        .filter(|(rv, _)| *rv >= MIN_RUSTC)
        .max_by_key(|(rv, _)| *rv)
        .map(|(_, v)| v)
}

fn toolchain_dir() -> PathBuf {
    setup::toolchain_dir()
}

/// Path of the bpf-linker to use; `None` if setup has not installed one for this LLVM.
fn installed_bpf_linker(tc: &EbpfToolchain) -> Option<PathBuf> {
    let dir = toolchain_dir();
    let bin = dir.join("bin/bpf-linker");
    let built_for = std::fs::read_to_string(dir.join("bpf-linker.llvm")).ok()?;
    let works = cmd::output(Command::new(&bin).arg("--version")).is_some();
    (works && built_for.trim() == tc.llvm_major.to_string()).then_some(bin)
}

fn ensure_bpf_linker(tc: &EbpfToolchain) -> Result<PathBuf> {
    if let Some(bin) = installed_bpf_linker(tc) {
        return Ok(bin);
    }
    let Some(&(_, version)) = BPF_LINKERS.iter().find(|(m, _)| *m == tc.llvm_major) else {
        bail!(
            "{} uses LLVM {}, and no bpf-linker release this project knows links with it \
             (known: LLVM {:?})",
            tc.label,
            tc.llvm_major,
            BPF_LINKERS.map(|(m, _)| m)
        );
    };
    let dir = toolchain_dir();
    eprintln!(
        "xtask: building bpf-linker {version} against LLVM {} into {} (1-2 minutes)",
        tc.llvm_major,
        dir.display()
    );
    let libllvm = find_libllvm(tc.llvm_major).or_else(|| {
        setup::apt_available()
            .then(|| setup::apt_install(&[&format!("libllvm{}", tc.llvm_major)]).ok())
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
        .with_context(|| format!("cannot create {} (run as root?)", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot create {}", link.display()))?;
    cmd::run(
        cmd::cargo()
            .current_dir(&dir)
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "--locked", "--force", "--no-default-features"])
            .arg(format!("bpf-linker@{version}"))
            .arg("--features")
            .arg(format!("llvm-{}", tc.llvm_major))
            .arg("--root")
            .arg(&dir),
    )?;
    std::fs::write(dir.join("bpf-linker.llvm"), tc.llvm_major.to_string())?;
    installed_bpf_linker(tc).context("bpf-linker was installed but does not run")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rustup_and_debian_versions() {
        assert_eq!(rust_version("1.96.0"), Some((1, 96)));
        assert_eq!(rust_version("1.98.0-nightly"), Some((1, 98)));
        assert_eq!(rust_version("1.85.0+dfsg3-1~deb12u3"), Some((1, 85)));
        assert_eq!(rust_version("garbage"), None);
    }

    #[test]
    fn picks_the_newest_served_version_the_aya_crates_accept() {
        let served = ["1.85.0+dfsg3-1~deb12u3", "1.96.0+dfsg1-1~deb12u2"];
        assert_eq!(newest_accepted(&served), Some("1.96.0+dfsg1-1~deb12u2"));
        assert_eq!(newest_accepted(&served[..1]), None);
        assert_eq!(newest_accepted(&[]), None);
    }
}
