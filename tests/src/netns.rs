//! A network namespace with only a loopback device, held open by an `lb-testkit hold` process.
//! The holder exits when its stdin closes, so the namespace disappears even if the test process
//! dies without running destructors.

use crate::paths::testkit_bin;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};

pub struct TestNet {
    holder: Child,
    stdin: Option<ChildStdin>,
    /// `/proc/<holder>/ns/net`, for `lb-testkit --netns`.
    pub ns_path: String,
}

impl TestNet {
    /// `addrs` are added to `lo` as /32 (backends live on 127.0.0.x addresses).
    pub fn new(addrs: &[&str]) -> Self {
        Self::spawn(addrs, false)
    }

    /// As `new`, and `crate::join::BLACKHOLE_NET` swallows every packet sent there.
    pub fn with_blackhole(addrs: &[&str]) -> Self {
        Self::spawn(addrs, true)
    }

    fn spawn(addrs: &[&str], blackhole: bool) -> Self {
        let mut cmd = Command::new(testkit_bin());
        cmd.arg("hold");
        if blackhole {
            cmd.arg("--blackhole");
        }
        for a in addrs {
            cmd.args(["--addr", a]);
        }
        let mut holder = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lb-testkit hold");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .ok();
        assert_eq!(line.trim(), "ready", "netns holder failed to start");
        let ns_path = format!("/proc/{}/ns/net", holder.id());
        let stdin = holder.stdin.take();
        Self {
            holder,
            stdin,
            ns_path,
        }
    }

    /// A command for `lb-testkit` already told to enter this namespace (and a cgroup, if given).
    pub fn testkit(&self, cgroup: Option<&crate::TestCgroup>) -> Command {
        let mut cmd = Command::new(testkit_bin());
        cmd.args(["--netns", &self.ns_path]);
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(&cg.path);
        }
        cmd
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        drop(self.stdin.take());
        crate::procs::wait_or_kill(&mut self.holder);
    }
}
