//! `cargo xtask fresh-check`: README's commands on a machine that has only what a new machine
//! of this kind has, so a missing install step fails here instead of on a newcomer's machine.
//!
//! The machine this runs on already has whatever earlier runs installed, so the check builds a
//! throwaway Debian root with `debootstrap` (the host's release, from the host's own apt
//! mirror), adds only what a new machine has (gcc, git, ca-certificates and rustup's stable
//! toolchain, mounted read-only from the host), clones the committed repository into it and
//! runs README's demo command there, then its test command. The kernel, bpffs, cgroup2 and the network (for the package
//! registries) are the host's, as on a real machine.
//!
//! Everything mounted for the root lives in a private mount namespace (`unshare --mount`), so
//! it disappears with the last process inside, even when the check is killed; the root's
//! folder is then removed without crossing into another file system.

use crate::{cmd, setup};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What a new machine of this kind has besides Debian's minimal base (see the environment
/// notes: gcc for crates that build C, git). Everything else is setup's job.
const BASE_PACKAGES: &str = "ca-certificates,gcc,libc6-dev,git";
/// The rustup proxies a new machine has on PATH (all are the rustup binary under other names).
const RUSTUP_PROXIES: [&str; 8] = [
    "cargo",
    "cargo-clippy",
    "cargo-fmt",
    "clippy-driver",
    "rustc",
    "rustdoc",
    "rustfmt",
    "rustup",
];

pub struct Options {
    /// The commit (or branch) to clone; the committed HEAD by default. Another revision lets a
    /// deliberately broken setup be checked without checking it out.
    pub rev: String,
    /// Leave the root in place afterwards (for looking around after a failure).
    pub keep: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    if !cmd::is_root() {
        bail!("fresh-check needs root: it runs debootstrap, chroot and the demo");
    }
    ensure_debootstrap()?;
    let work = work_dir();
    remove_root(&work)?;
    let guard = RootGuard {
        path: work.clone(),
        keep: opts.keep,
    };
    let root = work.join("root");
    let started = Instant::now();
    let (release, sources) = host_debian_sources()?;
    bootstrap(&root, &release, &sources)?;
    install_rustup(&root)?;
    clone_repo(&root, &opts.rev)?;
    let base_secs = started.elapsed().as_secs();
    let demo = timed_in_root(&root, "bash xtask/bootstrap.sh demo")?;
    // Privileged tests must run there too: a skip would hide a missing tool.
    let tests = timed_in_root(
        &root,
        "LB_REQUIRE_PRIVILEGED=1 bash xtask/bootstrap.sh test",
    )?;
    println!(
        "fresh-check: passed. Debian root ready in {base_secs} s; `bootstrap.sh demo` from a \
         fresh clone took {demo} s; `bootstrap.sh test` then took {tests} s"
    );
    drop(guard);
    Ok(())
}

fn ensure_debootstrap() -> Result<()> {
    if cmd::output(Command::new("debootstrap").arg("--version")).is_some() {
        return Ok(());
    }
    setup::apt_install(&["debootstrap"])
}

fn work_dir() -> PathBuf {
    std::env::var_os("LB_FRESH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::root().join("target/fresh-check"))
}

/// Removes the folder of an earlier root. Its mounts lived in a namespace that is gone, so
/// nothing should be mounted below it; if something is, removal stops rather than recurse
/// into a mounted file system.
fn remove_root(work: &Path) -> Result<()> {
    if !work.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = work.to_string_lossy().into_owned();
    if let Some(line) = mounts.lines().find(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|m| m.starts_with(&prefix))
    }) {
        bail!(
            "{} still has a mount below it ({line}); unmount it, then run again",
            work.display()
        );
    }
    cmd::run(
        Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(work),
    )
}

struct RootGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for RootGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("xtask: fresh-check root kept at {}", self.path.display());
        } else if let Err(e) = remove_root(&self.path) {
            eprintln!(
                "xtask: fresh-check could not remove {}: {e:#}",
                self.path.display()
            );
        }
    }
}

