//! Getting the programs into the kernel and out again: one agent per pin folder (`lock`), the
//! cgroup they attach to and those left untranslated (`cgroup`, `pod_cgroups`), an earlier
//! layout's pins (`previous`), loading, pinning and attaching (`loader`), and removing it all
//! (`detach`).

pub mod lock;
pub mod cgroup;
pub mod pod_cgroups;
pub mod previous;
pub mod loader;
pub mod detach;

/// Pin of a program's cgroup link, and where a starting agent pins its replacement first.
/// Link pins sit in the pin folder itself, whatever the layout, so that a new layout's
/// program replaces the old one's by the same rename.
pub fn link_pins(program: &str) -> [String; 2] {
    [format!("{program}_link"), format!("{program}_link_new")]
}
