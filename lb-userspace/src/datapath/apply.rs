//! Applying a reconcile plan to the maps, in order; see `reconcile` for why any prefix of the
//! operations leaves a consistent data plane.

use crate::codec::backend_value;
use crate::datapath::maps::Maps;
use crate::datapath::ops::Op;
use anyhow::{Context, Result};
use lb_common::{ServiceKey, ServiceName, ServiceValue};

/// Applies operations in order and stops at the first failure; see `reconcile` for why any
/// prefix leaves a consistent data plane. A run of service entries or of names is written as
/// one batch (in order, so a failure still leaves a prefix).
pub fn apply(dp: &mut impl Maps, ops: &[Op]) -> Result<()> {
    let mut rest = ops;
    while let Some(op) = rest.first() {
        let services: Vec<(ServiceKey, ServiceValue)> = rest
            .iter()
            .map_while(|op| match op {
                Op::PutService { key, value } => Some((*key, *value)),
                _ => None,
            })
            .collect();
        let names: Vec<(u32, ServiceName)> = rest
            .iter()
            .map_while(|op| match op {
                Op::PutName { service_id, name } => Some((*service_id, ServiceName::new(name))),
                _ => None,
            })
            .collect();
        let done = if services.len() > 1 {
            dp.put_services(&services)
                .with_context(|| format!("writing {} service entries", services.len()))?;
            services.len()
        } else if names.len() > 1 {
            dp.put_names(&names)
                .with_context(|| format!("writing {} service names", names.len()))?;
            names.len()
        } else {
            apply_one(dp, op).with_context(|| format!("applying {op:?}"))?;
            1
        };
        rest = &rest[done..];
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
