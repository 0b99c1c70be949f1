//! The core's one wall clock. The engine and the store never read it: every decision and every
//! write takes `now` from here, passed in by the I/O around them.

use std::time::{SystemTime, UNIX_EPOCH};

use stagely_engine::Timestamp;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Now, as the engine and the store take it.
pub fn now() -> Timestamp {
    Timestamp(now_ms())
}
