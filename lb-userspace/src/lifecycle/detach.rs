//! `lb-agent detach`: remove the link pins (the programs stop translating) and the map pins.

use crate::lifecycle::loader::link_pins;
use crate::lifecycle::loader::BYTE_COUNTERS;
use crate::lifecycle::lock;
use anyhow::{Context, Result};
use lb_common::names::{ALL_MAPS, PROGRAMS};
use std::path::Path;

pub fn detach(pin_dir: &Path) -> Result<()> {
    // A running agent would keep writing maps nobody reads; make the operator stop it first.
    let lock = lock::acquire(pin_dir)?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        lock.remove();
        return Ok(());
    }
    let links = PROGRAMS
        .iter()
        .chain(&BYTE_COUNTERS)
        .flat_map(|p| link_pins(p));
    for name in links.chain(ALL_MAPS.iter().map(|m| m.to_string())) {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    let _ = std::fs::remove_file(crate::status::path(pin_dir));
    std::fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "{} still holds other files; left in place",
            pin_dir.display()
        )
    })?;
    lock.remove();
    Ok(())
}
