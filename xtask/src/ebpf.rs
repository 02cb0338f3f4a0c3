//! `cargo xtask build-ebpf`: build lb-ebpf for bpfel-unknown-none with the toolchain setup chose.

use crate::{cmd, setup};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Where the object lands; lb-userspace's build script embeds it from here.
pub fn object_path() -> PathBuf {
    cmd::root().join("target/bpfel-unknown-none/release/lb-ebpf")
}

pub fn build() -> Result<PathBuf> {
    let tc = setup::detect_toolchain()
        .context("no eBPF toolchain found: run `cargo xtask setup` first")?;
    let linker = setup::bpf_linker(&tc)
        .context("bpf-linker for this toolchain is missing: run `cargo xtask setup` first")?;
    let arch = if cfg!(target_arch = "aarch64") {
        "aarch64"
    } else {
        "x86_64"
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut c = std::process::Command::new(&tc.cargo);
    // The host cargo that runs xtask exports variables that would make this cargo use the
    // wrong compiler or flags.
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c.current_dir(cmd::root().join("lb-ebpf"))
        .env("RUSTC", &tc.rustc)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(cmd::root().join("target"));
    if tc.bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd::run(&mut c)?;
    let obj = object_path();
    anyhow::ensure!(
        obj.exists(),
        "build finished but {} is missing",
        obj.display()
    );
    eprintln!("xtask: eBPF object: {}", obj.display());
    Ok(obj)
}
