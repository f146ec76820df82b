//! One shard's routing state: the workers registered on it, their sessions, and the client ids
//! it keeps the newest stream of.
//!
//! Over 500 lines: every command the router takes is one arm of `Router::handle`, and the
//! session bookkeeping those arms share sits beside them; what moves between routers is in
//! `router/moves.rs`.

use std::collections::hash_map::Entry;
use std::time::Instant;

use bytes::Bytes;
use metrics::{Gauge, Histogram};

use super::session::{self, State};
use super::{CloseReason, ConnId, DeliverError, InstanceId, Outbound, PeerId, PeerSink, Reply, Role, refuse};
use crate::metrics as names;
use crate::pb::{ErrorCode, RtcEvent};

/// Peer ids are chosen by peers (or their token issuer): a keyed hash keeps lookups fast
/// without letting chosen ids collide on purpose.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// One input to a [`Router`]. Each is handled completely, in order, by the shard that owns it:
/// worker registrations and every session message by the worker's shard, client registrations by
/// the client's shard, and `ClientGone` and `InstanceGone` by every shard.
pub enum Command<P: PeerSink> {
    RegisterWorker {
        worker: PeerId,
        sink: P,
    },
    RegisterClient {
        client: PeerId,
        sink: P,
    },
    FromClient {
        client: PeerId,
        sink: P,
        worker: PeerId,
        signal: Signal<P::Reply>,
    },
    FromWorker {
        worker: PeerId,
        conn: ConnId,
        client: PeerId,
        signal: Signal<P::Reply>,
    },
    /// A client stream ended. A local one is sent to every shard, after the stream's last
    /// message; each copy holds `departure` until its shard has handled it, which tells the
    /// cluster when every shard is done (`P::Departure`).
    ClientGone {
        client: PeerId,
        conn: ConnId,
        departure: P::Departure,
    },
    WorkerGone {
        worker: PeerId,
        conn: ConnId,
    },
    /// A message owed to a worker registered here (a refusal decided on another instance).
    ToWorker {
        worker: PeerId,
        msg: Outbound,
    },
    /// A newer stream registered this id elsewhere: an older one here ends.
    Evict {
        role: Role,
        id: PeerId,
        newer: ConnId,
    },
    /// An instance left or died: sessions with its clients end.
    InstanceGone {
        instance: InstanceId,
    },
    /// The worker's stream `conn` moves to instance `to` with its sessions: its entry leaves
    /// this shard, handed to `then`; what its clients send it meanwhile follows it there (see
    /// [`moves`]).
    ExportWorker {
        worker: PeerId,
        conn: ConnId,
        to: InstanceId,
        then: Box<dyn FnOnce(Vec<HandedSession<P>>) + Send + Sync>,
    },
    /// A client stream (`conn`, which keeps its id) moved between instances with its
    /// sessions: on this shard, its sessions (and its registration, if `sink` is local) are
    /// `sink`'s from now on. The workers whose sessions were rebound are added to `rebound`;
    /// `done` is dropped once the shard is done.
    RebindClient {
        client: PeerId,
        conn: ConnId,
        sink: P,
        /// Whether this is the client's shard, which registers a local `sink` as the client's.
        register: bool,
        /// Whether its sessions are rebound (else only its registration).
        sessions: bool,
        rebound: std::sync::Arc<std::sync::Mutex<Vec<PeerId>>>,
        done: std::sync::Arc<dyn Send + Sync>,
    },
    /// Does nothing: `done` is dropped once the shard has handled what was queued before it.
    Flush {
        done: std::sync::Arc<dyn Send + Sync>,
    },
    /// A worker moved here from another instance: registered as `RegisterWorker` does, its
    /// `sessions` taken over, and `messages` (what it had not received there) queued right
    /// after its acknowledgement.
    ImportWorker {
        worker: PeerId,
        sink: P,
        sessions: Vec<HandedSession<P>>,
        messages: Vec<Outbound>,
    },
}

mod moves;

