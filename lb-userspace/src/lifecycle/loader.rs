//! Loading the embedded eBPF object, adopting pinned maps and attaching to the cgroup.
//!
//! Start-up never interrupts traffic that an earlier agent set up: the maps are pinned by name,
//! so loading reuses them with their contents; the agent fills them (an upgrade from an
//! earlier layout starts with empty ones) before any program is attached; each new program is
//! attached next to the old one (cgroup links always allow several programs; the second
//! connect program sees an already-translated address, which is no VIP, and leaves it alone),
//! and only then its link pin is moved to the new link, which detaches the old program.

use crate::datapath::capacity::Capacity;
use crate::datapath::pinned::{check_pinned, maps_dir, pinned_capacity, specs, PinnedMaps};
use crate::lifecycle::{link_pins, previous};
use crate::private_files::private_dir;
use anyhow::{bail, Context, Result};
use aya::programs::{
    links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramInfo,
    SockOps,
};
use aya::{Ebpf, EbpfLoader};
use lb_common::names::{
    MAP_AFFINITY, MAP_BACKENDS, MAP_META, MAP_SERVICES, MAP_SLOTS, PROGRAMS, PROG_SKB_EGRESS,
    PROG_SKB_INGRESS, PROG_SOCK_OPS,
};
use lb_common::{Meta, LAYOUT_VERSION, META_MAGIC};
use serde::{Deserialize, Serialize};
use std::path::Path;

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT_PATH"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `pin_dir` can hold pins: mounts bpffs on /sys/fs/bpf if nothing is mounted there
/// and creates the folder, or checks the one that exists.
///
/// Whoever can write to the pin folder can unlink the link pins (which detaches balancing for
/// the host) or pin maps of their own for the agent to adopt, so the folder must be this
/// user's and writable by nobody else; one that is not is refused, never repaired.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().context("--pin-dir must not be /")?;
    // A pin folder that is itself a bpffs mount (a container given only its own folder) needs
    // no mount, and could not have one: that takes CAP_SYS_ADMIN.
    if !is_bpffs(pin_dir) && parent == Path::new("/sys/fs/bpf") && !is_bpffs(parent) {
        mount_bpffs(parent)?;
    }
    private_dir(pin_dir, "pin folder")?;
    if !is_bpffs(pin_dir) {
        bail!(
            "{} is not on a bpf file system (mount -t bpf bpf <dir>)",
            pin_dir.display()
        );
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounted 0700 rather than bpffs's default 1777, so that only root can pin anything next to
/// the agent's folder.
fn mount_bpffs(at: &Path) -> Result<()> {
    tracing::info!(path = %at.display(), "mounting bpffs (mode 0700)");
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "cannot mount bpffs on {}: {}",
            at.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Refuses pinned state this agent would misread: an `LB_META` of another layout version or
/// maps whose kind or sizes differ. Returns the capacity of the maps found (`None`: a fresh
/// folder). Maps are sized by the first agent that creates them; a later one adopts their
/// sizes, whatever it would have chosen (`wanted`, used only to check a set that an
/// interrupted first start left incomplete).
pub fn check_existing_pins(pin_dir: &Path, wanted: &Capacity) -> Result<Option<Capacity>> {
    let dir = maps_dir(pin_dir);
    // An interrupted first start may have left only some maps: they must match `wanted`.
    let sized_by = [MAP_SERVICES, MAP_BACKENDS, MAP_SLOTS, MAP_AFFINITY];
    let capacity = if sized_by.iter().all(|m| dir.join(m).exists()) {
        pinned_capacity(&dir)?
    } else {
        *wanted
    };
    let specs = specs(&capacity);
    let present: Vec<_> = specs.iter().filter(|s| dir.join(s.name).exists()).collect();
    for s in &present {
        check_pinned(&dir, s)?;
    }
    if dir.join(MAP_META).exists() {
        check_meta(&PinnedMaps::read_meta(&dir)?, pin_dir)?;
    }
    Ok((!present.is_empty()).then_some(capacity))
}

/// A zero magic is a folder whose maps were created but whose first agent died before writing
/// `LB_META`: ours, and empty.
fn check_meta(meta: &Meta, pin_dir: &Path) -> Result<()> {
    if meta.magic == 0 || (meta.magic == META_MAGIC && meta.layout_version == LAYOUT_VERSION) {
        return Ok(());
    }
    bail!(
        "pinned state in {} has layout version {} (magic {:#x}); this agent writes version \
         {LAYOUT_VERSION}. Remove it with `lb-agent detach --pin-dir {}` (interrupts balancing) \
         or run a matching agent",
        pin_dir.display(),
        meta.layout_version,
        meta.magic,
        pin_dir.display()
    )
}

pub struct LoadOptions<'a> {
    pub pin_dir: &'a Path,
    pub cgroup: &'a Path,
    pub bpf_log: bool,
    /// Attach the per-packet byte counters (`count_bytes` in the config).
    pub count_bytes: bool,
    /// The sizes of maps created now; maps found pinned keep theirs.
    pub capacity: Capacity,
}

/// The byte counters, attached only when asked for: they run for every packet of the cgroup.
pub const BYTE_COUNTERS: [&str; 2] = [PROG_SKB_EGRESS, PROG_SKB_INGRESS];

/// The object loaded with its maps pinned and opened, its programs not yet attached: the
/// agent fills the maps first.
pub struct Loaded {
    pub maps: PinnedMaps,
    /// Present when eBPF logging was asked for.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub programs: Programs,
}

/// The loaded programs, to attach once the maps are filled.
pub struct Programs {
    ebpf: Ebpf,
    /// Maps that found filled by an earlier agent of this layout.
    adopted: bool,
    /// The earlier layout whose programs these replace.
    upgrades_from: Option<u32>,
}

/// What the verifier made of one program; `stats` shows it so that growth is visible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgramSize {
    pub name: String,
    /// Instructions the verifier processed (kernel 5.16+; 0 when unknown).
    pub verified_insns: u32,
    /// Bytes of translated eBPF and of JIT-compiled machine code.
    pub xlated_bytes: u32,
    pub jited_bytes: u32,
    /// Runs and total run time so far; counted only while BPF run-time statistics are on
    /// (`lb-agent stats --interval` turns them on for its sampling window).
    #[serde(default)]
    pub run_count: u64,
    #[serde(default)]
    pub run_time_ns: u64,
    /// Over the sampling interval: runs per second and the average cost of one run.
    #[serde(default)]
    pub runs_per_s: Option<f64>,
    #[serde(default)]
    pub ns_per_run: Option<f64>,
}

