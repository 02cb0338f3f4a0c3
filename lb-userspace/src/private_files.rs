//! Folders and files that only the agent's user may change, and files the agent reads. Whoever
//! can write where the agent keeps its pins, lock or status can detach balancing, plant maps for
//! it to adopt, or point a file it writes somewhere else; so those folders are created private
//! and refused when they are not, and files are written without following links. Files it
//! reads (config, secrets, certificates) are read up to a bound, so a huge or endless file
//! (`/dev/zero`) is an error naming it instead of memory exhausted.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Bounds for `read_bounded`, by what the file holds.
pub const SECRET_LIMIT: u64 = 64 << 10;
pub const CERTIFICATE_LIMIT: u64 = 1 << 20;
/// 250,000 services of 4 backends take about 32 MiB of TOML.
pub const CONFIG_LIMIT: u64 = 64 << 20;
/// The agent's status file: about 600 bytes per service with four checked backends, so
/// 250,000 such services fit with room to spare.
pub const STATUS_LIMIT: u64 = 256 << 20;
/// The kernel's own type information (`/sys/kernel/btf/vmlinux`): about 6 MiB today.
pub const KERNEL_BTF_LIMIT: u64 = 64 << 20;

/// The whole of `path` if it holds at most `limit` bytes; `what` names it in the error (the
/// config field that named the file, for one).
pub fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    read_limited(path, limit).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// `read_bounded` with an error that does not name the file, for callers that do.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    read_opened(std::fs::File::open(path), limit)
}

/// A file the agent wrote itself, in a folder only it may write: read up to `limit`, and
/// never through a link (one planted there would show `stats` or a restarting agent
/// someone else's state). Missing is `Ok(None)`.
pub fn read_own(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, String> {
    let opened = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match opened {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        opened => read_opened(opened, limit)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
    }
}

/// A SHA-256 digest of `path` under the same bound as `read_bounded`, read a piece at a time:
/// telling whether a 30 MB config changed then needs no copy of it.
pub fn digest_bounded(path: &Path, limit: u64, what: &str) -> Result<[u8; 32], String> {
    let named = |e: String| format!("{what} {}: {e}", path.display());
    let mut file = open_bounded(std::fs::File::open(path), limit).map_err(named)?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut piece = vec![0u8; 64 << 10];
    let mut read = 0u64;
    loop {
        let n = match file.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(named(e.to_string())),
        };
        digest.update(&piece[..n]);
        read += n as u64;
    }
    within(read, limit).map_err(named)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.finish().as_ref());
    Ok(out)
}

fn read_opened(file: std::io::Result<std::fs::File>, limit: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let read = open_bounded(file, limit)?
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    within(read as u64, limit)?;
    Ok(bytes)
}

/// An opened file to be read up to one byte past `limit` (the caller checks what it read with
/// `within`). A regular file says its size up front, so a huge one is refused before reading
/// any of it; devices and pipes (size 0) are bounded by the read itself.
fn open_bounded(
    file: std::io::Result<std::fs::File>,
    limit: u64,
) -> Result<std::io::Take<std::fs::File>, String> {
    let file = file.map_err(|e| e.to_string())?;
    within(file.metadata().map_or(0, |m| m.len()), limit)?;
    Ok(file.take(limit + 1))
}

fn within(read: u64, limit: u64) -> Result<(), String> {
    if read > limit {
        return Err(format!(
            "larger than {} KiB, which no such file needs; refusing to read it",
            limit >> 10
        ));
    }
    Ok(())
}

/// `read_bounded` for text.
pub fn read_bounded_text(path: &Path, limit: u64, what: &str) -> Result<String, String> {
    String::from_utf8(read_bounded(path, limit, what)?)
        .map_err(|_| format!("{what} {}: not UTF-8 text", path.display()))
}

/// Creates `dir` (mode 0700) if missing, then refuses it unless it is a folder of this user that
/// group and others cannot write. `what` names it in the error.
pub fn private_dir(dir: &Path, what: &str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {what} {}", dir.display()))?;
    check_private(dir, what)
}

