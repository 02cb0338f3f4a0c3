//! Finding the cgroup v2 mount, and the cgroups `[dataplane] bypass` patterns match. Hosts
//! differ (`/sys/fs/cgroup` on pure v2, `/sys/fs/cgroup/unified` on hybrid layouts), so the
//! mount is read from mountinfo rather than assumed.

use anyhow::{Context, Result};
use lb_common::MAX_BYPASS;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo to find the cgroup2 mount")?;
    cgroup2_mount(&text).context(
        "no cgroup2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or \
         pass --cgroup",
    )
}

/// A cgroup left untranslated: its path, and the pod (`namespace/name`) whose annotation asked
/// for it, when it was not a `[dataplane] bypass` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bypassed {
    pub path: PathBuf,
    pub pod: Option<String>,
}

/// The cgroups `[dataplane] bypass` patterns match now, by cgroup id (a cgroup2 directory's
/// inode number is the id the kernel's `bpf_get_current_cgroup_id` returns), and what could
/// not be used. Relative patterns are taken from `root`, the cgroup2 mount; an absolute one
/// must lie under it.
pub fn bypassed(root: &Path, patterns: &[String]) -> (BTreeMap<u64, Bypassed>, Vec<String>) {
    let mut found = BTreeMap::new();
    let mut problems = Vec::new();
    for pattern in patterns {
        let given = Path::new(pattern);
        if given.is_absolute() && !given.starts_with(root) {
            problems.push(format!(
                "bypass pattern {pattern:?} is not under the cgroup2 mount {}",
                root.display()
            ));
            continue;
        }
        let full = root.join(given);
        let Ok(paths) = glob::glob(&full.to_string_lossy()) else {
            problems.push(format!("bypass pattern {pattern:?} is not a valid pattern"));
            continue;
        };
        for path in paths.flatten() {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_dir() || path == root {
                continue;
            }
            if found.len() >= MAX_BYPASS as usize {
                problems.push(format!(
                    "bypass patterns match more than {MAX_BYPASS} cgroups; the rest are not \
                     bypassed"
                ));
                return (found, problems);
            }
            found.insert(meta.ino(), Bypassed { path, pod: None });
        }
    }
    (found, problems)
}

/// mountinfo lines: `id parent maj:min root mountpoint opts [optional...] - fstype source sopts`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    cgroup2_mounts(mountinfo).next()
}

fn cgroup2_mounts(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
    })
}

/// The cgroup2 mount that holds `cgroup` (the deepest mount point it lies under), where
/// `[dataplane] bypass` patterns start: in a container the first cgroup2 mount is the
/// container's own view (`/sys/fs/cgroup`), while the agent attaches to the host's tree
/// mounted elsewhere (the DaemonSet's `/host/cgroup`), whose cgroups the patterns name.
pub fn mount_holding(cgroup: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo to find the cgroup2 mount")?;
    // mountinfo lists mount points resolved; a path given with a link in it would not match.
    let resolved = cgroup
        .canonicalize()
        .unwrap_or_else(|_| cgroup.to_path_buf());
    mount_holding_in(&text, &resolved).with_context(|| {
        format!(
            "{} lies under no cgroup2 mount of this mount namespace",
            cgroup.display()
        )
    })
}

fn mount_holding_in(mountinfo: &str, cgroup: &Path) -> Option<PathBuf> {
    cgroup2_mounts(mountinfo)
        .filter(|mount| cgroup.starts_with(mount))
        .max_by_key(|mount| mount.components().count())
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
    fn bypass_patterns_match_directories_below_the_root_only() {
        let root = std::env::temp_dir().join(format!("lb-cgroup-test-{}", std::process::id()));
        for dir in ["mesh/a", "mesh/b", "apps/c"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("mesh/file"), "").unwrap();
        let outside = "/elsewhere/x".to_owned();
        let absolute = root.join("apps/c").to_string_lossy().into_owned();
        let patterns = ["mesh/*".to_owned(), absolute, outside];
        let (found, problems) = bypassed(&root, &patterns);
        let mut names: Vec<String> = found
            .values()
            .map(|b| {
                b.path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(names, ["apps/c", "mesh/a", "mesh/b"]);
        let id = std::fs::metadata(root.join("mesh/a")).unwrap().ino();
        assert_eq!(found[&id].path, root.join("mesh/a"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("not under the cgroup2 mount"),
            "{problems:?}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

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

    #[test]
    fn the_mount_holding_a_cgroup_is_the_deepest_one_above_it() {
        let mi = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                  41 25 0:26 / /host/cgroup rw - cgroup2 cgroup2 rw\n\
                  42 41 0:26 / /host/cgroup/inner rw - cgroup2 cgroup2 rw\n";
        let of = |p: &str| mount_holding_in(mi, Path::new(p));
        assert_eq!(of("/host/cgroup"), Some(PathBuf::from("/host/cgroup")));
        assert_eq!(
            of("/host/cgroup/kubepods.slice"),
            Some(PathBuf::from("/host/cgroup"))
        );
        assert_eq!(
            of("/host/cgroup/inner/x"),
            Some(PathBuf::from("/host/cgroup/inner"))
        );
        assert_eq!(
            of("/sys/fs/cgroup/lbtest-1"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            of("/host/cgroupx"),
            None,
            "a prefix of the name is not a parent"
        );
        assert_eq!(of("/elsewhere"), None);
    }
}
