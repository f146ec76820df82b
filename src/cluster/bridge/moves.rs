//! A worker moving between instances with its sessions, the bridge's part: on its new home,
//! finding the streams of its sessions' clients for its shard; on its old one, noting that its
//! local clients now reach it across. Each instance of a client re-points the client's session
//! when the new home's claim says where the worker came from ([`LocalClients::repoint`](crate::cluster::clients::LocalClients::repoint)).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Bridge, Origin, Waiting, wire_conn};
use crate::cluster::tunnels::{MovedSession, MovedWorker};
use crate::cluster::wire::{self, record::Kind};
use crate::core::{Command, ConnId, HandedSession, InstanceId, Outbound, PeerId, Signal, refuse};
use crate::pb::{ErrorCode, RtcEvent};
use crate::peer::{Peer, PeerReply, RemoteClient, Sink};

impl Bridge {
    /// The worker moved here: each session's client is a local stream (taken from the sessions
    /// it holds across) or a stream elsewhere. A local client whose stream ended meanwhile has
    /// no session any more: the worker hears `PEER_GONE`, after what it had not received.
    pub(super) fn import_worker(&mut self, worker: PeerId, sink: Sink, moved: MovedWorker) {
        let MovedWorker { mut messages, sessions, .. } = moved;
        let mut handed = Vec::with_capacity(sessions.len());
        for MovedSession { client, conn, at, state } in sessions {
            // A local stream may name another instance: a client that moved here kept its id.
            let local =
                (conn.instance == self.me && self.moves.onward(conn).is_none()) || self.moves.is_here(conn);
            let client_sink = match self.clients.take_session(conn, worker) {
                Some(sink) => Peer::Local(sink),
                None if local => {
                    messages.push(Outbound::peer_gone(worker, client));
                    continue;
                }
                None => Peer::Remote(self.moved_remote(conn, at)),
            };
            handed.push(HandedSession { client, sink: client_sink, state });
        }
        let command = Command::ImportWorker { worker, sink: Peer::Local(sink), sessions: handed, messages };
        self.dispatch(self.shards.of_worker(worker), command);
    }

    /// The stand-in for a client stream on another instance, `at` according to the worker's
    /// old home: a client that moved since (its stream kept its id) is written to where it is,
    /// not through the instance it left. What this instance heard of the client itself, if
    /// anything, is newer.
    fn moved_remote(&mut self, conn: ConnId, at: InstanceId) -> Arc<RemoteClient> {
        let remote = self.remote(conn);
        if at != conn.instance && at != self.me && remote.at() == conn.instance {
            remote.moved_to(at);
            self.moves.moved(conn, at);
        }
        remote
    }

    /// A client's message for a worker that moved from here to `to` follows it: a local
    /// client's as if the worker had been located there, one from another instance's client on
    /// that client's behalf (the new home answers the client directly).
    pub(super) fn forward_moved(
        &mut self,
        client: PeerId,
        sink: Peer,
        worker: PeerId,
        to: InstanceId,
        signal: Signal<PeerReply>,
        now: Instant,
    ) {
        if !self.connected {
            let reason = "NATS is unreachable: other instances cannot be reached";
            return refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
        }
        match sink {
            Peer::Local(sink) => {
                self.clients.open(client, &sink);
                self.forward(to, worker, Waiting { client, conn: sink.id(), signal }, now);
            }
            Peer::Remote(remote) => {
                if self.links.is_full(to) {
                    let reason = "the link to the worker's instance is saturated";
                    return refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
                }
                let record = Kind::ClientSignal(wire::ClientSignal {
                    client,
                    conn: Some(wire_conn(remote.conn())),
                    worker,
                    event: signal.event as i32,
                    payload: signal.payload,
                    ..Default::default()
                });
                self.links.push(to, record, Origin::Client { reply: signal.reply, worker, client });
            }
        }
    }

    /// A local client's message that came back: it went to the instance a worker was moving
    /// away from, which sent it on here, where the worker moved. Routed as the stream's own
    /// (its answer in a slot of its queue); if the stream has no room for one, or is gone,
    /// the client is told to send it again, or nobody is left to tell.
    pub(super) fn returning(
        &mut self,
        client: PeerId,
        conn: ConnId,
        worker: PeerId,
        event: RtcEvent,
        payload: Bytes,
    ) {
        let Some(sink) = self.clients.sink(conn) else { return };
        let Some(permit) = sink.try_reserve() else {
            let reason = format!("worker {worker} moved to this instance: send this again");
            return sink.deliver_owed(Outbound::error(ErrorCode::ClusterUnavailable, worker, client, reason));
        };
        let signal = Signal { event, payload, reply: PeerReply::Local(permit) };
        let command = Command::FromClient { client, sink: Peer::Local(sink), worker, signal };
        self.dispatch(self.shards.of_worker(worker), command);
    }

    /// The worker moved from here to `to`: its clients here hold their sessions with it there.
    pub(super) fn moved_away(&mut self, worker: PeerId, to: InstanceId, clients: Vec<(PeerId, Sink)>) {
        for (client, sink) in clients {
            self.clients.adopt(client, &sink, worker, to);
        }
    }
}
