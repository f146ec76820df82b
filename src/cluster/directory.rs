//! Where workers of other instances are: a cache of their locations, and the messages waiting
//! while one is looked up.
//!
//! Sans-IO: [`Directory::route`] says where a message goes, or queues it and asks for a
//! locate; the answer ([`Directory::located`]) or the worker's claim, which every instance
//! hears ([`Directory::claimed`]), releases the queue in order. The cache forgets a worker when
//! its instance says it is not there any more, or when the instance is gone.
//!
//! A flood of messages for ids connected nowhere costs NATS little: a worker found nowhere is
//! believed absent for [`ABSENT_FOR`] (its claim, if it registers meanwhile, ends that at
//! once), and at most [`MAX_LOCATES`] locates are under way at once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::core::{InstanceId, PeerId};

/// How long a worker found nowhere is refused at once, without asking again.
pub const ABSENT_FOR: Duration = Duration::from_secs(2);
/// Locates under way at once; a message for yet another unknown worker is refused.
pub const MAX_LOCATES: usize = 256;

/// Why a worker could not be located.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No instance answered for it: it is connected nowhere.
    NotFound,
    /// NATS failed, or the answer made no sense.
    Unavailable,
}

/// Where one message for a worker goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// To the worker's known instance.
    At(InstanceId, T),
    /// Queued behind a locate already under way.
    Queued,
    /// Queued; the worker must be located (the caller starts the lookup).
    Locate,
    /// Found nowhere a moment ago: refuse it (`PEER_NOT_CONNECTED`).
    Absent(T),
    /// Too many locates under way: refuse it (`CLUSTER_UNAVAILABLE`).
    Busy(T),
}

/// The location cache and the queues of messages waiting for a locate; `T` is one waiting message.
pub struct Directory<T> {
    locations: HashMap<PeerId, InstanceId>,
    waiting: HashMap<PeerId, VecDeque<T>>,
    /// Workers found nowhere, until when they are believed absent.
    absent: HashMap<PeerId, Instant>,
}

impl<T> Default for Directory<T> {
    fn default() -> Self {
        Directory { locations: HashMap::new(), waiting: HashMap::new(), absent: HashMap::new() }
    }
}

impl<T> Directory<T> {
    /// Whether a locate of `worker` is under way.
    pub fn is_locating(&self, worker: PeerId) -> bool {
        self.waiting.contains_key(&worker)
    }

    /// Where `item`, a message for `worker`, goes at `now`. A message never overtakes one
    /// queued before it.
    pub fn route(&mut self, worker: PeerId, item: T, now: Instant) -> Route<T> {
        if let Some(queue) = self.waiting.get_mut(&worker) {
            queue.push_back(item);
            return Route::Queued;
        }
        if let Some(&instance) = self.locations.get(&worker) {
            return Route::At(instance, item);
        }
        if self.absent.get(&worker).is_some_and(|until| now < *until) {
            return Route::Absent(item);
        }
        if self.waiting.len() >= MAX_LOCATES {
            return Route::Busy(item);
        }
        self.waiting.insert(worker, VecDeque::from([item]));
        Route::Locate
    }

    /// The answer to a locate at `now`: cached if found, remembered as absent if not. Returns
    /// the messages that waited for it, in order (none if the locate was already answered, by a
    /// claim).
    pub fn located(
        &mut self,
        worker: PeerId,
        found: Result<InstanceId, Lookup>,
        now: Instant,
    ) -> VecDeque<T> {
        let Some(queue) = self.waiting.remove(&worker) else { return VecDeque::new() };
        match found {
            Ok(instance) => {
                self.locations.insert(worker, instance);
            }
            Err(Lookup::NotFound) => {
                self.absent.insert(worker, now + ABSENT_FOR);
            }
            Err(Lookup::Unavailable) => {}
        }
        queue
    }

    /// Forgets the absences that have run out.
    pub fn prune(&mut self, now: Instant) {
        self.absent.retain(|_, until| now < *until);
    }

    /// `worker` registered on `instance` (its claim): a cached location moves there, and a
    /// locate still waiting, maybe for the worker's subscription to reach other NATS servers,
    /// has its answer. Returns the messages that waited, in order.
    pub fn claimed(&mut self, worker: PeerId, instance: InstanceId) -> VecDeque<T> {
        if let Some(location) = self.locations.get_mut(&worker) {
            *location = instance;
        }
        self.absent.remove(&worker);
        let Some(queue) = self.waiting.remove(&worker) else { return VecDeque::new() };
        self.locations.insert(worker, instance);
        queue
    }

    /// `instance` says `worker` is not there (any more).
    pub fn left(&mut self, worker: PeerId, instance: InstanceId) {
        if self.locations.get(&worker) == Some(&instance) {
            self.locations.remove(&worker);
        }
    }

