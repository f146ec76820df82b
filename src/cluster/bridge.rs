//! The bridge: everything this instance does in the cluster, as a sans-IO state machine.
//!
//! It owns the [`Links`] to other instances, the worker [`Directory`], the [`LocalClients`]
//! that talk across and the [`RemoteClient`]s that talk here, and [`Liveness`]. Inputs come in
//! as method calls with `now` as an argument: commands from the shards ([`Bridge::command`]),
//! frames, claims and heartbeats from NATS, answers to locates, and the [`Bridge::tick`] of a
//! timer. What it wants published or looked up comes out of [`Bridge::poll_output`]; the
//! driver (`driver.rs`) does the I/O, and the tests pass outputs between two bridges by hand.
//!
//! Commands for the shards are handed over without waiting: a command a full shard queue
//! refuses is parked and retried on the next tick, and while too much is parked the driver stops
//! reading the inbox ([`Bridge::is_backlogged`]; the senders' links resend later). So the
//! shards may wait for room in the bridge's queue (a departure must not be dropped) without a
//! deadlock.
//!
//! Over 500 lines: this is where the rooms meet: every input is routed here to the room
//! that owns it, and what one room's outcome means for another (a dead link for the directory,
//! the clients and the shards) is decided here; the logic of each room lives in its own file.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;

use super::clients::{LocalClients, Stamp};
use super::directory::{Directory, Lookup, Route};
use super::links::Links;
use super::liveness::Liveness;
use super::tunnels::{TunnelCommand, Tunnels};
use super::wire::{self, record::Kind};
use crate::core::{
    Command, ConnId, DeliverError, InstanceId, Outbound, PeerId, Role, Signal, refuse, session,
};
use crate::pb::{ErrorCode, RtcEvent};
use crate::peer::{ConnClock, Peer, PeerReply, RemoteClient, Sink, ToClients, ToCluster};
use crate::shards::Shards;

/// Commands parked for full shard queues before the inbox is no longer read.
const PARKED_LIMIT: usize = 65_536;
/// How long shutdown waits for frames in flight to be acknowledged.
pub const LEAVE_WITHIN: Duration = Duration::from_secs(2);

/// What the bridge asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Publish a frame on `instance`'s inbox.
    ToInstance(InstanceId, Bytes),
    /// Publish this instance's heartbeat.
    Heartbeat(Bytes),
    /// Find the instance `worker` is registered on; answer with [`Bridge::located`].
    Locate(PeerId),
}

/// What a record in flight owes its sender if it cannot be sent.
enum Origin {
    /// Owed to the other side (a departure, an answer, a `PEER_GONE`), with nothing to refuse:
    /// it goes past a full window, waits while NATS is down, and is dropped only with its link,
    /// when the other instance is given up (which, hearing nothing from this one, ends the
    /// sessions across itself).
    Owed,
    /// A local client's message: refused through the room reserved for its answer.
    Client { reply: PeerReply, worker: PeerId, client: PeerId },
    /// A local worker's relay to a remote client: refused on the worker's stream.
    Worker { worker: PeerId, client: PeerId },
}

/// A local client's message waiting for its worker to be located.
struct Waiting {
    client: PeerId,
    conn: ConnId,
    signal: Signal<PeerReply>,
}

pub struct Bridge {
    me: InstanceId,
    shards: Arc<Shards<Peer>>,
    /// The way back to the bridge for the remote clients it creates.
    to_clients: ToClients,
    /// Sessions a local client may hold, here and across (0: no cap).
    max_sessions: usize,
    /// The clock of this instance's streams: claims from other instances move it forward.
    clock: Arc<ConnClock>,
    connected: bool,
    links: Links<Origin>,
    directory: Directory<Waiting>,
    liveness: Liveness,
    clients: LocalClients,
    remote: HashMap<ConnId, Arc<RemoteClient>>,
    tunnels: Tunnels,
    /// Clients that moved between instances with their sessions (see [`client_moves`]).
    moves: ClientMoves,
    /// What moved clients send, put back in the order they sent it (see [`client_order`]).
    order: ClientOrder,
    /// Peers that moved from here, waiting for their new home's claim (by role and id).
    awaiting_claims: HashMap<(bool, PeerId), Vec<tokio::sync::oneshot::Sender<()>>>,
    /// The claims of peers that moved from here, heard lately: one may come before its wait.
    heard_claims: HashMap<(bool, PeerId), Instant>,
    /// Local clients that left while messages of theirs waited for a locate.
    departing: HashMap<ConnId, PeerId>,
    /// The `sent_at` of the last heartbeat believed from each instance, and when: a replayed
    /// (older) heartbeat is not believed.
    beats: HashMap<InstanceId, (u64, Instant)>,
    parked: Vec<VecDeque<Command<Peer>>>,
    next_beat: Option<Instant>,
    leave_by: Option<Instant>,
    out: VecDeque<Output>,
}

