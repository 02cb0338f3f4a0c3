//! Composite tasks: build, test, run, demo.

use crate::{cmd, ebpf, setup};
use anyhow::{bail, Result};
use std::process::Command;

fn profile_dir(release: bool) -> &'static str {
    if release {
        "release"
    } else {
        "debug"
    }
}

/// The workspace's binaries; lb-userspace's build script embeds the committed eBPF object.
pub fn build(release: bool) -> Result<()> {
    warn_if_object_is_stale();
    let mut c = cmd::cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    cmd::run(&mut c)
}

/// A developer who changed the kernel side and forgot `build-ebpf` hears it here, before a test
/// run behaves as if the change did nothing (the digest test then fails too).
fn warn_if_object_is_stale() {
    match (ebpf::recorded_digest(), ebpf::source_digest()) {
        (Ok(recorded), Ok(now)) if recorded == now => {}
        (Ok(_), Ok(_)) => eprintln!(
            "xtask: WARNING: lb-ebpf/ or lb-common/ changed since lb-ebpf/prebuilt/lb-ebpf.o was \
             built; the build embeds the old object. Run `cargo xtask build-ebpf`."
        ),
        (Err(e), _) | (_, Err(e)) => eprintln!("xtask: WARNING: {e:#}"),
    }
}

pub fn test() -> Result<()> {
    setup::run()?;
    lint()?;
    build(false)?;
    // Where `build` put it: CARGO_TARGET_DIR when set (relative to the workspace, as cargo
    // takes it when run from there), else the workspace's target folder.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| cmd::root().join(dir))
        .unwrap_or_else(|| cmd::root().join("target"));
    let agent = target.join("debug/lb-agent");
    if !cmd::is_root() {
        eprintln!("xtask: not root: privileged end-to-end tests will report SKIPPED");
    }
    let mut c = cmd::cargo();
    c.env("LB_AGENT_BIN", agent)
        .env("LB_ETCD_BIN", setup::etcd_bin())
        .args(["test", "--workspace"]);
    run_counting_tests(&mut c)?;
    // Fuzzing builds every dependency again with sanitizers (minutes on a fresh machine), so it
    // runs only when asked for; CI asks (.ci/run).
    match std::env::var("LB_FUZZ_SECONDS")
        .ok()
        .map(|s| s.parse::<u64>())
    {
        None => Ok(()),
        Some(Ok(seconds)) => crate::fuzz::run(seconds),
        Some(Err(_)) => bail!("LB_FUZZ_SECONDS must be a number of seconds per fuzz target"),
    }
}

/// Runs cargo test, echoing its output, and ends with one total over every test binary:
/// cargo's own last line only describes the last binary (often doc tests, with 0 tests).
fn run_counting_tests(c: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", cmd::describe(c));
    let mut child = c.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
        }
    }
    let status = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// The number before `what` in `ok. 12 passed; 0 failed; …`.
fn count(summary: &str, what: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim_end()
                .strip_suffix(what)?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Formatting and clippy are part of the test run so that CI enforces them. A toolchain
/// without them (Debian's cargo alone) skips them with a notice, except under CI.
fn lint() -> Result<()> {
    for (tool, args) in [
        ("fmt", &["fmt", "--all", "--check"][..]),
        (
            "fmt",
            &["fmt", "--manifest-path", "lb-ebpf/Cargo.toml", "--check"][..],
        ),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ][..],
        ),
    ] {
        if cmd::output(cmd::cargo().args([tool, "--version"])).is_none() {
            if std::env::var_os("CI").is_some() {
                bail!("cargo {tool} is not installed, and CI requires it");
            }
            eprintln!(
                "xtask: SKIPPED lint: cargo {tool} is not installed (rustup component add {tool})"
            );
            continue;
        }
        cmd::run(cmd::cargo().args(args))?;
    }
    Ok(())
}

pub fn run(release: bool, args: &[String]) -> Result<()> {
    build(release)?;
    let bin = cmd::root()
        .join("target")
        .join(profile_dir(release))
        .join("lb-agent");
    cmd::run(Command::new(bin).args(args))
}

/// The demo (`lb-testkit demo`) and the benchmarks (`lb-bench`) reuse the test harness's
/// namespace, cgroup and agent handling.
fn privileged_run(what: &str, binary: &str, args: &[String], release: bool) -> Result<()> {
    if !cmd::is_root() {
        bail!("the {what} needs root: it creates a network namespace and a cgroup and loads eBPF");
    }
    setup::run()?;
    build(release)?;
    let dir = cmd::root().join("target").join(profile_dir(release));
    cmd::run(
        Command::new(dir.join(binary))
            .env("LB_AGENT_BIN", dir.join("lb-agent"))
            .args(args),
    )
}

pub fn demo(args: &[String]) -> Result<()> {
    let mut all = vec!["demo".to_string()];
    all.extend_from_slice(args);
    privileged_run("demo", "lb-testkit", &all, false)
}

pub fn bench(quick: bool) -> Result<()> {
    setup::ensure_bench_tools()?;
    let (trials, interval) = if quick { ("5", "200") } else { ("20", "1000") };
    let detection = ["health", "--trials", trials, "--interval-ms", interval];
    privileged_run("benchmark", "lb-bench", &detection.map(String::from), true)?;
    let seconds = if quick { "5" } else { "20" };
    let scale = ["health-scale", "--backends", "1000", "--seconds", seconds];
    privileged_run("benchmark", "lb-bench", &scale.map(String::from), true)?;
    let out = cmd::root().join("bench/results").display().to_string();
    for section in ["kube-churn", "compare"] {
        let mut args = vec![section.to_string(), "--out".into(), out.clone()];
        if quick {
            args.push("--quick".into());
        }
        privileged_run("benchmark", "lb-bench", &args, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_passed_and_failed_from_a_cargo_summary() {
        let ok = "ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 4.0s";
        assert_eq!((count(ok, " passed"), count(ok, " failed")), (12, 0));
        let bad = "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!((count(bad, " passed"), count(bad, " failed")), (3, 2));
        assert_eq!(count("garbage", " passed"), 0);
    }
}
