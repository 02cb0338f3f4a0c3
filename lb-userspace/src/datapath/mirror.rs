//! What the maps hold, kept in the agent's memory between reconciles: read from the maps once
//! (at start, and again after any plan that failed to be made or applied), then brought up to
//! date with the operations of every plan applied in full. A change then costs what it
//! touches, not a read of 250,000 services.
//!
//! The maps stay the source of truth: whatever goes wrong, the mirror is dropped and read anew.

use crate::codec::Mode;
use crate::config::Name;
use crate::datapath::free::Pools;
use crate::datapath::installed::{read_installed, Installed, InstalledService};
use crate::datapath::maps::Maps;
use crate::datapath::ops::Op;
use anyhow::Result;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub installed: Installed,
    pub pools: Pools,
}

impl Mirror {
    /// Reads everything, leftovers of interrupted updates included.
    pub fn read(dp: &impl Maps) -> Result<Self> {
        let installed = read_installed(dp, true)?;
        let pools = Pools::new(&installed);
        Ok(Self { installed, pools })
    }

    /// `ops` were all applied: the maps now hold what they say, and what the plan freed is
    /// free.
    pub fn record(&mut self, ops: Vec<Op>) {
        let installed = &mut self.installed;
        let mut tables: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut names: HashMap<u32, Name> = HashMap::new();
        for op in ops {
            match op {
                Op::ResetServiceCounters(_) => {}
                Op::PutBackend { id, addr, .. } => installed.backends.insert(id, addr),
                Op::PutSlots { base, backends } => {
                    tables.insert(base, backends);
                }
                Op::PutName { service_id, name } => {
                    names.insert(service_id, name);
                }
                Op::PutService { key, value } => {
                    let before = installed.services.remove(&key);
                    let slots = tables.remove(&value.slot_base).unwrap_or_default();
                    let name = names
                        .remove(&value.id)
                        .or_else(|| before.map(|b| b.name))
                        .unwrap_or_default();
                    let service = InstalledService {
                        id: value.id,
                        revision: value.revision,
                        slot_base: value.slot_base,
                        name,
                        slot_count: value.slot_count,
                        mode: Mode::from_value(&value),
                        complete: slots.len() == value.slot_count as usize,
                        slots,
                    };
                    installed.services.insert(key, service);
                }
                Op::DeleteService(key) => {
                    installed.services.remove(&key);
                }
                Op::DeleteName(id) => {
                    names.remove(&id);
                    installed.stray_names.retain(|s| *s != id);
                }
                Op::DeleteBackend(id) => {
                    installed.backends.remove(id);
                }
            }
        }
        // A rename that left the table alone (only a config reload renames, and that costs a
        // pass over every service anyway).
        if !names.is_empty() {
            for service in installed.services.values_mut() {
                if let Some(name) = names.remove(&service.id) {
                    service.name = name;
                }
            }
        }
        self.pools.commit();
    }
}
