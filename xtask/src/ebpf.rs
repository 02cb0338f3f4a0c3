//! The kernel object: `cargo xtask build-ebpf` rebuilds it into `lb-ebpf/prebuilt/`, to be
//! committed together with a digest of the sources it was built from.
//!
//! Every other build embeds that committed object, so neither a newcomer nor CI needs an eBPF
//! toolchain, and what the package archive serves that week cannot break them. The digest
//! keeps the object honest: a test fails as soon as `lb-ebpf/` or `lb-common/` differ from
//! what the object was built from.

use crate::{cmd, toolchain};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What the object is built from, relative to the workspace root. Folders are walked.
const SOURCES: [&str; 5] = [
    "lb-ebpf/Cargo.toml",
    "lb-ebpf/Cargo.lock",
    "lb-ebpf/src",
    "lb-common/Cargo.toml",
    "lb-common/src",
];

/// The committed object that lb-userspace's build script embeds.
pub fn prebuilt_object() -> PathBuf {
    cmd::root().join("lb-ebpf/prebuilt/lb-ebpf.o")
}

/// The digest (and, for people, how the object was built) beside the object.
fn digest_file() -> PathBuf {
    cmd::root().join("lb-ebpf/prebuilt/lb-ebpf.o.sources")
}

/// Where cargo leaves a fresh build before it is copied into `prebuilt/`.
fn built_object() -> PathBuf {
    cmd::root().join("target/bpfel-unknown-none/release/lb-ebpf")
}

pub fn build() -> Result<PathBuf> {
    let (tc, linker) = toolchain::ensure()?;
    let arch = if cfg!(target_arch = "aarch64") {
        "aarch64"
    } else {
        "x86_64"
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        // Clippy does not run on this crate; at least a warning stops the build.
        "-Dwarnings".into(),
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
    let built = built_object();
    let prebuilt = prebuilt_object();
    std::fs::create_dir_all(prebuilt.parent().expect("prebuilt has a folder"))?;
    std::fs::copy(&built, &prebuilt)
        .with_context(|| format!("copying {} to {}", built.display(), prebuilt.display()))?;
    let linker_version =
        cmd::output(std::process::Command::new(&linker).arg("--version")).unwrap_or_default();
    std::fs::write(
        digest_file(),
        format!(
            "sha256 {}\n# built by `cargo xtask build-ebpf` with {} rustc {} (LLVM {}), {}\n",
            source_digest()?,
            tc.label,
            tc.version,
            tc.llvm_major,
            linker_version.trim()
        ),
    )?;
    eprintln!(
        "xtask: eBPF object: {} ({} bytes); commit it with {}",
        prebuilt.display(),
        std::fs::metadata(&prebuilt)?.len(),
        digest_file().display()
    );
    Ok(prebuilt)
}

/// SHA-256 over every source file's path and contents, in path order.
pub fn source_digest() -> Result<String> {
    digest_of(&cmd::root())
}

fn digest_of(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    for source in SOURCES {
        collect_files(&root.join(source), &mut files)?;
    }
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        let rel = file.strip_prefix(root).expect("under the root");
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        // Lengths delimit the fields, so moving bytes between a name and a body changes it.
        for field in [rel.to_string_lossy().as_bytes(), &bytes[..]] {
            hash.update((field.len() as u64).to_le_bytes());
            hash.update(field);
        }
    }
    Ok(format!("{:x}", hash.finalize()))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        collect_files(&entry?.path(), out)?;
    }
    Ok(())
}

/// The digest recorded when the committed object was built.
pub fn recorded_digest() -> Result<String> {
    let text = std::fs::read_to_string(digest_file())
        .with_context(|| format!("reading {}", digest_file().display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .map(|d| d.trim().to_owned())
        .with_context(|| format!("no `sha256` line in {}", digest_file().display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed object is what the committed kernel sources build to. When this fails,
    /// the kernel side changed: run `cargo xtask build-ebpf` and commit `lb-ebpf/prebuilt/`.
    #[test]
    fn committed_object_matches_its_sources() {
        assert!(
            prebuilt_object().is_file(),
            "{} is missing",
            prebuilt_object().display()
        );
        assert_eq!(
            recorded_digest().unwrap(),
            source_digest().unwrap(),
            "lb-ebpf/ or lb-common/ changed since lb-ebpf/prebuilt/lb-ebpf.o was built: run \
             `cargo xtask build-ebpf` and commit lb-ebpf/prebuilt/"
        );
    }

    #[test]
    fn digest_follows_every_content_and_name_change() {
        let root = std::env::temp_dir().join(format!("xtask-digest-{}", std::process::id()));
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        for source in SOURCES {
            if source.ends_with("src") {
                write(&format!("{source}/lib.rs"), "fn a() {}");
            } else {
                write(source, "[package]");
            }
        }
        let first = digest_of(&root).unwrap();
        assert_eq!(first, digest_of(&root).unwrap(), "same tree, same digest");
        write("lb-common/src/lib.rs", "fn b() {}");
        let edited = digest_of(&root).unwrap();
        write("lb-common/src/more.rs", "");
        let added = digest_of(&root).unwrap();
        std::fs::remove_file(root.join("lb-common/src/more.rs")).unwrap();
        write("lb-ebpf/src/more.rs", "");
        let moved = digest_of(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let all = [&first, &edited, &added, &moved];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
