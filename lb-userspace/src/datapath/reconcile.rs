//! Pure: the ordered map operations that take the data plane from what is installed to what
//! is desired, touching only what changed.
//!
//! Order is the safety argument. For every service: new backends are written first, then the
//! new slot table into a free range of the slot array, then the service entry flips to that
//! range in one map update, then the backends only the old table used are deleted (the old
//! range is free for the next plan). Every prefix of
//! the returned operations therefore leaves each service entry pointing at a complete table of
//! existing backends, so a connect never sees a half-written set, and an update that fails
//! half-way leaves a consistent data plane (the unit tests apply every prefix to check this).

use crate::codec::Mode;
use crate::datapath::free::{CapacityError, IdPool, Pools};
use crate::datapath::installed::{Installed, InstalledService};
use crate::datapath::ops::Op;
use crate::plan::{Bound, Desired, DesiredService};
use lb_common::{ServiceKey, ServiceValue};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Operations in the plan.
    pub map_ops: usize,
}

impl std::ops::AddAssign<&Summary> for Summary {
    fn add_assign(&mut self, step: &Summary) {
        self.added += step.added;
        self.updated += step.updated;
        self.removed += step.removed;
        self.unchanged += step.unchanged;
        self.map_ops += step.map_ops;
    }
}

#[derive(Debug)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub summary: Summary,
    /// Backend ids a service stops using, with the service: their sockets may be terminated
    /// once the plan is applied (`terminate`).
    pub removed: Vec<(u32, ServiceKey)>,
}

/// Which services a plan looks at. A change names the services it touched; everything else
/// is known to be as installed, so the plan costs what the change costs, not what the maps
/// hold.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every service, and the leftovers of interrupted updates (after reading the maps).
    All,
    /// These keys only: `desired` then holds the wanted ones among them, and a key it lacks is
    /// removed.
    Keys(&'a BTreeSet<ServiceKey>),
    /// Every service but these (sorted), which earlier steps planned (`Steps`): like `All`,
    /// with these keys kept as if `desired` held them.
    AllBut(&'a [ServiceKey]),
}

/// Takes ids and ranges from `pools` and releases what the plan frees (usable once it has been
/// applied: `Pools::commit`). A plan that fails to be made or applied leaves `pools` to be
/// rebuilt from the maps.
pub fn reconcile(
    installed: &Installed,
    pools: &mut Pools,
    desired: &Desired,
    scope: Scope,
) -> Result<Plan, CapacityError> {
    let mut ops = Vec::new();
    let mut summary = Summary::default();
    let mut removed = Vec::new();
    for (key, want) in desired {
        match installed.services.get(key) {
            Some(have) => {
                let dropped = update_service(installed, *key, have, want, pools, &mut ops)?;
                match dropped {
                    Some(ids) => {
                        summary.updated += 1;
                        removed.extend(ids.into_iter().map(|id| (id, *key)));
                    }
                    None => summary.unchanged += 1,
                }
            }
            None => {
                add_service(*key, want, pools, &mut ops)?;
                summary.added += 1;
            }
        }
    }
    let mut remove = |key: &ServiceKey, have: &InstalledService| {
        ops.push(Op::DeleteService(*key));
        ops.push(Op::DeleteName(have.id));
        pools.service_ids.release(have.id);
        pools.ranges.release(have.slot_base, have.slot_count);
        for id in have.backend_ids() {
            ops.push(Op::DeleteBackend(id));
            pools.backend_ids.release(id);
            removed.push((id, *key));
        }
        summary.removed += 1;
    };
    match scope {
        Scope::All | Scope::AllBut(_) => {
            let planned = match scope {
                Scope::AllBut(keys) => keys,
                _ => &[],
            };
            for (key, have) in &installed.services {
                if !desired.contains_key(key) && planned.binary_search(key).is_err() {
                    remove(key, have);
                }
            }
            for id in &installed.stray_names {
                ops.push(Op::DeleteName(*id));
                pools.service_ids.release(*id);
            }
            for id in installed.stray_backends() {
                ops.push(Op::DeleteBackend(id));
                pools.backend_ids.release(id);
            }
        }
        Scope::Keys(keys) => {
            for key in keys.iter().filter(|k| !desired.contains_key(k)) {
                if let Some(have) = installed.services.get(key) {
                    remove(key, have);
                }
            }
        }
    }
    // Every service's own order holds (its backends and table, then its entry, then what it
    // no longer uses), and no id or range is both freed and taken in one plan, so the
    // services' steps may be interleaved by phase: the entries then flip in one batch.
    ops.sort_by_key(phase);
    summary.map_ops = ops.len();
    Ok(Plan {
        ops,
        summary,
        removed,
    })
}

/// A plan made and applied a chunk of services at a time, so that what it holds (desired
/// tables and operations) stays bounded however many services change: the first reconcile of
/// 250,000 services would otherwise hold two million operations at once. Each step is a plan
/// of its own, applied and recorded (`Mirror::record`) before the next is made, so the update
/// protocol holds per step as it does per plan. The last step also removes what the scope
/// covers and no step wanted, so services are written before any is removed, as in one plan,
/// and a single step is exactly the one plan.
pub struct Steps<'a> {
    scope: Scope<'a>,
    /// The keys the steps so far wanted: a list, sorted for the last step, takes a third of
    /// a set filled in order (100,000 keys: 2.6 MB, not 3.8).
    planned: Vec<ServiceKey>,
}

