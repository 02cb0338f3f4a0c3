//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target of `fuzz/` for N seconds
//! each, starting from (and adding to) its committed corpus `fuzz/corpus/<target>/`.
//!
//! libFuzzer needs a nightly toolchain (`-Zsanitizer`). Without one the task says so and
//! succeeds: `cargo test` still replays every committed corpus file
//! (lb-userspace/tests/fuzz_corpus.rs). A crash in any target fails the task after all targets
//! ran, naming the artifact that reproduces it.

use crate::cmd;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The targets in `fuzz/fuzz_targets/`, in the order they run.
const TARGETS: &[&str] = &["config", "consul", "etcd", "kubernetes"];
/// Installed with `cargo install --locked` when `cargo fuzz` is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The toolchain that builds the targets; `LB_FUZZ_TOOLCHAIN` overrides it (e.g. a dated
/// nightly, or a name that does not exist to see the no-nightly path).
const DEFAULT_TOOLCHAIN: &str = "nightly";
/// Memory cap per fuzzing process; a target above it is a failure (a leak or a blow-up).
const RSS_LIMIT_MB: u32 = 2048;
/// One input running this long is a failure (a hang), well below libFuzzer's 1200 s default.
const INPUT_TIMEOUT_SECS: u64 = 10;

pub fn run(seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let toolchain =
        std::env::var("LB_FUZZ_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_TOOLCHAIN.to_owned());
    let Some(version) = cmd::output(rustup(&toolchain).args(["rustc", "--version"])) else {
        println!(
            "SKIPPED fuzzing: no nightly toolchain (corpus replay still runs in cargo test) \
             [`rustup run {toolchain} rustc --version` failed]"
        );
        return Ok(());
    };
    eprintln!("xtask: fuzzing with {}", version.trim());
    ensure_cargo_fuzz(&toolchain)?;
    let fuzz_dir = cmd::root().join("fuzz");
    let mut failures = Vec::new();
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let started = SystemTime::now();
        let mut c = rustup(&toolchain);
        c.current_dir(cmd::root())
            .args(["cargo", "fuzz", "run", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg("-print_final_stats=1");
        let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
        if dict.exists() {
            c.arg(format!("-dict={}", dict.display()));
        }
        if let Err(e) = cmd::run(&mut c) {
            failures.push((target, e, written_since(&artifacts, started)));
        }
    }
    if failures.is_empty() {
        eprintln!(
            "xtask: fuzzing found nothing in {} targets x {seconds}s; new corpus entries are in \
             fuzz/corpus/<target>/ (minimize before committing: see fuzz/README.md)",
            TARGETS.len()
        );
        return Ok(());
    }
    for (target, error, new) in &failures {
        eprintln!("xtask: FUZZ FAILURE in target `{target}`: {error:#}");
        if new.is_empty() {
            eprintln!("xtask:   no new artifact (a build error? see the output above)");
        }
        for artifact in new {
            eprintln!(
                "xtask:   artifact {} (reproduce: cargo +{toolchain} fuzz run {target} {})",
                artifact.display(),
                artifact.display()
            );
        }
    }
    let names: Vec<&str> = failures.iter().map(|(t, _, _)| **t).collect();
    bail!("fuzzing failed in: {}", names.join(", "))
}

/// `rustup run <toolchain> ...`, the same as `cargo +<toolchain> ...` but independent of
/// which `cargo` is first on PATH, and without what the outer (stable) cargo exported to xtask.
fn rustup(toolchain: &str) -> Command {
    let mut c = Command::new("rustup");
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
    ] {
        c.env_remove(var);
    }
    c.args(["run", toolchain]);
    c
}

fn ensure_cargo_fuzz(toolchain: &str) -> Result<()> {
    if let Some(v) = cmd::output(rustup(toolchain).args(["cargo", "fuzz", "--version"])) {
        eprintln!("xtask: using {}", v.trim());
        return Ok(());
    }
    // Into the default cargo bin folder ($CARGO_HOME/bin), where cargo finds subcommands.
    cmd::run(cmd::cargo().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz")?;
    Ok(())
}

/// Files of a folder written at or after `since` (none when the folder does not exist). By
/// time, not by name: an artifact is named by its content, so a crash found again rewrites the
/// same file.
fn written_since(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            (e.metadata().ok()?.modified().ok()? >= since).then(|| e.path())
        })
        .collect();
    found.sort();
    found
}