use moves::Moved;
pub use moves::{HandedSession, MOVE_WAITING, MOVING_FOR};

/// A peer's message for the other side of a session. It carries `reply`, a slot reserved in the
/// sender's queue, so that a refusal always reaches the sender whatever else is queued for it.
pub struct Signal<R> {
    pub event: RtcEvent,
    pub payload: Bytes,
    pub reply: R,
}

/// Where a local client's message goes when its worker is not registered on this instance.
pub trait Elsewhere<P: PeerSink>: Send {
    /// Takes the message of `sink`, a local client, on, or refuses it through `signal.reply`.
    fn to_worker(&mut self, client: PeerId, sink: &P, worker: PeerId, signal: Signal<P::Reply>);

    /// Takes the message of `sink` (a local client, or one on another instance) on to
    /// `worker`, which moved from here to `instance`, or refuses it through `signal.reply`.
    fn forward(
        &mut self,
        client: PeerId,
        sink: &P,
        worker: PeerId,
        instance: InstanceId,
        signal: Signal<P::Reply>,
    );

    /// Tells `instance`, where `worker` moved from here, that the stream `conn` of `client` on
    /// another instance, which held a session with it, departed.
    fn gone(&mut self, client: PeerId, conn: ConnId, worker: PeerId, instance: InstanceId);
}

struct WorkerEntry<P> {
    sink: P,
    sessions: HashMap<PeerId, Session<P>>,
}

struct Session<P> {
    /// The client stream that opened the session; a newer stream of the same client replaces it.
    client: P,
    state: State,
    /// When the session's current OFFER was relayed.
    offered_at: Option<Instant>,
}

/// A shard's routing table and the session state machines it owns. See the module docs of
/// [`crate::core`] for who owns what.
pub struct Router<P: PeerSink> {
    workers: HashMap<PeerId, WorkerEntry<P>>,
    /// The newest stream of each client id that hashes to this shard.
    clients: HashMap<PeerId, P>,
    /// For each client, the workers on this shard it holds a session with.
    client_sessions: HashMap<PeerId, Vec<PeerId>>,
    /// Workers that moved to another instance with their sessions, lately.
    moved: HashMap<PeerId, Moved<P>>,
    elsewhere: Option<Box<dyn Elsewhere<P>>>,
    /// Sessions one client stream may hold (0: no cap), counted by its sink across shards.
    max_sessions: usize,
    metrics: RouterMetrics,
}

impl<P: PeerSink> Default for Router<P> {
    fn default() -> Self {
        Self::new(None)
    }
}

impl<P: PeerSink> Router<P> {
    /// A router; without `elsewhere`, a worker not registered here is connected nowhere.
    pub fn new(elsewhere: Option<Box<dyn Elsewhere<P>>>) -> Self {
        Router {
            workers: HashMap::default(),
            clients: HashMap::default(),
            client_sessions: HashMap::default(),
            moved: HashMap::default(),
            elsewhere,
            max_sessions: 0,
            metrics: RouterMetrics::new(),
        }
    }

