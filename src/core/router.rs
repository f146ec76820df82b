//! One shard's routing state: the workers registered on it, their sessions, and the client ids
//! it keeps the newest stream of.

use std::collections::hash_map::Entry;
use std::time::Instant;

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};

use super::session::{self, State};
use super::{CloseReason, ConnId, DeliverError, InstanceId, Outbound, PeerId, PeerSink, Reply, Role};
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
    ClientGone {
        client: PeerId,
        conn: ConnId,
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
}

/// A peer's message for the other side of a session. It carries `reply`, a slot reserved in the
/// sender's queue, so that a refusal always reaches the sender whatever else is queued for it.
pub struct Signal<R> {
    pub event: RtcEvent,
    pub payload: Bytes,
    pub reply: R,
}

/// Where a local client's message goes when its worker is not registered on this instance.
pub trait Elsewhere<P: PeerSink>: Send {
    /// Takes the message on, or refuses it through `signal.reply`.
    fn to_worker(&mut self, client: PeerId, sink: &P, worker: PeerId, signal: Signal<P::Reply>);
    /// A local client stream ended; called after every message of it this shard handed over.
    fn client_gone(&mut self, client: PeerId, conn: ConnId);
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
    elsewhere: Option<Box<dyn Elsewhere<P>>>,
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
            elsewhere,
            metrics: RouterMetrics::new(),
        }
    }

    /// Number of sessions this shard owns.
    pub fn session_count(&self) -> usize {
        self.workers.values().map(|w| w.sessions.len()).sum()
    }

    /// Handles one command. `now` is read only by the commands that time something (an
    /// `OFFER` starts the offer-to-answer clock, an `ANSWER` stops it), so a caller that routes
    /// message by message pays for no clock read on the others.
    pub fn handle(&mut self, command: Command<P>, now: impl FnOnce() -> Instant) {
        match command {
            Command::RegisterWorker { worker, sink } => self.register_worker(worker, sink),
            Command::RegisterClient { client, sink } => self.register_client(client, sink),
            Command::FromClient { client, sink, worker, signal } => {
                self.client_message(client, sink, worker, signal, now)
            }
            Command::FromWorker { worker, conn, client, signal } => {
                self.worker_message(worker, conn, client, signal, now)
            }
            Command::ClientGone { client, conn } => self.client_gone(client, conn),
            Command::WorkerGone { worker, conn } => self.worker_gone(worker, conn),
            Command::ToWorker { worker, msg } => {
                if let Some(entry) = self.workers.get(&worker) {
                    notify(&self.metrics, &entry.sink, msg);
                }
            }
            Command::Evict { role: Role::Worker, id, newer } => {
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
            Command::InstanceGone { instance } => self.instance_gone(instance),
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
        notify(&self.metrics, &sink, Outbound::relay(RtcEvent::Blank, worker, 0, Bytes::new()));
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
        notify(&self.metrics, &sink, Outbound::relay(RtcEvent::Blank, 0, client, Bytes::new()));
    }

    fn client_message(
        &mut self,
        client: PeerId,
        sink: P,
        worker: PeerId,
        signal: Signal<P::Reply>,
        now: impl FnOnce() -> Instant,
    ) {
        let m = &self.metrics;
        let Signal { event, payload, reply } = signal;
        let refuse = |reply: P::Reply, code, reason: Bytes| {
            m.errors(code).increment(1);
            reply.send(Outbound::error(code, worker, client, reason));
        };
        if !session::is_relayable(Role::Client, event) {
            let reason = session::step(None, Role::Client, event).expect_err("not relayable");
            return refuse(reply, ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
        }
        let Some(entry) = self.workers.get_mut(&worker) else {
            if let Some(elsewhere) = self.elsewhere.as_mut()
                && sink.remote().is_none()
            {
                return elsewhere.to_worker(client, &sink, worker, Signal { event, payload, reply });
            }
            let reason = format!("worker {worker} is not connected");
            return refuse(reply, ErrorCode::PeerNotConnected, reason.into());
        };
        let (state, superseded) = match entry.sessions.get(&client) {
            None => (None, false),
            Some(s) if s.client.conn() == sink.conn() => (Some(s.state), false),
            Some(s) if s.client.conn() > sink.conn() => {
                let reason = "this stream was superseded by a newer stream of the same client";
                return refuse(reply, ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
            }
            Some(_) => (None, true),
        };
        let next = match session::step(state, Role::Client, event) {
            Ok(next) => next,
            Err(reason) => {
                return refuse(reply, ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
            }
        };
        if superseded {
            // The session belonged to an older stream of this client: it ended with that stream.
            let old = entry.sessions.remove(&client).expect("just looked up");
            m.sessions(old.state).decrement(1.0);
            notify(m, &entry.sink, Outbound::peer_gone(worker, client));
        }
        let forwarded = session::forwarded(event);
        match entry.sink.try_deliver(Outbound::relay(forwarded, worker, client, payload)) {
            Ok(()) => m.relayed(forwarded).increment(1),
            Err(e) => return refuse(reply, e.code(), undelivered(Role::Worker, worker, e)),
        }
        match entry.sessions.get_mut(&client) {
            Some(s) => {
                if s.state != next {
                    m.sessions(s.state).decrement(1.0);
                    m.sessions(next).increment(1.0);
                    s.state = next;
                }
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
        let refuse = |code, reason: Bytes| {
            m.errors(code).increment(1);
            reply.send(Outbound::error(code, worker, client, reason));
        };
        if !session::is_relayable(Role::Worker, event) {
            let reason = session::step(None, Role::Worker, event).expect_err("not relayable");
            return refuse(ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
        }
        let entry = match self.workers.get_mut(&worker) {
            Some(entry) if entry.sink.conn() == conn => entry,
            _ => {
                let reason = "this stream is not the registered stream of its worker id";
                return refuse(ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
            }
        };
        let Some(session) = entry.sessions.get_mut(&client) else {
            let reason = format!("no session with client {client}: the client starts with OFFER");
            return refuse(ErrorCode::InvalidTransition, reason.into());
        };
        let next = match session::step(Some(session.state), Role::Worker, event) {
            Ok(next) => next,
            Err(reason) => {
                return refuse(ErrorCode::InvalidTransition, Bytes::from_static(reason.as_bytes()));
            }
        };
        let forwarded = session::forwarded(event);
        match session.client.try_deliver(Outbound::relay(forwarded, worker, client, payload)) {
            Ok(()) => m.relayed(forwarded).increment(1),
            Err(e) => return refuse(e.code(), undelivered(Role::Client, client, e)),
        }
        if event == RtcEvent::Answer
            && let Some(offered_at) = session.offered_at
        {
            m.offer_to_answer.record(now().saturating_duration_since(offered_at).as_secs_f64());
        }
        if session.state != next {
            m.sessions(session.state).decrement(1.0);
            m.sessions(next).increment(1.0);
            session.state = next;
        }
    }

    fn client_gone(&mut self, client: PeerId, conn: ConnId) {
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
                        m.sessions(s.remove().state).decrement(1.0);
                        notify(m, &entry.sink, Outbound::peer_gone(*worker, client));
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
        if let Some(elsewhere) = self.elsewhere.as_mut() {
            elsewhere.client_gone(client, conn);
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
                m.sessions(session.state).decrement(1.0);
                notify(m, &entry.sink, Outbound::peer_gone(*worker, *client));
                if let Entry::Occupied(mut index) = self.client_sessions.entry(*client) {
                    index.get_mut().retain(|w| w != worker);
                    if index.get().is_empty() {
                        index.remove();
                    }
                }
                false
            });
        }
    }

    /// Tells every client of a departed worker stream that it is gone.
    fn end_worker_sessions(&mut self, worker: PeerId, entry: WorkerEntry<P>) {
        for (client, session) in entry.sessions {
            self.metrics.sessions(session.state).decrement(1.0);
            notify(&self.metrics, &session.client, Outbound::peer_gone(worker, client));
            if let Entry::Occupied(mut index) = self.client_sessions.entry(client) {
                index.get_mut().retain(|w| *w != worker);
                if index.get().is_empty() {
                    index.remove();
                }
            }
        }
    }
}

impl DeliverError {
    pub fn code(self) -> ErrorCode {
        match self {
            DeliverError::Full => ErrorCode::PeerOverloaded,
            DeliverError::Closed => ErrorCode::PeerNotConnected,
            DeliverError::Unavailable => ErrorCode::ClusterUnavailable,
        }
    }
}

fn undelivered(role: Role, id: PeerId, e: DeliverError) -> Bytes {
    let role = role.as_str();
    match e {
        DeliverError::Full => format!("{role} {id} is not reading; the message was not delivered"),
        DeliverError::Closed => format!("{role} {id} is disconnecting; the message was not delivered"),
        DeliverError::Unavailable => {
            format!("{role} {id} is on an instance that cannot be reached; the message was not delivered")
        }
    }
    .into()
}

/// Delivers a message the distributor owes a peer unasked (an acknowledgement, a `PEER_GONE`).
/// If the peer's queue is full it is not reading, and rather than lose the message
/// silently its stream is ended.
fn notify<P: PeerSink>(m: &RouterMetrics, peer: &P, msg: Outbound) {
    if let Err(DeliverError::Full) = peer.try_deliver(msg) {
        m.queue_drops.increment(1);
        peer.close(CloseReason::NotReading);
    }
}

/// Metric handles, looked up once so that the per-message path only bumps atomics.
struct RouterMetrics {
    relayed: Vec<Counter>,
    errors: Vec<Counter>,
    sessions: [Gauge; 3],
    queue_drops: Counter,
    offer_to_answer: Histogram,
}

impl RouterMetrics {
    fn new() -> Self {
        let relayed = (0..=RtcEvent::PeerGone as i32)
            .map(|e| {
                let event = RtcEvent::try_from(e).expect("dense enum").as_str_name();
                metrics::counter!(names::MESSAGES_RELAYED, "event" => event)
            })
            .collect();
        let errors = (0..=ErrorCode::ClusterUnavailable as i32)
            .map(|c| {
                let code = ErrorCode::try_from(c).expect("dense enum").as_str_name();
                metrics::counter!(names::ERRORS, "code" => code)
            })
            .collect();
        RouterMetrics {
            relayed,
            errors,
            sessions: State::ALL.map(|s| metrics::gauge!(names::SESSIONS, "state" => s.as_str())),
            queue_drops: metrics::counter!(names::QUEUE_DROPS),
            offer_to_answer: metrics::histogram!(names::OFFER_TO_ANSWER),
        }
    }

    fn relayed(&self, event: RtcEvent) -> &Counter {
        &self.relayed[event as usize]
    }

    fn errors(&self, code: ErrorCode) -> &Counter {
        &self.errors[code as usize]
    }

    fn sessions(&self, state: State) -> &Gauge {
        &self.sessions[state as usize]
    }
}
