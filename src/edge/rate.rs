//! How fast one stream may send: a token bucket of `burst` tokens refilled at `rate` per
//! second; a message takes one, and a message that finds none is refused with `RATE_LIMITED`.
//! Sans-IO: the time is an argument.

use std::time::Instant;

/// One stream's bucket.
#[derive(Debug)]
pub struct Bucket {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    /// A full bucket, or `None` when `rate` is 0 (no limit).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Bucket {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            at: now,
        })
    }

    /// Takes a token for one message at `now`, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, t0).unwrap();
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst at once");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token later: none");
        assert!(b.take(t0 + Duration::from_millis(100)), "one token per 100 ms");
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Over 10 s at 10/s: about 100 more, never more than the rate allows.
        let taken = (1..=10_000).filter(|i| b.take(t0 + Duration::from_millis(100 + i))).count();
        assert!((99..=101).contains(&taken), "{taken}");
        // A quiet stream refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..8).filter(|_| b.take(later)).count(), 5);
    }

    #[test]
    fn no_rate_no_bucket() {
        assert!(Bucket::new(0, 100, Instant::now()).is_none());
    }
}