    /// Caps the sessions one client stream may hold at `max` (0: no cap): the OFFER that
    /// would open one more is refused with `TOO_MANY_SESSIONS`.
    pub fn with_session_cap(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Number of sessions this shard owns.
    pub fn session_count(&self) -> usize {
        self.workers.values().map(|w| w.sessions.len()).sum()
    }

    /// Handles one command. `now` is read only by the commands that time something (an
    /// `OFFER` starts the offer-to-answer clock, an `ANSWER` stops it), so a caller that routes
    /// message by message pays for no clock read on the others.
    pub fn handle(&mut self, command: Command<P>, mut now: impl FnMut() -> Instant) {
        match command {
            Command::RegisterWorker { worker, sink } => self.register_worker(worker, sink),
            Command::RegisterClient { client, sink } => self.register_client(client, sink),
            Command::FromClient { client, sink, worker, signal } => {
                self.client_message(client, sink, worker, signal, &mut now)
            }
            Command::FromWorker { worker, conn, client, signal } => {
                self.worker_message(worker, conn, client, signal, now)
            }
            Command::ClientGone { client, conn, departure: _ } => self.client_gone(client, conn),
            Command::WorkerGone { worker, conn } => self.worker_gone(worker, conn),
            Command::ToWorker { worker, msg } => {
                if let Some(entry) = self.workers.get(&worker) {
                    answer_late(&entry.sink, msg);
                }
            }
            Command::Evict { role: Role::Worker, id, newer } => {
                if !self.moved.is_empty() {
                    self.moved_claimed(id, newer, now());
                }
                if self.workers.get(&id).is_some_and(|w| w.sink.conn() < newer) {
                    let old = self.workers.remove(&id).expect("just looked up");
                    old.sink.close(CloseReason::Superseded);
                    self.end_worker_sessions(id, old);
                }
            }
            Command::Evict { role: Role::Client, id, newer } => {
                if let Entry::Occupied(current) = self.clients.entry(id)
                    && current.get().conn() < newer
                {
                    // Its own `ClientGone` ends its sessions.
                    current.remove().close(CloseReason::Superseded);
                }
            }
            Command::InstanceGone { instance } => {
                self.moved_instance_gone(instance);
                self.instance_gone(instance)
            }
            Command::ExportWorker { worker, conn, to, then } => {
                self.export_worker(worker, conn, to, then, now())
            }
            Command::RebindClient { client, conn, sink, register, sessions, rebound, done: _ } => {
                self.rebind_client(client, conn, sink, register, sessions, &rebound)
            }
            Command::ImportWorker { worker, sink, sessions, messages } => {
                self.import_worker(worker, sink, sessions, messages)
            }
            Command::Flush { done: _ } => {}
        }
    }

    fn register_worker(&mut self, worker: PeerId, sink: P) {
        if let Some(current) = self.workers.get(&worker) {
            if current.sink.conn() >= sink.conn() {
                if current.sink.conn() > sink.conn() {
                    sink.close(CloseReason::Superseded);
                }
                return;
            }
            let old = self.workers.remove(&worker).expect("just looked up");
            old.sink.close(CloseReason::Superseded);
            self.end_worker_sessions(worker, old);
        }
        self.workers.insert(worker, WorkerEntry { sink: sink.clone(), sessions: HashMap::default() });
        sink.deliver_owed(Outbound::relay(RtcEvent::Blank, worker, 0, Bytes::new()));
    }

    fn register_client(&mut self, client: PeerId, sink: P) {
        match self.clients.entry(client) {
            Entry::Occupied(mut current) => {
                if current.get().conn() > sink.conn() {
                    sink.close(CloseReason::Superseded);
                    return;
                }
                // The old stream's own `ClientGone` ends its sessions.
                current.get().close(CloseReason::Superseded);
                current.insert(sink.clone());
            }
            Entry::Vacant(slot) => {
                slot.insert(sink.clone());
            }
        }
        sink.deliver_owed(Outbound::relay(RtcEvent::Blank, 0, client, Bytes::new()));
    }

    fn client_message(
        &mut self,
        client: PeerId,
        sink: P,
        worker: PeerId,
        signal: Signal<P::Reply>,
        mut now: impl FnMut() -> Instant,
    ) {
        let m = &self.metrics;
        let Signal { event, payload, reply } = signal;
        if !session::is_relayable(Role::Client, event) {
            let reason = session::step(None, Role::Client, event).expect_err("not relayable");
            return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason);
        }
        let Some(entry) = self.workers.get_mut(&worker) else {
            let signal = Signal { event, payload, reply };
            let Some((sink, Signal { event, payload, reply })) =
                self.for_moved(client, sink, worker, signal, &mut now)
            else {
                return;
            };
            if let Some(elsewhere) = self.elsewhere.as_mut()
                && sink.remote().is_none()
            {
                return elsewhere.to_worker(client, &sink, worker, Signal { event, payload, reply });
            }
            let reason = format!("worker {worker} is not connected");
            return refuse(reply, ErrorCode::PeerNotConnected, worker, client, reason);
        };
        let (state, superseded) = match entry.sessions.get(&client) {
            None => (None, false),
            Some(s) if s.client.conn() == sink.conn() => (Some(s.state), false),
            Some(s) if s.client.conn() > sink.conn() => {
                let reason = "this stream was superseded by a newer stream of the same client";
                return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason);
            }
            Some(_) => (None, true),
        };
        let next = match session::step(state, Role::Client, event) {
            Ok(next) => next,
            Err(reason) => return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason),
        };
        let opens = state.is_none();
        if opens && !sink.open_session(self.max_sessions) {
            let reason = format!("this client already holds {} sessions, the most it may", self.max_sessions);
            return refuse(reply, ErrorCode::TooManySessions, worker, client, reason);
        }
        if superseded {
            // The session belonged to an older stream of this client: it ended with that stream.
            let old = entry.sessions.remove(&client).expect("just looked up");
            m.ended(&old);
            entry.sink.close_session();
            entry.sink.deliver_owed(Outbound::peer_gone(worker, client));
        }
        // The worker's stream counts its sessions too, before the first message is queued
        // (see `Conn::end_if_idle`).
        if opens {
            entry.sink.open_session(0);
        }
        let forwarded = event.forwarded();
        if let Err(e) = entry.sink.try_deliver(Outbound::relay(forwarded, worker, client, payload)) {
            if opens {
                sink.close_session();
                entry.sink.close_session();
            }
            return reply.send(e.refusal(Role::Worker, worker, client));
        }
        match entry.sessions.get_mut(&client) {
            Some(s) => {
                m.advance(&mut s.state, next);
                if event == RtcEvent::Offer {
                    s.offered_at = Some(now());
                }
            }
            None => {
                // Only an OFFER opens a session.
                let offered_at = (event == RtcEvent::Offer).then(now);
                entry.sessions.insert(client, Session { client: sink.clone(), state: next, offered_at });
                m.sessions(next).increment(1.0);
                let workers = self.client_sessions.entry(client).or_default();
                if !workers.contains(&worker) {
                    workers.push(worker);
                }
            }
        }
    }

    fn worker_message(
        &mut self,
        worker: PeerId,
        conn: ConnId,
        client: PeerId,
        signal: Signal<P::Reply>,
        now: impl FnOnce() -> Instant,
    ) {
        let m = &self.metrics;
        let Signal { event, payload, reply } = signal;
        if !session::is_relayable(Role::Worker, event) {
            let reason = session::step(None, Role::Worker, event).expect_err("not relayable");
            return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason);
        }
        let entry = match self.workers.get_mut(&worker) {
            Some(entry) if entry.sink.conn() == conn => entry,
            _ => {
                let reason = "this stream is not the registered stream of its worker id";
                return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason);
            }
        };
        let Some(session) = entry.sessions.get_mut(&client) else {
            let reason = format!("no session with client {client}: the client starts with OFFER");
            return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason);
        };
        let next = match session::step(Some(session.state), Role::Worker, event) {
            Ok(next) => next,
            Err(reason) => return refuse(reply, ErrorCode::InvalidTransition, worker, client, reason),
        };
        let forwarded = event.forwarded();
        if let Err(e) = session.client.try_deliver(Outbound::relay(forwarded, worker, client, payload)) {
            return reply.send(e.refusal(Role::Client, worker, client));
        }
        if event == RtcEvent::Answer
            && let Some(offered_at) = session.offered_at
        {
            m.offer_to_answer.record(now().saturating_duration_since(offered_at).as_secs_f64());
        }
        m.advance(&mut session.state, next);
    }

    fn client_gone(&mut self, client: PeerId, conn: ConnId) {
        if !self.moved.is_empty() {
            self.moved_client_gone(client, conn);
        }
        if let Entry::Occupied(current) = self.clients.entry(client)
            && current.get().conn() == conn
        {
            current.remove();
        }
        if let Entry::Occupied(mut index) = self.client_sessions.entry(client) {
            let m = &self.metrics;
            let workers = &mut self.workers;
            index.get_mut().retain(|worker| {
                let Some(entry) = workers.get_mut(worker) else {
                    return false;
                };
                match entry.sessions.entry(client) {
                    Entry::Occupied(s) if s.get().client.conn() == conn => {
                        m.ended(&s.remove());
                        entry.sink.close_session();
                        entry.sink.deliver_owed(Outbound::peer_gone(*worker, client));
                        false
                    }
                    Entry::Occupied(_) => true,
                    Entry::Vacant(_) => false,
                }
            });
            if index.get().is_empty() {
                index.remove();
            }
        }
    }

    fn worker_gone(&mut self, worker: PeerId, conn: ConnId) {
        match self.workers.entry(worker) {
            Entry::Occupied(current) if current.get().sink.conn() == conn => {
                let entry = current.remove();
                self.end_worker_sessions(worker, entry);
            }
            _ => {}
        }
    }

    /// Ends every session whose client is on `instance`; their workers get `PEER_GONE`.
    fn instance_gone(&mut self, instance: InstanceId) {
        let m = &self.metrics;
        for (worker, entry) in &mut self.workers {
            entry.sessions.retain(|client, session| {
                if session.client.remote() != Some(instance) {
                    return true;
                }
                m.ended(session);
                entry.sink.close_session();
                entry.sink.deliver_owed(Outbound::peer_gone(*worker, *client));
                unlink(&mut self.client_sessions, *client, *worker);
                false
            });
        }
    }

    /// Tells every client of a departed worker stream that it is gone.
    fn end_worker_sessions(&mut self, worker: PeerId, entry: WorkerEntry<P>) {
        for (client, session) in entry.sessions {
            self.metrics.ended(&session);
            session.client.deliver_owed(Outbound::peer_gone(worker, client));
            unlink(&mut self.client_sessions, client, worker);
        }
    }
}

