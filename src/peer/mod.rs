//! Peers as the routing core sees them: a stream on this instance, or a client stream on another.
//!
//! This layer sits between the sans-IO [`crate::core`] and the two sides that feed it, the gRPC
//! [`crate::edge`] and the NATS [`crate::cluster`]: both depend on these types, not on each
//! other. [`conn`] is a local stream's bounded queue; [`RemoteClient`] stands for a client
//! stream on another instance and hands what is owed to it to the cluster bridge through the
//! one queue of [`ToCluster`] commands.

pub mod conn;
pub mod numbers;
pub mod remote;
pub mod resume;
pub(crate) mod written;

use std::sync::Arc;

pub use conn::{Close, Conn, ConnClock, Encode, Numbering, OutboundStream, Permit, Sink};
pub use remote::{
    ClusterQueue, Departure, ForClients, RELAYS_WAITING, RemoteClient, ToClients, ToCluster, to_clients,
};

use crate::core::{CloseReason, ConnId, DeliverError, InstanceId, Outbound, PeerSink, Reply};

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

impl Reply for PeerReply {
    fn send(self, msg: Outbound) {
        match self {
            PeerReply::Local(permit) => permit.send(msg),
            PeerReply::Remote(client) => client.reply(msg),
        }
    }
}

impl Peer {
    /// The instance its stream is on: `here` for a local one (which may have moved here
    /// keeping another instance's id), the client's current instance for a remote one.
    pub fn instance(&self, here: InstanceId) -> InstanceId {
        match self {
            Peer::Local(_) => here,
            Peer::Remote(client) => client.at(),
        }
    }
}

impl PeerSink for Peer {
    type Reply = PeerReply;
    /// In cluster mode, a local client's departure is announced to the other instances once
    /// every shard has let go of it (see [`Departure`]).
    type Departure = Option<Arc<Departure>>;

    fn conn(&self) -> ConnId {
        match self {
            Peer::Local(conn) => conn.id(),
            Peer::Remote(client) => client.conn(),
        }
    }

    fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        match self {
            Peer::Local(conn) => conn.try_deliver(msg),
            Peer::Remote(client) => client.try_deliver(msg),
        }
    }

    fn deliver_owed(&self, msg: Outbound) {
        match self {
            Peer::Local(conn) => conn.deliver_owed(msg),
            Peer::Remote(client) => client.deliver_owed(msg),
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
            Peer::Remote(client) => Some(client.at()),
        }
    }

    fn open_session(&self, max: usize) -> bool {
        match self {
            Peer::Local(conn) => conn.open_session(max),
            // Counted on its own instance, by the bridge, when the OFFER left.
            Peer::Remote(_) => true,
        }
    }

    fn close_session(&self) {
        if let Peer::Local(conn) = self {
            conn.close_session();
        }
    }
}
