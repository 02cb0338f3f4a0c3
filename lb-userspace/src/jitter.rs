//! A small xorshift generator: probe schedules and retry backoff need spread, not
//! cryptographic randomness, and this keeps a random-number crate out of the agent.

use std::time::Duration;

pub struct Jitter(u64);

impl Jitter {
    /// Seeds that differ in a few bits (a counter, a timestamp) are mixed first (splitmix64's
    /// finalizer); xorshift alone would start them on nearly the same sequence.
    pub fn seeded(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    /// A duration in `[0, max)` (zero when `max` is below a millisecond).
    pub fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let ms = max.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { self.0 % ms })
    }
}