/// Forgets that `client` holds a session with `worker` on this shard.
fn unlink(client_sessions: &mut HashMap<PeerId, Vec<PeerId>>, client: PeerId, worker: PeerId) {
    if let Entry::Occupied(mut index) = client_sessions.entry(client) {
        index.get_mut().retain(|w| *w != worker);
        if index.get().is_empty() {
            index.remove();
        }
    }
}

/// Delivers the answer to one of the peer's own messages decided on another instance, after the
/// slot reserved for it was given back. If the peer's queue is full it does not read its own
/// answers, and rather than lose one silently its stream is ended (its own doing).
pub(crate) fn answer_late<P: PeerSink>(peer: &P, msg: Outbound) {
    if let Err(DeliverError::Full) = peer.try_deliver(msg) {
        metrics::counter!(names::QUEUE_DROPS).increment(1);
        peer.close(CloseReason::NotReading);
    }
}

/// Metric handles, looked up once so that the per-message path only bumps atomics. What is
/// written to peers is counted where it is written (`peer::written`), not here.
struct RouterMetrics {
    sessions: [Gauge; 3],
    offer_to_answer: Histogram,
}

impl RouterMetrics {
    fn new() -> Self {
        RouterMetrics {
            sessions: State::ALL.map(|s| metrics::gauge!(names::SESSIONS, "state" => s.as_str())),
            offer_to_answer: metrics::histogram!(names::OFFER_TO_ANSWER),
        }
    }

    fn sessions(&self, state: State) -> &Gauge {
        &self.sessions[state as usize]
    }

    /// A session ended: its gauge and its client's count go down.
    fn ended<P: PeerSink>(&self, session: &Session<P>) {
        self.sessions(session.state).decrement(1.0);
        session.client.close_session();
    }

    /// Moves a session to `next`, keeping the gauges by state in step.
    fn advance(&self, state: &mut State, next: State) {
        if *state != next {
            self.sessions(*state).decrement(1.0);
            self.sessions(next).increment(1.0);
            *state = next;
        }
    }
}
