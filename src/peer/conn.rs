//! One peer's stream as the distributor holds it: a bounded outbound queue the shards deliver
//! into, and the response stream tonic writes from it.
//!
//! The queue is bounded by a count of slots, not by the channel: every message a peer sends
//! takes a slot for its answer before it is routed ([`Permit`]), and gives it back when the
//! answer is not needed, which is almost always. A tokio bounded channel does this with its
//! semaphore, whose every release takes a lock (twice per relayed message: the unused answer,
//! and the written message); the slot count here is one atomic add and one subtract, and the
//! messages go through an unbounded channel that the count keeps bounded. 4 % less server CPU
//! per message at window 32 (BENCHMARKS.md).
//!
//! Over 500 lines: the queue and its response stream share the slot count and the way a stream
//! ends, and a resumable stream's numbering writes through the same phases.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::numbers::Numbers;
use super::resume::Released;
use super::written;
use crate::core::{CloseReason, ConnId, DeliverError, InstanceId, Outbound};
use crate::pb::RtcEvent;

/// Hands out [`ConnId`]s, which order the streams of one id across the cluster (the newest
/// wins): a hybrid logical clock, nanoseconds since the Unix epoch, strictly increasing, and
/// never behind a stream this instance has heard of ([`Self::observe`], fed the claims of
/// other instances). So a stream opened after the claim of another reached this instance is
/// newer than it whatever the two wall clocks say; only streams opened within the time a
/// claim takes to cross (milliseconds) are ordered by wall clock.
#[derive(Debug, Default)]
pub struct ConnClock {
    last: AtomicU64,
    /// Nanoseconds added to the wall clock (tests only).
    skew_ns: i64,
}

impl ConnClock {
    /// A clock that runs `skew_ms` ahead of the wall clock (behind if negative): for tests.
    pub fn skewed(skew_ms: i64) -> Self {
        ConnClock { last: AtomicU64::new(0), skew_ns: skew_ms.saturating_mul(1_000_000) }
    }

    pub fn next(&self, instance: InstanceId) -> ConnId {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let now = wall.saturating_add_signed(self.skew_ns);
        let previous = self.last.fetch_max(now, Ordering::Relaxed);
        let at = if previous >= now { self.last.fetch_add(1, Ordering::Relaxed) + 1 } else { now };
        ConnId { at, instance }
    }

    /// A stream opened at `at` exists elsewhere: streams opened here from now on are newer.
    pub fn observe(&self, at: u64) {
        self.last.fetch_max(at, Ordering::Relaxed);
    }
}

/// The edge's handle on one of its streams; cheap to clone.
pub type Sink = Arc<Conn>;

/// The status every stream ends with when the distributor shuts down.
pub fn shutting_down() -> Status {
    Status::unavailable("the distributor is shutting down")
}

/// How a stream ends.
#[derive(Clone, Debug)]
pub enum Close {
    /// Write what is already queued, then end with this status (`None`: OK).
    Drain(Option<Status>),
    /// End now with this status; what is queued is not written.
    Now(Status),
}

pub struct Conn {
    id: ConnId,
    tx: mpsc::UnboundedSender<Outbound>,
    /// Slots taken: messages queued plus answers reserved. Never above `capacity`, which bounds
    /// the channel.
    taken: AtomicUsize,
    capacity: usize,
    /// Why it ends; the first reason given wins. Unset when the peer went away.
    close: OnceLock<Close>,
    /// Set when the stream ends, for any reason; read on every message, so a plain flag.
    ended: AtomicBool,
    /// Sessions this stream holds: as a client, on every shard and across instances; as a
    /// worker, on its shard.
    sessions: AtomicUsize,
    /// The last number the peer gave one of its messages (resumable streams; 0: none yet).
    received: AtomicU64,
    /// The stream's reading task, woken when the stream ends and when a slot frees up in a full
    /// queue; and its response writer, woken when the stream ends.
    reader: AtomicWaker,
    writer: AtomicWaker,
}