/// Refuses a folder another user owns or that group or others may write to, and anything that
/// is not a folder (a symlink included).
pub fn check_private(dir: &Path, what: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {what} {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != me || mode & 0o022 != 0 {
        bail!(
            "{what} {} is {} owned by uid {} with mode {mode:o}; it must be a folder owned by \
             this user (uid {me}) that group and others cannot write, because whoever can write \
             there can detach balancing, plant maps or redirect the agent's files. Remove it (or \
             fix its owner and mode) and start again",
            dir.display(),
            if meta.is_dir() {
                "a folder"
            } else {
                "not a folder"
            },
            meta.uid()
        );
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: written to a new file of a name nobody can
/// predict, opened without following links, then renamed over `path` (which replaces a link
/// planted there instead of following it). A reader never sees half a file.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().context("a file name")?.to_string_lossy();
    // SAFETY: getrandom writes at most the buffer's length into it.
    let mut nonce = [0u8; 8];
    let filled = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
    if filled != nonce.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    let tmp = path.with_file_name(format!(".{name}.{:016x}", u64::from_ne_bytes(nonce)));
    let written = std::fs::File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot replace {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-private-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_private_folders_and_refuses_open_ones() {
        let dir = scratch("dir");
        private_dir(&dir, "run folder").unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&dir, "run folder").unwrap_err().to_string();
        assert!(
            err.contains("run folder") && err.contains("mode 777"),
            "{err}"
        );
        let link = scratch("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = check_private(&link, "pin folder").unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_are_bounded_and_name_the_file() {
        let dir = scratch("read");
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        assert_eq!(
            read_bounded_text(&token, SECRET_LIMIT, "discovery.token_file").unwrap(),
            "s3cret\n"
        );
        // 100 MiB without writing them: a sparse file reads as zeros.
        let huge = dir.join("huge");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        let err = read_bounded(&huge, SECRET_LIMIT, "discovery.token_file").unwrap_err();
        assert!(
            err.contains("discovery.token_file") && err.contains("huge") && err.contains("64 KiB"),
            "{err}"
        );
        let err = read_bounded(Path::new("/dev/zero"), SECRET_LIMIT, "x").unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_files_are_bounded_and_never_read_through_a_link() {
        let dir = scratch("own");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("status.json");
        assert_eq!(read_own(&file, 16), Ok(None));
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_own(&file, 16), Ok(Some(b"{}".to_vec())));
        std::fs::File::create(&file).unwrap().set_len(17).unwrap();
        let err = read_own(&file, 16).unwrap_err();
        assert!(
            err.contains("status.json") && err.contains("larger than"),
            "{err}"
        );
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = read_own(&link, 1 << 20).unwrap_err();
        assert!(err.contains("link.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digests_tell_contents_apart_under_the_same_bound() {
        let dir = scratch("digest");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.toml");
        // More than one piece, so that every piece counts.
        let mut text = vec![b'#'; 200 << 10];
        std::fs::write(&file, &text).unwrap();
        let first = digest_bounded(&file, CONFIG_LIMIT, "config file").unwrap();
        assert_eq!(
            digest_bounded(&file, CONFIG_LIMIT, "config file"),
            Ok(first)
        );
        for at in [0, 70 << 10, (200 << 10) - 1] {
            text[at] = b'x';
            std::fs::write(&file, &text).unwrap();
            let now = digest_bounded(&file, CONFIG_LIMIT, "config file").unwrap();
            assert_ne!(now, first, "a change at byte {at}");
            text[at] = b'#';
        }
        let err = digest_bounded(&file, 100 << 10, "config file").unwrap_err();
        assert!(
            err.contains("config file") && err.contains("larger than 100 KiB"),
            "{err}"
        );
        let err = digest_bounded(&dir.join("gone"), CONFIG_LIMIT, "config file").unwrap_err();
        assert!(err.contains("gone"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replace_never_writes_through_a_planted_link() {
        let dir = scratch("replace");
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let target = dir.join("status.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        replace(&target, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "{}");
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 2, "a temporary file was left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