impl<'a> Steps<'a> {
    pub fn new(scope: Scope<'a>) -> Self {
        let planned = match scope {
            Scope::AllBut(keys) => keys.to_vec(),
            _ => Vec::new(),
        };
        Self { scope, planned }
    }

    /// The plan of the next chunk, whose wanted services in scope `desired` holds.
    pub fn plan(
        &mut self,
        installed: &Installed,
        pools: &mut Pools,
        desired: &Desired,
        last: bool,
    ) -> Result<Plan, CapacityError> {
        if !last {
            self.planned.extend(desired.keys().copied());
            // No key to remove: the chunk's own services alone.
            return reconcile(installed, pools, desired, Scope::Keys(&BTreeSet::new()));
        }
        self.planned.sort_unstable();
        let planned = |key: &&ServiceKey| self.planned.binary_search(key).is_ok();
        match self.scope {
            Scope::All | Scope::AllBut(_) => {
                reconcile(installed, pools, desired, Scope::AllBut(&self.planned))
            }
            Scope::Keys(keys) => {
                let rest = keys.iter().filter(|k| !planned(k)).copied().collect();
                reconcile(installed, pools, desired, Scope::Keys(&rest))
            }
        }
    }

    /// Refuses, before any step is applied, steps that would not fit the maps as one plan
    /// (nothing a step frees taken by a later one), as one plan is refused whole. `chunks`
    /// gives each step's `desired` anew: planning twice costs less than holding every table,
    /// and is needed only when the maps may not hold what `bound` says the steps take.
    pub fn fit(
        installed: &Installed,
        pools: &Pools,
        bound: &Bound,
        chunks: impl Iterator<Item = Desired>,
    ) -> Result<(), CapacityError> {
        if pools.surely_fit(bound) {
            return Ok(());
        }
        let mut pools = pools.clone();
        for desired in chunks {
            reconcile(
                installed,
                &mut pools,
                &desired,
                Scope::Keys(&BTreeSet::new()),
            )?;
        }
        Ok(())
    }
}

fn add_service(
    key: ServiceKey,
    want: &DesiredService,
    pools: &mut Pools,
    ops: &mut Vec<Op>,
) -> Result<(), CapacityError> {
    let id = pools.service_ids.take()?;
    let base = pools.ranges.take(want.slots.len() as u32)?;
    ops.push(Op::ResetServiceCounters(id));
    ops.push(Op::PutName {
        service_id: id,
        name: want.name.clone(),
    });
    let slots = assign_backends(id, &BTreeMap::new(), want, &mut pools.backend_ids, ops)?;
    write_table(key, (id, 1, base), want.mode, slots, ops);
    Ok(())
}

/// Returns `None` when nothing changed, else the backend ids the service no longer uses.
fn update_service(
    installed: &Installed,
    key: ServiceKey,
    have: &InstalledService,
    want: &DesiredService,
    pools: &mut Pools,
    ops: &mut Vec<Op>,
) -> Result<Option<Vec<u32>>, CapacityError> {
    let owned: BTreeMap<SocketAddr, u32> = have
        .backend_ids()
        .filter_map(|id| installed.backends.get(id).map(|addr| (addr, id)))
        .collect();
    let renamed = have.name != want.name;
    if renamed {
        ops.push(Op::PutName {
            service_id: have.id,
            name: want.name.clone(),
        });
    }
    let mark = ops.len();
    let slots = assign_backends(have.id, &owned, want, &mut pools.backend_ids, ops)?;
    if have.complete && slots == have.slots && have.mode == want.mode {
        ops.truncate(mark);
        return Ok(renamed.then(Vec::new));
    }
    let keep: BTreeSet<u32> = slots.iter().copied().collect();
    let base = pools.ranges.take(slots.len() as u32)?;
    pools.ranges.release(have.slot_base, have.slot_count);
    let revision = have.revision.wrapping_add(1);
    write_table(key, (have.id, revision, base), want.mode, slots, ops);
    let dropped: Vec<u32> = have.backend_ids().filter(|id| !keep.contains(id)).collect();
    for id in &dropped {
        ops.push(Op::DeleteBackend(*id));
        pools.backend_ids.release(*id);
    }
    Ok(Some(dropped))
}