impl Bridge {
    /// A bridge whose frames carry at most `frame_limit` bytes of records (see
    /// [`links::frame_limit`](super::links::frame_limit)).
    pub fn new(
        me: InstanceId,
        shards: Arc<Shards<Peer>>,
        to_clients: ToClients,
        max_sessions: usize,
        frame_limit: usize,
    ) -> Self {
        let parked = (0..shards.len()).map(|_| VecDeque::new()).collect();
        Bridge {
            me,
            shards,
            to_clients,
            max_sessions,
            clock: Arc::default(),
            connected: true,
            links: Links::new(me).with_frame_limit(frame_limit),
            directory: Directory::default(),
            liveness: Liveness::default(),
            clients: LocalClients::default(),
            remote: HashMap::new(),
            tunnels: Tunnels::default(),
            moves: ClientMoves::default(),
            order: ClientOrder::default(),
            awaiting_claims: HashMap::new(),
            heard_claims: HashMap::new(),
            departing: HashMap::new(),
            beats: HashMap::new(),
            parked,
            next_beat: None,
            leave_by: None,
            out: VecDeque::new(),
        }
    }

    /// Shares `clock` with the edge, which numbers this instance's streams with it.
    pub fn with_clock(mut self, clock: Arc<ConnClock>) -> Self {
        self.clock = clock;
        self
    }

    /// Whether NATS is connected; while it is not, what would cross is refused at once.
    pub fn set_connected(&mut self, connected: bool) {
        self.connected = connected;
    }

    /// The next thing to publish or look up.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Whether so much waits for full shard queues that the inbox should not be read.
    pub fn is_backlogged(&self) -> bool {
        self.parked.iter().map(VecDeque::len).sum::<usize>() >= PARKED_LIMIT
    }

    pub fn command(&mut self, command: ToCluster, now: Instant) {
        match command {
            ToCluster::ClientSignal { client, sink, worker, signal } => {
                self.client_signal(client, &sink, worker, signal, now)
            }
            ToCluster::ClientGone { client, conn } => self.client_gone(client, conn, now),
            ToCluster::ImportWorker { worker, sink, moved, done } => {
                self.import_worker(worker, sink, *moved);
                let _ = done.send(());
            }
            ToCluster::Forward { client, sink, worker, to, signal } => {
                self.forward_moved(client, sink, worker, to, signal, now)
            }
            ToCluster::ClientLeaving { client, conn, to, done } => {
                let _ = done.send(self.client_leaving(client, conn, to));
            }
            ToCluster::ImportClient { client, sink, moved, done, start } => {
                self.import_client(client, sink, *moved, start, now);
                let _ = done.send(());
            }
            ToCluster::ForwardGone { client, conn, to } => {
                let gone = wire::ClientGone { client, conn: Some(wire_conn(conn)), ..Default::default() };
                self.links.push(to, Kind::ClientGone(gone), Origin::Owed);
            }
            ToCluster::AwaitClaim { worker, id, claimed } => {
                if self.heard_claims.contains_key(&(worker, id)) {
                    let _ = claimed.send(());
                } else {
                    self.awaiting_claims.entry((worker, id)).or_default().push(claimed);
                }
            }
            ToCluster::MovedAway { worker, to, clients, done } => {
                self.moved_away(worker, to, clients);
                let _ = done.send(());
            }
        }
    }

    fn client_signal(
        &mut self,
        client: PeerId,
        sink: &Sink,
        worker: PeerId,
        signal: Signal<PeerReply>,
        now: Instant,
    ) {
        self.clients.open(client, sink);
        if !self.connected && !self.directory.is_locating(worker) {
            let reason = "NATS is unreachable: other instances cannot be reached";
            return refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
        }
        match self.directory.route(worker, Waiting { client, conn: sink.id(), signal }, now) {
            Route::At(instance, waiting) => self.forward(instance, worker, waiting, now),
            Route::Queued => {}
            Route::Locate => self.out.push_back(Output::Locate(worker)),
            Route::Absent(w) => {
                let reason = format!("worker {worker} is not connected");
                refuse(w.signal.reply, ErrorCode::PeerNotConnected, worker, client, reason)
            }
            Route::Busy(w) => {
                let reason = "too many workers are being looked up at once; try again";
                refuse(w.signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason)
            }
        }
    }

