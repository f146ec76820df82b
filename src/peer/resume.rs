//! Resumable peers (metadata `x-resume-after`): a peer whose stream ends without its half-close
//! is detached, not gone. Its sessions stay, what is sent to it is held in its queue (within the
//! same bound), and a new stream of the same identity takes it over: the welcome says so, then
//! what the peer missed is replayed with its original numbers, then live traffic.
//!
//! A resumable peer's [`Conn`](crate::peer::conn::Conn) (its queue and sessions, what the router knows it by) and its
//! numbered [`OutboundStream`] outlive its gRPC streams. Each gRPC stream is an
//! [`Attachment`]; its response stream, a [`Resumed`], writes from the peer's shared outbound
//! stream while the attachment is the current one, and ends (`ABORTED`) when a newer stream
//! takes the peer over. [`Resumables`] holds, per identity, which attachment is current, so
//! that a takeover, a detach and the end of the grace period never race each other.
//!
//! Over 500 lines: attaching, taking over, detaching and releasing a peer act on one shared
//! record under one lock, and are kept together so that their order can be read in one place.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio_stream::Stream;
use tonic::Status;

use super::Sink;
use super::conn::{Close, Numbering, OutboundStream};
use super::numbers::TooOld;
use crate::core::session::State;
use crate::core::{ConnId, InstanceId, Outbound, PeerId};

/// A peer's outbound stream, shared by the streams that attach to it in turn.
type Shared<M> = Arc<Mutex<OutboundStream<M>>>;

/// What another instance sends a stream whose peer it holds.
pub type FromElsewhere<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// What a resumable stream writes, once its peer is known.
enum Bound<M> {
    /// The peer is held here: its outbound stream, after `first` (the welcome, what it missed).
    Here(Shared<M>, VecDeque<M>),
    /// The peer is held on another instance: what that instance sends through the tunnel.
    Elsewhere(FromElsewhere<M>),
}

/// One gRPC stream of a resumable peer.
pub struct Attachment<M> {
    ended: AtomicBool,
    /// How the distributor ended it (a takeover); unset when the peer's connection went away.
    close: OnceLock<Status>,
    /// The stream's reading task and its response writer, woken when it ends.
    reader: AtomicWaker,
    writer: AtomicWaker,
    /// What to write, once the peer is known (a worker's after its registration); taken by
    /// the response writer.
    bound: Mutex<Option<Bound<M>>>,
    /// Set once its reading task has stopped: everything it read was handed to the shards.
    stopped_reading: AtomicBool,
    stopped: tokio::sync::Notify,
}

impl<M> Attachment<M> {
    pub fn new() -> Arc<Self> {
        Arc::new(Attachment {
            ended: AtomicBool::new(false),
            close: OnceLock::new(),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
            bound: Mutex::new(None),
            stopped_reading: AtomicBool::new(false),
            stopped: tokio::sync::Notify::new(),
        })
    }

    /// Its reading task stopped (for that task, as its last step).
    pub fn stop_reading(&self) {
        self.stopped_reading.store(true, Ordering::Release);
        self.stopped.notify_waiters();
    }

