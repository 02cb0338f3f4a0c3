//! The previous release's agent, built from this repository's git history, for the upgrade
//! test: `git archive` of a fixed commit, extracted under the target folder and built there
//! with its own lock file. The old revision embeds its committed eBPF object
//! (`lb-ebpf/prebuilt/`), so the build needs cargo and git, no eBPF toolchain.
//!
//! Layout under `<target>/previous-agent/`: `<rev>/src` (the extracted tree), `<rev>/lb-agent`
//! (the binary), `<rev>/built-from` (the marker naming the revision, written last, so a build
//! that was interrupted is not mistaken for a finished one), `target/` (cargo's, shared by all
//! revisions so that a new one reuses the dependencies) and `build.lock`.

use anyhow::{bail, ensure, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The last commit whose maps have layout version 2: the release an upgrade starts from.
pub const PREVIOUS_LAYOUT_REV: &str = "b811c4fda886d7a971e0fa73e2534de41445dce6";

/// `lb-agent` of [`PREVIOUS_LAYOUT_REV`], built on first use (minutes on a fresh machine,
/// progress on stderr) and reused afterwards.
pub fn previous_agent() -> Result<PathBuf> {
    agent_of(&repo_root(), PREVIOUS_LAYOUT_REV, &work_dir())
}

/// The repository holding this crate: its folder is `tests/` of the workspace.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lies in the workspace")
        .to_path_buf()
}

fn work_dir() -> PathBuf {
    crate::paths::target_dir().join("previous-agent")
}

/// `lb-agent` of commit `rev` of `repo`, built under `work` unless a finished build is there.
pub fn agent_of(repo: &Path, rev: &str, work: &Path) -> Result<PathBuf> {
    let built = Built::new(work, rev)?;
    if built.is_complete() {
        return Ok(built.binary);
    }
    require_commit(repo, rev)?;
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let _lock = lock(&work.join("build.lock"))?;
    // Another test may have built it while this one waited for the lock.
    if built.is_complete() {
        return Ok(built.binary);
    }
    let started = Instant::now();
    let src = built.dir.join("src");
    let target = work.join("target");
    say(&format!(
        "previous agent: building lb-agent of {rev} in {} (minutes the first time; cached in \
         {} afterwards)",
        src.display(),
        built.dir.display()
    ));
    extract(repo, rev, &src)?;
    build(&src, &target, rev)?;
    built.record(&target.join("debug/lb-agent"))?;
    say(&format!(
        "previous agent: built {} in {} s",
        built.binary.display(),
        started.elapsed().as_secs()
    ));
    Ok(built.binary)
}

/// A line on the real stderr: the test harness captures `eprintln!` of passing tests, and a
/// build of minutes must show.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Where one revision's build ends up, and whether it finished.
struct Built {
    dir: PathBuf,
    binary: PathBuf,
    marker: PathBuf,
    rev: String,
}

impl Built {
    fn new(work: &Path, rev: &str) -> Result<Self> {
        // The revision names a folder and is what the marker records: a full commit id, so
        // that a moved branch or tag can never pass for what was built earlier.
        ensure!(
            rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
            "{rev:?} is not a full commit id (40 hex digits)"
        );
        let dir = work.join(rev);
        Ok(Self {
            binary: dir.join("lb-agent"),
            marker: dir.join("built-from"),
            dir,
            rev: rev.to_owned(),
        })
    }

    /// The binary is there and the marker says it is this revision's.
    fn is_complete(&self) -> bool {
        self.binary.is_file()
            && std::fs::read_to_string(&self.marker).is_ok_and(|m| m.trim() == self.rev)
    }

    /// Copies the freshly built binary into place, then writes the marker. Both through a
    /// temporary name and a rename, so neither is ever seen half written.
    fn record(&self, built: &Path) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let _ = std::fs::remove_file(&self.marker);
        let tmp = self.binary.with_extension("new");
        std::fs::copy(built, &tmp)
            .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
        std::fs::rename(&tmp, &self.binary)?;
        let tmp = self.marker.with_extension("new");
        std::fs::write(&tmp, format!("{}\n", self.rev))?;
        std::fs::rename(&tmp, &self.marker)?;
        Ok(())
    }
}