    /// A tunnel's half asks for something (see [`super::tunnels`]); what it sends is owed.
    pub fn tunnel(&mut self, command: TunnelCommand) {
        let Some((instance, record)) = self.tunnels.command(command) else { return };
        self.links.push(instance, record, Origin::Owed);
    }

    /// The tunnels open here.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.count()
    }

    /// The other instances heard from and not yet found dead.
    pub fn alive(&self) -> Vec<InstanceId> {
        self.liveness.alive()
    }

    /// The answer to an [`Output::Locate`], at `now`.
    pub fn located(&mut self, worker: PeerId, found: Result<InstanceId, Lookup>, now: Instant) {
        let waiting = self.directory.located(worker, found, now);
        self.release(worker, found, waiting, now);
    }

    fn release(
        &mut self,
        worker: PeerId,
        found: Result<InstanceId, Lookup>,
        waiting: VecDeque<Waiting>,
        now: Instant,
    ) {
        for w in waiting {
            match found {
                Ok(instance) => self.forward(instance, worker, w, now),
                Err(Lookup::NotFound) => {
                    let reason = format!("worker {worker} is not connected");
                    refuse(w.signal.reply, ErrorCode::PeerNotConnected, worker, w.client, reason)
                }
                Err(Lookup::Unavailable) => {
                    let reason = "the worker's instance did not answer";
                    refuse(w.signal.reply, ErrorCode::ClusterUnavailable, worker, w.client, reason)
                }
            }
        }
        self.finish_departures(now);
    }

    fn forward(&mut self, instance: InstanceId, worker: PeerId, waiting: Waiting, now: Instant) {
        let Waiting { client, conn, signal } = waiting;
        if self.links.is_full(instance) {
            let reason = "the link to the worker's instance is saturated";
            return refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
        }
        let Ok(stamp) = self.clients.send(conn, worker, instance, signal.event, self.max_sessions, now)
        else {
            let reason = format!("this client already holds {} sessions, the most it may", self.max_sessions);
            return refuse(signal.reply, ErrorCode::TooManySessions, worker, client, reason);
        };
        let record = Kind::ClientSignal(wire::ClientSignal {
            client,
            conn: Some(wire_conn(conn)),
            worker,
            event: signal.event as i32,
            payload: signal.payload,
            moves: stamp.moves,
            after_left_of: stamp.after_left_of,
        });
        self.links.push(instance, record, Origin::Client { reply: signal.reply, worker, client });
    }

    /// A local client stream ended. Its messages still waiting for a locate are handled first
    /// (forwarded or refused, as if it had stayed), then the instances of its sessions are told.
    fn client_gone(&mut self, client: PeerId, conn: ConnId, now: Instant) {
        if self.directory.any_waiting(|w| w.conn == conn) {
            self.departing.insert(conn, client);
            return;
        }
        self.moves.forget(conn);
        let released = self.order.forget(conn);
        self.take_released(released, now);
        for (instance, stamp) in self.clients.gone(conn, now) {
            if instance == self.me {
                continue;
            }
            let Stamp { moves, after_left_of } = stamp;
            let gone = wire::ClientGone { client, conn: Some(wire_conn(conn)), moves, after_left_of };
            self.links.push(instance, Kind::ClientGone(gone), Origin::Owed);
        }
    }

    /// Completes the departures that waited for locates, once none of their messages waits.
    fn finish_departures(&mut self, now: Instant) {
        if self.departing.is_empty() {
            return;
        }
        let departing = std::mem::take(&mut self.departing);
        for (conn, client) in departing {
            self.client_gone(client, conn, now);
        }
    }

    /// A message from a local worker's shard for a client on another instance: a relay, which
    /// is refused to the worker if it cannot leave now, or what is owed to the client, which
    /// always goes (see [`Origin::Owed`]).
    pub fn to_client(&mut self, conn: ConnId, msg: Outbound) {
        let mut to = conn.instance;
        let mut held = false;
        if !self.moves.is_idle() {
            match self.moves.onward(conn) {
                Some(Onward::To(at)) => to = at,
                Some(Onward::Held) => held = true,
                // A client that moved here, which this instance's workers reach through the
                // bridge (see `import_client`).
                None if self.moves.is_here(conn) => return self.for_local_client(self.me, conn, msg),
                None => {}
            }
        }
        let origin = if session::is_relay(msg.event) {
            if !self.connected || (!held && self.links.is_full(to)) {
                return self.fail(Origin::Worker { worker: msg.worker, client: msg.client });
            }
            Origin::Worker { worker: msg.worker, client: msg.client }
        } else {
            Origin::Owed
        };
        if held {
            return self.moves.hold(conn, to_client_record(conn, msg), origin);
        }
        self.links.push(to, to_client_record(conn, msg), origin);
    }

    /// Sends what the last commands and frames produced, then the acknowledgements owed.
    pub fn flush(&mut self, now: Instant) {
        if !self.connected {
            let refused = self.links.unsend(|origin| !matches!(origin, Origin::Owed));
            return refused.into_iter().for_each(|o| self.fail(o));
        }
        let (out, liveness) = (&mut self.out, &mut self.liveness);
        self.links.flush(now, |instance, frame| {
            liveness.expect(instance, now);
            out.push_back(Output::ToInstance(instance, frame));
        });
    }

    /// One message from this instance's inbox.
    pub fn frame(&mut self, payload: Bytes, now: Instant) {
        let frame = match wire::Frame::decode(payload) {
            Ok(frame) => frame,
            Err(e) => return crate::warn_throttled!("undecodable frame on the inbox: {e}"),
        };
        let from = frame.from;
        if from == self.me || from == 0 {
            return;
        }
        self.liveness.heard(from, now);
        let (records, acked) = self.links.receive(frame, now);
        for record in records {
            if let Some(kind) = record.kind {
                self.record(from, kind, now);
            }
        }
        // Only now: the answers these records carried are queued before the slots that the
        // acknowledged messages held for their answers are given back.
        drop(acked);
    }

    fn take(&mut self, from: InstanceId, kind: Kind, now: Instant) {
        match kind {
            Kind::ClientSignal(s) => {
                let Some(conn) = s.conn.map(conn_id) else {
                    return malformed(from, "a client signal names no stream");
                };
                let Ok(event) = RtcEvent::try_from(s.event) else {
                    // Sent by an instance that knows more events than this one: refused to the
                    // client, as its own instance refuses an event it does not know.
                    let reason = format!("unknown event {}", s.event);
                    let refusal = Outbound::error(ErrorCode::InvalidTransition, s.worker, s.client, reason);
                    return self.links.push(from, to_client_record(conn, refusal), Origin::Owed);
                };
                let moved_away = !self.moves.is_idle() && self.moves.onward(conn).is_some();
                if (conn.instance == self.me && !moved_away)
                    || (!self.moves.is_idle() && self.moves.is_here(conn))
                {
                    return self.returning(s.client, conn, s.worker, event, s.payload);
                }
                let remote = self.remote(conn);
                let signal = Signal { event, payload: s.payload, reply: PeerReply::Remote(remote.clone()) };
                let command = Command::FromClient {
                    client: s.client,
                    sink: Peer::Remote(remote),
                    worker: s.worker,
                    signal,
                };
                self.dispatch(self.shards.of_worker(s.worker), command);
            }
            Kind::ToClient(m) => {
                let Some(conn) = m.conn.map(conn_id) else {
                    return malformed(from, "a message for a client names no stream");
                };
                let Ok(event) = RtcEvent::try_from(m.event) else {
                    // The worker's message cannot be delivered here: it hears so.
                    let reason = format!("the client's instance does not know event {}", m.event);
                    let refusal = Outbound::error(ErrorCode::InvalidTransition, m.worker, m.client, reason);
                    self.links.push(from, to_worker_record(refusal), Origin::Owed);
                    return malformed(from, "a message for a client has an unknown event");
                };
                let error = ErrorCode::try_from(m.error_code).unwrap_or(ErrorCode::Unspecified);
                let msg = Outbound { event, worker: m.worker, client: m.client, payload: m.payload, error };
                self.for_local_client(from, conn, msg);
            }
            Kind::ToWorker(m) => {
                let Ok(event) = RtcEvent::try_from(m.event) else {
                    return malformed(from, "a message for a worker has an unknown event");
                };
                let error = ErrorCode::try_from(m.error_code).unwrap_or(ErrorCode::Unspecified);
                let msg = Outbound { event, worker: m.worker, client: m.client, payload: m.payload, error };
                self.dispatch(self.shards.of_worker(m.worker), Command::ToWorker { worker: m.worker, msg });
            }
            Kind::ClientGone(g) => {
                let Some(conn) = g.conn.map(conn_id) else {
                    return malformed(from, "a departure names no stream");
                };
                // What the client sent before it left, if some still waited, comes first.
                let released = self.order.forget(conn);
                self.take_released(released, now);
                self.remote.remove(&conn);
                self.moves.forget(conn);
                for shard in 0..self.shards.len() {
                    self.dispatch(shard, Command::ClientGone { client: g.client, conn, departure: None });
                }
            }
            Kind::Repointed(r) => {
                let Some(conn) = r.conn.map(conn_id) else {
                    return malformed(from, "a marker names no stream");
                };
                self.repointed(from, conn, r.from);
            }
            Kind::Tunnel(t) => {
                let answer = self.tunnels.receive(from, t);
                answer.into_iter().for_each(|a| self.links.push(from, a, Origin::Owed));
            }
            // Taken in `record`.
            Kind::ClientLeft(_) => {}
        }
    }

    /// The stand-in for the client stream `conn` on another instance, one per stream.
    fn remote(&mut self, conn: ConnId) -> Arc<RemoteClient> {
        let to_clients = &self.to_clients;
        self.remote
            .entry(conn)
            .or_insert_with(|| Arc::new(RemoteClient::new(conn, to_clients.clone())))
            .clone()
    }

    /// A message from another instance (or, for a client that moved here, from this one's
    /// workers) for a local client stream.
    fn for_local_client(&mut self, from: InstanceId, conn: ConnId, msg: Outbound) {
        let msg = if self.moves.is_idle() {
            msg
        } else {
            match self.moved_client_message(from, conn, msg) {
                Some(msg) => msg,
                None => return,
            }
        };
        let (worker, client, event) = (msg.worker, msg.client, msg.event);
        if msg.says_worker_left() {
            self.directory.left(worker, from);
        }
        match self.clients.deliver(conn, from, msg) {
            Ok(()) => {}
            Err(e) if session::is_relay(event) => {
                let refusal = e.refusal(Role::Client, worker, client);
                if from == self.me {
                    let shard = self.shards.of_worker(worker);
                    self.dispatch(shard, Command::ToWorker { worker, msg: refusal });
                } else {
                    self.links.push(from, to_worker_record(refusal), Origin::Owed);
                }
            }
            // Owed to a stream that ended: nobody is left to tell.
            Err(_) => {}
        }
    }

    /// Refuses what a lost record owed its sender.
    fn fail(&mut self, origin: Origin) {
        match origin {
            Origin::Owed => {}
            Origin::Client { reply, worker, client } => {
                let reason = "the worker's instance cannot be reached";
                refuse(reply, ErrorCode::ClusterUnavailable, worker, client, reason)
            }
            Origin::Worker { worker, client } => {
                let msg = DeliverError::Unavailable.refusal(Role::Client, worker, client);
                self.dispatch(self.shards.of_worker(worker), Command::ToWorker { worker, msg });
            }
        }
    }

    /// Hands a command to a shard without waiting: what a full queue refuses waits here.
    fn dispatch(&mut self, shard: usize, command: Command<Peer>) {
        if !self.parked[shard].is_empty() {
            return self.parked[shard].push_back(command);
        }
        if let Err(command) = self.shards.try_send(shard, command) {
            self.parked[shard].push_back(command);
        }
    }

    fn unpark(&mut self) {
        for shard in 0..self.parked.len() {
            while let Some(command) = self.parked[shard].pop_front() {
                if let Err(command) = self.shards.try_send(shard, command) {
                    self.parked[shard].push_front(command);
                    break;
                }
            }
        }
    }

    /// Forgets an instance that left or died: what was in flight to it is refused, sessions
    /// across it end.
    fn instance_gone(&mut self, instance: InstanceId, now: Instant) {
        for origin in self.links.forget(instance, now) {
            self.fail(origin);
        }
        self.liveness.forget(instance);
        self.directory.instance_gone(instance);
        self.clients.instance_gone(instance);
        self.tunnels.instance_gone(instance);
        self.remote.retain(|_, remote| remote.at() != instance);
        let (deliver, lost) = self.moves.instance_gone(instance);
        lost.into_iter().for_each(|origin| self.fail(origin));
        for (conn, msg) in deliver {
            self.for_local_client(instance, conn, msg);
        }
        let released = self.order.instance_gone(instance);
        self.take_released(released, now);
        for shard in 0..self.shards.len() {
            self.dispatch(shard, Command::InstanceGone { instance });
        }
    }
}

mod client_moves;
mod client_order;
mod membership;
mod moves;
mod records;

use client_moves::{ClientMoves, Onward};
use client_order::ClientOrder;

pub use records::{conn_id, wire_conn};
use records::{malformed, to_client_record, to_worker_record};

#[cfg(test)]
mod tests;
