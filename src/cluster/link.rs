//! Reliable, ordered delivery between two instances over core NATS, which may lose messages
//! when a server dies or a connection is re-established.
//!
//! Sans-IO. The sending side numbers frames per link *epoch* (1, 2, 3...), keeps each until the
//! receiver acknowledges it, and resends everything unacknowledged (go-back-N) when the receiver
//! reports a gap or nothing was acknowledged for [`RESEND_AFTER`]. The receiver accepts only the
//! next frame in sequence, so records reach the shards exactly once and in order; it
//! acknowledges cumulatively, once per batch it reads. A link that makes no progress for
//! [`GIVE_UP_AFTER`] is declared dead: what it holds is refused to its senders.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Resend unacknowledged frames when none was acknowledged for this long.
pub const RESEND_AFTER: Duration = Duration::from_millis(250);
/// A link with unacknowledged frames and no progress for this long is dead.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3);
/// Frames a link keeps unacknowledged before it refuses more.
pub const WINDOW: usize = 4096;

/// One sent, unacknowledged frame and what its records owe their senders if it is lost.
pub struct InFlight<O> {
    pub seq: u64,
    pub frame: Bytes,
    pub origins: Vec<O>,
    pub sent_at: Instant,
}

/// The sending half of a link to one instance.
pub struct OutLink<O> {
    pub epoch: u64,
    next_seq: u64,
    in_flight: VecDeque<InFlight<O>>,
    /// When the oldest frame in flight was sent, acknowledged, or last resent.
    progress_at: Instant,
    resend_due: bool,
}

impl<O> OutLink<O> {
    pub fn new(epoch: u64, now: Instant) -> Self {
        OutLink { epoch, next_seq: 1, in_flight: VecDeque::new(), progress_at: now, resend_due: false }
    }

    /// The sequence number the next frame takes.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= WINDOW
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Records a frame just sent, numbered [`Self::next_seq`].
    pub fn sent(&mut self, frame: Bytes, origins: Vec<O>, now: Instant) {
        if self.in_flight.is_empty() {
            self.progress_at = now;
        }
        self.in_flight.push_back(InFlight { seq: self.next_seq, frame, origins, sent_at: now });
        self.next_seq += 1;
    }

    /// Applies an acknowledgement of every frame before `next`; `nak` reports a gap at `next`.
    /// Returns the frames acknowledged, oldest first.
    pub fn acknowledged(&mut self, epoch: u64, next: u64, nak: bool, now: Instant) -> Vec<InFlight<O>> {
        if epoch != self.epoch {
            return Vec::new();
        }
        let mut done = Vec::new();
        while self.in_flight.front().is_some_and(|f| f.seq < next) {
            done.extend(self.in_flight.pop_front());
        }
        if !done.is_empty() {
            self.progress_at = now;
        }
        if nak && !self.in_flight.is_empty() {
            self.resend_due = true;
        }
        done
    }

    /// The frames to send again now, if any, oldest first.
    pub fn to_resend(&mut self, now: Instant) -> Vec<Bytes> {
        let due = !self.in_flight.is_empty()
            && (self.resend_due || now.saturating_duration_since(self.progress_at) >= RESEND_AFTER);
        if !due {
            return Vec::new();
        }
        self.resend_due = false;
        self.progress_at = now.max(self.progress_at);
        self.in_flight.iter().map(|f| f.frame.clone()).collect()
    }

    /// Whether the link made no progress for [`GIVE_UP_AFTER`] while frames were in flight.
    pub fn is_dead(&self, now: Instant) -> bool {
        self.in_flight
            .front()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.sent_at) >= GIVE_UP_AFTER)
    }

    /// Everything in flight, for refusing it when the link is dropped.
    pub fn drain(&mut self) -> impl Iterator<Item = InFlight<O>> + '_ {
        self.in_flight.drain(..)
    }
}

/// What the receiving half makes of one arriving frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next frame: hand its records on.
    Next,
    /// Already handed on (a resend): acknowledge again, do nothing else.
    Duplicate,
    /// A frame after a gap: drop it and ask for a resend from [`InLink::next`].
    Gap,
    /// A frame of an older epoch than the link's: a replay, or a straggler of a link the
    /// sender has since replaced. Dropped.
    Stale,
}

