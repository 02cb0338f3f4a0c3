//! Maglev lookup tables (Eisenbud et al., NSDI 2016, "Maglev: A Fast and Reliable Software
//! Network Load Balancer", section 3.4), with weights.
//!
//! The data path picks a service's backend by indexing a prime-sized table with the client hash:
//! O(1), and the same answer on every host. Maglev fills the table because it gives both an even
//! spread (shares within an entry or two of the weights' shares) and minimal disruption (removing
//! or adding a backend moves little beyond that backend's own clients, so other flows stay put).

#[cfg(test)]
use crate::config::{DEFAULT_TABLE_SIZE, MIN_TABLE_SIZE};

/// One backend: a stable identity (e.g. the bytes of "10.0.0.1:80" or "[fd00::1]:80") and a
/// weight >= 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    pub id: &'a [u8],
    pub weight: u32,
}

// Tables must come out the same across agent versions, hosts and restarts (or clients get
// reshuffled), so the hash is spelled out here rather than taken from std: FNV-1a over the id,
// then splitmix64's finalizer, because FNV's low bits mix poorly and we reduce modulo the size.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Builds the lookup table of `size` entries (size must be prime and > members.len(); callers
/// guarantee it). Returns an empty Vec if members is empty. Entry i is the index into `members` of
/// the backend serving hash bucket i. Deterministic: depends only on the set of (id, weight) and
/// size, NOT on the order of `members`.
///
/// A weight of 0 counts as 1, so a stray zero cannot take a backend (or a service) out.
/// Members sharing an id are one backend with the sum of their weights, and its entries hold the
/// lowest of their indices. Size 0 gives an empty Vec; other non-prime sizes still fill every
/// entry.
pub fn table(members: &[Member], size: u32) -> Vec<u32> {
    if members.is_empty() || size == 0 {
        return Vec::new();
    }
    struct Backend {
        index: u32,
        weight: u64,
        credit: u64,
        pos: u64,
        skip: u64,
    }
    let size64 = u64::from(size);
    let modulus = (size64 - 1).max(1);
    // Fill order decides who wins contested entries; sorting by id makes it independent of the
    // caller's order, and the index tie-break makes duplicates keep their first index.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| members[a].id.cmp(members[b].id).then(a.cmp(&b)));
    let mut backends: Vec<Backend> = Vec::with_capacity(order.len());
    for i in order {
        let m = members[i];
        let weight = u64::from(m.weight.max(1));
        match backends.last_mut() {
            Some(b) if members[b.index as usize].id == m.id => b.weight += weight,
            _ => {
                let h = fnv1a(m.id);
                let mut skip = mix(h ^ 0x9e37_79b9_7f4a_7c15) % modulus + 1;
                // Only for non-prime sizes: a skip sharing a factor with the size would visit
                // part of the table and the search for a free entry would never end.
                while gcd(skip, size64) != 1 {
                    skip = skip % modulus + 1;
                }
                let pos = mix(h) % size64;
                backends.push(Backend {
                    index: i as u32,
                    weight,
                    credit: 0,
                    pos,
                    skip,
                });
            }
        }
    }
    let max_weight = backends.iter().map(|b| b.weight).max().unwrap_or(1);
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0;
    // Weights as credit: each round every backend earns its weight and, once it holds
    // max_weight, claims its next free preferred entry. Claims then track weight to within an
    // entry, and the heaviest backend claims every round, so there are at most `size` rounds.
    // Scaling each permutation instead (repeating entries w times) would cost w-fold memory.
    while filled < entries.len() {
        for b in &mut backends {
            b.credit += b.weight;
            if b.credit < max_weight {
                continue;
            }
            b.credit -= max_weight;
            while entries[b.pos as usize] != u32::MAX {
                b.pos = (b.pos + b.skip) % size64;
            }
            entries[b.pos as usize] = b.index;
            filled += 1;
            if filled == entries.len() {
                break;
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    // Stand-in for lb_common::client_hash (the hash the kernel really uses lives there); any
    // well-mixed key -> bucket map measures the same disruption.
    fn bucket(key: u64, size: u32) -> u32 {
        (mix(key.wrapping_add(0x9e37_79b9_7f4a_7c15)) % u64::from(size)) as u32
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:80", i + 1)).collect()
    }

    fn weighted<'a>(ids: &'a [String], weights: &[u32]) -> Vec<Member<'a>> {
        let w = |i: usize| weights.get(i).copied().unwrap_or(1);
        ids.iter()
            .enumerate()
            .map(|(i, id)| Member {
                id: id.as_bytes(),
                weight: w(i),
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        t.iter().for_each(|&e| c[e as usize] += 1);
        c
    }

    fn by_id<'a>(m: &[Member<'a>], size: u32) -> Vec<&'a [u8]> {
        table(m, size).iter().map(|&e| m[e as usize].id).collect()
    }

    /// Of 100k client keys: the fraction whose backend changed, and among those whose old
    /// backend is still in `b`, the fraction needlessly moved to another backend that was in `a`.
    fn moved(a: &[Member], b: &[Member]) -> (f64, f64) {
        let (ta, tb) = (by_id(a, DEFAULT_TABLE_SIZE), by_id(b, DEFAULT_TABLE_SIZE));
        let in_set = |set: &[Member], id| set.iter().any(|m| m.id == id);
        let (mut all, mut kept, mut needless) = (0, 0, 0);
        for k in 0..100_000u64 {
            let i = bucket(k, DEFAULT_TABLE_SIZE) as usize;
            all += u32::from(ta[i] != tb[i]);
            if in_set(b, ta[i]) {
                kept += 1;
                needless += u32::from(ta[i] != tb[i] && in_set(a, tb[i]));
            }
        }
        (f64::from(all) / 1e5, f64::from(needless) / f64::from(kept))
    }

    #[test]
    fn fills_every_entry_with_every_backend_without_panics() {
        for (n, size) in [(10, 65_537), (1024, 1_031), (1, 1_031), (6, 7)] {
            let ids = ids(n);
            let t = table(&weighted(&ids, &[]), size);
            assert_eq!(t.len(), size as usize);
            assert!(counts(&t, n).iter().all(|&c| c > 0), "n={n} size={size}");
        }
        // Outside the contract (weights 0 and u32::MAX, sizes not prime or <= n): still full.
        let ids = ids(20);
        let m = weighted(&ids, &[0, u32::MAX, 1]);
        assert!(table(&[], DEFAULT_TABLE_SIZE).is_empty() && table(&m, 0).is_empty());
        for size in [1, 2, 4, 10, 1_000, 65_536] {
            assert_eq!(
                counts(&table(&m, size), m.len()).iter().sum::<usize>(),
                size as usize
            );
        }
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_entry() {
        let ids = ids(10);
        let c = counts(&table(&weighted(&ids, &[]), DEFAULT_TABLE_SIZE), 10);
        println!("equal shares of {DEFAULT_TABLE_SIZE}: {c:?}");
        let fair = DEFAULT_TABLE_SIZE as usize / 10;
        assert!(c.iter().all(|&c| c.abs_diff(fair) <= 1), "{c:?}");
    }

    #[test]
    fn weights_1_2_3_give_proportional_shares() {
        let ids = ids(3);
        for size in [MIN_TABLE_SIZE, DEFAULT_TABLE_SIZE] {
            let c = counts(&table(&weighted(&ids, &[1, 2, 3]), size), 3);
            println!("1:2:3 shares of {size}: {c:?}");
            for (w, c) in [1, 2, 3].iter().zip(&c) {
                assert!((*c as f64 / f64::from(size) - f64::from(*w) / 6.0).abs() < 0.001);
            }
        }
    }

    #[test]
    fn order_duplicates_and_zero_weights_do_not_matter() {
        let ids = ids(12);
        let m = weighted(&ids, &[5, 1, 3, 1, 2, 7, 1, 1, 4, 1, 2, 9]);
        let mut shuffled = m.clone();
        shuffled.reverse();
        shuffled.rotate_left(5);
        assert_eq!(by_id(&m, MIN_TABLE_SIZE), by_id(&shuffled, MIN_TABLE_SIZE));
        // Split weight 5 as 2 + 3 and weight 1 as 0: same set of (id, total weight).
        let mut split = shuffled.clone();
        split.retain(|b| b.id != m[0].id);
        split.insert(3, Member { weight: 2, ..m[0] });
        split.push(Member { weight: 3, ..m[0] });
        split.iter_mut().find(|b| b.weight == 1).unwrap().weight = 0;
        assert_eq!(by_id(&m, MIN_TABLE_SIZE), by_id(&split, MIN_TABLE_SIZE));
    }

    #[test]
    fn removing_one_of_ten_moves_few_keys() {
        let ids = ids(10);
        let all = weighted(&ids, &[]);
        let mut nine = all.clone();
        nine.remove(3);
        let (moved, needless) = moved(&all, &nine);
        println!("remove 1 of 10: {moved:.4} of keys moved; {needless:.4} of the rest moved");
        assert!(moved <= 0.15, "{moved}");
        assert!(needless <= 0.03, "{needless}");
    }

    #[test]
    fn adding_an_eleventh_moves_few_keys() {
        let ids = ids(11);
        let eleven = weighted(&ids, &[]);
        let (moved, needless) = moved(&eleven[..10], &eleven);
        println!("add 11th: {moved:.4} of keys moved; {needless:.4} not to the new backend");
        assert!(moved <= 0.15, "{moved}");
        assert!(needless <= 0.03, "{needless}");
    }
}
