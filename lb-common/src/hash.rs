//! The client hash Maglev services index their table with. The kernel computes it on every
//! connect and the agent and tests compute it to predict the kernel's choice, so both must
//! compile this one definition.

/// Mixes a client key (netns cookie or cgroup id) into 32 well-spread bits: the splitmix64
/// finalizer, whose every input bit affects every output bit. Cookies and cgroup ids are small
/// sequential numbers, which a plain modulo would map to neighbouring slots.
#[inline(always)]
pub const fn client_hash(key: u64) -> u32 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 32) as u32 ^ z as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_spread_over_a_small_table() {
        let mut hits = [0u32; 7];
        for k in 1..=7000u64 {
            hits[(client_hash(k) % 7) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (900..1100).contains(&h)), "{hits:?}");
    }

    #[test]
    fn is_a_fixed_function() {
        // Pinned values (computed independently): pins written by one build are read by
        // kernels running another, so the function must never change silently.
        assert_eq!(client_hash(1), 0x1808_712d);
        assert_eq!(client_hash(0x1234), 0x8a86_170f);
    }
}