/// Fails, saying why and what to do, unless `repo`'s history has commit `rev`.
fn require_commit(repo: &Path, rev: &str) -> Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", "-e", &format!("{rev}^{{commit}}")])
        .stdin(Stdio::null())
        .output()
        .context("running git (the upgrade test builds the previous agent from git history)")?;
    if !out.status.success() {
        bail!(
            "commit {rev} (the previous release, which the upgrade test builds its old agent \
             from) is not in the git history of {}: a shallow clone (`--depth`) lacks it; \
             fetch the full history (`git fetch --unshallow`) or clone without --depth. git \
             said: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `git archive <rev> | tar -x` into a fresh `src`.
fn extract(repo: &Path, rev: &str, src: &Path) -> Result<()> {
    if src.exists() {
        // What an interrupted run left: start over.
        std::fs::remove_dir_all(src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(src)?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", rev])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(src)
        .stdin(archive.stdout.take().expect("piped"))
        .status()
        .context("running tar");
    let git = archive.wait().context("waiting for git archive")?;
    let tar = tar?;
    ensure!(
        git.success() && tar.success(),
        "extracting {rev} into {} failed (git archive: {git}, tar: {tar})",
        src.display()
    );
    Ok(())
}

/// `cargo build --locked -p lb-userspace --bin lb-agent` in the extracted tree. Its output
/// (cargo's progress) goes to this process's stderr.
fn build(src: &Path, target: &Path, rev: &str) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(src)
        .args([
            "build",
            "--locked",
            "-p",
            "lb-userspace",
            "--bin",
            "lb-agent",
        ])
        .env("CARGO_TARGET_DIR", target)
        // Built once and only run: debug info and incremental state would be gigabytes of disk.
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_INCREMENTAL", "0")
        // Would embed another eBPF object than the revision's committed one (build.rs).
        .env_remove("LB_EBPF_OBJECT")
        // Would move the binary to target/<triple>/debug.
        .env_remove("CARGO_BUILD_TARGET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "building lb-agent of {rev} in {} failed ({status}); cargo's output is above",
        src.display()
    );
    Ok(())
}

/// An exclusive flock on `path`, held until the returned file is dropped: one build at a time
/// across test processes and threads (each open has its own lock).
fn lock(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let flock = |op| loop {
        // SAFETY: flock on a descriptor this function owns; closing it releases the lock.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if flock(libc::LOCK_EX | libc::LOCK_NB).is_err() {
        say(&format!(
            "previous agent: waiting for another test's build ({})",
            path.display()
        ));
        flock(libc::LOCK_EX).with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of its own, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(crate::paths::unique_name());
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const REV_A: &str = "0123456789abcdef0123456789abcdef01234567";
    const REV_B: &str = "89abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_build_counts_only_with_the_binary_and_a_marker_naming_its_revision() {
        let work = Scratch::new();
        let built = Built::new(&work.0, REV_A).unwrap();
        assert!(!built.is_complete(), "nothing there yet");

        std::fs::create_dir_all(&built.dir).unwrap();
        std::fs::write(&built.binary, "#!/bin/true\n").unwrap();
        assert!(!built.is_complete(), "a binary without marker: interrupted");
        std::fs::write(&built.marker, format!("{REV_B}\n")).unwrap();
        assert!(!built.is_complete(), "the marker names another revision");

        let fresh = work.0.join("fresh-lb-agent");
        std::fs::write(&fresh, "new binary").unwrap();
        built.record(&fresh).unwrap();
        assert!(built.is_complete());
        assert_eq!(
            std::fs::read_to_string(&built.binary).unwrap(),
            "new binary"
        );
        // A finished build is returned as it is: no git, no cargo.
        let agent = agent_of(Path::new("/nonexistent"), REV_A, &work.0).unwrap();
        assert_eq!(agent, work.0.join(REV_A).join("lb-agent"));
        assert!(
            !Built::new(&work.0, REV_B).unwrap().is_complete(),
            "one revision's build does not count for another"
        );
    }

    #[test]
    fn only_full_commit_ids_are_accepted() {
        let work = Scratch::new();
        for rev in ["HEAD", "main", "b811c4f", &format!("{}x", &REV_A[..39])] {
            let e = agent_of(&repo_root(), rev, &work.0).unwrap_err();
            assert!(format!("{e:#}").contains("40 hex digits"), "{rev}: {e:#}");
        }
    }

    #[test]
    fn a_commit_missing_from_the_history_is_a_clear_error() {
        let work = Scratch::new();
        let e = agent_of(&repo_root(), REV_A, &work.0).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(REV_A)
                && msg.contains("not in the git history")
                && msg.contains("shallow"),
            "{msg}"
        );
        assert!(
            !work.0.join(REV_A).exists(),
            "nothing is extracted for a missing commit"
        );
    }

    /// The upgrade test needs this commit; a shallow clone fails here, without root, with the
    /// same message the upgrade test would give.
    #[test]
    fn the_previous_layout_revision_is_in_the_history_and_has_layout_version_2() {
        require_commit(&repo_root(), PREVIOUS_LAYOUT_REV).unwrap();
        let out = Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args([
                "show",
                &format!("{PREVIOUS_LAYOUT_REV}:lb-common/src/layout.rs"),
            ])
            .output()
            .unwrap();
        let layout = String::from_utf8_lossy(&out.stdout);
        assert!(
            layout.contains("pub const LAYOUT_VERSION: u32 = 2;"),
            "{PREVIOUS_LAYOUT_REV} is not of layout version 2: {layout}"
        );
    }

    #[test]
    fn the_build_folder_is_in_the_workspace_target_folder() {
        let target = crate::paths::target_dir();
        assert!(
            target.join("CACHEDIR.TAG").is_file() || std::env::var_os("CARGO_TARGET_DIR").is_some(),
            "{} is not cargo's target folder",
            target.display()
        );
        assert_eq!(work_dir(), target.join("previous-agent"));
    }

    #[test]
    fn the_lock_is_exclusive_between_two_opens() {
        let work = Scratch::new();
        let path = work.0.join("build.lock");
        let held = lock(&path).unwrap();
        let other = OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, -1, "a second open took the lock while the first held it");
        drop(held);
        // SAFETY: as above.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0, "the lock was not released with its file");
    }
}
