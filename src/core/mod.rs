//! The routing core: sessions, their state machine, and who is connected where.
//!
//! Sans-IO and free of tonic: a [`Router`] owns one shard's share of workers, sessions and client
//! registrations, and is fed one [`Command`] at a time with the current time as an argument.
//! It delivers through [`PeerSink`], which the gRPC edge implements with bounded queues and the
//! tests with plain vectors. Sessions live on their worker's shard, so both directions of a
//! session pass through one owner in order and no lock is taken per message.
//!
//! In a cluster, a session lives on its worker's shard on the worker's instance; its client may
//! be a [`PeerSink`] standing for a stream on another instance. A local client's message for a
//! worker registered elsewhere is handed to [`Elsewhere`].

mod router;
pub mod session;
#[cfg(test)]
mod tests;

pub use router::{Command, Elsewhere, HandedSession, MOVE_WAITING, MOVING_FOR, Router, Signal};

/// Sends a refusal of one of a peer's own messages through the room reserved for its answer.
pub fn refuse<R: Reply>(reply: R, code: ErrorCode, worker: PeerId, client: PeerId, reason: impl Into<Bytes>) {
    reply.send(Outbound::error(code, worker, client, reason));
}

use bytes::Bytes;

use crate::pb::{ErrorCode, RtcEvent};

/// A client's or worker's id: its address on the wire. Never zero for a connected peer.
pub type PeerId = i64;

/// A distributor instance: random at start, so a restarted instance is a new one.
pub type InstanceId = u64;

/// One gRPC stream, unique across instances and ordered by when it opened (then by instance).
/// When two streams claim the same peer id, the greater is the newer one and wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId {
    /// Nanoseconds since the Unix epoch when the stream opened, strictly increasing per instance.
    pub at: u64,
    pub instance: InstanceId,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}@{:x}", self.at, self.instance)
    }
}

/// The two kinds of peer; each speaks its own half of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

/// A message for one peer, in the terms of both wire messages: `worker` and `client` name the
/// session's two ends (zero where there is none), the edge fills the peer's own message type.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    pub event: RtcEvent,
    pub worker: PeerId,
    pub client: PeerId,
    pub payload: Bytes,
    pub error: ErrorCode,
}

impl Outbound {
    pub fn relay(event: RtcEvent, worker: PeerId, client: PeerId, payload: Bytes) -> Self {
        Outbound { event, worker, client, payload, error: ErrorCode::Unspecified }
    }

    /// A refusal of one message: `ERROR` naming the refused message's address, with a reason.
    pub fn error(code: ErrorCode, worker: PeerId, client: PeerId, reason: impl Into<Bytes>) -> Self {
        Outbound { event: RtcEvent::Error, worker, client, payload: reason.into(), error: code }
    }

    pub fn peer_gone(worker: PeerId, client: PeerId) -> Self {
        Outbound::relay(RtcEvent::PeerGone, worker, client, Bytes::new())
    }

    /// Whether this message for a client, coming from its worker's instance, says the worker is
    /// no longer there: its session ended (`PEER_GONE`), or it was not found (`PEER_NOT_CONNECTED`).
    pub fn says_worker_left(&self) -> bool {
        self.event == RtcEvent::PeerGone
            || (self.event == RtcEvent::Error && self.error == ErrorCode::PeerNotConnected)
    }
}

/// Why a delivery could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverError {
    /// The peer's outbound queue is full: it does not read.
    Full,
    /// The peer's stream is ending.
    Closed,
    /// The peer is on another instance, which cannot be reached right now.
    Unavailable,
}

impl DeliverError {
    pub fn code(self) -> ErrorCode {
        match self {
            DeliverError::Full => ErrorCode::PeerOverloaded,
            DeliverError::Closed => ErrorCode::PeerNotConnected,
            DeliverError::Unavailable => ErrorCode::ClusterUnavailable,
        }
    }

    /// The `ERROR` for the sender of a relay that could not be delivered to `to`, the other
    /// end of the session (`worker`, `client`).
    pub fn refusal(self, to: Role, worker: PeerId, client: PeerId) -> Outbound {
        let (role, id) = (to.as_str(), if to == Role::Worker { worker } else { client });
        let reason = match self {
            DeliverError::Full => format!("{role} {id} is not reading; the message was not delivered"),
            DeliverError::Closed => format!("{role} {id} is disconnecting; the message was not delivered"),
            DeliverError::Unavailable => {
                format!("{role} {id} is on an instance that cannot be reached; the message was not delivered")
            }
        };
        Outbound::error(self.code(), worker, client, reason)
    }
}

/// Why the core ends a peer's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer stream registered the same id (`ABORTED`).
    Superseded,
    /// The peer's outbound queue stayed full for the answers to its own messages
    /// (`RESOURCE_EXHAUSTED`): it does not read, and would otherwise lose messages silently.
    NotReading,
}

/// A slot reserved in a peer's queue: sending through it cannot fail for lack of room.
pub trait Reply {
    fn send(self, msg: Outbound);
}

/// The sending half of one peer's stream, as the core sees it.
pub trait PeerSink: Clone {
    /// A reserved slot in this peer's queue, for the answer to one of its own messages.
    type Reply: Reply + Send + 'static;
    /// Carried by each shard's copy of a client's departure and dropped once that shard has
    /// handled it (see [`Command::ClientGone`]); `()` where nothing waits for departures.
    type Departure: Clone + Send + 'static;
    /// The instance the peer's stream is on, when it is not this one.
    fn remote(&self) -> Option<InstanceId> {
        None
    }
    fn conn(&self) -> ConnId;
    /// Queues `msg` without blocking.
    fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError>;
    /// Queues a message the distributor owes the peer unasked (a `PEER_GONE`, the
    /// acknowledgement of its registration), above the queue's bound if need be: a peer is
    /// never ended, nor such a message lost, because of what another peer did. Each is owed
    /// once per session or registration, so the excess is bounded by what the peer held.
    fn deliver_owed(&self, msg: Outbound);
    /// Ends the stream with `reason`.
    fn close(&self, reason: CloseReason);
    /// Counts one more session held by this stream, unless it holds `max` already (0: no cap;
    /// a worker's). A client on another instance is counted there, so `true` by default.
    fn open_session(&self, max: usize) -> bool {
        let _ = max;
        true
    }
    /// One session counted by [`Self::open_session`] ended.
    fn close_session(&self) {}
}