impl Conn {
    /// A new stream and the response stream that writes its queue of `queue` slots, `encode`
    /// turning each [`Outbound`] into the peer's message type.
    pub fn open<M>(id: ConnId, queue: usize, encode: Encode<M>) -> (Sink, OutboundStream<M>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            id,
            tx,
            taken: AtomicUsize::new(0),
            capacity: queue,
            close: OnceLock::new(),
            ended: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
        });
        let stream = OutboundStream {
            rx,
            conn: conn.clone(),
            phase: Phase::Open,
            encode,
            numbers: None,
            resumed_welcome: false,
        };
        (conn, stream)
    }

    /// [`Self::open`] for a resumable peer: what it is written is numbered, and the last
    /// `queue` messages written are kept for replay (see [`Numbers`]).
    pub fn open_numbered<M>(id: ConnId, queue: usize, encode: Encode<M>) -> (Sink, OutboundStream<M>) {
        let (conn, mut stream) = Self::open(id, queue, encode);
        stream.numbers = Some(Numbers::new(queue));
        (conn, stream)
    }

    /// The peer numbered one of its messages `seq` (0: unnumbered, ignored).
    pub fn received(&self, seq: u64) {
        if seq != 0 {
            self.received.fetch_max(seq, Ordering::Relaxed);
        }
    }

    /// The last number the peer gave one of its messages.
    pub fn last_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Messages queued or answers reserved (held, while a resumable peer is detached).
    pub fn queued(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Ends the stream; the first call decides how.
    pub fn end(&self, how: Close) {
        let _ = self.close.set(how);
        self.mark_ended();
    }

    fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }

    /// Whether the stream is ending.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Resolves when the stream is ending (for its one reading task).
    pub fn ended(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_ended(&self.reader, cx))
    }

    fn poll_ended(&self, slot: &AtomicWaker, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_ended() {
            return Poll::Ready(());
        }
        slot.register(cx.waker());
        if self.is_ended() { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Takes a slot if one is free.
    fn take_slot(&self) -> bool {
        let capacity = self.capacity;
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| (t < capacity).then_some(t + 1))
            .is_ok()
    }

    /// Gives a slot back (its message was written, or its answer was not needed), waking the
    /// reading task if it waits for room.
    fn free_slot(&self) {
        // From full to one free (also when owed messages had taken it past full).
        if self.taken.fetch_sub(1, Ordering::AcqRel) == self.capacity {
            self.reader.wake();
        }
    }

    /// Reserves room in this stream's own queue for the answer to a message it sent, waiting
    /// while the peer has not read earlier answers: a peer that does not read its answers is
    /// not read from either. `None` once the stream is ending. For the stream's one reading
    /// task.
    pub async fn reserve(self: &Arc<Self>) -> Option<Permit> {
        std::future::poll_fn(|cx| {
            // Registered before looking, so a slot freed or an end in between wakes this task.
            self.reader.register(cx.waker());
            match self.try_reserve() {
                Some(permit) => Poll::Ready(Some(permit)),
                None if self.is_ended() => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// [`Self::reserve`] when there is room now.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Permit> {
        self.take_slot().then(|| Permit { conn: Some(self.clone()) })
    }

    /// Queues `msg` without blocking.
    pub fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        if self.is_ended() {
            return Err(DeliverError::Closed);
        }
        if !self.take_slot() {
            return Err(DeliverError::Full);
        }
        self.tx.send(msg).map_err(|_| DeliverError::Closed)
    }

    /// Queues a message owed to the peer unasked, above the bound if the queue is full (see
    /// `PeerSink::deliver_owed`). Not written if the stream has ended.
    pub fn deliver_owed(&self, msg: Outbound) {
        if self.is_ended() {
            return;
        }
        // Taken even past the capacity: until the peer reads below it again, its queue refuses
        // other deliveries as full.
        self.taken.fetch_add(1, Ordering::AcqRel);
        let _ = self.tx.send(msg);
    }

    /// Counts one more session held by this (client) stream, unless it holds `max` already
    /// (0: no cap).
    pub fn open_session(&self, max: usize) -> bool {
        self.sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok()
    }

    /// One session counted by [`Self::open_session`] ended.
    pub fn close_session(&self) {
        let _ = self.sessions.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Sessions this stream holds.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Ends the stream (`how`) if it is idle: nothing queued, no answer reserved (no message
    /// of the peer's on its way), no session. In one step against the reading task and the
    /// shards: the slots are taken all at once first, so that nothing can be reserved or
    /// queued meanwhile, and a session a shard opens meanwhile (counted before its first
    /// message is queued) is seen. A message the reading task read but could not reserve an
    /// answer for is not routed, and not counted as received.
    pub fn end_if_idle(&self, how: Close) -> bool {
        const ALL: usize = usize::MAX / 2;
        if self.sessions() > 0
            || self.taken.compare_exchange(0, ALL, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return false;
        }
        if self.sessions() > 0 {
            // Owed messages may have been added meanwhile: only what was taken is given back.
            self.taken.fetch_sub(ALL, Ordering::AcqRel);
            self.reader.wake();
            return false;
        }
        self.end(how);
        true
    }

    /// Ends the stream for a reason of the routing core's.
    pub fn close(&self, reason: CloseReason) {
        let status = match reason {
            CloseReason::Superseded => Status::aborted("this peer id was claimed by a newer stream"),
            CloseReason::NotReading => {
                crate::warn_throttled!(conn = %self.id, "ending a stream that does not read its messages");
                Status::resource_exhausted("the outbound queue is full: this stream does not read")
            }
        };
        self.end(Close::Now(status));
    }
}

/// A slot taken in a stream's queue for one message; given back if dropped unused.
pub struct Permit {
    /// `None` once sent.
    conn: Option<Sink>,
}

impl Permit {
    /// Queues `msg` in the reserved slot. If the stream has ended it is not written, as
    /// anything else queued for it.
    pub fn send(mut self, msg: Outbound) {
        let conn = self.conn.take().expect("a permit is sent once");
        // The slot stays taken until the response writer takes the message.
        let _ = conn.tx.send(msg);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.free_slot();
            // A draining stream waits for the answers it owes; this one is not needed.
            if conn.is_ended() {
                conn.writer.wake();
            }
        }
    }
}

enum Phase {
    Open,
    Draining(Option<Status>),
    Done,
}

/// The response stream of one peer: its queued messages, then the status it ends with. Drained
/// (a clean end, a shutdown), it also writes the answers still owed to messages the peer sent
/// before the end, which hold reserved slots until they are sent or found not needed.
/// Dropping it (the peer went away) ends the stream's reading side too.
pub struct OutboundStream<M> {
    rx: mpsc::UnboundedReceiver<Outbound>,
    conn: Sink,
    phase: Phase,
    encode: Encode<M>,
    /// Resumable peers: the numbering, and what was written, for replay.
    numbers: Option<Numbers>,
    /// The welcome says `resumed`: the peer moved here from another instance.
    resumed_welcome: bool,
}

/// Turns a message into the peer's message type, with its number (resumable streams).
pub type Encode<M> = fn(Outbound, Numbering) -> M;

/// What a resumable stream's message says of itself besides the message (fields 6 and 7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Numbering {
    /// The message's number; in the welcome, the last number received from the peer.
    pub seq: u64,
    /// In the welcome: whether the stream took over the peer's earlier one.
    pub resumed: bool,
}

impl<M> OutboundStream<M> {
    /// Hands one message to tonic: its slot frees up, and it is counted as written.
    fn write(&mut self, msg: Outbound) -> M {
        self.conn.free_slot();
        written::count(&msg);
        let numbering = match &mut self.numbers {
            None => Numbering::default(),
            // The welcome is not numbered: it says what was last received from the peer.
            Some(_) if msg.event == RtcEvent::Blank => Numbering {
                seq: self.conn.last_received(),
                resumed: std::mem::take(&mut self.resumed_welcome),
            },
            Some(numbers) => Numbering { seq: numbers.number(&msg), resumed: false },
        };
        (self.encode)(msg, numbering)
    }

    /// A resumable peer another instance let go (see [`Released`]) goes on here: numbered on
    /// from there, and its welcome says it resumed.
    pub fn moved_from(&mut self, released: Released) {
        self.conn.received(released.last_received);
        if let Some(numbers) = &mut self.numbers {
            numbers.start_at(released.next_seq);
        }
        self.resumed_welcome = true;
    }

    /// Takes what is queued and not yet written, in order (a worker moving to another
    /// instance takes it along).
    pub fn take_queued(&mut self) -> Vec<Outbound> {
        let mut queued = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            self.conn.free_slot();
            queued.push(msg);
        }
        queued
    }

    /// The numbering of a resumable peer's stream.
    pub fn numbers(&self) -> Option<&Numbers> {
        self.numbers.as_ref()
    }

    /// Encodes `msg` as this stream's messages are.
    pub fn encode(&self, msg: Outbound, numbering: Numbering) -> M {
        (self.encode)(msg, numbering)
    }
}

impl<M> Stream for OutboundStream<M> {
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Open => {
                    if !this.conn.is_ended() {
                        match this.rx.poll_recv(cx) {
                            Poll::Ready(Some(msg)) => return Poll::Ready(Some(Ok(this.write(msg)))),
                            // Not while the conn lives: it holds a sender itself.
                            Poll::Ready(None) => {
                                this.phase = Phase::Done;
                                continue;
                            }
                            Poll::Pending if this.conn.poll_ended(&this.conn.writer, cx).is_pending() => {
                                return Poll::Pending;
                            }
                            Poll::Pending => {}
                        }
                    }
                    let how =
                        this.conn.close.get().cloned().unwrap_or_else(|| Close::Drain(Some(shutting_down())));
                    match how {
                        Close::Now(status) => {
                            this.phase = Phase::Done;
                            return Poll::Ready(Some(Err(status)));
                        }
                        Close::Drain(status) => this.phase = Phase::Draining(status),
                    }
                }
                Phase::Draining(status) => {
                    // Registered before looking, so an answer sent or given up in between
                    // wakes this writer.
                    this.conn.writer.register(cx.waker());
                    match this.rx.poll_recv(cx) {
                        Poll::Ready(Some(msg)) => return Poll::Ready(Some(Ok(this.write(msg)))),
                        // Nothing queued: every slot still taken is an answer still owed to a
                        // message the peer sent before it left. It is written before the end.
                        Poll::Pending if this.conn.taken.load(Ordering::Acquire) > 0 => return Poll::Pending,
                        _ => {
                            let status = status.take();
                            this.phase = Phase::Done;
                            return Poll::Ready(status.map(Err));
                        }
                    }
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}

impl<M> Drop for OutboundStream<M> {
    fn drop(&mut self) {
        // The peer went away: its reading task stops too.
        self.conn.mark_ended();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio_stream::StreamExt;

    use super::*;

    #[test]
    fn the_clock_never_goes_back_and_is_moved_forward_by_what_it_hears() {
        let clock = ConnClock::default();
        let (first, second) = (clock.next(1), clock.next(1));
        assert!(second > first);
        // Another instance's clock runs a minute ahead: its stream is heard of here, and the
        // next stream opened here is newer all the same.
        let ahead = ConnClock::skewed(60_000).next(2);
        assert!(ahead > clock.next(1));
        clock.observe(ahead.at);
        assert!(clock.next(1).at > ahead.at);
        // What is heard of the past changes nothing.
        let before = clock.next(1);
        clock.observe(first.at);
        assert!(clock.next(1) > before);
    }
    fn open(queue: usize) -> (Sink, OutboundStream<Outbound>) {
        Conn::open(ConnId { at: 1, instance: 1 }, queue, |msg, _| msg)
    }

    fn msg(n: u8) -> Outbound {
        Outbound::relay(RtcEvent::IceCandidate, 1, 2, Bytes::from(vec![n]))
    }

    #[tokio::test]
    async fn answers_and_deliveries_share_the_bounded_slots() {
        let (conn, mut out) = open(3);
        let answer = conn.try_reserve().expect("a free slot");
        conn.try_deliver(msg(1)).unwrap();
        conn.try_deliver(msg(2)).unwrap();
        assert_eq!(conn.try_deliver(msg(3)), Err(DeliverError::Full));
        assert!(conn.try_reserve().is_none());

        // An answer not needed gives its slot back.
        drop(answer);
        let answer = conn.try_reserve().expect("the slot came back");
        // Sent, it keeps its slot until the writer takes it; queued order is kept.
        answer.send(msg(9));
        assert_eq!(conn.try_deliver(msg(4)), Err(DeliverError::Full));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(out.next().await.unwrap().unwrap().payload[0]);
        }
        assert_eq!(got, [1, 2, 9]);
        conn.try_deliver(msg(5)).expect("room again once written");
    }

    #[tokio::test]
    async fn owed_messages_are_queued_past_the_bound_and_the_bound_holds_for_the_rest() {
        let (conn, mut out) = open(2);
        conn.try_deliver(msg(1)).unwrap();
        conn.try_deliver(msg(2)).unwrap();
        conn.deliver_owed(msg(3));
        assert_eq!(conn.try_deliver(msg(4)), Err(DeliverError::Full), "still full for the rest");
        assert!(conn.try_reserve().is_none());
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(out.next().await.unwrap().unwrap().payload[0]);
        }
        assert_eq!(got, [1, 2, 3], "nothing lost, in order");
        conn.try_deliver(msg(5)).expect("room again once read");
    }

    #[tokio::test]
    async fn a_drained_stream_writes_the_answers_it_still_owes() {
        let (conn, mut out) = open(4);
        let owed = conn.try_reserve().unwrap();
        let unneeded = conn.try_reserve().unwrap();
        conn.try_deliver(msg(1)).unwrap();
        conn.end(Close::Drain(None));
        assert_eq!(out.next().await.unwrap().unwrap().payload[0], 1);
        let waiting = tokio::spawn(async move {
            let next = out.next().await;
            (next.map(|m| m.unwrap().payload[0]), out.next().await.is_none())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "two answers still owed");
        drop(unneeded);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one answer still owed");
        owed.send(msg(2));
        let (answer, ended) = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!((answer, ended), (Some(2), true), "the answer, then the end");
    }

    #[tokio::test]
    async fn reserving_waits_for_the_writer_and_ends_with_the_stream() {
        let (conn, mut out) = open(1);
        conn.try_deliver(msg(1)).unwrap();
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move { conn.reserve().await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room until the peer reads");
        out.next().await.unwrap().unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap());

        let (conn, _out) = open(1);
        conn.try_deliver(msg(1)).unwrap();
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move { conn.reserve().await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.end(Close::Drain(None));
        assert!(!tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap());
        assert_eq!(conn.try_deliver(msg(2)), Err(DeliverError::Closed));
    }
}
