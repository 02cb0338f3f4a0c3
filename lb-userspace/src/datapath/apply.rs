//! Applying a reconcile plan to the maps, in order; see `reconcile` for why any prefix of the
//! operations leaves a consistent data plane.

use crate::codec::backend_value;
use crate::datapath::maps::Maps;
use crate::datapath::ops::Op;
use anyhow::{Context, Result};
use lb_common::ServiceName;

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
        Op::PutBackend {
            id,
            addr,
            service_id,
        } => {
            dp.new_backend_generation(*id)?;
            let generation = dp.backend_generation(*id)?;
            dp.put_backend(*id, &backend_value(addr, *service_id, generation))
        }
        Op::PutSlots { base, backends } => dp.put_slots(*base, backends),
        Op::PutName { service_id, name } => dp.put_name(*service_id, &ServiceName::new(name)),
        Op::PutService { key, value } => dp.put_service(key, value),
        Op::DeleteService(key) => dp.delete_service(key),
        Op::DeleteName(id) => dp.delete_name(*id),
        Op::DeleteBackend(id) => dp.delete_backend(*id),
    }
}
