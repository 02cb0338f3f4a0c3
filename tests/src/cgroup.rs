//! A child cgroup of the cgroup2 mount, created for one test and removed after it.

use crate::paths::unique_name;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        let root = cgroup2_mount().expect("cgroup2 mounted");
        let path = root.join(unique_name());
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A cgroup below this one: the parent's programs apply to it too, but its id differs
    /// (drop it before the parent).
    pub fn child(&self) -> Self {
        self.child_named(&unique_name())
    }

    /// `child` with a name of the test's choosing (kubelet's for a pod, say): only ever below
    /// a cgroup the test made, so the name cannot clash with the host's.
    pub fn child_named(&self, name: &str) -> Self {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// The id `bpf_get_current_cgroup_id()` returns for tasks in it: its inode number.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).expect("cgroup folder").ino()
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only our clients are ever placed here; any still running are ended so rmdir works.
        for pid in self.pids() {
            // SAFETY: plain kill(2) of a pid in the cgroup this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
