//! Wall-clock time as the status file and the sources record it: milliseconds since the Unix
//! epoch, readable by another process and across agent restarts (an `Instant` is neither).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