impl ProgramSize {
    fn of(name: &str, info: &ProgramInfo) -> Self {
        Self {
            name: name.to_owned(),
            verified_insns: info.verified_instruction_count().unwrap_or(0),
            xlated_bytes: info.size_translated().unwrap_or(0),
            jited_bytes: info.size_jitted(),
            run_count: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
            runs_per_s: None,
            ns_per_run: None,
        }
    }
}

/// The programs attached through `pin_dir`'s link pins, as the kernel reports them now (no
/// agent needed).
pub fn attached_programs(pin_dir: &Path) -> Vec<ProgramSize> {
    let loaded: Vec<ProgramInfo> = aya::programs::loaded_programs().flatten().collect();
    PROGRAMS
        .iter()
        .chain(&BYTE_COUNTERS)
        .filter_map(|name| {
            let [pin, _] = link_pins(name);
            let link: FdLink = aya::programs::links::PinnedLink::from_pin(pin_dir.join(pin))
                .ok()?
                .into();
            let id = link.info().ok()?.program_id();
            let info = loaded.iter().find(|p| p.id() == id)?;
            Some(ProgramSize::of(name, info))
        })
        .collect()
}

/// Loads the object, creating this layout's pinned maps or reusing them.
pub fn load(opts: &LoadOptions) -> Result<Loaded> {
    let found = check_existing_pins(opts.pin_dir, &opts.capacity)?;
    let adopted = found.is_some();
    let capacity = found.unwrap_or(opts.capacity);
    if capacity != opts.capacity {
        tracing::info!(
            ?capacity,
            wanted = ?opts.capacity,
            "the pinned maps keep the capacity they were created with"
        );
    }
    let upgrades_from = previous::find(opts.pin_dir)?;
    let dir = maps_dir(opts.pin_dir);
    private_dir(&dir, "maps folder")?;
    // aya-log's level filter is read by the program on every log call: 0 turns them all off,
    // 5 (trace) lets every level through.
    let level: u8 = if opts.bpf_log { 5 } else { 0 };
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(&dir)
        .override_global("AYA_LOG_LEVEL", &level, false);
    for spec in specs(&capacity) {
        // Socket storage takes no size; the others are sized for `capacity`.
        if spec.max_entries > 0 {
            loader.map_max_entries(spec.name, spec.max_entries);
        }
    }
    let mut ebpf = loader
        .load(OBJECT)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    let mut maps = PinnedMaps::open(opts.pin_dir)?;
    maps.set_meta(Meta {
        magic: META_MAGIC,
        layout_version: LAYOUT_VERSION,
    })?;
    let logger = if opts.bpf_log {
        Some(aya_log::EbpfLogger::init(&mut ebpf)?)
    } else {
        None
    };
    Ok(Loaded {
        maps,
        logger,
        programs: Programs {
            ebpf,
            adopted,
            upgrades_from,
        },
    })
}

