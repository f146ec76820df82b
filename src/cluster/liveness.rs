//! Which other instances are alive: each is expected to be heard from (a heartbeat, a frame)
//! at least every [`DEAD_AFTER`]; one that is not is dead. Sans-IO: `now` is an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::core::InstanceId;

/// An instance not heard from for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// How often an instance says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// When each instance this one deals with was last heard from.
#[derive(Default)]
pub struct Liveness {
    last_seen: HashMap<InstanceId, Instant>,
}

impl Liveness {
    /// `instance` said something.
    pub fn heard(&mut self, instance: InstanceId, now: Instant) {
        self.last_seen.insert(instance, now);
    }

    /// This instance starts depending on `instance` (sends it something): from now on it must
    /// be heard from. Keeps the time it was last heard from, if it was.
    pub fn expect(&mut self, instance: InstanceId, now: Instant) {
        self.last_seen.entry(instance).or_insert(now);
    }

    /// The instances not heard from for [`DEAD_AFTER`].
    pub fn dead(&self, now: Instant) -> Vec<InstanceId> {
        self.last_seen
            .iter()
            .filter(|(_, seen)| now.saturating_duration_since(**seen) >= DEAD_AFTER)
            .map(|(instance, _)| *instance)
            .collect()
    }

    /// The instances heard from and not yet found dead.
    pub fn alive(&self) -> Vec<InstanceId> {
        self.last_seen.keys().copied().collect()
    }

    pub fn forget(&mut self, instance: InstanceId) {
        self.last_seen.remove(&instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_not_heard_from_is_dead_after_the_bound() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.expect(1, t0);
        l.heard(2, t0);
        l.heard(1, t0 + Duration::from_secs(2));
        l.expect(1, t0 + Duration::from_secs(10)); // does not reset what was heard
        assert_eq!(l.dead(t0 + DEAD_AFTER), [2]);
        assert!(l.dead(t0 + Duration::from_secs(4)).contains(&2));
        assert!(!l.dead(t0 + Duration::from_secs(4)).contains(&1));
        l.forget(2);
        assert_eq!(l.dead(t0 + Duration::from_secs(5)), [1]);
    }
}
