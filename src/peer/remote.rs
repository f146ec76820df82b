//! The routing side's view of other instances: a client stream there, and the two queues through
//! which everything bound for other instances reaches the cluster bridge: [`ToCluster`] for
//! local clients' messages and departures, [`ToClients`] for what local workers' sessions send
//! to remote clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::{PeerReply, Sink};
use crate::core::{ConnId, DeliverError, InstanceId, Outbound, PeerId, Signal};

/// What the shards and the edge hand to the cluster bridge for workers on other instances. One
/// queue for all of it, so that what one sender hands over stays in its order: a client's
/// messages, then its departure.
pub enum ToCluster {
    /// A local client's message for a worker not registered on this instance.
    ClientSignal { client: PeerId, sink: Sink, worker: PeerId, signal: Signal<PeerReply> },
    /// A local client stream ended, after every message it sent was routed (see [`Departure`]).
    ClientGone { client: PeerId, conn: ConnId },
    /// A client's message (`sink` here or on another instance) for a worker that moved from
    /// here to `to`: it follows the worker there.
    Forward { client: PeerId, sink: super::Peer, worker: PeerId, to: InstanceId, signal: Signal<PeerReply> },
    /// The departure of the stream `conn` of `client` (on another instance), which held a
    /// session with a worker that moved from here to `to`: it follows the worker.
    ForwardGone { client: PeerId, conn: ConnId, to: InstanceId },
    /// A worker moved here from another instance with its sessions: the bridge finds their
    /// clients' streams and hands them to the worker's shard; `done` once it has.
    ImportWorker {
        worker: PeerId,
        sink: Sink,
        moved: Box<super::resume::MovedWorker>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// The local client stream `conn` moves to `to` with its sessions (see
    /// `cluster::bridge::client_moves`); `done` gets its sessions across and its stand-in.
    ClientLeaving {
        client: PeerId,
        conn: ConnId,
        to: InstanceId,
        done: tokio::sync::oneshot::Sender<Leaving>,
    },
    /// A client moved here with its sessions, its stream (`sink`) keeping its id: `done` once
    /// they are its stream's; `start` once its stream may be read (what it sent this instance
    /// before it moved has come: see `cluster::bridge::client_order`).
    ImportClient {
        client: PeerId,
        sink: Sink,
        moved: Box<super::resume::MovedClient>,
        done: tokio::sync::oneshot::Sender<()>,
        start: tokio::sync::oneshot::Sender<()>,
    },
    /// A peer moved from here: `claimed` once its new home's claim is heard here (that home
    /// has its sessions, and the instances of its sessions send there).
    AwaitClaim { worker: bool, id: PeerId, claimed: tokio::sync::oneshot::Sender<()> },
    /// A worker moved from here to `to` with its sessions: these local clients of it now talk
    /// to it across; `done` once the bridge knows.
    MovedAway {
        worker: PeerId,
        to: InstanceId,
        clients: Vec<(PeerId, Sink)>,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// A client leaving for another instance with its sessions.
pub struct Leaving {
    /// Its sessions across: each worker and its instance.
    pub sessions: Vec<(PeerId, InstanceId)>,
    /// The stand-in for it in the sessions of this instance's workers.
    pub stand_in: Arc<RemoteClient>,
    /// How many times its stream has moved, this move included.
    pub moves: u32,
}

/// The sending end of the bridge's queue.
pub type ClusterQueue = mpsc::Sender<ToCluster>;

/// Relays for client streams on other instances that may wait for the bridge before more are
/// refused (`CLUSTER_UNAVAILABLE` to the worker).
pub const RELAYS_WAITING: usize = 65_536;

/// The way from the shards to the bridge for messages to client streams on other instances:
/// relays, answers to the clients' messages, `PEER_GONE`s, in one queue so that they keep their
/// order. Like a stream's own queue ([`super::conn`]), relays are bounded
/// ([`RELAYS_WAITING`]) and what is owed always goes in: it is bounded by what caused it (one
/// answer per message taken off a link, which the bridge does not read while it is behind; one
/// `PEER_GONE` per session).
#[derive(Clone)]
pub struct ToClients {
    tx: mpsc::UnboundedSender<(ConnId, Outbound)>,
    waiting: Arc<AtomicUsize>,
}

/// The bridge's end of [`ToClients`].
pub struct ForClients {
    rx: mpsc::UnboundedReceiver<(ConnId, Outbound)>,
    waiting: Arc<AtomicUsize>,
}

/// A new way to the bridge for messages to remote clients.
pub fn to_clients() -> (ToClients, ForClients) {
    let (tx, rx) = mpsc::unbounded_channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    (ToClients { tx, waiting: waiting.clone() }, ForClients { rx, waiting })
}

impl ToClients {
    /// Queues a relay, unless [`RELAYS_WAITING`] messages already wait.
    fn relay(&self, conn: ConnId, msg: Outbound) -> Result<(), DeliverError> {
        if self.waiting.load(Ordering::Relaxed) >= RELAYS_WAITING {
            return Err(DeliverError::Unavailable);
        }
        self.owed(conn, msg);
        Ok(())
    }

    /// Queues what is owed, whatever waits. Fails only once the bridge has stopped (the
    /// instance is shutting down, and its links with it).
    fn owed(&self, conn: ConnId, msg: Outbound) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.tx.send((conn, msg)).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ForClients {
    /// The next message, once one is queued; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<(ConnId, Outbound)> {
        let next = self.rx.recv().await;
        self.taken(next)
    }

    /// The next message, if one is queued.
    pub fn try_recv(&mut self) -> Option<(ConnId, Outbound)> {
        let next = self.rx.try_recv().ok();
        self.taken(next)
    }

    fn taken(&self, next: Option<(ConnId, Outbound)>) -> Option<(ConnId, Outbound)> {
        if next.is_some() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        next
    }
}

/// A client stream on another instance, as a session's owner sees it.
pub struct RemoteClient {
    conn: ConnId,
    /// The instance the stream is on: its own (`conn.instance`) unless the client moved with
    /// its sessions, keeping its stream's id.
    at: AtomicU64,
    cluster: ToClients,
}

impl RemoteClient {
    pub fn new(conn: ConnId, cluster: ToClients) -> Self {
        RemoteClient { conn, at: AtomicU64::new(conn.instance), cluster }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The instance the stream is on.
    pub fn at(&self) -> InstanceId {
        self.at.load(Ordering::Relaxed)
    }

    /// The client moved to `instance` with its sessions.
    pub fn moved_to(&self, instance: InstanceId) {
        self.at.store(instance, Ordering::Relaxed);
    }

    /// Hands a relay to the link towards the client's instance, unless too many wait.
    pub fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        self.cluster.relay(self.conn, msg)
    }

    /// Hands a message owed to the client unasked (a `PEER_GONE`) to the link towards its
    /// instance: it always goes in.
    pub fn deliver_owed(&self, msg: Outbound) {
        self.cluster.owed(self.conn, msg)
    }

    /// Sends the answer to one of the client's own messages back to its instance: it always
    /// goes in.
    pub fn reply(&self, msg: Outbound) {
        self.cluster.owed(self.conn, msg)
    }
}

/// A local client stream's departure, on its way through the shards.
///
/// The protocol, in full: when a client stream ends, its task sends `ClientGone` to every shard,
/// each copy holding a clone of one `Arc<Departure>`. A shard handles its copy after every
/// message of that stream it was given, and then drops it. The last drop, wherever it happens
/// (a shard thread, an inline shard, a shard queue dropped at shutdown), hands
/// [`ToCluster::ClientGone`] to the bridge, which therefore sees it after every message the
/// stream sent across, and tells the instances of its sessions. Nothing counts down by hand,
/// and a departure whose broadcast failed is still announced.
pub struct Departure {
    client: PeerId,
    conn: ConnId,
    cluster: ClusterQueue,
}

impl Departure {
    pub fn new(client: PeerId, conn: ConnId, cluster: ClusterQueue) -> Self {
        Departure { client, conn, cluster }
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        let gone = ToCluster::ClientGone { client: self.client, conn: self.conn };
        // Never dropped: a full queue waits for room. The bridge never waits for a shard (it
        // parks what a full shard queue refuses), so this cannot deadlock. On the runtime
        // (inline shards, stream tasks) blocking is not allowed: a task waits instead.
        match self.cluster.try_send(gone) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(gone)) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let cluster = self.cluster.clone();
                    runtime.spawn(async move { cluster.send(gone).await });
                }
                Err(_) => {
                    let _ = self.cluster.blocking_send(gone);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::ErrorCode;

    #[test]
    fn relays_are_bounded_and_what_is_owed_always_goes_in() {
        let (to, mut from) = to_clients();
        let client = RemoteClient::new(ConnId { at: 1, instance: 0xa }, to);
        let candidate = || Outbound::relay(crate::pb::RtcEvent::IceCandidate, 7, 100, bytes::Bytes::new());
        for _ in 0..RELAYS_WAITING {
            client.try_deliver(candidate()).unwrap();
        }
        assert_eq!(client.try_deliver(candidate()), Err(DeliverError::Unavailable));
        client.reply(Outbound::error(ErrorCode::InvalidTransition, 7, 100, "no"));
        client.deliver_owed(Outbound::peer_gone(7, 100));
        // What is owed counts too: room for a relay once the bridge took three.
        for _ in 0..3 {
            assert!(from.try_recv().is_some());
        }
        client.try_deliver(candidate()).expect("room again");
        let taken = std::iter::from_fn(|| from.try_recv()).map(|(_, m)| m.event).collect::<Vec<_>>();
        assert_eq!(taken.len(), RELAYS_WAITING);
        assert_eq!(
            taken[RELAYS_WAITING - 4..],
            [
                crate::pb::RtcEvent::IceCandidate,
                crate::pb::RtcEvent::Error,
                crate::pb::RtcEvent::PeerGone,
                crate::pb::RtcEvent::IceCandidate,
            ]
        );
    }
}
