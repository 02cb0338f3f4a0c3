//! A bpffs folder for one test's pins, detached and removed afterwards.

use crate::paths::{agent_bin, unique_name};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self {
            path: PathBuf::from("/sys/fs/bpf").join(unique_name()),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Command::new(agent_bin())
            .arg("detach")
            .arg("--pin-dir")
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
