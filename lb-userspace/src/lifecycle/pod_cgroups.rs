//! Finding Kubernetes pods' cgroups by the pods' uids, for pods annotated to be bypassed.
//!
//! kubelet gives every pod a cgroup named after its uid, below its QoS class's cgroup:
//!
//! - cgroupfs driver: `kubepods/besteffort/pod<uid>/` (`kubepods/pod<uid>/` when guaranteed),
//!   the name being `pod` followed by the uid exactly;
//! - systemd driver: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/`,
//!   the name ending in `-pod<uid>.slice` with every `-` of the uid written `_` (a `-` in a
//!   slice name separates the levels of the hierarchy).
//!
//! So a directory's name alone says which pod it belongs to, if any (`pod_uid_in`), and one
//! walk finds every wanted pod, however many, without trusting where kubelet's cgroup root
//! or the QoS levels are. Only canonical uids are recognised (`PodUid::parse`). The walk is
//! bounded in depth and in directories read, does not follow links, and does not descend into
//! a pod's cgroup (its containers' cgroups are below it, and the kernel checks a connecting
//! task's ancestors anyway).

use super::cgroup::Bypassed;
use crate::sources::kubernetes::bypass_pods::PodUid;
use lb_common::MAX_BYPASS;
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Levels below the search root a pod's cgroup may be at. kubelet's are at 2 or 3 below the
/// host's cgroup2 root; a `--cgroup-root`, a nested runtime or a node in a container adds a
/// few.
const MAX_DEPTH: usize = 8;
/// Directories read at most per search: a node's pods and their containers come to a few
/// thousand, and a search runs every 2 seconds while some pod is annotated.
const MAX_DIRS: usize = 20_000;

/// The uid of the pod whose cgroup a directory named `name` is, by either driver's naming.
pub fn pod_uid_in(name: &str) -> Option<PodUid> {
    if let Some(uid) = name.strip_prefix("pod") {
        return PodUid::parse(uid);
    }
    let (parent, escaped) = name.strip_suffix(".slice")?.rsplit_once("-pod")?;
    if parent.is_empty() || escaped.contains('-') {
        return None;
    }
    PodUid::parse(&escaped.replace('_', "-"))
}

