//! One peer's stream as the edge holds it: a bounded outbound queue the shards deliver into, and
//! the response stream tonic writes from it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::cluster::RemoteClient;
use crate::core::{CloseReason, ConnId, DeliverError, InstanceId, Outbound, PeerSink, Reply};

/// Hands out [`ConnId`]s: nanoseconds since the Unix epoch, strictly increasing.
#[derive(Debug, Default)]
pub struct ConnClock(AtomicU64);

impl ConnClock {
    pub fn next(&self, instance: InstanceId) -> ConnId {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let previous = self.0.fetch_max(now, Ordering::Relaxed);
        let at = if previous >= now { self.0.fetch_add(1, Ordering::Relaxed) + 1 } else { now };
        ConnId { at, instance }
    }
}

/// The edge's handle on one of its streams; cheap to clone.
pub type Sink = Arc<Conn>;

/// A peer as the routing core sees it: a stream here, or a client stream on another instance.
#[derive(Clone)]
pub enum Peer {
    Local(Sink),
    Remote(Arc<RemoteClient>),
}

/// Where the answer to a peer's message goes.
pub enum PeerReply {
    /// Room reserved in a local stream's queue.
    Local(Permit),
    /// Back to a client on another instance.
    Remote(Arc<RemoteClient>),
}

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
    tx: mpsc::Sender<Outbound>,
    /// Why it ends; the first reason given wins. Unset when the peer went away.
    close: OnceLock<Close>,
    /// Set when the stream ends, for any reason; read on every message, so a plain flag.
    ended: AtomicBool,
    /// The stream's reading task and its response writer, woken when it ends.
    reader: AtomicWaker,
    writer: AtomicWaker,
}

impl Conn {
    /// A new stream and the response stream that writes its queue, `encode` turning each
    /// [`Outbound`] into the peer's message type.
    pub fn open<M>(id: ConnId, queue: usize, encode: fn(Outbound) -> M) -> (Sink, OutboundStream<M>) {
        let (tx, rx) = mpsc::channel(queue);
        let conn = Arc::new(Conn {
            id,
            tx,
            close: OnceLock::new(),
            ended: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
        });
        let stream = OutboundStream { rx, conn: conn.clone(), phase: Phase::Open, encode };
        (conn, stream)
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

    /// Reserves room in this stream's own queue for the answer to a message it sent, waiting
    /// while the peer has not read earlier answers: a peer that does not read its answers is
    /// not read from either. `None` once the stream is gone.
    pub async fn reserve(&self) -> Option<Permit> {
        self.tx.clone().reserve_owned().await.ok()
    }

    /// [`Self::reserve`] when there is room now.
    pub fn try_reserve(&self) -> Option<Permit> {
        self.tx.clone().try_reserve_owned().ok()
    }

    /// Queues `msg` without blocking.
    pub fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        if self.is_ended() {
            return Err(DeliverError::Closed);
        }
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DeliverError::Full,
            mpsc::error::TrySendError::Closed(_) => DeliverError::Closed,
        })
    }

    /// Ends the stream for a reason of the routing core's.
    pub fn close(&self, reason: CloseReason) {
        let status = match reason {
            CloseReason::Superseded => Status::aborted("this peer id was claimed by a newer stream"),
            CloseReason::NotReading => {
                tracing::warn!(conn = %self.id, "ending a stream that does not read its messages");
                Status::resource_exhausted("the outbound queue is full: this stream does not read")
            }
        };
        self.end(Close::Now(status));
    }
}

/// Room reserved in a stream's queue.
pub type Permit = mpsc::OwnedPermit<Outbound>;

impl Reply for PeerReply {
    fn send(self, msg: Outbound) {
        match self {
            PeerReply::Local(permit) => {
                permit.send(msg);
            }
            PeerReply::Remote(client) => client.reply(msg),
        }
    }
}

impl PeerSink for Peer {
    type Reply = PeerReply;

    fn conn(&self) -> ConnId {
        match self {
            Peer::Local(conn) => conn.id,
            Peer::Remote(client) => client.conn(),
        }
    }

    fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        match self {
            Peer::Local(conn) => conn.try_deliver(msg),
            Peer::Remote(client) => client.try_deliver(msg),
        }
    }

    fn close(&self, reason: CloseReason) {
        match self {
            Peer::Local(conn) => conn.close(reason),
            // A remote stream is ended by its own instance, which hears of newer streams
            // through claims and of its peer's departure through PEER_GONE.
            Peer::Remote(_) => {}
        }
    }

    fn remote(&self) -> Option<InstanceId> {
        match self {
            Peer::Local(_) => None,
            Peer::Remote(client) => Some(client.conn().instance),
        }
    }
}

enum Phase {
    Open,
    Draining(Option<Status>),
    Done,
}

/// The response stream of one peer: its queued messages, then the status it ends with.
/// Dropping it (the peer went away) ends the stream's reading side too.
pub struct OutboundStream<M> {
    rx: mpsc::Receiver<Outbound>,
    conn: Sink,
    phase: Phase,
    encode: fn(Outbound) -> M,
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
                            Poll::Ready(Some(msg)) => return Poll::Ready(Some(Ok((this.encode)(msg)))),
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
                Phase::Draining(status) => match this.rx.try_recv() {
                    Ok(msg) => return Poll::Ready(Some(Ok((this.encode)(msg)))),
                    Err(_) => {
                        let status = status.take();
                        this.phase = Phase::Done;
                        return Poll::Ready(status.map(Err));
                    }
                },
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
