//! Where the binaries under test are, and unique names for what a test creates.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The folder holding the workspace binaries: test executables live in `target/<profile>/deps`,
/// binaries (and the demo, which is `lb-testkit` itself) in `target/<profile>`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable path");
    let dir = exe.parent().expect("executable has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

/// The workspace's target folder: `CARGO_TARGET_DIR` when it is an absolute path (a relative
/// one is relative to wherever cargo was started, which a test cannot know), else the folder
/// above this executable that cargo marked with `CACHEDIR.TAG` (so `target/<triple>/<profile>`
/// works too), else the parent of the profile folder.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    let bins = bin_dir();
    bins.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(PathBuf::from)
        .unwrap_or_else(|| bins.parent().unwrap_or(&bins).to_path_buf())
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("lb-agent"))
}

pub fn testkit_bin() -> PathBuf {
    std::env::var_os("LB_TESTKIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("lb-testkit"))
}

/// `lbtest-<pid>-<n>`: unique per process and call, recognisable as ours when cleaning up.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "lbtest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
