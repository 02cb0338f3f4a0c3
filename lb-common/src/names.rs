//! Names under which maps, programs and links are pinned in the bpffs folder. Kernel object
//! names are limited to 15 bytes, so every map name fits in that.

pub const MAP_SERVICES: &str = "LB_SERVICES";
pub const MAP_SLOTS: &str = "LB_SLOTS";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_BACKEND_COUNTERS: &str = "LB_BACKEND_CTRS";
pub const MAP_SERVICE_COUNTERS: &str = "LB_SERVICE_CTRS";
pub const MAP_SERVICE_NAMES: &str = "LB_SVC_NAMES";
pub const MAP_META: &str = "LB_META";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
pub const MAP_SOCKETS: &str = "LB_SOCKETS";
pub const MAP_BYPASS: &str = "LB_BYPASS";

/// The folder under the pin folder that holds this layout's maps (`LB_META` says the same
/// version inside). Each layout has its own, so that an agent of a new layout can build its
/// maps beside the old ones while the old programs keep serving, and swap programs only when
/// its maps are filled. Layout 2 and earlier pinned their maps in the pin folder itself.
pub const MAPS_FOLDER: &str = "layout-3";

/// The maps layout 2 pinned in the pin folder itself.
pub const LAYOUT2_MAPS: [&str; 10] = [
    "LB_SERVICES",
    "LB_FAIL_STREAK",
    "LB_AFFINITY",
    "LB_REVERSE",
    "LB_SLOTS",
    "LB_BACKENDS",
    "LB_BACKEND_CTRS",
    "LB_SERVICE_CTRS",
    "LB_SVC_NAMES",
    "LB_META",
];

/// All pinned maps, in the order `lb-agent detach` removes them.
pub const ALL_MAPS: [&str; 10] = [
    MAP_SERVICES,
    MAP_BYPASS,
    MAP_AFFINITY,
    MAP_SOCKETS,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_BACKEND_COUNTERS,
    MAP_SERVICE_COUNTERS,
    MAP_SERVICE_NAMES,
    MAP_META,
];

/// Every program, attached to the cgroup in this order. The reverse-translation programs go
/// first so that a socket translated by the new connect programs is always shown its VIP.
/// Each has a link pinned as `<name>_link` (while it exists the program stays attached without
/// any agent); a starting agent pins its new link as `<name>_link_new` and renames it over
/// the old one (bpffs rejects names with dots).
pub const PROGRAMS: [&str; 9] = [
    "lb_sock_ops",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_connect4",
    "lb_connect6",
];
/// Programs an earlier layout attached that this one has not: a starting agent removes their
/// link pins once its own programs run. (Layout 2's `sock_release` deleted reverse entries,
/// which per-socket storage no longer needs.)
pub const RETIRED_PROGRAMS: [&str; 1] = ["lb_sock_release"];
/// Programs of other kinds than `cgroup_sock_addr`.
pub const PROG_SOCK_OPS: &str = "lb_sock_ops";
/// Byte and packet counting (`cgroup_skb`), attached only while the config asks for it.
pub const PROG_SKB_EGRESS: &str = "lb_skb_egress";
pub const PROG_SKB_INGRESS: &str = "lb_skb_ingress";
