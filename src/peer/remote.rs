//! The routing side's view of other instances: a client stream there, and the one queue through
//! which everything bound for other instances reaches the cluster bridge.

use tokio::sync::mpsc;

use super::{PeerReply, Sink};
use crate::core::{ConnId, DeliverError, Outbound, PeerId, Signal};
use crate::metrics as names;

/// What the shards and the edge hand to the cluster bridge. One queue for all of it, so that
/// what one sender hands over stays in its order: a client's messages, then its departure.
pub enum ToCluster {
    /// A local client's message for a worker not registered on this instance.
    ClientSignal { client: PeerId, sink: Sink, worker: PeerId, signal: Signal<PeerReply> },
    /// A local client stream ended, after every message it sent was routed (see [`Departure`]).
    ClientGone { client: PeerId, conn: ConnId },
    /// A message for a client stream on another instance.
    ToClient { conn: ConnId, msg: Outbound },
}

/// The sending end of the bridge's queue.
pub type ClusterQueue = mpsc::Sender<ToCluster>;

/// A client stream on another instance, as a session's owner sees it.
pub struct RemoteClient {
    conn: ConnId,
    cluster: ClusterQueue,
}

impl RemoteClient {
    pub fn new(conn: ConnId, cluster: ClusterQueue) -> Self {
        RemoteClient { conn, cluster }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Hands `msg` to the link towards the client's instance.
    pub fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        self.cluster
            .try_send(ToCluster::ToClient { conn: self.conn, msg })
            .map_err(|_| DeliverError::Unavailable)
    }

    /// Hands a message owed to the client unasked (a `PEER_GONE`) to the link towards its
    /// instance. The bridge's queue is bounded; if it is full the message is lost, and counted
    /// (a loss path still open: README, "No silent loss").
    pub fn deliver_owed(&self, msg: Outbound) {
        if self.try_deliver(msg).is_err() {
            metrics::counter!(names::QUEUE_DROPS).increment(1);
            crate::warn_throttled!(conn = %self.conn, "cross-instance queue full: a PEER_GONE for a remote client was dropped");
        }
    }

    /// Sends the answer to one of the client's own messages back to its instance.
    pub fn reply(&self, msg: Outbound) {
        if self.try_deliver(msg).is_err() {
            metrics::counter!(names::QUEUE_DROPS).increment(1);
            crate::warn_throttled!(conn = %self.conn, "cross-instance queue full: a reply to a remote client was dropped");
        }
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
