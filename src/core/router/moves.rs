//! Workers moving between instances with their sessions, a shard's part.
//!
//! The old home hands a worker's entry over ([`Router::export_worker`]) and keeps a tombstone
//! for [`MOVING_FOR`]: what the worker's clients send it meanwhile follows it. Until the new
//! home's claim is heard here, their messages wait in the tombstone (the new home takes the
//! sessions over before it claims, so nothing sent on before then could find them missing);
//! then they go on to it, and so do later ones from clients on other instances that have not
//! heard the claim yet. This instance's own clients reach it through the directory once the
//! claim is heard. The new home registers the worker with its sessions
//! ([`Router::import_worker`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Router, Session, WorkerEntry, unlink};
use crate::core::session::State;
use crate::core::{CloseReason, ConnId, InstanceId, Outbound, PeerId, PeerSink, Reply, Signal, refuse};
use crate::pb::{ErrorCode, RtcEvent};

/// How long a worker that moved away is followed: until every instance has heard where it
/// went, with room to spare. Past it, a message for it here is answered as for a worker not
/// connected here.
pub const MOVING_FOR: Duration = Duration::from_secs(10);

/// Client messages that may wait for a moved worker's claim, per worker: past it they are
/// refused (`CLUSTER_UNAVAILABLE`, to be sent again).
pub const MOVE_WAITING: usize = 1024;

/// One session of a worker that moves between instances.
pub struct HandedSession<P> {
    pub client: PeerId,
    /// The client's stream, as the shard holding the session sees it.
    pub sink: P,
    pub state: State,
}

/// A worker that moved away from this shard lately.
pub(super) struct Moved<P: PeerSink> {
    at: Instant,
    /// Where it went: the instance of the stream that took it over, then of its claim.
    to: InstanceId,
    /// Whether its claim was heard here: it is registered there, with its sessions.
    claimed: bool,
    /// Client messages that came before its claim, in order.
    waiting: Vec<(PeerId, P, Signal<P::Reply>)>,
    /// The streams of its sessions' clients on other instances, whose departure may cross its
    /// move: it follows the worker (before the claim, it waits with the messages).
    clients: Vec<(PeerId, ConnId)>,
    /// Those clients' departures that came before its claim.
    departed: Vec<(PeerId, ConnId)>,
}

impl<P: PeerSink> Router<P> {
    pub(super) fn export_worker(
        &mut self,
        worker: PeerId,
        conn: ConnId,
        to: InstanceId,
        then: Box<dyn FnOnce(Vec<HandedSession<P>>) + Send + Sync>,
        now: Instant,
    ) {
        self.prune_moved(now);
        let entry = match self.workers.entry(worker) {
            std::collections::hash_map::Entry::Occupied(current) if current.get().sink.conn() == conn => {
                current.remove()
            }
            // Gone meanwhile (its sessions ended with it): nothing to hand over.
            _ => return then(Vec::new()),
        };
        let mut handed = Vec::with_capacity(entry.sessions.len());
        let mut clients = Vec::new();
        for (client, session) in entry.sessions {
            if session.client.remote().is_some() {
                clients.push((client, session.client.conn()));
            }
            // The session goes on elsewhere: the client's count of it stays as it is.
            self.metrics.sessions(session.state).decrement(1.0);
            unlink(&mut self.client_sessions, client, worker);
            handed.push(HandedSession { client, sink: session.client, state: session.state });
        }
        let departed = Vec::new();
        self.moved
            .insert(worker, Moved { at: now, to, claimed: false, waiting: Vec::new(), clients, departed });
        then(handed)
    }

    /// A client stream on another instance departed: if it held a session with a worker that
    /// moved away lately, its departure follows the worker (once its claim was heard).
    pub(super) fn moved_client_gone(&mut self, client: PeerId, conn: ConnId) {
        for (worker, moved) in &mut self.moved {
            let Some(i) = moved.clients.iter().position(|c| *c == (client, conn)) else { continue };
            moved.clients.swap_remove(i);
            if !moved.claimed {
                moved.departed.push((client, conn));
            } else if let Some(elsewhere) = self.elsewhere.as_mut() {
                elsewhere.gone(client, conn, *worker, moved.to);
            }
        }
    }

    pub(super) fn import_worker(
        &mut self,
        worker: PeerId,
        sink: P,
        sessions: Vec<HandedSession<P>>,
        messages: Vec<Outbound>,
    ) {
        if let Some(current) = self.workers.get(&worker) {
            if current.sink.conn() > sink.conn() {
                // A newer stream of the worker registered meanwhile: the moved one is over.
                sink.close(CloseReason::Superseded);
                for s in sessions {
                    s.sink.close_session();
                    s.sink.deliver_owed(Outbound::peer_gone(worker, s.client));
                }
                return;
            }
            let old = self.workers.remove(&worker).expect("just looked up");
            old.sink.close(CloseReason::Superseded);
            self.end_worker_sessions(worker, old);
        }
        sink.deliver_owed(Outbound::relay(RtcEvent::Blank, worker, 0, Bytes::new()));
        messages.into_iter().for_each(|m| sink.deliver_owed(m));
        let mut entry = WorkerEntry { sink, sessions: Default::default() };
        for HandedSession { client, sink: client_sink, state } in sessions {
            entry.sink.open_session(0);
            self.metrics.sessions(state).increment(1.0);
            let session = Session { client: client_sink, state, offered_at: None };
            if let Some(old) = entry.sessions.insert(client, session) {
                self.metrics.ended(&old);
            }
            let workers = self.client_sessions.entry(client).or_default();
            if !workers.contains(&worker) {
                workers.push(worker);
            }
        }
        self.workers.insert(worker, entry);
    }

