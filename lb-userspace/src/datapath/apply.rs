//! Applying a reconcile plan to the maps, in order; see `reconcile` for why any prefix of the
//! operations leaves a consistent data plane.

use crate::codec::backend_value;
use crate::datapath::maps::Maps;
use crate::datapath::ops::Op;
use anyhow::{Context, Result};
use lb_common::{ServiceName, SlotKey};

/// Applies operations in order and stops at the first failure; see `reconcile` for why any
/// prefix leaves a consistent data plane.
pub fn apply(dp: &mut impl Maps, ops: &[Op]) -> Result<()> {
    for op in ops {
        apply_one(dp, op).with_context(|| format!("applying {op:?}"))?;
    }
    Ok(())
}

fn apply_one(dp: &mut impl Maps, op: &Op) -> Result<()> {
    match op {
        Op::ResetServiceCounters(id) => dp.reset_service_counters(*id),
        Op::NewBackendGeneration(id) => dp.new_backend_generation(*id),
        Op::PutBackend {
            id,
            addr,
            service_id,
        } => {
            let generation = dp.backend_generation(*id)?;
            dp.put_backend(*id, &backend_value(addr, *service_id, generation))
        }
        Op::PutSlots {
            service_id,
            revision,
            backends,
        } => {
            for (slot, backend) in backends.iter().enumerate() {
                let key = SlotKey {
                    service_id: *service_id,
                    revision: *revision,
                    slot: slot as u32,
                };
                dp.put_slot(&key, *backend)?;
            }
            Ok(())
        }
        Op::PutName { service_id, name } => dp.put_name(*service_id, &ServiceName::new(name)),
        Op::PutService { key, value } => dp.put_service(key, value),
        Op::DeleteService(key) => dp.delete_service(key),
        Op::DeleteSlots {
            service_id,
            revision,
            count,
        } => {
            for slot in 0..*count {
                dp.delete_slot(&SlotKey {
                    service_id: *service_id,
                    revision: *revision,
                    slot,
                })?;
            }
            Ok(())
        }
        Op::DeleteSlot(key) => dp.delete_slot(key),
        Op::DeleteName(id) => dp.delete_name(*id),
        Op::DeleteBackend(id) => dp.delete_backend(*id),
    }
}