    /// Resolves once its reading task stopped (at once if it has).
    pub async fn reading_stopped(&self) {
        loop {
            let notified = self.stopped.notified();
            if self.stopped_reading.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Ends this stream (not the peer) with `status`, or quietly (`None`: the peer went away).
    pub fn end(&self, status: Option<Status>) {
        if let Some(status) = status {
            let _ = self.close.set(status);
        }
        self.ended.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Whether a newer stream took the peer over from this one.
    pub fn is_taken_over(&self) -> bool {
        self.close.get().is_some_and(|s| s.code() == tonic::Code::Aborted)
    }

    /// Resolves when this stream ends (for its one reading task).
    pub async fn ended(&self) {
        std::future::poll_fn(|cx| {
            if self.is_ended() {
                return Poll::Ready(());
            }
            self.reader.register(cx.waker());
            if self.is_ended() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }

    fn bind(&self, outbound: Shared<M>, first: VecDeque<M>) {
        *self.bound.lock().expect("not poisoned") = Some(Bound::Here(outbound, first));
        self.writer.wake();
    }

    /// The peer is held on another instance: this stream writes what `tunnel` yields.
    pub fn bind_elsewhere(&self, tunnel: FromElsewhere<M>) {
        *self.bound.lock().expect("not poisoned") = Some(Bound::Elsewhere(tunnel));
        self.writer.wake();
    }
}

/// The response stream of one resumable gRPC stream.
pub struct Resumed<M> {
    attachment: Arc<Attachment<M>>,
    outbound: Option<Shared<M>>,
    /// Set instead of `outbound` when the peer is held on another instance.
    tunnel: Option<FromElsewhere<M>>,
    /// Written before the peer's queue: the welcome, then what the peer missed.
    first: VecDeque<M>,
    done: bool,
}

impl<M> Resumed<M> {
    pub fn new(attachment: Arc<Attachment<M>>) -> Self {
        Resumed { attachment, outbound: None, tunnel: None, first: VecDeque::new(), done: false }
    }

    fn finish(&mut self) -> Poll<Option<Result<M, Status>>> {
        self.done = true;
        Poll::Ready(self.attachment.close.get().cloned().map(Err))
    }
}

// Nothing in it is pinned: `M`s are only moved in and out of queues.
impl<M> Unpin for Resumed<M> {}

impl<M> Stream for Resumed<M> {
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.attachment.is_ended() {
            return this.finish();
        }
        if this.outbound.is_none() && this.tunnel.is_none() {
            let bound = this.attachment.bound.lock().expect("not poisoned").take();
            match bound {
                None => return this.wait(cx),
                Some(Bound::Here(outbound, first)) => {
                    this.outbound = Some(outbound);
                    this.first = first;
                }
                Some(Bound::Elsewhere(tunnel)) => this.tunnel = Some(tunnel),
            }
        }
        if let Some(tunnel) = &mut this.tunnel {
            let next = tunnel.as_mut().poll_next(cx);
            if let Poll::Ready(None | Some(Err(_))) = next {
                this.done = true;
            }
            return next;
        }
        if let Some(msg) = this.first.pop_front() {
            return Poll::Ready(Some(Ok(msg)));
        }
        let mut outbound = this.outbound.as_ref().expect("bound").lock().expect("not poisoned");
        // Looked at under the lock a takeover ends this stream under (see `take_over`).
        if this.attachment.is_ended() {
            drop(outbound);
            return this.finish();
        }
        let next = Pin::new(&mut *outbound).poll_next(cx);
        drop(outbound);
        match next {
            // Nothing queued: this writer also waits for its stream's end.
            Poll::Pending => this.wait(cx),
            Poll::Ready(None | Some(Err(_))) => {
                // The peer ended for good (its queue's writer says how).
                this.done = true;
                next
            }
            Poll::Ready(Some(Ok(_))) => next,
        }
    }
}

impl<M> Resumed<M> {
    /// Waits to be woken by the stream's end or binding (registered only when about to wait:
    /// not on every message); looks again after registering, so that neither is missed.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<M, Status>>> {
        self.attachment.writer.register(cx.waker());
        if self.attachment.is_ended() {
            return self.finish();
        }
        if self.outbound.is_none()
            && self.tunnel.is_none()
            && self.attachment.bound.lock().expect("not poisoned").is_some()
        {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<M> Drop for Resumed<M> {
    fn drop(&mut self) {
        // The peer's connection went away (or the stream ended): its reading task stops too.
        self.attachment.end(None);
    }
}

/// The attachment of each resumable peer of one role on this instance.
struct Entry<M> {
    sink: Sink,
    outbound: Shared<M>,
    attachment: Arc<Attachment<M>>,
    /// Counts the attachments, so that a grace period ends only the detachment it began with.
    generation: u64,
    /// Let go to another instance (see [`Resumables::release`]): it departs from here without
    /// having expired.
    released: bool,
    /// The generation of the attachment last told `RECONNECT` by a drain.
    told: Option<u64>,
}

/// A peer let go to the instance its new stream is on: how its numbering goes on there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The number the next message written to the peer takes.
    pub next_seq: u64,
    /// The last number the peer gave one of its messages.
    pub last_received: u64,
}

/// The most messages a peer takes along when it moves with its sessions (what it had not
/// received, and what was queued for it); one with more stays, served through a tunnel.
pub const MOVE_AT_MOST: usize = 256;

/// A peer on its way to another instance with its sessions (see [`Resumables::begin_move`]).
pub struct Moving {
    pub sink: Sink,
    /// Its stream until now, ended: its reading task must stop before the sessions leave.
    pub stream: Arc<dyn StoppedReading>,
}

/// A stream whose reading task can be waited for.
pub trait StoppedReading: Send + Sync {
    fn wait(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

impl<M: Send + 'static> StoppedReading for Attachment<M> {
    fn wait(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.reading_stopped())
    }
}

/// What a moved worker takes along.
pub struct TakenAlong {
    /// What it had not received, then what was queued for it: numbered on from `after` + 1.
    pub messages: Vec<Outbound>,
    pub last_received: u64,
}

/// A client that moved to another instance with its sessions: its stream keeps its id
/// (`conn`), by which its sessions know it, wherever its workers are.
#[derive(Debug, Clone, PartialEq)]
pub struct MovedClient {
    /// The instance it moved from.
    pub from: InstanceId,
    pub conn: ConnId,
    /// The number of `messages[0]`, and of the next message written if there is none.
    pub first_seq: u64,
    pub last_received: u64,
    /// What it had not received and what was queued for it, in order.
    pub messages: Vec<Outbound>,
    /// Its sessions: each worker and its instance.
    pub sessions: Vec<(PeerId, InstanceId)>,
    /// How many times its stream has moved, this move included (0: the instance it moved from
    /// does not count them, and sent no `ClientLeft` to wait for).
    pub moves: u32,
}

/// A worker that moved to another instance with its sessions: what its new home takes over.
#[derive(Debug, Clone, PartialEq)]
pub struct MovedWorker {
    /// The instance it moved from.
    pub from: InstanceId,
    /// The number of `messages[0]`, and of the next message written if there is none.
    pub first_seq: u64,
    pub last_received: u64,
    /// What it had not received and what was queued for it, in order.
    pub messages: Vec<Outbound>,
    /// Its sessions.
    pub sessions: Vec<MovedSession>,
}

/// A session of a worker that moved: its client, and where the negotiation stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MovedSession {
    pub client: PeerId,
    /// The client's stream.
    pub conn: ConnId,
    /// The instance the client's stream is on: `conn`'s, unless the client moved since with
    /// its sessions (its stream keeps its id).
    pub at: InstanceId,
    pub state: State,
}

/// How a detached peer's grace period ended.
pub enum Expired {
    /// It did not resume in time.
    Expired(Sink),
    /// It moved to another instance meanwhile.
    Released(Sink),
}

/// What became of a stream that asked to resume.
pub enum Resume {
    /// It took the peer over: same queue, same sessions.
    Resumed(Sink),
    /// Nothing is known of the peer here: it starts afresh.
    Unknown,
    /// The peer is known, but what it missed is no longer kept: `Sink` must end for good (its
    /// sessions' other sides hear `PEER_GONE`), and the peer starts afresh.
    TooOld(Sink),
}

/// The resumable peers of one role on this instance, by id.
pub struct Resumables<M> {
    peers: Mutex<HashMap<PeerId, Entry<M>>>,
}

impl<M> Default for Resumables<M> {
    fn default() -> Self {
        Resumables { peers: Mutex::new(HashMap::new()) }
    }
}

impl<M> Resumables<M> {
    /// A new stream of `id` that received up to `after` asks to take the peer over. If the
    /// peer is known and what it missed is kept, `attachment` becomes its current stream,
    /// written `welcome` (numbered with the last number received from the peer, `resumed`),
    /// then what it missed; the previous stream, if open, ends `ABORTED`.
    pub fn take_over(
        &self,
        id: PeerId,
        after: u64,
        attachment: &Arc<Attachment<M>>,
        welcome: Outbound,
    ) -> Resume {
        let mut peers = self.peers.lock().expect("not poisoned");
        let Some(entry) = peers.get_mut(&id) else { return Resume::Unknown };
        if entry.sink.is_ended() {
            peers.remove(&id);
            return Resume::Unknown;
        }
        // The old stream ends while the outbound stream is locked: its writer checks under the
        // same lock, so it never polls the queue again (which would take the queue's wake-ups
        // from the new writer).
        let outbound = entry.outbound.clone();
        let outbound = outbound.lock().expect("not poisoned");
        let missed = outbound.numbers().map(|n| n.after(after)).unwrap_or(Err(TooOld));
        let Ok(missed) = missed else {
            drop(outbound);
            let entry = peers.remove(&id).expect("looked up");
            entry.attachment.end(Some(Status::aborted("this peer reconnected on a newer stream")));
            return Resume::TooOld(entry.sink);
        };
        let numbering = Numbering { seq: entry.sink.last_received(), resumed: true };
        let mut first = VecDeque::with_capacity(missed.len() + 1);
        first.push_back(outbound.encode(welcome, numbering));
        for (seq, msg) in missed {
            first.push_back(outbound.encode(msg, Numbering { seq, resumed: false }));
        }
        entry.attachment.end(Some(Status::aborted("this peer resumed on a newer stream")));
        drop(outbound);
        entry.attachment = attachment.clone();
        entry.generation += 1;
        attachment.bind(entry.outbound.clone(), first);
        Resume::Resumed(entry.sink.clone())
    }

    /// Whether the peer `id` is held here (its stream open or detached).
    pub fn holds(&self, id: PeerId) -> bool {
        self.peers.lock().expect("not poisoned").get(&id).is_some_and(|e| !e.sink.is_ended())
    }

    /// A fresh resumable peer: `attachment` writes `outbound`, the queue of `sink`.
    pub fn insert(
        &self,
        id: PeerId,
        sink: Sink,
        outbound: OutboundStream<M>,
        attachment: &Arc<Attachment<M>>,
    ) {
        let outbound = Arc::new(Mutex::new(outbound));
        attachment.bind(outbound.clone(), VecDeque::new());
        let entry = Entry {
            sink,
            outbound,
            attachment: attachment.clone(),
            generation: 0,
            released: false,
            told: None,
        };
        if let Some(old) = self.peers.lock().expect("not poisoned").insert(id, entry) {
            old.attachment.end(Some(Status::aborted("this peer id was claimed by a newer stream")));
        }
    }

    /// `attachment` ended without the peer leaving: if it is the peer's current stream, the
    /// peer is detached; returns the generation its grace period must find unchanged.
    pub fn detach(&self, id: PeerId, attachment: &Arc<Attachment<M>>) -> Option<u64> {
        let peers = self.peers.lock().expect("not poisoned");
        let entry = peers.get(&id)?;
        Arc::ptr_eq(&entry.attachment, attachment).then_some(entry.generation)
    }

    /// The grace period of the detachment `generation` ran out (or the peer was let go): if
    /// the peer was not resumed since, it is forgotten, and its queue returned, to end for good.
    pub fn expire(&self, id: PeerId, generation: u64) -> Option<Expired> {
        let mut peers = self.peers.lock().expect("not poisoned");
        let entry = peers.get(&id)?;
        if entry.generation != generation || !entry.attachment.is_ended() {
            return None;
        }
        let entry = peers.remove(&id).expect("looked up");
        Some(if entry.released { Expired::Released(entry.sink) } else { Expired::Expired(entry.sink) })
    }

    /// A stream of `id` on another instance, which received up to `after`, asks for the peer.
    /// A peer that holds no session, has nothing queued or owed, and received everything it was
    /// written has nothing to keep here: it is let go, and numbered on there. Its current
    /// stream ends (`ABORTED`), then its queue (what is delivered to it from now on is refused
    /// as to a peer gone), and it departs from here as any ended peer (with its last stream, or
    /// its grace period). `None`: it stays here, to be served through a tunnel.
    pub fn release(&self, id: PeerId, after: u64) -> Option<Released> {
        let mut peers = self.peers.lock().expect("not poisoned");
        let entry = peers.get_mut(&id)?;
        if entry.sink.is_ended() {
            return None;
        }
        // Under the lock its writer numbers under: nothing is written meanwhile.
        let outbound = entry.outbound.lock().expect("not poisoned");
        if outbound.numbers()?.next() != after + 1 {
            return None;
        }
        let moved = || Status::aborted("this peer resumed on another instance");
        if !entry.sink.end_if_idle(Close::Now(moved())) {
            return None;
        }
        entry.attachment.end(Some(moved()));
        let next_seq = after + 1;
        drop(outbound);
        entry.released = true;
        Some(Released { next_seq, last_received: entry.sink.last_received() })
    }

    /// A stream of the peer on another instance, which received up to `after`, asks for it
    /// while it holds sessions (or has something it did not receive): it moves there with them
    /// if what it would take along is kept and small (at most [`MOVE_AT_MOST`] messages). Its
    /// current stream ends (`ABORTED`); its queue stays open until its sessions are handed
    /// over ([`Self::finish_move`]). `None`: it stays, served through a tunnel.
    pub fn begin_move(&self, id: PeerId, after: u64) -> Option<Moving>
    where
        M: Send + 'static,
    {
        let mut peers = self.peers.lock().expect("not poisoned");
        let entry = peers.get_mut(&id)?;
        if entry.sink.is_ended() {
            return None;
        }
        let outbound = entry.outbound.lock().expect("not poisoned");
        let numbers = outbound.numbers()?;
        let unreceived = numbers.next().checked_sub(after + 1)? as usize;
        if !numbers.covers(after) || unreceived + entry.sink.queued() > MOVE_AT_MOST {
            return None;
        }
        entry.attachment.end(Some(Status::aborted("this peer resumed on another instance")));
        drop(outbound);
        // Its grace period, if it was detached, no longer applies.
        entry.generation += 1;
        Some(Moving { sink: entry.sink.clone(), stream: entry.attachment.clone() })
    }

    /// The moving peer's sessions were handed over: nothing more is queued for it here.
    /// Takes what it had not received (after `after`) and what is queued, ends its queue, and
    /// forgets it.
    pub fn finish_move(&self, id: PeerId, after: u64, moving: &Moving) -> TakenAlong {
        let mut peers = self.peers.lock().expect("not poisoned");
        let mut messages = Vec::new();
        if let Some(entry) = peers.get(&id).filter(|e| Arc::ptr_eq(&e.sink, &moving.sink)) {
            let mut outbound = entry.outbound.lock().expect("not poisoned");
            let missed = outbound.numbers().map(|n| n.after(after));
            messages.extend(missed.into_iter().flatten().flatten().map(|(_, msg)| msg));
            messages.extend(outbound.take_queued());
            drop(outbound);
            peers.remove(&id);
        }
        moving.sink.end(Close::Now(Status::aborted("this peer resumed on another instance")));
        TakenAlong { messages, last_received: moving.sink.last_received() }
    }

    /// The peer left or ended for good on `attachment`: forgotten, if that is its current one.
    pub fn remove(&self, id: PeerId, attachment: &Arc<Attachment<M>>) {
        let mut peers = self.peers.lock().expect("not poisoned");
        if peers.get(&id).is_some_and(|e| Arc::ptr_eq(&e.attachment, attachment)) {
            peers.remove(&id);
        }
    }

    /// A drain tells every peer with an open stream `reconnect(id)`, once per stream: at its
    /// start, each (`idle_only` false); then, as they come to hold no session and have nothing
    /// queued, those that resumed elsewhere through a tunnel still holding one, so that they
    /// resume again, and move (see [`Self::release`]). Returns the streams told.
    pub fn reconnect(
        &self,
        idle_only: bool,
        reconnect: impl Fn(PeerId) -> Outbound,
    ) -> Vec<crate::core::ConnId> {
        let mut peers = self.peers.lock().expect("not poisoned");
        let mut told = Vec::new();
        for (id, entry) in peers.iter_mut() {
            let open = !entry.attachment.is_ended() && !entry.sink.is_ended();
            let idle = entry.sink.sessions() == 0 && entry.sink.queued() == 0;
            if open && entry.told != Some(entry.generation) && (idle || !idle_only) {
                entry.sink.deliver_owed(reconnect(*id));
                entry.told = Some(entry.generation);
                told.push(entry.sink.id());
            }
        }
        told
    }

    /// Detached peers, and the messages held for them.
    pub fn detached(&self) -> (usize, usize) {
        let peers = self.peers.lock().expect("not poisoned");
        peers
            .values()
            .filter(|e| e.attachment.is_ended() && !e.sink.is_ended())
            .fold((0, 0), |(n, held), e| (n + 1, held + e.sink.queued()))
    }
}

#[cfg(test)]
mod tests;