    pub(super) fn rebind_client(
        &mut self,
        client: PeerId,
        conn: ConnId,
        sink: P,
        register: bool,
        sessions: bool,
        rebound: &Mutex<Vec<PeerId>>,
    ) {
        if let Some(workers) = self.client_sessions.get(&client).filter(|_| sessions) {
            let mut rebound = rebound.lock().expect("not poisoned");
            for worker in workers {
                let Some(session) = self.workers.get_mut(worker).and_then(|w| w.sessions.get_mut(&client))
                else {
                    continue;
                };
                if session.client.conn() == conn {
                    // Counted on the stream as the sessions it holds; a stand-in for a stream
                    // elsewhere counts nothing.
                    sink.open_session(0);
                    session.client = sink.clone();
                    rebound.push(*worker);
                }
            }
        }
        match self.clients.entry(client) {
            std::collections::hash_map::Entry::Occupied(current) if current.get().conn() == conn => {
                let current = current.remove();
                if register && sink.remote().is_none() {
                    self.clients.insert(client, sink);
                }
                drop(current);
            }
            std::collections::hash_map::Entry::Vacant(slot) if register && sink.remote().is_none() => {
                slot.insert(sink);
            }
            _ => {}
        }
    }

    /// A client's message for `worker`, which is not registered here: if it moved away lately,
    /// the message waits for its claim or goes on to it (`None`); else it is handed back.
    pub(super) fn for_moved(
        &mut self,
        client: PeerId,
        sink: P,
        worker: PeerId,
        signal: Signal<P::Reply>,
        now: impl FnOnce() -> Instant,
    ) -> Option<(P, Signal<P::Reply>)> {
        let Some(moved) = self.moved.get_mut(&worker) else { return Some((sink, signal)) };
        if now().saturating_duration_since(moved.at) >= MOVING_FOR {
            let moved = self.moved.remove(&worker).expect("just looked up");
            refuse_waiting(worker, moved);
            return Some((sink, signal));
        }
        if !moved.claimed {
            if moved.waiting.len() >= MOVE_WAITING {
                let reason = format!("worker {worker} is moving to another instance: send this again");
                refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
            } else {
                moved.waiting.push((client, sink, signal));
            }
            return None;
        }
        if sink.remote().is_none() {
            return Some((sink, signal));
        }
        let to = moved.to;
        match self.elsewhere.as_mut() {
            Some(elsewhere) => elsewhere.forward(client, &sink, worker, to, signal),
            None => refuse_one(worker, client, signal),
        }
        None
    }

    /// A claim for `worker`, whose newest stream is `newer`: if it moved away from here, what
    /// waited for the claim goes on to it.
    pub(super) fn moved_claimed(&mut self, worker: PeerId, newer: ConnId, now: Instant) {
        self.prune_moved(now);
        let Some(moved) = self.moved.get_mut(&worker) else { return };
        moved.claimed = true;
        moved.to = newer.instance;
        let (to, waiting) = (moved.to, std::mem::take(&mut moved.waiting));
        let departed = std::mem::take(&mut moved.departed);
        for (client, sink, signal) in waiting {
            match self.elsewhere.as_mut() {
                Some(elsewhere) => elsewhere.forward(client, &sink, worker, to, signal),
                None => refuse_one(worker, client, signal),
            }
        }
        if let Some(elsewhere) = self.elsewhere.as_mut() {
            for (client, conn) in departed {
                elsewhere.gone(client, conn, worker, to);
            }
        }
    }

    /// `instance` is gone: workers that moved there are gone too.
    pub(super) fn moved_instance_gone(&mut self, instance: InstanceId) {
        let gone: Vec<PeerId> =
            self.moved.iter().filter(|(_, m)| m.to == instance).map(|(w, _)| *w).collect();
        for worker in gone {
            let moved = self.moved.remove(&worker).expect("just listed");
            refuse_waiting(worker, moved);
        }
    }

    fn prune_moved(&mut self, now: Instant) {
        let old: Vec<PeerId> = self
            .moved
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.at) >= MOVING_FOR)
            .map(|(w, _)| *w)
            .collect();
        for worker in old {
            let moved = self.moved.remove(&worker).expect("just listed");
            refuse_waiting(worker, moved);
        }
    }
}

/// What waited for a worker that never arrived where it was going.
fn refuse_waiting<P: PeerSink>(worker: PeerId, moved: Moved<P>) {
    for (client, _, signal) in moved.waiting {
        refuse_one(worker, client, signal);
    }
}

fn refuse_one<R: Reply>(worker: PeerId, client: PeerId, signal: Signal<R>) {
    let reason = format!("worker {worker} is not connected");
    refuse(signal.reply, ErrorCode::PeerNotConnected, worker, client, reason);
}
