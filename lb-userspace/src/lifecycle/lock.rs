//! One agent per pin folder. Two agents reconciling the same maps from different configs would
//! undo each other's work, so a second `lb-agent run` on the same pins refuses to start (the
//! first keeps serving). The lock is an flock, released by the kernel when the holder dies, so a
//! SIGKILLed agent never blocks its successor.

use crate::private_files::private_dir;
use crate::status::{run_file, RUN_DIR};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct PinLock {
    _file: File,
    path: PathBuf,
}

impl PinLock {
    /// For `detach`: once the pins are gone the lock file names nothing.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn acquire(pin_dir: &Path) -> Result<PinLock> {
    private_dir(Path::new(RUN_DIR), "run folder")?;
    let path = run_file(pin_dir, "lock");
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        // The holder writes only its pid; more is not worth reading.
        let mut holder = String::new();
        let _ = (&file).take(32).read_to_string(&mut holder);
        bail!(
            "another lb-agent (pid {}) is managing {}; stop it first (SIGTERM keeps traffic \
             flowing), then start this one",
            holder.trim(),
            pin_dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(PinLock { _file: file, path })
}