/// The host's Debian release and its Debian apt sources (without third-party repositories,
/// whose keys a new root lacks), so the root sees what a new machine here would see.
fn host_debian_sources() -> Result<(String, Vec<AptSource>)> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let release = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: fresh-check needs a Debian host")?;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    files.extend(
        std::fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources")),
    );
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    let sources: Vec<AptSource> = texts
        .iter()
        .flat_map(|t| parse_sources(t))
        .filter(|s| s.suite == release || s.suite.starts_with(&format!("{release}-")))
        .collect();
    if !sources.iter().any(|s| s.suite == release) {
        bail!("no apt source for {release} itself in /etc/apt: cannot bootstrap a root");
    }
    Ok((release, sources))
}

#[derive(Debug, PartialEq)]
struct AptSource {
    uri: String,
    suite: String,
    components: String,
}

/// `deb URI SUITE COMPONENTS…` lines and deb822 stanzas (`Types`, `URIs`, `Suites`,
/// `Components`), one entry per URI and suite.
fn parse_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if let [uri, suite, components @ ..] = &rest[..] {
            out.push(AptSource {
                uri: uri.to_string(),
                suite: suite.to_string(),
                components: components.join(" "),
            });
        }
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        if !field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        let components = field("Components").unwrap_or_default();
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                out.push(AptSource {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                    components: components.clone(),
                });
            }
        }
    }
    out
}

fn bootstrap(root: &Path, release: &str, sources: &[AptSource]) -> Result<()> {
    let mirror = sources
        .iter()
        .find(|s| s.suite == release)
        .expect("checked by host_debian_sources");
    // Base packages are Debian's, not the project's: caching them between runs on one machine
    // changes nothing inside the root.
    let cache = PathBuf::from("/var/cache/lb-fresh-check/debs");
    std::fs::create_dir_all(&cache)?;
    std::fs::create_dir_all(root)?;
    cmd::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={BASE_PACKAGES}")])
            .arg(format!("--cache-dir={}", cache.display()))
            .args([release, &root.to_string_lossy(), &mirror.uri]),
    )?;
    let list: String = sources
        .iter()
        .map(|s| format!("deb {} {} {}\n", s.uri, s.suite, s.components))
        .collect();
    std::fs::write(root.join("etc/apt/sources.list"), list)?;
    carry_network_settings(root)
}

/// What every machine of this kind has for reaching the registries, which the root would
/// otherwise lack: name servers, local certificate authorities (the registries are reached
/// through a TLS-inspecting gateway here) and apt's `Acquire::` settings.
fn carry_network_settings(root: &Path) -> Result<()> {
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the root")?;
    let local_cas = Path::new("/usr/local/share/ca-certificates");
    for entry in std::fs::read_dir(local_cas).into_iter().flatten().flatten() {
        let to = root.join(entry.path().strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(to.parent().expect("has a folder"))?;
        std::fs::copy(entry.path(), &to)?;
    }
    cmd::run(
        Command::new("chroot")
            .arg(root)
            .args(["update-ca-certificates", "--fresh"])
            .stdout(std::process::Stdio::null()),
    )?;
    for entry in std::fs::read_dir("/etc/apt/apt.conf.d")
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let settings = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//") && !l.starts_with('#'));
        if settings.clone().count() > 0 && settings.clone().all(|l| l.starts_with("Acquire::")) {
            std::fs::write(
                root.join("etc/apt/apt.conf.d").join(entry.file_name()),
                text,
            )?;
        }
    }
    Ok(())
}

