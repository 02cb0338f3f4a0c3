//! Names under which maps, programs and links are pinned in the bpffs folder. Kernel object
//! names are limited to 15 bytes, so every map name fits in that.

pub const MAP_SERVICES: &str = "LB_SERVICES";
pub const MAP_SLOTS: &str = "LB_SLOTS";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_BACKEND_COUNTERS: &str = "LB_BACKEND_CTRS";
pub const MAP_SERVICE_COUNTERS: &str = "LB_SERVICE_CTRS";
pub const MAP_SERVICE_NAMES: &str = "LB_SVC_NAMES";
pub const MAP_META: &str = "LB_META";

/// All pinned maps, in the order `lb-agent detach` removes them.
pub const ALL_MAPS: [&str; 7] = [
    MAP_SERVICES,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_BACKEND_COUNTERS,
    MAP_SERVICE_COUNTERS,
    MAP_SERVICE_NAMES,
    MAP_META,
];

pub const PROG_CONNECT4: &str = "lb_connect4";
/// Pin of the cgroup link: while it exists the program stays attached without any agent.
pub const LINK_CONNECT4: &str = "lb_connect4_link";
/// Where a starting agent pins its new link before renaming it over the old one (bpffs
/// rejects names with dots).
pub const LINK_CONNECT4_NEW: &str = "lb_connect4_link_new";
