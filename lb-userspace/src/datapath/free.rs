//! What the maps have free: service ids, backend ids and ranges of the slot array. Kept
//! across reconciles (in `mirror`), so that handing out an id or a range costs the same at
//! 100 services as at 250,000: no reconcile rebuilds them from everything installed.
//!
//! Whatever a plan frees is held back until the plan has been applied (`commit`): an id or a
//! range freed by a plan is never written by the same plan while a connect may still read it
//! through the old service entry. A plan that fails leaves the pools to be dropped and rebuilt
//! from the maps (`Pools::new`).

use crate::datapath::installed::Installed;
use crate::plan::Bound;
use std::collections::{BTreeMap, BTreeSet};

/// A plan needs more than the maps were sized for.
#[derive(Debug, PartialEq, Eq)]
pub struct CapacityError(pub String);

impl std::fmt::Display for CapacityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CapacityError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPool {
    /// Free ids below `next`.
    free: BTreeSet<u32>,
    /// This id and every one above it is free.
    next: u32,
    limit: u32,
    what: &'static str,
    released: Vec<u32>,
}

impl IdPool {
    pub fn new(used: impl IntoIterator<Item = u32>, limit: u32, what: &'static str) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(0, |top| top + 1);
        let free = (0..next).filter(|id| !used.contains(id)).collect();
        Self {
            free,
            next,
            limit,
            what,
            released: Vec::new(),
        }
    }

    /// The lowest free id.
    pub fn take(&mut self) -> Result<u32, CapacityError> {
        if let Some(id) = self.free.pop_first() {
            return Ok(id);
        }
        if self.next >= self.limit {
            return Err(CapacityError(format!(
                "out of {} ids: the maps hold at most {} (including ones being replaced); \
                 the maps were sized when first created: see --max-{}s",
                self.what, self.limit, self.what
            )));
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Free once the plan that frees it has been applied.
    pub fn release(&mut self, id: u32) {
        self.released.push(id);
    }

    /// Ids free now.
    fn available(&self) -> u64 {
        self.free.len() as u64 + u64::from(self.limit.saturating_sub(self.next))
    }

    fn commit(&mut self) {
        self.free.extend(self.released.drain(..));
        // The top shrinks back, so that the pool looks exactly as one rebuilt from the maps.
        while self.next > 0 && self.free.remove(&(self.next - 1)) {
            self.next -= 1;
        }
    }
}

/// Free ranges of the slot array, handed out first fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRanges {
    /// start → length, never empty, never adjacent (merged when freed).
    gaps: BTreeMap<u32, u32>,
    capacity: u32,
    released: Vec<(u32, u32)>,
}

impl SlotRanges {
    /// Everything no installed service's table covers is free.
    pub fn new(installed: &Installed) -> Self {
        let mut used: Vec<(u32, u32)> = installed
            .services
            .values()
            .map(|s| (s.slot_base, s.slot_count))
            .filter(|(_, len)| *len > 0)
            .collect();
        used.sort_unstable();
        let capacity = installed.capacity.slots;
        let mut gaps = BTreeMap::new();
        let mut at = 0u32;
        for (start, len) in used {
            if start > at {
                gaps.insert(at, start - at);
            }
            at = at.max(start.saturating_add(len));
        }
        if capacity > at {
            gaps.insert(at, capacity - at);
        }
        Self {
            gaps,
            capacity,
            released: Vec::new(),
        }
    }

    /// The start of a free range of `len` entries: the first that fits.
    pub fn take(&mut self, len: u32) -> Result<u32, CapacityError> {
        if len == 0 {
            return Ok(0);
        }
        let Some((&start, &gap)) = self.gaps.iter().find(|(_, gap)| **gap >= len) else {
            let free: u64 = self.gaps.values().map(|g| u64::from(*g)).sum();
            return Err(CapacityError(format!(
                "no free range of {len} entries in the slot array ({} entries, {free} free in \
                 pieces; a table being replaced exists twice until the update ends): raise \
                 --max-slots, or use fewer or smaller Maglev tables (maglev_table_size)",
                self.capacity
            )));
        };
        self.gaps.remove(&start);
        if gap > len {
            self.gaps.insert(start + len, gap - len);
        }
        Ok(start)
    }

