//! Pinned state of an earlier layout (see `MAPS_FOLDER`): found before loading, so that the
//! agent knows it upgrades, and removed once this layout's programs have replaced the old ones
//! (their link pins are shared, so the swap itself is the usual hitless one).

use crate::datapath::pinned::PinnedMaps;
use anyhow::{bail, Context, Result};
use lb_common::names::{LAYOUT2_MAPS, MAP_META, RETIRED_PROGRAMS};
use lb_common::META_MAGIC;
use std::path::{Path, PathBuf};

/// The one earlier layout this agent upgrades from.
pub const UPGRADES_FROM: u32 = 2;

/// The layout version of maps pinned in the pin folder itself (layout 2 and earlier), if any.
/// Only layout 2 is taken over; anything else there is refused, never removed.
pub fn find(pin_dir: &Path) -> Result<Option<u32>> {
    if !pin_dir.join(MAP_META).exists() {
        return Ok(None);
    }
    let meta = PinnedMaps::read_meta(pin_dir)
        .with_context(|| format!("reading {}", pin_dir.join(MAP_META).display()))?;
    // A zero magic: the old agent created its maps and died before writing LB_META.
    if meta.magic == 0 || (meta.magic == META_MAGIC && meta.layout_version == UPGRADES_FROM) {
        return Ok(Some(UPGRADES_FROM));
    }
    bail!(
        "pinned state in {} has layout version {} (magic {:#x}); this agent upgrades only from \
         layout {UPGRADES_FROM}. Remove it with `lb-agent detach --pin-dir {}` (interrupts \
         balancing) or run a matching agent",
        pin_dir.display(),
        meta.layout_version,
        meta.magic,
        pin_dir.display()
    )
}

/// Everything of the earlier layout that may be in `pin_dir`: its maps, and the link pins of
/// programs this layout no longer has.
pub fn pins(pin_dir: &Path) -> Vec<PathBuf> {
    let links = RETIRED_PROGRAMS
        .iter()
        .flat_map(|p| crate::lifecycle::link_pins(p));
    LAYOUT2_MAPS
        .iter()
        .map(|m| m.to_string())
        .chain(links)
        .map(|name| pin_dir.join(name))
        .collect()
}

/// Removes `pins(pin_dir)`; missing ones are fine (an interrupted earlier removal).
pub fn remove(pin_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for path in pins(pin_dir) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    Ok(removed)
}
