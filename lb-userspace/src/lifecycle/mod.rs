//! Getting the programs into the kernel and out again: one agent per pin folder (`lock`), the
//! cgroup they attach to (`cgroup`), loading, pinning and attaching (`loader`), and removing it
//! all (`detach`).

pub mod lock;
pub mod cgroup;
pub mod loader;
pub mod detach;