/// Writes before flips before removals; names (read only by `stats`) together, so that they
/// go in batches too.
fn phase(op: &Op) -> u8 {
    match op {
        Op::ResetServiceCounters(_) | Op::PutBackend { .. } | Op::PutSlots { .. } => 0,
        Op::PutName { .. } => 1,
        Op::PutService { .. } => 2,
        Op::DeleteService(_) | Op::DeleteName(_) | Op::DeleteBackend(_) => 3,
    }
}

/// Backend ids for each slot: a backend the service already has keeps its id (and so its
/// counters); a new one gets a fresh id, zeroed and written before any table names it.
fn assign_backends(
    service_id: u32,
    owned: &BTreeMap<SocketAddr, u32>,
    want: &DesiredService,
    backend_ids: &mut IdPool,
    ops: &mut Vec<Op>,
) -> Result<Vec<u32>, CapacityError> {
    let mut fresh = BTreeMap::new();
    want.slots
        .iter()
        .map(|addr| {
            if let Some(id) = owned.get(addr).or_else(|| fresh.get(addr)) {
                return Ok(*id);
            }
            let id = backend_ids.take()?;
            ops.push(Op::PutBackend {
                id,
                addr: *addr,
                service_id,
            });
            fresh.insert(*addr, id);
            Ok(id)
        })
        .collect()
}