impl Programs {
    /// Attaches every program next to its predecessor and moves the link pins, then removes
    /// what an earlier layout left.
    pub fn attach(mut self, opts: &LoadOptions) -> Result<()> {
        let cgroup = std::fs::File::open(opts.cgroup)
            .with_context(|| format!("cannot open cgroup {}", opts.cgroup.display()))?;
        let skb: &[&str] = if opts.count_bytes {
            &BYTE_COUNTERS
        } else {
            &[]
        };
        for name in PROGRAMS.iter().chain(skb) {
            let (link, size) = attach(&mut self.ebpf, name, &cgroup)
                .with_context(|| format!("program {name}, cgroup {}", opts.cgroup.display()))?;
            swap_link_pin(opts.pin_dir, name, link)?;
            tracing::debug!(?size, "attached");
        }
        if !opts.count_bytes {
            // An earlier agent may have counted bytes: its links are this agent's to remove.
            for name in BYTE_COUNTERS {
                for pin in link_pins(name) {
                    remove_if_present(&opts.pin_dir.join(pin))?;
                }
            }
        }
        // The earlier layout's programs are detached now; their maps only hold memory.
        let removed = previous::remove(opts.pin_dir)?;
        if let Some(from) = self.upgrades_from {
            tracing::info!(from, to = LAYOUT_VERSION, removed, "upgraded the layout");
        }
        tracing::info!(
            pin_dir = %opts.pin_dir.display(),
            cgroup = %opts.cgroup.display(),
            adopted = self.adopted,
            programs = PROGRAMS.len() + skb.len(),
            "programs attached"
        );
        Ok(())
    }
}

/// Loads a program of type `$ty` through the verifier, attaches it with `$attach` (a closure
/// body over the program) and takes its link: the same four steps for every program type,
/// which share no trait in aya.
macro_rules! load_and_link {
    ($program:expr, $ty:ty, $name:expr, |$p:ident| $attach:expr) => {{
        let $p: &mut $ty = $program.try_into()?;
        $p.load().context("the kernel verifier rejected it")?;
        let size = ProgramSize::of($name, &$p.info()?);
        let id = $attach.context("cannot attach")?;
        Ok(($p.take_link(id)?.try_into()?, size))
    }};
}

/// Loads one program through the verifier and attaches it. With bpf_link the kernel always
/// lets several programs share the cgroup and rejects any attach flag, so the mode must be
/// the flag-less one.
fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &std::fs::File) -> Result<(FdLink, ProgramSize)> {
    let program = ebpf
        .program_mut(name)
        .context("missing from the eBPF object")?;
    let single = CgroupAttachMode::Single;
    match name {
        PROG_SOCK_OPS => load_and_link!(program, SockOps, name, |p| p.attach(cgroup, single)),
        PROG_SKB_EGRESS => load_and_link!(program, CgroupSkb, name, |p| p.attach(
            cgroup,
            CgroupSkbAttachType::Egress,
            single
        )),
        PROG_SKB_INGRESS => load_and_link!(program, CgroupSkb, name, |p| p.attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            single
        )),
        _ => load_and_link!(program, CgroupSockAddr, name, |p| p.attach(cgroup, single)),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(pin = %path.display(), "byte counting is off: detached");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Pins the new link under a temporary name, then renames it over the old pin. The old link
/// loses its last reference at the rename and detaches; the new one is already running.
fn swap_link_pin(pin_dir: &Path, program: &str, link: FdLink) -> Result<()> {
    let [final_name, tmp_name] = link_pins(program);
    let final_path = pin_dir.join(final_name);
    let tmp = pin_dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let pinned = link
        .pin(&tmp)
        .with_context(|| format!("cannot pin link at {}", tmp.display()))?;
    std::fs::rename(&tmp, &final_path)
        .with_context(|| format!("cannot move link pin to {}", final_path.display()))?;
    // The pin, not this process, now keeps the program attached.
    drop(pinned);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(magic: u32, layout_version: u32) -> Meta {
        Meta {
            magic,
            layout_version,
        }
    }

    #[test]
    fn accepts_own_layout_and_unwritten_meta() {
        let dir = Path::new("/sys/fs/bpf/lb");
        assert!(check_meta(&meta(META_MAGIC, LAYOUT_VERSION), dir).is_ok());
        assert!(check_meta(&meta(0, 0), dir).is_ok());
    }

    #[test]
    fn refuses_other_layouts_and_foreign_maps_naming_the_fix() {
        let dir = Path::new("/sys/fs/bpf/lb");
        let err = check_meta(&meta(META_MAGIC, LAYOUT_VERSION + 1), dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("layout version {}", LAYOUT_VERSION + 1)),
            "{err}"
        );
        assert!(
            err.contains("lb-agent detach --pin-dir /sys/fs/bpf/lb"),
            "{err}"
        );
        assert!(check_meta(&meta(0xdead_beef, LAYOUT_VERSION), dir).is_err());
    }
}
