//! Pure: the ordered map operations that take the data plane from what is installed to what
//! is desired, touching only what changed.
//!
//! Order is the safety argument. For every service: new backends are written first, then the
//! new slot table under a fresh revision, then the service entry flips to that revision in one
//! map update, then the old table and the backends only it used are deleted. Every prefix of
//! the returned operations therefore leaves each service entry pointing at a complete table of
//! existing backends, so a connect never sees a half-written set, and an update that fails
//! half-way leaves a consistent data plane (the unit tests apply every prefix to check this).

use crate::codec::Mode;
use crate::datapath::installed::{Installed, InstalledService};
use crate::datapath::ops::Op;
use crate::plan::{Desired, DesiredService};
use lb_common::{ServiceKey, ServiceValue, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

#[derive(Debug)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub summary: Summary,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CapacityError(pub String);

impl std::fmt::Display for CapacityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CapacityError {}

/// Hands out ids not used by anything installed. Ids freed by this same plan are not reused
/// in it, so a freed id is never written while a connect may still read it under the old
/// revision.
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
    what: &'static str,
}

impl IdPool {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32, what: &'static str) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 0,
            limit,
            what,
        }
    }

    fn take(&mut self) -> Result<u32, CapacityError> {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        if self.next >= self.limit {
            return Err(CapacityError(format!(
                "out of {} ids: the data plane holds at most {} (including ones being replaced)",
                self.what, self.limit
            )));
        }
        self.used.insert(self.next);
        Ok(self.next)
    }
}

pub fn reconcile(installed: &Installed, desired: &Desired) -> Result<Plan, CapacityError> {
    check_slot_capacity(installed, desired)?;
    // An id whose leftovers this plan deletes at its end is not handed out again in it: the new
    // service's entries would be deleted with them.
    let stray_ids = installed
        .stray_slots
        .iter()
        .map(|k| k.service_id)
        .chain(installed.stray_names.iter().copied());
    let mut service_ids = IdPool::new(
        installed.services.values().map(|s| s.id).chain(stray_ids),
        MAX_SERVICES,
        "service",
    );
    let mut backend_ids = IdPool::new(installed.backends.keys().copied(), MAX_BACKENDS, "backend");
    let mut ops = Vec::new();
    let mut summary = Summary::default();

    for (key, want) in desired {
        match installed.services.get(key) {
            Some(have) => {
                let changed =
                    update_service(installed, *key, have, want, &mut backend_ids, &mut ops)?;
                if changed {
                    summary.updated += 1;
                } else {
                    summary.unchanged += 1;
                }
            }
            None => {
                add_service(
                    installed,
                    *key,
                    want,
                    &mut service_ids,
                    &mut backend_ids,
                    &mut ops,
                )?;
                summary.added += 1;
            }
        }
    }
    for (key, have) in &installed.services {
        if !desired.contains_key(key) {
            ops.push(Op::DeleteService(*key));
            ops.push(delete_table(have));
            ops.push(Op::DeleteName(have.id));
            ops.extend(have.backend_ids().map(Op::DeleteBackend));
            summary.removed += 1;
        }
    }
    ops.extend(installed.stray_slots.iter().copied().map(Op::DeleteSlot));
    ops.extend(installed.stray_names.iter().copied().map(Op::DeleteName));
    ops.extend(
        installed
            .stray_backends()
            .into_iter()
            .map(Op::DeleteBackend),
    );
    Ok(Plan { ops, summary })
}

/// Follows the plan's order: services are added or swapped one by one (a swapped service has
/// both tables for a moment), and removed services go last. The peak must fit the slot map.
/// Unchanged services are counted once, so large Maglev tables do not count double.
fn check_slot_capacity(installed: &Installed, desired: &Desired) -> Result<(), CapacityError> {
    let mut held: usize = installed.services.values().map(|s| s.slots.len()).sum();
    let mut peak = held;
    for (key, want) in desired {
        let have = installed.services.get(key);
        if have.is_some_and(|have| same_table(installed, have, want)) {
            continue;
        }
        let old = have.map_or(0, |s| s.slots.len());
        peak = peak.max(held + want.slots.len());
        held = held + want.slots.len() - old;
    }
    if peak > MAX_SLOTS as usize {
        return Err(CapacityError(format!(
            "the update needs {peak} slot entries at its peak (tables being replaced exist twice \
             for a moment) but the slot map holds {MAX_SLOTS}; use fewer or smaller Maglev \
             tables (maglev_table_size)"
        )));
    }
    Ok(())
}

/// Whether `want` is exactly what is installed (then it is not rewritten).
fn same_table(installed: &Installed, have: &InstalledService, want: &DesiredService) -> bool {
    have.complete
        && have.mode == want.mode
        && have.slots.len() == want.slots.len()
        && have
            .slots
            .iter()
            .zip(&want.slots)
            .all(|(id, addr)| installed.backends.get(id) == Some(addr))
}

