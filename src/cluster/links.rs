//! This instance's side of every [`link`](super::link): records packed into numbered frames,
//! acknowledgements owed and piggybacked, resends, and links that died.
//!
//! Sans-IO: records go in with [`Links::push`], frames come out of [`Links::flush`] and
//! [`Links::resend`] through a `send(instance, bytes)` callback, arriving frames go in with
//! [`Links::receive`], which returns their records once, in order. `now` is an argument.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Histogram};
use prost::Message;

use super::link::{Arrival, InFlight, InLink, OutLink};
use super::wire::{self, record::Kind};
use crate::core::InstanceId;
use crate::metrics as names;

/// Records are packed into frames of at most this many bytes of records, or less when NATS' own
/// `max_payload` is smaller (see [`frame_limit`]).
pub const FRAME_BYTES: usize = 256 * 1024;
/// What a frame adds to its records, at most: its own fields (`from`, `epoch`, `seq`, the
/// acknowledgement), and the seal's trailer.
pub const FRAME_OVERHEAD: usize = 64 + super::seal::TRAILER;
/// What a record adds to its message's payload, at most: its kind, the client, its stream, the
/// worker, the event, the error code, and the lengths of each.
pub const RECORD_OVERHEAD: usize = 96;

/// The bytes of records one frame may carry when NATS takes payloads of `max_payload` bytes.
pub fn frame_limit(max_payload: usize) -> usize {
    FRAME_BYTES.min(max_payload.saturating_sub(FRAME_OVERHEAD))
}

/// Whether a message of `payload` bytes fits one frame under `max_payload`.
pub fn fits(payload: usize, max_payload: usize) -> bool {
    payload + RECORD_OVERHEAD <= frame_limit(max_payload)
}

/// How long the receiving half of a forgotten link is kept, so that a replay of its old frames
/// (which the seal lets through for [`FRESH_FOR`](super::seal::FRESH_FOR)) is still recognised
/// as stale, and a sender that did not forget this instance goes on where it was.
pub const RETIRED_FOR: Duration = Duration::from_secs(60);

/// Records pushed since the last flush, with what each owes its sender if it is lost.
struct Outgoing<O> {
    records: Vec<wire::Record>,
    origins: Vec<O>,
}

impl<O> Default for Outgoing<O> {
    fn default() -> Self {
        Outgoing { records: Vec::new(), origins: Vec::new() }
    }
}

/// The links to and from every other instance. `O` is what a record owes its sender when it
/// is lost (an `ERROR` to send back, or nothing).
pub struct Links<O> {
    me: InstanceId,
    out: HashMap<InstanceId, OutLink<O>>,
    building: HashMap<InstanceId, Outgoing<O>>,
    inbound: HashMap<InstanceId, InLink>,
    /// Receiving halves of forgotten links, and when they were forgotten.
    retired: HashMap<InstanceId, (InLink, Instant)>,
    ack_due: HashSet<InstanceId>,
    nak_due: HashSet<InstanceId>,
    /// The epoch of the last link opened: each new link to an instance takes the next one, so
    /// that the receiver tells a new link from an old one.
    last_epoch: u64,
    /// Bytes of records a frame may carry.
    frame_limit: usize,
    metrics: LinkMetrics,
}

impl<O> Links<O> {
    pub fn new(me: InstanceId) -> Self {
        Links {
            me,
            out: HashMap::new(),
            building: HashMap::new(),
            inbound: HashMap::new(),
            retired: HashMap::new(),
            ack_due: HashSet::new(),
            nak_due: HashSet::new(),
            last_epoch: 0,
            frame_limit: FRAME_BYTES,
            metrics: LinkMetrics::new(),
        }
    }

    /// Frames carry at most `limit` bytes of records (a record alone may exceed it).
    pub fn with_frame_limit(mut self, limit: usize) -> Self {
        self.frame_limit = limit;
        self
    }

    /// Whether the link to `to` holds as many unacknowledged frames as it may.
    pub fn is_full(&self, to: InstanceId) -> bool {
        self.out.get(&to).is_some_and(OutLink::is_full)
    }

