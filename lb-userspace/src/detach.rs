//! `lb-agent detach`: remove the link pin (the program stops translating) and the map pins.

use crate::lock;
use anyhow::{Context, Result};
use lb_common::names::{ALL_MAPS, LINK_CONNECT4, LINK_CONNECT4_NEW};
use std::path::Path;

pub fn detach(pin_dir: &Path) -> Result<()> {
    // A running agent would keep writing maps nobody reads; make the operator stop it first.
    let lock = lock::acquire(pin_dir)?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        lock.remove();
        return Ok(());
    }
    for name in [LINK_CONNECT4, LINK_CONNECT4_NEW]
        .into_iter()
        .chain(ALL_MAPS)
    {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    let _ = std::fs::remove_file(crate::status_file::path(pin_dir));
    std::fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "{} still holds other files; left in place",
            pin_dir.display()
        )
    })?;
    lock.remove();
    Ok(())
}