fn rustup_home() -> PathBuf {
    std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".rustup"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The root gets rustup and its stable toolchain only: no nightly, no components or tools the
/// host gained later. The toolchain itself is mounted read-only when the root is entered.
fn install_rustup(root: &Path) -> Result<()> {
    let rustup = cmd::output(Command::new("which").arg("rustup"))
        .map(|s| PathBuf::from(s.trim()))
        .context("fresh-check gives the root rustup's stable toolchain, but rustup is not here")?;
    let bin = root.join("root/.cargo/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(&rustup, bin.join("rustup"))?;
    for proxy in RUSTUP_PROXIES.iter().filter(|p| **p != "rustup") {
        std::fs::hard_link(bin.join("rustup"), bin.join(proxy))?;
    }
    let stable = stable_toolchain()?;
    let toolchains = root.join("root/.rustup/toolchains");
    std::fs::create_dir_all(toolchains.join(&stable))?;
    std::fs::write(
        root.join("root/.rustup/settings.toml"),
        format!("version = \"12\"\ndefault_toolchain = \"{stable}\"\nprofile = \"default\"\n"),
    )?;
    Ok(())
}

/// The name of the host's stable toolchain folder, e.g. `stable-x86_64-unknown-linux-gnu`.
fn stable_toolchain() -> Result<String> {
    std::fs::read_dir(rustup_home().join("toolchains"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("stable-"))
        .context("rustup has no stable toolchain")
}

/// A clone of the committed tree: what CI and a newcomer get, without uncommitted changes.
/// It is a full clone: the upgrade test builds the previous release's agent from the history
/// (lb-testkit's `previous.rs`), so a shallow one would fail there, later and less clearly.
fn clone_repo(root: &Path, rev: &str) -> Result<()> {
    let target = root.join("root/lb");
    // A commit id, so that a branch of this repository works as well as HEAD in the clone.
    let commit = cmd::output(Command::new("git").arg("-C").arg(cmd::root()).args([
        "rev-parse",
        "--verify",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("`{rev}` names no commit of this repository"))?;
    cmd::run(
        Command::new("git")
            .args(["clone", "--quiet", "--no-local"])
            .arg(cmd::root())
            .arg(&target),
    )?;
    // A shallow repository clones shallow: its clone lacks the history the test needs.
    let shallow = cmd::output(
        Command::new("git")
            .arg("-C")
            .arg(&target)
            .args(["rev-parse", "--is-shallow-repository"]),
    );
    if shallow.as_deref().map(str::trim) != Some("false") {
        bail!(
            "the clone of {} is shallow (or git could not tell): the upgrade test builds the \
             previous release's agent from the history. Fetch all of it (`git fetch \
             --unshallow`) and run again",
            cmd::root().display()
        );
    }
    cmd::run(Command::new("git").arg("-C").arg(&target).args([
        "checkout",
        "--quiet",
        "--detach",
        commit.trim(),
    ]))
}

/// Runs `script` in the root from the clone's folder, in a private mount namespace that holds
/// the root's mounts. Returns how long it took, in seconds.
fn timed_in_root(root: &Path, script: &str) -> Result<u64> {
    let stable = stable_toolchain()?;
    let r = root.display();
    // A login shell as a newcomer would have it: HOME, a plain PATH without ~/.cargo/bin
    // (bootstrap.sh finds cargo there itself), and none of this process's variables.
    let enter = format!(
        "#!/bin/sh
# Written by `cargo xtask fresh-check`: mounts the root, then runs \"$1\" in the clone.
set -e
mount -t proc proc {r}/proc
mount --rbind /sys {r}/sys
mount --rbind /dev {r}/dev
mount -t tmpfs tmpfs {r}/run
mount --bind -o ro {toolchain} {r}/root/.rustup/toolchains/{stable}
mount -o remount,bind,ro {r}/root/.rustup/toolchains/{stable}
exec chroot {r} /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \\
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
  /bin/bash -c \"cd /root/lb && $1\"
",
        toolchain = rustup_home().join("toolchains").join(&stable).display(),
    );
    let enter_path = root.with_file_name("enter.sh");
    std::fs::write(&enter_path, enter)?;
    eprintln!("xtask: fresh-check: in the root: {script}");
    let started = Instant::now();
    cmd::run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh"])
            .arg(&enter_path)
            .arg(script),
    )
    .with_context(|| format!("in the fresh root: `{script}` failed"))?;
    Ok(started.elapsed().as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_line_and_deb822_sources() {
        let one_line =
            "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://m/debian bookworm main contrib\n\
                        deb-src http://m/debian bookworm main\n";
        let deb822 = "Types: deb\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\nSigned-By: /k.gpg\n\nTypes: deb-src\nURIs: http://x\n\
                      Suites: bookworm\n";
        let parsed: Vec<_> = [one_line, deb822]
            .iter()
            .flat_map(|t| parse_sources(t))
            .collect();
        let want = |suite: &str, components: &str| AptSource {
            uri: "http://m/debian".into(),
            suite: suite.into(),
            components: components.into(),
        };
        assert_eq!(
            parsed,
            [
                want("bookworm", "main contrib"),
                want("bookworm", "main"),
                want("bookworm-updates", "main")
            ]
        );
    }
}