/// `table`: service id, revision and where the table goes.
fn write_table(
    key: ServiceKey,
    (id, revision, slot_base): (u32, u32, u32),
    mode: Mode,
    backends: Vec<u32>,
    ops: &mut Vec<Op>,
) {
    let value = ServiceValue {
        id,
        revision,
        slot_base,
        slot_count: backends.len() as u32,
        algorithm: mode.algorithm,
        flags: mode.flags,
        _pad: 0,
        affinity_timeout_s: mode.affinity_timeout_s,
    };
    if !backends.is_empty() {
        ops.push(Op::PutSlots {
            base: slot_base,
            backends,
        });
    }
    ops.push(Op::PutService { key, value });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Admission, Service};
    use crate::codec::{backend_value, service_key, socket_addr};
    use crate::config::{BackendConfig, Protocol};
    use crate::datapath::apply::apply;
    use crate::datapath::capacity::Capacity;
    use crate::datapath::installed::read_installed;
    use crate::datapath::maps::fake::FakeMaps;
    use crate::datapath::mirror::Mirror;
    use crate::plan::desired;

    fn service(name: &str, vip: &str, backends: &[(&str, u32)]) -> Service {
        Service {
            name: name.into(),
            vip: vip.parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: backends
                .iter()
                .map(|(a, w)| BackendConfig {
                    address: a.parse().unwrap(),
                    weight: *w,
                })
                .collect(),
            balancing: Default::default(),
            admission: Admission::default(),
        }
    }

    /// Plans against `dp` and applies the plan. If `dp` starts consistent, every prefix of the
    /// plan is applied to a copy first and must leave it consistent; the end state always must.
    /// The mirror after the plan must be exactly what reading the maps gives.
    fn converge(dp: &mut FakeMaps, cfg: &[Service]) -> Plan {
        let mut mirror = Mirror::read(dp).unwrap();
        let plan = plan_all(&mut mirror, cfg);
        if dp.check_consistent().is_ok() {
            let mut step = dp.clone();
            for op in &plan.ops {
                apply(&mut step, std::slice::from_ref(op)).unwrap();
                step.check_consistent()
                    .unwrap_or_else(|e| panic!("after {op:?}: {e}"));
            }
        }
        apply(dp, &plan.ops).unwrap();
        dp.check_consistent().unwrap();
        mirror.record(plan.ops.clone());
        assert_eq!(
            mirror,
            Mirror::read(dp).unwrap(),
            "the mirror after {plan:?}"
        );
        plan
    }

    fn plan_all(mirror: &mut Mirror, cfg: &[Service]) -> Plan {
        let want = desired(cfg, &|_, _| true).0;
        reconcile(&mirror.installed, &mut mirror.pools, &want, Scope::All).unwrap()
    }

    /// The backend addresses a service's current table names, with multiplicity, sorted.
    fn table(dp: &FakeMaps, vip: &str) -> Vec<String> {
        let installed = read_installed(dp, false).unwrap();
        let key = service_key(vip.parse().unwrap(), Protocol::Tcp);
        let svc = &installed.services[&key];
        let mut t: Vec<String> = svc
            .slots
            .iter()
            .map(|id| installed.backends.get(*id).unwrap().to_string())
            .collect();
        t.sort();
        t
    }

    fn web(backends: &[(&str, u32)]) -> Vec<Service> {
        vec![service("web", "10.96.0.10:80", backends)]
    }

    #[test]
    fn fresh_install_writes_every_service_consistently() {
        let mut dp = FakeMaps::default();
        let cfg = vec![
            service(
                "web",
                "10.96.0.10:80",
                &[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 3)],
            ),
            service("db", "10.96.0.11:5432", &[("10.0.0.3:5432", 1)]),
        ];
        let plan = converge(&mut dp, &cfg);
        assert_eq!(
            plan.summary,
            Summary {
                added: 2,
                map_ops: plan.ops.len(),
                ..Summary::default()
            }
        );
        assert_eq!(
            table(&dp, "10.96.0.10:80"),
            [
                "10.0.0.1:8080",
                "10.0.0.2:8080",
                "10.0.0.2:8080",
                "10.0.0.2:8080"
            ]
        );
        assert_eq!(table(&dp, "10.96.0.11:5432"), ["10.0.0.3:5432"]);
        assert_eq!(dp.names.len(), 2);
        assert_eq!(dp.service_resets.len(), 2);
    }

    #[test]
    fn same_config_again_changes_nothing() {
        let mut dp = FakeMaps::default();
        let cfg = web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 1)]);
        converge(&mut dp, &cfg);
        let plan = converge(&mut dp, &cfg);
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
        assert_eq!(plan.summary.unchanged, 1);
    }

    #[test]
    fn update_moves_the_table_keeps_surviving_backend_ids_and_cleans_up() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 1)]));
        let before = dp.services.values().next().copied().unwrap();
        let kept_id = *dp
            .backends
            .iter()
            .find(|(_, b)| socket_addr(b) == "10.0.0.1:8080".parse().unwrap())
            .unwrap()
            .0;

        let plan = converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.3:8080", 1)]));
        assert_eq!(plan.summary.updated, 1);
        let after = dp.services.values().next().copied().unwrap();
        assert_eq!(after.id, before.id);
        assert_ne!(
            after.slot_base, before.slot_base,
            "a new range, never rewritten in place"
        );
        assert_eq!(after.revision, before.revision + 1);
        assert_eq!(
            table(&dp, "10.96.0.10:80"),
            ["10.0.0.1:8080", "10.0.0.3:8080"]
        );
        assert!(
            dp.backends.contains_key(&kept_id),
            "surviving backend keeps its id"
        );
        assert_eq!(dp.backends.len(), 2, "removed backend deleted");
        // The next update may use the old range again.
        converge(&mut dp, &web(&[("10.0.0.4:8080", 1), ("10.0.0.3:8080", 1)]));
        let third = dp.services.values().next().copied().unwrap();
        assert_eq!(third.slot_base, before.slot_base);
    }

    #[test]
    fn weight_change_rewrites_table_with_same_backends() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 1)]));
        let ids: Vec<u32> = dp.backends.keys().copied().collect();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 2)]));
        assert_eq!(dp.backends.keys().copied().collect::<Vec<_>>(), ids);
        assert_eq!(table(&dp, "10.96.0.10:80").len(), 3);
    }

    #[test]
    fn rename_only_rewrites_the_name() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        let mut cfg = web(&[("10.0.0.1:8080", 1)]);
        cfg[0].name = "frontend".into();
        let plan = converge(&mut dp, &cfg);
        assert!(matches!(plan.ops.as_slice(), [Op::PutName { name, .. }] if &**name == "frontend"));
    }

    #[test]
    fn emptied_service_stays_with_zero_slots_and_no_backends() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        converge(&mut dp, &web(&[]));
        let v = dp.services.values().next().unwrap();
        assert_eq!(v.slot_count, 0);
        assert!(live_slots(&dp).is_empty() && dp.backends.is_empty());
    }

    #[test]
    fn removed_service_leaves_nothing_behind() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 5)]));
        let plan = converge(&mut dp, &[]);
        assert_eq!(plan.summary.removed, 1);
        assert!(dp.services.is_empty() && live_slots(&dp).is_empty());
        assert!(dp.backends.is_empty() && dp.names.is_empty());
    }

    #[test]
    fn new_ids_do_not_reuse_ids_freed_in_the_same_plan() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        let old_backend = *dp.backends.keys().next().unwrap();
        converge(&mut dp, &web(&[("10.0.0.2:8080", 1)]));
        assert_ne!(*dp.backends.keys().next().unwrap(), old_backend);
    }

    #[test]
    fn a_reused_backend_id_is_a_new_generation() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        let first = dp.backends[&0].generation;
        converge(&mut dp, &web(&[]));
        converge(&mut dp, &web(&[("10.0.0.9:8080", 1)]));
        assert_eq!(dp.backends.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(dp.backends[&0].generation, first + 1);
        // A backend that stays keeps its generation (and so its sockets' counting).
        converge(&mut dp, &web(&[("10.0.0.9:8080", 2)]));
        assert_eq!(dp.backends[&0].generation, first + 1);
    }

    #[test]
    fn leftovers_of_an_interrupted_update_are_removed() {
        let mut dp = FakeMaps::default();
        let cfg = web(&[("10.0.0.1:8080", 1)]);
        converge(&mut dp, &cfg);
        let v = *dp.services.values().next().unwrap();
        // An interrupted update's table in a range no service points at: free, nothing to undo.
        dp.slots.insert(v.slot_base + 7, 0);
        dp.backends
            .insert(99, backend_value(&"10.9.9.9:1".parse().unwrap(), 5, 0));
        dp.names.insert(77, lb_common::ServiceName::new("gone"));
        converge(&mut dp, &cfg);
        assert!(!dp.backends.contains_key(&99));
        assert!(!dp.names.contains_key(&77));
    }

    /// Every map entry that counts, for comparing whole data planes: slot array entries only
    /// where a service's table is (the rest is free space, whatever it holds).
    fn entries(dp: &FakeMaps) -> String {
        format!(
            "{:?} {:?} {:?} {:?}",
            dp.services,
            live_slots(dp),
            dp.backends,
            dp.names
        )
    }

    fn live_slots(dp: &FakeMaps) -> Vec<u32> {
        let installed = read_installed(dp, false).unwrap();
        installed
            .services
            .values()
            .flat_map(|s| s.slots.clone())
            .collect()
    }

    /// A plan that fails at any of its operations (an agent killed, ENOMEM, a full map) leaves
    /// every service consistent, and the retry, planned afresh from what the maps then hold,
    /// ends in exactly the data plane an uninterrupted plan gives: no holes, no leftovers.
    #[test]
    fn a_plan_interrupted_at_any_operation_is_finished_exactly_by_the_retry() {
        let one = [("10.0.0.1:8080", 1)];
        let two = [("10.0.0.1:8080", 1), ("10.0.0.2:8080", 2)];
        let other = [("10.0.0.3:8080", 1), ("10.0.0.2:8080", 1)];
        let steps: [(Vec<Service>, Vec<Service>); 4] = [
            // Adding services to an empty data plane.
            (
                vec![],
                vec![
                    service("a", "10.96.0.1:80", &two),
                    service("b", "10.96.0.2:80", &one),
                ],
            ),
            // Swapping a table.
            (web(&two), web(&other)),
            // Removing one service while adding another.
            (web(&one), vec![service("db", "10.96.0.11:5432", &two)]),
            // Emptying a service.
            (web(&two), web(&[])),
        ];
        for (from, to) in steps {
            let mut clean = FakeMaps::default();
            converge(&mut clean, &from);
            let start = clean.clone();
            converge(&mut clean, &to);
            let plan = plan_all(&mut Mirror::read(&start).unwrap(), &to);
            for k in 0..plan.ops.len() {
                let mut dp = start.clone();
                let done = apply(&mut dp, &plan.ops[..k]);
                assert!(done.is_ok(), "the first {k} operations: {done:?}");
                dp.check_consistent()
                    .unwrap_or_else(|e| panic!("interrupted after {k} operations: {e}"));
                // The retry: each of its own prefixes must be consistent too (converge checks).
                converge(&mut dp, &to);
                converge(&mut dp, &to);
                for svc in &to {
                    let vip = svc.vip.to_string();
                    assert_eq!(
                        table(&dp, &vip),
                        table(&clean, &vip),
                        "{vip} after an interruption at operation {k} of {:?}",
                        plan.ops
                    );
                }
                assert_eq!(
                    dp.services.len() + live_slots(&dp).len() + dp.backends.len() + dp.names.len(),
                    clean.services.len()
                        + live_slots(&clean).len()
                        + clean.backends.len()
                        + clean.names.len(),
                    "map entries after an interruption at operation {k}: {} vs {}",
                    entries(&dp),
                    entries(&clean)
                );
                let names: Vec<_> = dp
                    .names
                    .values()
                    .map(|n| n.as_str().map(str::to_owned))
                    .collect();
                let clean_names: Vec<_> = clean
                    .names
                    .values()
                    .map(|n| n.as_str().map(str::to_owned))
                    .collect();
                assert_eq!(names.len(), clean_names.len());
                let mut names = names;
                let mut clean_names = clean_names;
                names.sort();
                clean_names.sort();
                assert_eq!(
                    names, clean_names,
                    "service names after an interruption at {k}"
                );
            }
        }
    }

    /// Plans made for the one service a change touched, from a mirror kept across plans, end
    /// exactly where plans of everything from fresh reads do, and write nothing of the others.
    #[test]
    fn plans_for_the_touched_keys_alone_end_where_full_plans_do() {
        let mut cfg: Vec<Service> = (0..8).map(|i| numbered(i, 2)).collect();
        let (mut scoped, mut full) = (FakeMaps::default(), FakeMaps::default());
        converge(&mut scoped, &cfg);
        converge(&mut full, &cfg);
        let mut mirror = Mirror::read(&scoped).unwrap();
        let mut seed = 7u32;
        for step in 0..300 {
            let key = churn(&mut cfg, &mut seed);
            let touched = BTreeSet::from([key]);
            let changed = cfg.iter().filter(|s| service_key(s.vip, s.protocol) == key);
            let want = desired(changed, &|_, _| true).0;
            let plan = reconcile(
                &mirror.installed,
                &mut mirror.pools,
                &want,
                Scope::Keys(&touched),
            );
            let plan = plan.unwrap();
            let others = |dp: &FakeMaps| {
                let mut d = dp.services.clone();
                d.remove(&key);
                d
            };
            let before = others(&scoped);
            apply(&mut scoped, &plan.ops).unwrap();
            assert_eq!(
                others(&scoped),
                before,
                "step {step}: another service rewritten"
            );
            scoped.check_consistent().unwrap();
            mirror.record(plan.ops);
            assert_eq!(mirror, Mirror::read(&scoped).unwrap(), "step {step}");
            converge(&mut full, &cfg);
            assert_same_tables(&scoped, &full, &cfg, &format!("step {step}"));
        }
    }

    /// Service `i` of the randomised tests: VIP 10.96.0.i:80 with `n` backends.
    fn numbered(i: usize, n: usize) -> Service {
        let backends: Vec<String> = (0..n).map(|b| format!("10.0.{i}.{b}:80")).collect();
        let refs: Vec<(&str, u32)> = backends.iter().map(|b| (b.as_str(), 1)).collect();
        service(&format!("s{i}"), &format!("10.96.0.{i}:80"), &refs)
    }

    /// One pseudo-random change to `cfg`: one of 12 numbered services gets 0 to 3 backends (0
    /// removes it). Returns its key.
    fn churn(cfg: &mut Vec<Service>, seed: &mut u32) -> ServiceKey {
        *seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let (i, n) = ((*seed >> 8) as usize % 12, (*seed >> 20) as usize % 4);
        let changed = numbered(i, n);
        let key = service_key(changed.vip, changed.protocol);
        match (cfg.iter().position(|s| s.vip == changed.vip), n) {
            (Some(at), 0) => drop(cfg.remove(at)),
            (Some(at), _) => cfg[at] = changed,
            (None, _) => cfg.push(changed),
        }
        key
    }

    /// Both data planes hold the same table for every service of `cfg`, and as many entries.
    fn assert_same_tables(a: &FakeMaps, b: &FakeMaps, cfg: &[Service], when: &str) {
        for svc in cfg {
            let v = svc.vip.to_string();
            assert_eq!(table(a, &v), table(b, &v), "{when}: {v}");
        }
        assert_eq!(a.services.len(), b.services.len(), "{when}");
        assert_eq!(a.backends.len(), b.backends.len(), "{when}");
        assert_eq!(a.names.len(), b.names.len(), "{when}");
    }

    /// `cfg` planned and applied in steps of `size` services, from a mirror kept across them:
    /// every prefix of every step consistent, the mirror equal to a fresh read after each.
    fn converge_in_steps(
        dp: &mut FakeMaps,
        mirror: &mut Mirror,
        cfg: &[&Service],
        scope: Scope,
        size: usize,
    ) -> Summary {
        let chunks: Vec<&[&Service]> = match cfg.len() {
            0 => vec![&[]],
            _ => cfg.chunks(size).collect(),
        };
        let want = |chunk: &[&Service]| desired(chunk.iter().copied(), &|_, _| true).0;
        Steps::fit(
            &mirror.installed,
            &mirror.pools,
            &Bound::default(),
            chunks.iter().map(|c| want(c)),
        )
        .unwrap();
        let mut steps = Steps::new(scope);
        let mut summary = Summary::default();
        for (n, chunk) in chunks.iter().enumerate() {
            let last = n + 1 == chunks.len();
            let plan = steps
                .plan(&mirror.installed, &mut mirror.pools, &want(chunk), last)
                .unwrap();
            let mut step = dp.clone();
            for op in &plan.ops {
                apply(&mut step, std::slice::from_ref(op)).unwrap();
                step.check_consistent()
                    .unwrap_or_else(|e| panic!("step {n}, after {op:?}: {e}"));
            }
            apply(dp, &plan.ops).unwrap();
            summary += &plan.summary;
            mirror.record(plan.ops);
            assert_eq!(*mirror, Mirror::read(dp).unwrap(), "after step {n}");
        }
        summary
    }

    /// A change planned and applied a few services at a time ends exactly where one plan of
    /// it does: the same tables, and no map entry more or less (what the scope no longer
    /// wants and the leftovers of interrupted updates removed by the last step).
    #[test]
    fn steps_end_where_one_plan_does() {
        let mut cfg: Vec<Service> = (0..8).map(|i| numbered(i, 2)).collect();
        let (mut stepped, mut full) = (FakeMaps::default(), FakeMaps::default());
        let mut mirror = Mirror::read(&stepped).unwrap();
        let mut seed = 11u32;
        for round in 0..120 {
            let mut touched = BTreeSet::new();
            for _ in 0..(round % 5) {
                touched.insert(churn(&mut cfg, &mut seed));
            }
            if round % 7 == 3 {
                // Leftovers of an interrupted update, for the last step of `All` to remove.
                stepped
                    .backends
                    .insert(200, backend_value(&"10.9.9.9:1".parse().unwrap(), 5, 0));
                stepped
                    .names
                    .insert(300, lb_common::ServiceName::new("gone"));
                mirror = Mirror::read(&stepped).unwrap();
            }
            let size = 1 + round % 3;
            let summary = if round % 2 == 0 || stepped.backends.contains_key(&200) {
                let all: Vec<&Service> = cfg.iter().collect();
                converge_in_steps(&mut stepped, &mut mirror, &all, Scope::All, size)
            } else {
                let key = |s: &&Service| touched.contains(&service_key(s.vip, s.protocol));
                let changed: Vec<&Service> = cfg.iter().filter(key).collect();
                let scope = Scope::Keys(&touched);
                converge_in_steps(&mut stepped, &mut mirror, &changed, scope, size)
            };
            let plan = converge(&mut full, &cfg);
            assert_eq!(summary.removed, plan.summary.removed, "round {round}");
            assert_same_tables(&stepped, &full, &cfg, &format!("round {round}"));
        }
    }

    /// Steps are refused before any is applied when, taken as one plan, they would not fit:
    /// the check plans them all when the maps may be too small, and only then.
    #[test]
    fn steps_that_would_not_fit_as_one_plan_are_refused_whole() {
        let mut dp = FakeMaps {
            capacity: Capacity {
                backends: 6,
                ..Capacity::default()
            },
            ..FakeMaps::default()
        };
        let two = |i: usize| {
            let (a, b) = (format!("10.0.{i}.1:80"), format!("10.0.{i}.2:80"));
            service(
                &format!("s{i}"),
                &format!("10.96.0.{i}:80"),
                &[(&a, 1), (&b, 1)],
            )
        };
        converge(&mut dp, &[two(0), two(1)]);
        let mirror = Mirror::read(&dp).unwrap();
        let want = |cfg: &[Service]| desired(cfg, &|_, _| true).0;
        // Moving both services needs four new backend ids while the old four are in use: two
        // are free.
        let moved = [two(2), two(3)];
        let moved = [
            Service {
                vip: "10.96.0.0:80".parse().unwrap(),
                ..moved[0].clone()
            },
            Service {
                vip: "10.96.0.1:80".parse().unwrap(),
                ..moved[1].clone()
            },
        ];
        let bound = Bound {
            services: 2,
            backends: 4,
            slots: 4,
        };
        let chunks = moved.chunks(1).map(want);
        let err = Steps::fit(&mirror.installed, &mirror.pools, &bound, chunks).unwrap_err();
        assert!(err.0.contains("out of backend ids"), "{err}");
        // Keeping one backend of each needs two new ids: it fits, though the bound says it may not.
        let mut kept = [two(0), two(1)];
        for (service, moved) in kept.iter_mut().zip(["10.0.8.8:80", "10.0.9.9:80"]) {
            let mut backends = service.backends.to_vec();
            backends[1].address = moved.parse().unwrap();
            service.backends = backends.into();
        }
        let chunks = kept.chunks(1).map(want);
        Steps::fit(&mirror.installed, &mirror.pools, &bound, chunks).unwrap();
        // What surely fits is not planned at all.
        let nothing = Bound::default();
        let unplanned = std::iter::from_fn(|| -> Option<Desired> { panic!("planned") });
        Steps::fit(&mirror.installed, &mirror.pools, &nothing, unplanned).unwrap();
    }

    #[test]
    fn incomplete_table_is_written_anew_in_another_range() {
        let mut dp = FakeMaps::default();
        let cfg = web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 1)]);
        converge(&mut dp, &cfg);
        let v = *dp.services.values().next().unwrap();
        dp.slots.insert(v.slot_base + 1, 4242);
        converge(&mut dp, &cfg);
        dp.check_consistent().unwrap();
        assert_ne!(dp.services.values().next().unwrap().slot_base, v.slot_base);
        assert_eq!(
            table(&dp, "10.96.0.10:80"),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
    }

    #[test]
    fn inconsistent_pinned_state_is_refused_not_repaired() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        let (key, v) = dp.services.iter().next().map(|(k, v)| (*k, *v)).unwrap();
        let mut twin = key;
        twin.port = twin.port.wrapping_add(1);

        let mut shared_id = dp.clone();
        shared_id.services.insert(twin, v);
        let err = read_installed(&shared_id, true).unwrap_err().to_string();
        assert!(
            err.contains("service id 0 out of range or repeated"),
            "{err}"
        );

        let mut huge = dp.clone();
        huge.services.insert(
            key,
            ServiceValue {
                slot_count: u32::MAX,
                ..v
            },
        );
        let err = read_installed(&huge, true).unwrap_err().to_string();
        assert!(err.contains("claims 4294967295 slots"), "{err}");

        let mut beyond = dp.clone();
        beyond.services.insert(
            key,
            ServiceValue {
                slot_base: dp.capacity.slots,
                ..v
            },
        );
        let err = read_installed(&beyond, true).unwrap_err().to_string();
        assert!(err.contains("beyond the slot array"), "{err}");

        // A table naming another service's backend is not taken as owning it: rewritten.
        let mut stolen = dp.clone();
        let other = ServiceValue {
            id: 1,
            slot_base: 100,
            ..v
        };
        stolen.services.insert(twin, other);
        stolen.slots.insert(100, 0);
        let installed = read_installed(&stolen, true).unwrap();
        let one = installed.services.values().find(|s| s.id == 1).unwrap();
        assert!(!one.complete && one.slots.is_empty(), "{one:?}");
    }

    #[test]
    fn too_many_backends_is_a_capacity_error_that_changes_nothing() {
        let installed = Installed::default();
        let backends: Vec<(String, u32)> = (0..lb_common::MAX_BACKENDS + 1)
            .map(|i| {
                (
                    format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255),
                    1,
                )
            })
            .collect();
        let services: Vec<Service> = backends
            .chunks(1024)
            .enumerate()
            .map(|(n, chunk)| {
                let refs: Vec<(&str, u32)> = chunk.iter().map(|(a, w)| (a.as_str(), *w)).collect();
                service(
                    &format!("s{n}"),
                    &format!("10.96.{}.{}:80", n >> 8, n & 255),
                    &refs,
                )
            })
            .collect();
        let mut pools = Pools::new(&installed);
        let want = desired(&services, &|_, _| true).0;
        let err = reconcile(&installed, &mut pools, &want, Scope::All).unwrap_err();
        assert!(err.0.contains("out of backend ids"), "{err}");
    }

    /// The slot array holds what it holds: tables are placed in free ranges, a table being
    /// replaced needs room for its new copy, and a plan that does not fit is refused whole.
    #[test]
    fn tables_are_placed_in_free_ranges_and_a_plan_that_does_not_fit_is_refused() {
        let mut dp = FakeMaps {
            capacity: Capacity {
                slots: 10,
                ..Capacity::default()
            },
            ..FakeMaps::default()
        };
        let four = [
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
            ("10.0.0.4:80", 1),
        ];
        let cfg = vec![
            service("a", "10.96.0.1:80", &four),
            service("b", "10.96.0.2:80", &four[..2]),
        ];
        converge(&mut dp, &cfg);
        let bases: Vec<u32> = dp.services.values().map(|v| v.slot_base).collect();
        assert_eq!(bases, [0, 4]);
        // Replacing a's table needs 4 more entries while the old ones are in use: 6+4 = 10.
        let changed = vec![
            service(
                "a",
                "10.96.0.1:80",
                &[("10.0.0.9:80", 1), ("10.0.0.2:80", 3)],
            ),
            service("b", "10.96.0.2:80", &four[..2]),
        ];
        converge(&mut dp, &changed);
        assert_eq!(dp.services.values().next().unwrap().slot_base, 6);
        // Now a (6..10) and b (4..6) are in use; a table of 5 fits nowhere.
        let mut mirror = Mirror::read(&dp).unwrap();
        let five = [
            ("10.0.0.1:80", 1),
            ("10.0.0.2:80", 1),
            ("10.0.0.3:80", 1),
            ("10.0.0.4:80", 1),
            ("10.0.0.5:80", 1),
        ];
        let five = vec![changed[0].clone(), service("b", "10.96.0.2:80", &five)];
        let want = desired(&five, &|_, _| true).0;
        let err = reconcile(&mirror.installed, &mut mirror.pools, &want, Scope::All).unwrap_err();
        assert!(err.0.contains("no free range of 5 entries"), "{err}");
        assert!(err.0.contains("10 entries, 4 free in pieces"), "{err}");
    }
}