    /// Queues a record for `to`; it leaves with the next [`Self::flush`].
    pub fn push(&mut self, to: InstanceId, kind: Kind, origin: O) {
        let outgoing = self.building.entry(to).or_default();
        outgoing.records.push(wire::Record { kind: Some(kind) });
        outgoing.origins.push(origin);
    }

    /// Packs what was pushed into frames and sends them, then the acknowledgements still owed.
    pub fn flush(&mut self, now: Instant, mut send: impl FnMut(InstanceId, Bytes)) {
        for (instance, outgoing) in std::mem::take(&mut self.building) {
            let mut records = outgoing.records.into_iter().zip(outgoing.origins).peekable();
            while records.peek().is_some() {
                let (mut chunk, mut origins, mut bytes) = (Vec::new(), Vec::new(), 0);
                // Records join the frame while they fit (a record alone always goes).
                while let Some((record, _)) = records.peek() {
                    let len = framed_len(record);
                    if !chunk.is_empty() && bytes + len > self.frame_limit {
                        break;
                    }
                    let (record, origin) = records.next().expect("peeked");
                    bytes += len;
                    chunk.push(record);
                    origins.push(origin);
                }
                self.metrics.records_out.increment(chunk.len() as u64);
                let (ack_epoch, ack_next, nak) = self.take_ack(instance).unwrap_or_default();
                let link = match self.out.entry(instance) {
                    std::collections::hash_map::Entry::Occupied(link) => link.into_mut(),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        self.last_epoch += 1;
                        slot.insert(OutLink::new(self.last_epoch, now))
                    }
                };
                let frame = wire::Frame {
                    from: self.me,
                    epoch: link.epoch,
                    seq: link.next_seq(),
                    records: chunk,
                    ack_epoch,
                    ack_next,
                    nak,
                };
                let bytes = Bytes::from(frame.encode_to_vec());
                link.sent(bytes.clone(), origins, now);
                self.metrics.frames_data.increment(1);
                send(instance, bytes);
            }
        }
        let owed: HashSet<InstanceId> = self.ack_due.union(&self.nak_due).copied().collect();
        for instance in owed {
            let Some((ack_epoch, ack_next, nak)) = self.take_ack(instance) else { continue };
            let frame = wire::Frame { from: self.me, ack_epoch, ack_next, nak, ..Default::default() };
            self.metrics.frames_ack.increment(1);
            send(instance, frame.encode_to_vec().into());
        }
    }

    /// The acknowledgement owed to `instance`, as it goes out: (epoch, next expected, gap seen).
    fn take_ack(&mut self, instance: InstanceId) -> Option<(u64, u64, bool)> {
        self.ack_due.remove(&instance);
        let nak = self.nak_due.remove(&instance);
        self.inbound.get(&instance).map(|inl| (inl.epoch, inl.next, nak))
    }

    /// Takes one frame from another instance: applies the acknowledgement it carries, and
    /// returns its records if it is the next frame of its link (nothing for a resend already
    /// taken, or a frame after a gap, which is asked for again), and the frames it
    /// acknowledged. Drop those after handing the records on: an answer in this frame to a
    /// message in one of them is then delivered before that message's reserved answer slot is
    /// given back.
    pub fn receive(&mut self, frame: wire::Frame, now: Instant) -> (Vec<wire::Record>, Vec<InFlight<O>>) {
        let from = frame.from;
        let mut acked = Vec::new();
        if frame.ack_epoch != 0
            && let Some(link) = self.out.get_mut(&from)
        {
            acked = link.acknowledged(frame.ack_epoch, frame.ack_next, frame.nak, now);
            for done in &acked {
                self.metrics.ack_seconds.record(now.saturating_duration_since(done.sent_at).as_secs_f64());
            }
        }
        (self.take(frame), acked)
    }

    /// The records of `frame` if it is the next of its link.
    fn take(&mut self, frame: wire::Frame) -> Vec<wire::Record> {
        let from = frame.from;
        if frame.seq == 0 {
            return Vec::new();
        }
        let retired = &mut self.retired;
        let link = self
            .inbound
            .entry(from)
            .or_insert_with(|| retired.remove(&from).map_or_else(|| InLink::new(frame.epoch), |(l, _)| l));
        match link.arrive(frame.epoch, frame.seq) {
            Arrival::Next => {
                self.ack_due.insert(from);
                self.metrics.records_in.increment(frame.records.len() as u64);
                frame.records
            }
            Arrival::Duplicate => {
                self.ack_due.insert(from);
                Vec::new()
            }
            Arrival::Gap => {
                self.nak_due.insert(from);
                Vec::new()
            }
            Arrival::Stale => {
                self.metrics.stale.increment(1);
                Vec::new()
            }
        }
    }

    /// Sends again what a link has not had acknowledged in time, or was told it missed.
    pub fn resend(&mut self, now: Instant, mut send: impl FnMut(InstanceId, Bytes)) {
        for (instance, link) in &mut self.out {
            for frame in link.to_resend(now) {
                self.metrics.frames_resent.increment(1);
                send(*instance, frame);
            }
        }
    }

    /// The instances whose link made no progress for [`super::link::GIVE_UP_AFTER`].
    pub fn dead(&self, now: Instant) -> Vec<InstanceId> {
        self.out.iter().filter(|(_, link)| link.is_dead(now)).map(|(instance, _)| *instance).collect()
    }

    /// Forgets both links with `instance`; returns what their unacknowledged and unsent records
    /// owe their senders, oldest first. The receiving half is kept for [`RETIRED_FOR`].
    pub fn forget(&mut self, instance: InstanceId, now: Instant) -> Vec<O> {
        let mut lost: Vec<O> = match self.out.remove(&instance) {
            Some(mut link) => link.drain().flat_map(|f| f.origins).collect(),
            None => Vec::new(),
        };
        lost.extend(self.building.remove(&instance).into_iter().flat_map(|o| o.origins));
        if let Some(inbound) = self.inbound.remove(&instance) {
            self.retired.insert(instance, (inbound, now));
        }
        self.ack_due.remove(&instance);
        self.nak_due.remove(&instance);
        lost
    }

    /// Drops the receiving halves retired for longer than [`RETIRED_FOR`].
    pub fn prune(&mut self, now: Instant) {
        self.retired.retain(|_, (_, at)| now.saturating_duration_since(*at) < RETIRED_FOR);
    }

    /// Takes back, unsent, the records pushed since the last flush whose origin is
    /// `refusable` (NATS is down: they are refused now), and returns what they owe; the others
    /// wait for the next flush.
    pub fn unsend(&mut self, refusable: impl Fn(&O) -> bool) -> Vec<O> {
        let mut refused = Vec::new();
        for outgoing in self.building.values_mut() {
            let (mut records, mut origins) = (Vec::new(), Vec::new());
            for (record, origin) in outgoing.records.drain(..).zip(outgoing.origins.drain(..)) {
                if refusable(&origin) {
                    refused.push(origin);
                } else {
                    records.push(record);
                    origins.push(origin);
                }
            }
            (outgoing.records, outgoing.origins) = (records, origins);
        }
        self.building.retain(|_, outgoing| !outgoing.records.is_empty());
        refused
    }

    /// Whether nothing is waiting to leave or to be acknowledged.
    pub fn is_quiet(&self) -> bool {
        self.building.is_empty() && self.out.values().all(|l| l.in_flight() == 0)
    }
}

