//! Finding the cgroup v2 mount. Hosts differ (`/sys/fs/cgroup` on pure v2, `/sys/fs/cgroup/unified`
//! on hybrid layouts), so it is read from mountinfo rather than assumed.

use anyhow::{Context, Result};
use std::path::PathBuf;

pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo to find the cgroup2 mount")?;
    cgroup2_mount(&text).context(
        "no cgroup2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or \
         pass --cgroup",
    )
}

/// mountinfo lines: `id parent maj:min root mountpoint opts [optional...] - fstype source sopts`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_layout_mount() {
        let mi = "24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn ignores_cgroup_v1_and_handles_escapes() {
        let mi = "35 25 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                  36 25 0:31 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(mi), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn none_without_cgroup2() {
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        assert_eq!(cgroup2_mount("garbage"), None);
    }
}
