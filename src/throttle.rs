//! Log lines that peers or outsiders can cause are throttled, so that a flood of bad input
//! cannot flood the logs too: at most one line per [`EVERY`] per call site, saying how many
//! were suppressed since the last.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One line per call site per this long.
pub const EVERY: Duration = Duration::from_secs(1);

/// The state of one call site; see [`warn_throttled`](crate::warn_throttled).
pub struct Throttle {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle { next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether a line may be written at `now_ms`; if so, how many were suppressed before it.
    pub fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.allow_at(now.as_millis() as u64)
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!`, at most once per [`EVERY`] at this call site.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)*) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(suppressed, $($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_suppressed() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(10_000), Some(0));
        assert_eq!(t.allow_at(10_001), None);
        assert_eq!(t.allow_at(10_999), None);
        assert_eq!(t.allow_at(11_000), Some(2));
        assert_eq!(t.allow_at(11_001), None);
    }
}
