//! Where workers of other instances are: a cache of their locations, and the messages waiting
//! while one is looked up.
//!
//! Sans-IO: [`Directory::route`] says where a message goes, or queues it and asks for a
//! locate; the answer ([`Directory::located`]) or the worker's claim, which every instance
//! hears ([`Directory::claimed`]), releases the queue in order. The cache forgets a worker when
//! its instance says it is not there any more, or when the instance is gone.

use std::collections::{HashMap, VecDeque};

use crate::core::{InstanceId, PeerId};

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
}

/// The location cache and the queues of messages waiting for a locate; `T` is one waiting message.
pub struct Directory<T> {
    locations: HashMap<PeerId, InstanceId>,
    waiting: HashMap<PeerId, VecDeque<T>>,
}

impl<T> Default for Directory<T> {
    fn default() -> Self {
        Directory { locations: HashMap::new(), waiting: HashMap::new() }
    }
}

impl<T> Directory<T> {
    /// Whether a locate of `worker` is under way.
    pub fn is_locating(&self, worker: PeerId) -> bool {
        self.waiting.contains_key(&worker)
    }

    /// Where `item`, a message for `worker`, goes. A message never overtakes one queued before it.
    pub fn route(&mut self, worker: PeerId, item: T) -> Route<T> {
        if let Some(queue) = self.waiting.get_mut(&worker) {
            queue.push_back(item);
            return Route::Queued;
        }
        match self.locations.get(&worker) {
            Some(&instance) => Route::At(instance, item),
            None => {
                self.waiting.insert(worker, VecDeque::from([item]));
                Route::Locate
            }
        }
    }

    /// The answer to a locate: cached if found. Returns the messages that waited for it, in
    /// order (none if the locate was already answered, by a claim).
    pub fn located(&mut self, worker: PeerId, found: Result<InstanceId, Lookup>) -> VecDeque<T> {
        let Some(queue) = self.waiting.remove(&worker) else { return VecDeque::new() };
        if let Ok(instance) = found {
            self.locations.insert(worker, instance);
        }
        queue
    }

    /// `worker` registered on `instance` (its claim): a cached location moves there, and a
    /// locate still waiting, maybe for the worker's subscription to reach other NATS servers,
    /// has its answer. Returns the messages that waited, in order.
    pub fn claimed(&mut self, worker: PeerId, instance: InstanceId) -> VecDeque<T> {
        if let Some(location) = self.locations.get_mut(&worker) {
            *location = instance;
        }
        self.located(worker, Ok(instance))
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

    /// Drops the waiting messages `keep` refuses.
    pub fn retain_waiting(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for queue in self.waiting.values_mut() {
            queue.retain(&mut keep);
        }
    }

    /// The instance `worker` is cached at.
    pub fn location(&self, worker: PeerId) -> Option<InstanceId> {
        self.locations.get(&worker).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_wait_for_one_locate_and_leave_in_order() {
        let mut d = Directory::default();
        assert_eq!(d.route(7, 'a'), Route::Locate);
        assert_eq!(d.route(7, 'b'), Route::Queued, "one locate per worker");
        assert!(d.is_locating(7));
        assert_eq!(d.located(7, Ok(0xb)), ['a', 'b']);
        assert_eq!(d.route(7, 'c'), Route::At(0xb, 'c'), "cached");
        assert!(d.located(7, Ok(0xc)).is_empty(), "a late answer changes nothing");
        assert_eq!(d.location(7), Some(0xb));
    }

    #[test]
    fn a_claim_answers_a_waiting_locate() {
        let mut d = Directory::default();
        assert_eq!(d.route(7, 'a'), Route::Locate);
        assert_eq!(d.claimed(7, 0xb), ['a']);
        assert!(!d.is_locating(7));
        // The locate's own answer, arriving later, finds nothing waiting.
        assert!(d.located(7, Err(Lookup::NotFound)).is_empty());
        assert_eq!(d.route(7, 'b'), Route::At(0xb, 'b'));
        // A claim from elsewhere moves the cached location.
        assert!(d.claimed(7, 0xc).is_empty());
        assert_eq!(d.location(7), Some(0xc));
    }

    #[test]
    fn a_failed_locate_releases_the_queue_and_caches_nothing() {
        let mut d = Directory::default();
        d.route(7, 'a');
        assert_eq!(d.located(7, Err(Lookup::NotFound)), ['a']);
        assert_eq!(d.route(7, 'b'), Route::Locate, "looked up again");
    }

    #[test]
    fn locations_are_forgotten_when_the_worker_or_its_instance_leaves() {
        let mut d = Directory::default();
        d.route(1, ());
        d.located(1, Ok(0xb));
        d.route(2, ());
        d.located(2, Ok(0xb));
        d.left(1, 0xc);
        assert_eq!(d.location(1), Some(0xb), "only the instance it is cached at can say it left");
        d.left(1, 0xb);
        assert_eq!(d.location(1), None);
        d.instance_gone(0xb);
        assert_eq!(d.location(2), None);
    }

    #[test]
    fn waiting_messages_of_an_ended_stream_are_dropped() {
        let mut d = Directory::default();
        d.route(7, 1);
        d.route(7, 2);
        d.route(7, 1);
        d.retain_waiting(|conn| *conn != 1);
        assert_eq!(d.located(7, Ok(0xb)), [2]);
    }
}