    /// Every table of `len` entries in all fits: first fit never fails while the largest gap
    /// could hold them all.
    fn surely_fit(&self, len: u64) -> bool {
        len == 0 || self.gaps.values().any(|gap| u64::from(*gap) >= len)
    }

    /// Free once the plan that frees it has been applied.
    pub fn release(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.released.push((start, len));
        }
    }

    fn commit(&mut self) {
        for (mut start, mut len) in std::mem::take(&mut self.released) {
            if let Some((&before, &before_len)) = self.gaps.range(..start).next_back() {
                if before + before_len == start {
                    self.gaps.remove(&before);
                    start = before;
                    len += before_len;
                }
            }
            if let Some(after_len) = self.gaps.remove(&(start + len)) {
                len += after_len;
            }
            self.gaps.insert(start, len);
        }
    }
}

/// Everything a plan takes its ids and ranges from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools {
    pub service_ids: IdPool,
    pub backend_ids: IdPool,
    pub ranges: SlotRanges,
}

impl Pools {
    /// What `installed` leaves free. A service id whose leftover name a plan deletes counts as
    /// used until then: a new service given it would lose its name with the leftover's.
    pub fn new(installed: &Installed) -> Self {
        let service_ids = installed
            .services
            .values()
            .map(|s| s.id)
            .chain(installed.stray_names.iter().copied());
        Self {
            service_ids: IdPool::new(service_ids, installed.capacity.services, "service"),
            backend_ids: IdPool::new(
                installed.backends.ids(),
                installed.capacity.backends,
                "backend",
            ),
            ranges: SlotRanges::new(installed),
        }
    }

    /// Whatever services within `bound` a plan wants, it fits: the checks of a plan on the
    /// maps' capacity cannot fail.
    pub fn surely_fit(&self, bound: &Bound) -> bool {
        self.service_ids.available() >= bound.services
            && self.backend_ids.available() >= bound.backends
            && self.ranges.surely_fit(bound.slots)
    }

    /// The plan that released ids and ranges has been applied: they are free from now on.
    pub fn commit(&mut self) {
        self.service_ids.commit();
        self.backend_ids.commit();
        self.ranges.commit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_lowest_first_and_freed_ones_only_after_the_commit() {
        let mut pool = IdPool::new([0, 2, 3], 6, "backend");
        assert_eq!(pool.take(), Ok(1));
        assert_eq!(pool.take(), Ok(4));
        pool.release(0);
        assert_eq!(pool.take(), Ok(5));
        assert!(pool.take().unwrap_err().0.contains("--max-backends"));
        pool.commit();
        assert_eq!(pool.take(), Ok(0));
    }

    #[test]
    fn a_committed_pool_equals_one_rebuilt_from_what_is_used() {
        let mut pool = IdPool::new([0, 1, 2, 3], 10, "service");
        pool.release(3);
        pool.release(1);
        pool.commit();
        assert_eq!(pool, IdPool::new([0, 2], 10, "service"));
    }

    #[test]
    fn freed_ranges_merge_with_their_neighbours() {
        let mut installed = Installed::default();
        installed.capacity.slots = 100;
        let mut ranges = SlotRanges::new(&installed);
        let a = ranges.take(10).unwrap();
        let b = ranges.take(20).unwrap();
        let c = ranges.take(30).unwrap();
        assert_eq!((a, b, c), (0, 10, 30));
        ranges.release(a, 10);
        ranges.release(b, 20);
        assert_eq!(ranges.take(5), Ok(60), "nothing freed before the commit");
        ranges.commit();
        assert_eq!(ranges.take(30), Ok(0), "0..10 and 10..30 merged");
        assert!(ranges.take(40).unwrap_err().0.contains("--max-slots"));
    }
}