    /// `instance` is gone: none of its workers is there.
    pub fn instance_gone(&mut self, instance: InstanceId) {
        self.locations.retain(|_, i| *i != instance);
    }

    /// Whether a message waiting for a locate is one `of` says.
    pub fn any_waiting(&self, mut of: impl FnMut(&T) -> bool) -> bool {
        self.waiting.values().any(|queue| queue.iter().any(&mut of))
    }

    /// The instance `worker` is cached at.
    pub fn location(&self, worker: PeerId) -> Option<InstanceId> {
        self.locations.get(&worker).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn messages_wait_for_one_locate_and_leave_in_order() {
        let mut d = Directory::default();
        assert_eq!(d.route(7, 'a', t0()), Route::Locate);
        assert_eq!(d.route(7, 'b', t0()), Route::Queued, "one locate per worker");
        assert!(d.is_locating(7));
        assert_eq!(d.located(7, Ok(0xb), t0()), ['a', 'b']);
        assert_eq!(d.route(7, 'c', t0()), Route::At(0xb, 'c'), "cached");
        assert!(d.located(7, Ok(0xc), t0()).is_empty(), "a late answer changes nothing");
        assert_eq!(d.location(7), Some(0xb));
    }

    #[test]
    fn a_claim_answers_a_waiting_locate() {
        let mut d = Directory::default();
        assert_eq!(d.route(7, 'a', t0()), Route::Locate);
        assert_eq!(d.claimed(7, 0xb), ['a']);
        assert!(!d.is_locating(7));
        // The locate's own answer, arriving later, finds nothing waiting.
        assert!(d.located(7, Err(Lookup::NotFound), t0()).is_empty());
        assert_eq!(d.route(7, 'b', t0()), Route::At(0xb, 'b'));
        // A claim from elsewhere moves the cached location.
        assert!(d.claimed(7, 0xc).is_empty());
        assert_eq!(d.location(7), Some(0xc));
    }

    #[test]
    fn a_failed_locate_releases_the_queue_and_caches_nothing() {
        let mut d = Directory::default();
        d.route(7, 'a', t0());
        assert_eq!(d.located(7, Err(Lookup::NotFound), t0()), ['a']);
        assert_eq!(d.route(7, 'b', t0() + ABSENT_FOR), Route::Locate, "looked up again, later");
    }

    #[test]
    fn locations_are_forgotten_when_the_worker_or_its_instance_leaves() {
        let mut d = Directory::default();
        d.route(1, (), t0());
        d.located(1, Ok(0xb), t0());
        d.route(2, (), t0());
        d.located(2, Ok(0xb), t0());
        d.left(1, 0xc);
        assert_eq!(d.location(1), Some(0xb), "only the instance it is cached at can say it left");
        d.left(1, 0xb);
        assert_eq!(d.location(1), None);
        d.instance_gone(0xb);
        assert_eq!(d.location(2), None);
    }

    #[test]
    fn a_worker_found_nowhere_is_absent_for_a_while_unless_it_claims() {
        let now = Instant::now();
        let mut d = Directory::default();
        assert_eq!(d.route(7, 'a', now), Route::Locate);
        d.located(7, Err(Lookup::NotFound), now);
        assert_eq!(d.route(7, 'b', now + ABSENT_FOR / 2), Route::Absent('b'), "refused without asking");
        assert_eq!(d.route(7, 'c', now + ABSENT_FOR), Route::Locate, "asked again after ABSENT_FOR");
        d.located(7, Err(Lookup::NotFound), now + ABSENT_FOR);
        assert!(d.claimed(7, 0xb).is_empty());
        assert_eq!(d.route(7, 'd', now + ABSENT_FOR), Route::Locate, "its claim ends the absence");
        // An unavailable NATS is not an absence.
        d.route(8, 'e', now);
        d.located(8, Err(Lookup::Unavailable), now);
        assert_eq!(d.route(8, 'f', now), Route::Locate);
        d.prune(now + ABSENT_FOR * 2);
        assert!(d.absent.is_empty());
    }

    #[test]
    fn locates_under_way_are_bounded() {
        let now = Instant::now();
        let mut d = Directory::default();
        for worker in 0..MAX_LOCATES as PeerId {
            assert_eq!(d.route(worker, worker, now), Route::Locate);
        }
        assert_eq!(d.route(-1, -1, now), Route::Busy(-1));
        assert_eq!(d.route(0, 0, now), Route::Queued, "a worker already being located still queues");
        d.located(0, Ok(0xb), now);
        assert_eq!(d.route(-1, -1, now), Route::Locate);
    }

    #[test]
    fn waiting_messages_can_be_looked_for() {
        let mut d = Directory::default();
        d.route(7, 1, t0());
        d.route(8, 2, t0());
        assert!(d.any_waiting(|conn| *conn == 2));
        d.located(8, Ok(0xb), t0());
        assert!(!d.any_waiting(|conn| *conn == 2));
    }
}