/// A record's bytes in its frame: its encoding, its field tag and its length.
fn framed_len(record: &wire::Record) -> usize {
    let len = record.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

struct LinkMetrics {
    frames_data: Counter,
    frames_ack: Counter,
    frames_resent: Counter,
    records_out: Counter,
    records_in: Counter,
    /// Frames of an older link epoch (counted with the frames the seal rejects).
    stale: Counter,
    ack_seconds: Histogram,
}

impl LinkMetrics {
    fn new() -> Self {
        LinkMetrics {
            frames_data: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "data"),
            frames_ack: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "ack"),
            frames_resent: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "resent"),
            records_out: metrics::counter!(names::CLUSTER_RECORDS, "direction" => "out"),
            records_in: metrics::counter!(names::CLUSTER_RECORDS, "direction" => "in"),
            stale: metrics::counter!(names::CLUSTER_REJECTED, "kind" => "frame"),
            ack_seconds: metrics::histogram!(names::CLUSTER_ACK),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::link::{GIVE_UP_AFTER, RESEND_AFTER};

    const A: InstanceId = 0xa;
    const B: InstanceId = 0xb;

    fn gone(client: i64) -> Kind {
        Kind::ClientGone(wire::ClientGone { client, ..Default::default() })
    }

    fn clients(records: &[wire::Record]) -> Vec<i64> {
        records
            .iter()
            .map(|r| match &r.kind {
                Some(Kind::ClientGone(g)) => g.client,
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    /// Flushes `links`, returning the frames it sent to B.
    fn flush(links: &mut Links<i64>, now: Instant) -> Vec<wire::Frame> {
        let mut sent = Vec::new();
        links.flush(now, |to, bytes| {
            assert_eq!(to, B);
            sent.push(wire::Frame::decode(bytes).unwrap());
        });
        sent
    }

    #[test]
    fn records_arrive_once_in_order_and_are_acknowledged() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Links::<i64>::new(A), Links::<i64>::new(B));
        a.push(B, gone(1), 1);
        a.push(B, gone(2), 2);
        let frames = flush(&mut a, t0);
        assert_eq!(frames.len(), 1, "one frame per flush when the records fit");
        assert_eq!(clients(&b.receive(frames[0].clone(), t0).0), [1, 2]);
        assert!(b.receive(frames[0].clone(), t0).0.is_empty(), "a resend is not handed on again");
        assert!(!a.is_quiet(), "unacknowledged");
        // B owes an acknowledgement; it carries it back on its next frame or alone.
        let mut acks = Vec::new();
        b.flush(t0, |to, bytes| acks.push((to, wire::Frame::decode(bytes).unwrap())));
        assert_eq!(acks.len(), 1);
        assert_eq!((acks[0].0, acks[0].1.seq, acks[0].1.ack_next), (A, 0, 2));
        assert!(a.receive(acks[0].1.clone(), t0).0.is_empty());
        assert!(a.is_quiet());
    }

    #[test]
    fn a_lost_frame_is_resent_after_silence_and_a_gap_asks_at_once() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Links::<i64>::new(A), Links::<i64>::new(B));
        a.push(B, gone(1), 1);
        let lost = flush(&mut a, t0);
        a.push(B, gone(2), 2);
        let second = flush(&mut a, t0);
        assert_eq!((lost[0].seq, second[0].seq), (1, 2));
        // The second arrives alone: a gap, nothing handed on, a NAK owed.
        assert!(b.receive(second[0].clone(), t0).0.is_empty());
        let mut nak = Vec::new();
        b.flush(t0, |_, bytes| nak.push(wire::Frame::decode(bytes).unwrap()));
        assert!(nak[0].nak && nak[0].ack_next == 1, "{:?}", nak[0]);
        a.receive(nak[0].clone(), t0);
        let mut resent = Vec::new();
        a.resend(t0, |_, bytes| resent.push(wire::Frame::decode(bytes).unwrap()));
        assert_eq!(resent.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2], "go-back-N from the gap");
        let got: Vec<i64> = resent.into_iter().flat_map(|f| clients(&b.receive(f, t0).0)).collect();
        assert_eq!(got, [1, 2]);

        // Silence: without any acknowledgement, everything is resent after RESEND_AFTER.
        let mut c = Links::<i64>::new(A);
        c.push(B, gone(3), 3);
        flush(&mut c, t0);
        let mut again = 0;
        c.resend(t0 + RESEND_AFTER / 2, |_, _| again += 1);
        assert_eq!(again, 0, "not before RESEND_AFTER");
        c.resend(t0 + RESEND_AFTER, |_, _| again += 1);
        assert_eq!(again, 1);
    }

    #[test]
    fn a_link_without_progress_is_dead_and_gives_back_what_it_owed() {
        let t0 = Instant::now();
        let mut a = Links::<i64>::new(A);
        a.push(B, gone(1), 1);
        flush(&mut a, t0);
        a.push(B, gone(2), 2);
        assert!(a.dead(t0 + GIVE_UP_AFTER - Duration::from_millis(1)).is_empty());
        assert_eq!(a.dead(t0 + GIVE_UP_AFTER), [B]);
        assert_eq!(a.forget(B, t0), [1, 2], "in flight, then not yet sent");
        assert!(a.is_quiet());
        // A new link to the same instance is a new epoch: the receiver starts it afresh.
        a.push(B, gone(3), 3);
        let frames = flush(&mut a, t0 + GIVE_UP_AFTER);
        assert_eq!((frames[0].epoch, frames[0].seq), (2, 1));
    }

    #[test]
    fn a_forgotten_link_still_refuses_its_old_frames_and_takes_a_new_epoch() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Links::<i64>::new(A), Links::<i64>::new(B));
        a.push(B, gone(1), 1);
        let first = flush(&mut a, t0);
        assert_eq!(clients(&b.receive(first[0].clone(), t0).0), [1]);
        // B gives A up (a partition), A too; A's next link is a new epoch.
        b.forget(A, t0);
        a.forget(B, t0);
        a.push(B, gone(2), 2);
        let second = flush(&mut a, t0);
        assert_eq!(clients(&b.receive(second[0].clone(), t0).0), [2]);
        // A replay of the old epoch's frame, even after B forgot A, is not handed on again.
        b.forget(A, t0);
        assert!(b.receive(first[0].clone(), t0).0.is_empty(), "stale epoch");
        b.prune(t0 + RETIRED_FOR);
        assert!(b.retired.is_empty());
    }

    #[test]
    fn big_batches_are_cut_into_frames_of_bounded_size() {
        let t0 = Instant::now();
        let mut a = Links::<i64>::new(A);
        let payload = bytes::Bytes::from(vec![0u8; 100 * 1024]);
        for i in 0..6 {
            let signal = wire::ClientSignal { client: i, payload: payload.clone(), ..Default::default() };
            a.push(B, Kind::ClientSignal(signal), i);
        }
        let frames = flush(&mut a, t0);
        assert_eq!(frames.len(), 3, "two records of 100 KiB fit FRAME_BYTES, three do not");
        assert!(frames.iter().all(|f| f.encoded_len() <= FRAME_BYTES + FRAME_OVERHEAD));
        assert_eq!(frames.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2, 3]);

        // Under a small NATS max_payload, every frame (sealed) fits it.
        let max_payload = 64 * 1024;
        let mut small = Links::<i64>::new(A).with_frame_limit(frame_limit(max_payload));
        let payload = bytes::Bytes::from(vec![0u8; 16 * 1024]);
        assert!(fits(payload.len(), max_payload));
        for i in 0..20 {
            let signal = wire::ClientSignal { client: i, payload: payload.clone(), ..Default::default() };
            small.push(B, Kind::ClientSignal(signal), i);
        }
        let frames = flush(&mut small, t0);
        assert_eq!(frames.len(), 7, "3 records a frame");
        for f in &frames {
            assert!(f.encoded_len() + crate::cluster::seal::TRAILER <= max_payload, "{}", f.encoded_len());
        }
        assert!(!fits(max_payload, max_payload), "a message as large as max_payload cannot cross");
    }

    #[test]
    fn while_nats_is_down_refusable_records_are_given_back_and_the_others_wait() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Links::<i64>::new(A), Links::<i64>::new(B));
        for client in 1..=4 {
            a.push(B, gone(client), client);
        }
        let odd = |origin: &i64| origin % 2 == 1;
        assert_eq!(a.unsend(odd), [1, 3]);
        assert!(!a.is_quiet(), "2 and 4 wait");
        assert!(a.unsend(odd).is_empty());
        let frames = flush(&mut a, t0);
        assert_eq!(clients(&b.receive(frames[0].clone(), t0).0), [2, 4]);
        a.push(B, gone(5), 5);
        assert_eq!(a.unsend(odd), [5]);
        assert!(flush(&mut a, t0).is_empty(), "nothing left to send");
    }
}

/// The links of two instances over a network that loses, duplicates and reorders frames at
/// random (a property test).
#[cfg(test)]
mod lossy_network;
