//! `lb-agent detach`: remove the link pins (the programs stop translating) and the map pins.
//!
//! The kernel releases a link whose last pin is removed from a work queue, a moment after the
//! unlink returns; detach waits for that, so that translation has stopped when it returns.

use crate::datapath::pinned::maps_dir;
use crate::lifecycle::loader::BYTE_COUNTERS;
use crate::lifecycle::{link_pins, lock, previous};
use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use lb_common::names::{ALL_MAPS, PROGRAMS, RETIRED_PROGRAMS};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long detach waits for the kernel to release the programs.
const UNLOAD_WAIT: Duration = Duration::from_secs(5);

pub fn detach(pin_dir: &Path) -> Result<()> {
    // A running agent would keep writing maps nobody reads; make the operator stop it first.
    let lock = lock::acquire(pin_dir)?;
    if !pin_dir.exists() {
        println!("nothing pinned at {}", pin_dir.display());
        lock.remove();
        return Ok(());
    }
    let links: Vec<String> = PROGRAMS
        .iter()
        .chain(&BYTE_COUNTERS)
        .chain(&RETIRED_PROGRAMS)
        .flat_map(|p| link_pins(p))
        .collect();
    let programs = attached_program_ids(pin_dir, &links);
    let maps = maps_dir(pin_dir);
    let pins = links
        .iter()
        .map(|name| pin_dir.join(name))
        .chain(previous::pins(pin_dir))
        .chain(ALL_MAPS.iter().map(|m| maps.join(m)));
    for path in pins {
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    wait_until_unloaded(&programs);
    let _ = std::fs::remove_file(crate::status::path(pin_dir));
    match std::fs::remove_dir(&maps) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("{} still holds other files", maps.display()))
        }
        _ => {}
    }
    std::fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "{} still holds other files; left in place",
            pin_dir.display()
        )
    })?;
    lock.remove();
    Ok(())
}

/// The programs the link pins attach, read before the pins go.
fn attached_program_ids(pin_dir: &Path, links: &[String]) -> BTreeSet<u32> {
    links
        .iter()
        .filter_map(|name| {
            let link: FdLink = PinnedLink::from_pin(pin_dir.join(name)).ok()?.into();
            Some(link.info().ok()?.program_id())
        })
        .collect()
}

/// Waits (bounded) until none of `programs` is loaded any more: the kernel detaches a link
/// before it frees its program, so then nothing translates. A program that outlives the bound
/// is held by some other process; that is said, not hidden.
fn wait_until_unloaded(programs: &BTreeSet<u32>) {
    let deadline = Instant::now() + UNLOAD_WAIT;
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(|p| p.ok().map(|p| p.id()))
            .filter(|id| programs.contains(id))
            .collect();
        if loaded.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: programs {loaded:?} are still loaded {}s after their links were \
                 removed: another process holds them",
                UNLOAD_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