fn add_service(
    installed: &Installed,
    key: ServiceKey,
    want: &DesiredService,
    service_ids: &mut IdPool,
    backend_ids: &mut IdPool,
    ops: &mut Vec<Op>,
) -> Result<(), CapacityError> {
    let id = service_ids.take()?;
    let revision = fresh_revision(installed, id, 0);
    ops.push(Op::ResetServiceCounters(id));
    ops.push(Op::PutName {
        service_id: id,
        name: want.name.clone(),
    });
    let slots = assign_backends(id, &BTreeMap::new(), want, backend_ids, ops)?;
    write_table(key, id, revision, want.mode, slots, ops);
    Ok(())
}

/// A revision for a new table of service `id` whose current one is `current` (0: none): above
/// every revision the slot map holds for the id, so the new table never shares a key with a
/// leftover of an interrupted plan, which this plan deletes at its end.
fn fresh_revision(installed: &Installed, id: u32, current: u32) -> u32 {
    let strays = installed.stray_slots.iter().filter(|k| k.service_id == id);
    strays
        .map(|k| k.revision)
        .fold(current, u32::max)
        .wrapping_add(1)
}

/// Returns whether anything changed.
fn update_service(
    installed: &Installed,
    key: ServiceKey,
    have: &InstalledService,
    want: &DesiredService,
    backend_ids: &mut IdPool,
    ops: &mut Vec<Op>,
) -> Result<bool, CapacityError> {
    let owned: BTreeMap<SocketAddr, u32> = have
        .backend_ids()
        .filter_map(|id| installed.backends.get(&id).map(|addr| (*addr, id)))
        .collect();
    let renamed = have.name != want.name;
    if renamed {
        ops.push(Op::PutName {
            service_id: have.id,
            name: want.name.clone(),
        });
    }
    let mark = ops.len();
    let slots = assign_backends(have.id, &owned, want, backend_ids, ops)?;
    if have.complete && slots == have.slots && have.mode == want.mode {
        ops.truncate(mark);
        return Ok(renamed);
    }
    let keep: BTreeSet<u32> = slots.iter().copied().collect();
    let revision = fresh_revision(installed, have.id, have.revision);
    write_table(key, have.id, revision, want.mode, slots, ops);
    ops.push(delete_table(have));
    ops.extend(
        have.backend_ids()
            .filter(|id| !keep.contains(id))
            .map(Op::DeleteBackend),
    );
    Ok(true)
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
            ops.push(Op::NewBackendGeneration(id));
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

fn write_table(
    key: ServiceKey,
    id: u32,
    revision: u32,
    mode: Mode,
    backends: Vec<u32>,
    ops: &mut Vec<Op>,
) {
    let value = ServiceValue {
        id,
        revision,
        slot_count: backends.len() as u32,
        algorithm: mode.algorithm,
        flags: mode.flags,
        _pad: 0,
        affinity_timeout_s: mode.affinity_timeout_s,
    };
    if !backends.is_empty() {
        ops.push(Op::PutSlots {
            service_id: id,
            revision,
            backends,
        });
    }
    ops.push(Op::PutService { key, value });
}

fn delete_table(have: &InstalledService) -> Op {
    Op::DeleteSlots {
        service_id: have.id,
        revision: have.revision,
        count: have.slot_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Admission, Service};
    use crate::codec::{backend_value, service_key, socket_addr};
    use crate::config::{BackendConfig, Protocol};
    use crate::datapath::apply::apply;
    use crate::datapath::installed::read_installed;
    use crate::datapath::maps::fake::FakeMaps;
    use crate::plan::desired;
    use lb_common::SlotKey;

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
    fn converge(dp: &mut FakeMaps, cfg: &[Service]) -> Plan {
        let installed = read_installed(dp, true).unwrap();
        let plan = reconcile(&installed, &desired(cfg, &|_, _| true).0).unwrap();
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
        plan
    }

    /// The backend addresses a service's current table names, with multiplicity, sorted.
    fn table(dp: &FakeMaps, vip: &str) -> Vec<String> {
        let installed = read_installed(dp, false).unwrap();
        let key = service_key(vip.parse().unwrap(), Protocol::Tcp);
        let svc = &installed.services[&key];
        let mut t: Vec<String> = svc
            .slots
            .iter()
            .map(|id| installed.backends[id].to_string())
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
    fn update_swaps_revision_keeps_surviving_backend_ids_and_cleans_up() {
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
        assert!(
            dp.slots.keys().all(|k| k.revision == after.revision),
            "old table deleted"
        );
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
        assert!(matches!(plan.ops.as_slice(), [Op::PutName { name, .. }] if name == "frontend"));
    }

    #[test]
    fn emptied_service_stays_with_zero_slots_and_no_backends() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1)]));
        converge(&mut dp, &web(&[]));
        let v = dp.services.values().next().unwrap();
        assert_eq!(v.slot_count, 0);
        assert!(dp.slots.is_empty() && dp.backends.is_empty());
    }

    #[test]
    fn removed_service_leaves_nothing_behind() {
        let mut dp = FakeMaps::default();
        converge(&mut dp, &web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 5)]));
        let plan = converge(&mut dp, &[]);
        assert_eq!(plan.summary.removed, 1);
        assert!(dp.services.is_empty() && dp.slots.is_empty());
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
        dp.slots.insert(
            SlotKey {
                service_id: v.id,
                revision: v.revision + 7,
                slot: 0,
            },
            0,
        );
        dp.backends
            .insert(99, backend_value(&"10.9.9.9:1".parse().unwrap(), 5, 0));
        dp.names.insert(77, lb_common::ServiceName::new("gone"));
        converge(&mut dp, &cfg);
        assert_eq!(dp.slots.len(), 1);
        assert!(!dp.backends.contains_key(&99));
        assert!(!dp.names.contains_key(&77));
    }

    /// Every map entry, for comparing whole data planes.
    fn entries(dp: &FakeMaps) -> String {
        format!(
            "{:?} {:?} {:?} {:?}",
            dp.services, dp.slots, dp.backends, dp.names
        )
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
            let installed = read_installed(&start, true).unwrap();
            let plan = reconcile(&installed, &desired(&to, &|_, _| true).0).unwrap();
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
                    dp.services.len() + dp.slots.len() + dp.backends.len() + dp.names.len(),
                    clean.services.len()
                        + clean.slots.len()
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

    #[test]
    fn incomplete_table_is_rewritten_under_a_new_revision() {
        let mut dp = FakeMaps::default();
        let cfg = web(&[("10.0.0.1:8080", 1), ("10.0.0.2:8080", 1)]);
        converge(&mut dp, &cfg);
        let v = *dp.services.values().next().unwrap();
        dp.slots.remove(&SlotKey {
            service_id: v.id,
            revision: v.revision,
            slot: 1,
        });
        converge(&mut dp, &cfg);
        dp.check_consistent().unwrap();
        assert_eq!(
            dp.services.values().next().unwrap().revision,
            v.revision + 1
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

        let mut stolen = dp.clone();
        let other = ServiceValue {
            id: 1,
            revision: 1,
            ..v
        };
        stolen.services.insert(twin, other);
        stolen.slots.insert(
            SlotKey {
                service_id: 1,
                revision: 1,
                slot: 0,
            },
            0,
        );
        let err = read_installed(&stolen, true).unwrap_err().to_string();
        assert!(
            err.contains("backend id 0 out of range or used by services 0 and 1"),
            "{err}"
        );
    }

    #[test]
    fn too_many_backends_is_a_capacity_error_that_changes_nothing() {
        let installed = Installed::default();
        let backends: Vec<(String, u32)> = (0..MAX_BACKENDS + 1)
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
        let err = reconcile(&installed, &desired(&services, &|_, _| true).0).unwrap_err();
        assert!(err.0.contains("out of backend ids"), "{err}");
    }

    /// Fifteen full-size Maglev tables fit the slot map; a sixteenth table only during one
    /// service's swap would not. Unchanged tables are not rewritten, so they count once.
    #[test]
    fn slot_capacity_counts_only_the_tables_being_swapped_twice() {
        let size = lb_common::MAX_SLOTS_PER_SERVICE as usize;
        let mut installed = Installed::default();
        let mut want = Desired::new();
        for i in 0..15u32 {
            let addr: SocketAddr = format!("10.0.0.{i}:80").parse().unwrap();
            let key = service_key(format!("10.96.0.{i}:80").parse().unwrap(), Protocol::Tcp);
            installed.backends.insert(i, addr);
            installed.services.insert(
                key,
                InstalledService {
                    id: i,
                    slots: vec![i; size],
                    slot_count: size as u32,
                    complete: true,
                    ..Default::default()
                },
            );
            let slots = vec![addr; size];
            let svc = DesiredService {
                name: format!("s{i}"),
                slots,
                mode: Mode::default(),
            };
            want.insert(key, svc);
        }
        assert!(check_slot_capacity(&installed, &want).is_ok());
        let first = want.values_mut().next().unwrap();
        first.slots[0] = "10.0.0.99:80".parse().unwrap();
        let err = check_slot_capacity(&installed, &want).unwrap_err();
        assert!(err.0.contains("1048592 slot entries at its peak"), "{err}");
    }
}