/// The receiving half of a link from one instance.
#[derive(Debug)]
pub struct InLink {
    pub epoch: u64,
    /// The sequence number expected next.
    pub next: u64,
}

impl InLink {
    /// A link from an instance not heard from before, or whose epoch changed.
    pub fn new(epoch: u64) -> Self {
        InLink { epoch, next: 1 }
    }

    pub fn arrive(&mut self, epoch: u64, seq: u64) -> Arrival {
        // A sender numbers its links' epochs upwards: only a newer one replaces this one.
        match epoch.cmp(&self.epoch) {
            std::cmp::Ordering::Less => return Arrival::Stale,
            std::cmp::Ordering::Greater => *self = InLink::new(epoch),
            std::cmp::Ordering::Equal => {}
        }
        match seq.cmp(&self.next) {
            std::cmp::Ordering::Equal => {
                self.next += 1;
                Arrival::Next
            }
            std::cmp::Ordering::Less => Arrival::Duplicate,
            std::cmp::Ordering::Greater => Arrival::Gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[test]
    fn frames_are_kept_until_acknowledged() {
        let t0 = Instant::now();
        let mut out = OutLink::<u8>::new(7, t0);
        for n in 1..=3 {
            assert_eq!(out.next_seq(), n as u64);
            out.sent(frame(n), vec![n], t0);
        }
        assert_eq!(out.acknowledged(99, 3, false, t0).len(), 0, "another epoch's ack is ignored");
        let done = out.acknowledged(7, 3, false, t0);
        assert_eq!(done.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(out.in_flight(), 1);
        assert!(out.acknowledged(7, 2, false, t0).is_empty(), "a stale ack changes nothing");
    }

    #[test]
    fn resends_after_silence_or_a_gap_report() {
        let t0 = Instant::now();
        let mut out = OutLink::<()>::new(1, t0);
        out.sent(frame(1), vec![], t0);
        out.sent(frame(2), vec![], t0);
        assert!(out.to_resend(t0 + Duration::from_millis(10)).is_empty());
        let later = t0 + RESEND_AFTER;
        assert_eq!(out.to_resend(later), [frame(1), frame(2)]);
        assert!(out.to_resend(later).is_empty(), "not again at once");
        out.acknowledged(1, 2, true, later);
        assert_eq!(out.to_resend(later), [frame(2)], "a nak resends at once");
    }

    #[test]
    fn a_link_without_progress_dies() {
        let t0 = Instant::now();
        let mut out = OutLink::<()>::new(1, t0);
        assert!(!out.is_dead(t0 + GIVE_UP_AFTER * 2), "an idle link is not dead");
        out.sent(frame(1), vec![], t0);
        assert!(!out.is_dead(t0 + GIVE_UP_AFTER / 2));
        assert!(out.is_dead(t0 + GIVE_UP_AFTER));
        assert_eq!(out.drain().count(), 1);
    }

    #[test]
    fn the_receiver_takes_frames_once_and_in_order() {
        let mut inl = InLink::new(5);
        assert_eq!(inl.arrive(5, 1), Arrival::Next);
        assert_eq!(inl.arrive(5, 3), Arrival::Gap);
        assert_eq!(inl.arrive(5, 1), Arrival::Duplicate);
        assert_eq!(inl.arrive(5, 2), Arrival::Next);
        assert_eq!(inl.arrive(5, 3), Arrival::Next);
        assert_eq!(inl.next, 4);
        // A new epoch (the sender restarted its link) starts again at 1.
        assert_eq!(inl.arrive(6, 2), Arrival::Gap);
        assert_eq!(inl.arrive(6, 1), Arrival::Next);
        // An old epoch never resets the link again: a replayed frame of it is dropped.
        assert_eq!(inl.arrive(5, 4), Arrival::Stale);
        assert_eq!(inl.arrive(6, 2), Arrival::Next);
    }
}
