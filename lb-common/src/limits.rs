//! Capacities. The `MAX_*` ones are the maps' sizes as compiled; the agent sizes the maps when
//! it first creates them (`lb-agent run --max-services` etc., or from the config) and later
//! agents read the sizes back from the pinned maps. `LIMIT_*` bound what may be asked for.

/// Entries of the services map (distinct VIP:port:protocol), unless sized otherwise.
pub const MAX_SERVICES: u32 = 65_536;
/// Backend ids index the counter array, so they are dense: 0..capacity.
pub const MAX_BACKENDS: u32 = 65_536;
/// The most services, backends and slots the maps may be sized for: 16× the 250,000 services
/// this project is measured with, and a slot array of at most 1 GiB.
pub const LIMIT_SERVICES: u32 = 1 << 22;
pub const LIMIT_BACKENDS: u32 = 1 << 24;
pub const LIMIT_SLOTS: u32 = 1 << 28;
/// Remembered client choices (client affinity) at most: about 100 bytes each, preallocated.
pub const LIMIT_AFFINITY: u32 = 1 << 24;
/// Upper bound on a `random` service's weighted table. Weights are reduced by their gcd and, if
/// the sum still exceeds this, scaled down proportionally (every backend keeps at least one slot).
pub const MAX_RANDOM_SLOTS: u32 = 4_096;
/// Upper bound on any service's table: the largest Maglev lookup table (a prime).
pub const MAX_SLOTS_PER_SERVICE: u32 = 65_537;
/// Slots of the slot array (`LB_SLOTS`): every service's table, in ranges. A table being
/// replaced exists twice for a moment.
pub const MAX_SLOTS: u32 = 1 << 20;
/// Slots per element of `LB_SLOTS`: the kernel rounds array elements up to 8 bytes, so each
/// holds two 4-byte backend ids (slot `i` is half `i % 2` of element `i / 2`).
pub const SLOTS_PER_ENTRY: u32 = 2;
/// Attempts the connect program makes when it loses a race with an update (it read a service
/// revision whose slots were deleted before it read them).
pub const MAX_LOOKUP_ATTEMPTS: u32 = 3;
/// Longest service name stored for `lb-agent stats` (the value holds a NUL terminator).
pub const MAX_NAME_LEN: usize = 63;
/// Entries of the affinity map (LRU): remembered client choices of client-affinity services.
/// LRU maps are preallocated, about 80 bytes an entry.
pub const MAX_AFFINITY: u32 = 65_536;
/// `BPF_F_MMAPABLE`: arrays the agent reads and writes through a shared mapping instead of a
/// syscall per element (counters of a million backends are read in milliseconds).
pub const MMAPABLE_FLAGS: u32 = 1 << 10;
/// Flags of the hash maps the agent writes: `BPF_F_NO_PREALLOC` (see lb-ebpf's maps.rs for why).
/// The agent checks adopted maps against it, so it lives here, once.
pub const AGENT_HASH_FLAGS: u32 = 1;
/// Cgroups `[dataplane] bypass` may list (each also covers everything below it).
pub const MAX_BYPASS: u32 = 1_024;
/// The key of `LB_BYPASS` present whenever some cgroup is bypassed, so that a connect costs
/// one lookup while none is (cgroup ids start at 1).
pub const BYPASS_ANY: u64 = 0;
/// Cgroup levels a connect looks at for a bypassed ancestor: deeper than any hierarchy
/// systemd, Kubernetes and container runtimes make (about 6).
pub const MAX_CGROUP_DEPTH: i32 = 16;