/// Adds the cgroups below `root` of the `pods` (uid, `namespace/name`) to `found`, as long as
/// `found` holds fewer than `MAX_BYPASS`; a search cut short says so in `problems`. A pod not
/// found is simply not bypassed yet: kubelet creates its cgroup when it starts the pod.
pub fn add(
    root: &Path,
    pods: &BTreeMap<PodUid, String>,
    found: &mut BTreeMap<u64, Bypassed>,
    problems: &mut Vec<String>,
) {
    let mut left = pods.len();
    let mut read = 0;
    let mut queue = VecDeque::from([(root.to_path_buf(), 0)]);
    while let Some((dir, depth)) = queue.pop_front() {
        if left == 0 {
            return;
        }
        if read == MAX_DIRS {
            return problems.push(format!(
                "stopped looking for annotated pods' cgroups after {MAX_DIRS} directories \
                 below {}; {left} not found",
                root.display()
            ));
        }
        read += 1;
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // lstat: a link is not a cgroup and is never followed.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name();
            match pod_uid_in(&name.to_string_lossy()) {
                Some(uid) => {
                    let Some(pod) = pods.get(&uid) else {
                        continue;
                    };
                    if found.len() >= MAX_BYPASS as usize {
                        return problems.push(format!(
                            "bypassed cgroups would be more than {MAX_BYPASS}; pod {pod} is not \
                             bypassed"
                        ));
                    }
                    let pod = Some(pod.clone());
                    found.insert(meta.ino(), Bypassed { path, pod });
                    left -= 1;
                }
                None if depth + 1 < MAX_DEPTH => queue.push_back((path, depth + 1)),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const UID: &str = "6a1c2f3e-0b4d-4e5f-8a9b-0c1d2e3f4a5b";
    const SYSTEMD: &str = "6a1c2f3e_0b4d_4e5f_8a9b_0c1d2e3f4a5b";
    const OTHER: &str = "11111111-2222-4333-8444-555555555555";

    /// The paths below `root` where `add` finds pods, for the tests.
    fn paths(root: &Path, pods: &BTreeMap<PodUid, String>) -> Vec<PathBuf> {
        let (mut found, mut problems) = (BTreeMap::new(), Vec::new());
        add(root, pods, &mut found, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let mut paths: Vec<PathBuf> = found
            .into_values()
            .map(|b| b.path.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        paths.sort();
        paths
    }

    fn uid(text: &str) -> PodUid {
        PodUid::parse(text).unwrap()
    }

    #[test]
    fn both_drivers_names_give_the_uid() {
        assert_eq!(pod_uid_in(&format!("pod{UID}")), Some(uid(UID)));
        for name in [
            format!("kubepods-besteffort-pod{SYSTEMD}.slice"),
            format!("kubepods-burstable-pod{SYSTEMD}.slice"),
            format!("kubepods-pod{SYSTEMD}.slice"),
        ] {
            assert_eq!(pod_uid_in(&name), Some(uid(UID)), "{name}");
        }
    }

    #[test]
    fn other_names_and_bad_uids_are_no_pod() {
        for name in [
            "kubepods".to_owned(),
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            "pod".to_owned(),
            format!("pod{SYSTEMD}"),
            format!("pod{}", UID.to_uppercase()),
            format!("pod{UID}x"),
            format!("pod{UID}.slice"),
            format!("kubepods-besteffort-pod{UID}.slice"),
            format!("-pod{SYSTEMD}.slice"),
            format!("kubepods-pod{SYSTEMD}"),
            format!("kubepods-pod{SYSTEMD}.scope"),
            "kubepods-pod*.slice".to_owned(),
            "kubepods-pod.._.._.._...slice".to_owned(),
            "cri-containerd-0123456789abcdef.scope".to_owned(),
        ] {
            assert_eq!(pod_uid_in(&name), None, "{name}");
        }
    }

    /// A throwaway tree of directories (not a cgroup2 mount: the walk only reads names).
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str, dirs: &[String]) -> Self {
            let root =
                std::env::temp_dir().join(format!("lb-pod-cgroups-{name}-{}", std::process::id()));
            for dir in dirs {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
            Self(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_pods_of_either_driver_anywhere_below_the_root() {
        let systemd = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD}.slice"
        );
        let cgroupfs = format!("kubepods/burstable/pod{OTHER}");
        let tree = Tree::new(
            "drivers",
            &[
                format!("{systemd}/cri-containerd-abc.scope"),
                format!("{cgroupfs}/0123abcd"),
                "system.slice/containerd.service".to_owned(),
                format!(
                    "kubepods/besteffort/pod{}",
                    "21111111-2222-4333-8444-555555555555"
                ),
            ],
        );
        let pods = BTreeMap::from([
            (uid(UID), "shop/proxy".to_owned()),
            (uid(OTHER), "shop/sandbox".to_owned()),
        ]);
        let found = paths(&tree.0, &pods);
        assert_eq!(found, [PathBuf::from(cgroupfs), PathBuf::from(systemd)]);
        let only_one = BTreeMap::from([(uid(OTHER), "shop/sandbox".to_owned())]);
        assert_eq!(paths(&tree.0, &only_one).len(), 1);
        assert!(paths(&tree.0, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn the_walk_is_bounded_in_depth_and_names_the_pod() {
        let deep = (0..MAX_DEPTH).map(|i| format!("l{i}")).collect::<Vec<_>>();
        let too_deep = format!("{}/pod{UID}", deep.join("/"));
        let deepest = format!("{}/pod{OTHER}", deep[..MAX_DEPTH - 1].join("/"));
        let tree = Tree::new("depth", &[too_deep, deepest.clone()]);
        let pods = BTreeMap::from([
            (uid(UID), "a/too-deep".to_owned()),
            (uid(OTHER), "a/deepest".to_owned()),
        ]);
        assert_eq!(paths(&tree.0, &pods), [PathBuf::from(&deepest)]);
        let (mut found, mut problems) = (BTreeMap::new(), Vec::new());
        add(&tree.0, &pods, &mut found, &mut problems);
        let entry = found.into_values().next().unwrap();
        assert_eq!(entry.pod.as_deref(), Some("a/deepest"));
    }
}
