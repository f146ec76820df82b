//! The router against a reference model (a property test): random registrations, messages
//! (every event, valid or not) and departures from several workers and clients. After each
//! command, every stream has received exactly what the model says, no more: so every message
//! is delivered or refused exactly once, sessions are in the states the model says, and
//! nothing panics.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::core::session::{self, State};

const WORKERS: [PeerId; 2] = [1, 2];
const CLIENTS: [PeerId; 3] = [100, 101, 102];
const EVENTS: [RtcEvent; 10] = [
    RtcEvent::Offer,
    RtcEvent::Answer,
    RtcEvent::AcceptAnswer,
    RtcEvent::IceCandidate,
    RtcEvent::LocalIceCandidate,
    RtcEvent::Blank,
    RtcEvent::Ping,
    RtcEvent::Error,
    RtcEvent::PeerGone,
    RtcEvent::Reconnect,
];

#[derive(Debug, Clone)]
enum Step {
    /// A new stream registers the worker (the old one, if any, is superseded and departs).
    Worker(usize),
    /// A new stream registers the client.
    Client(usize),
    ClientSends {
        client: usize,
        worker: usize,
        event: usize,
    },
    WorkerSends {
        worker: usize,
        client: usize,
        event: usize,
    },
    ClientLeaves(usize),
    WorkerLeaves(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let (w, c, e) = (0..WORKERS.len(), 0..CLIENTS.len(), 0..EVENTS.len());
    prop_oneof![
        1 => w.clone().prop_map(Step::Worker),
        1 => c.clone().prop_map(Step::Client),
        6 => (c.clone(), w.clone(), e.clone()).prop_map(|(client, worker, event)| Step::ClientSends { client, worker, event }),
        4 => (w.clone(), c.clone(), e).prop_map(|(worker, client, event)| Step::WorkerSends { worker, client, event }),
        1 => c.prop_map(Step::ClientLeaves),
        1 => w.prop_map(Step::WorkerLeaves),
    ]
}

/// What a stream is expected to receive: (event, worker, client, error).
type Expected = (RtcEvent, PeerId, PeerId, ErrorCode);

/// The reference: who is registered on which stream, and each session's state.
#[derive(Default)]
struct Model {
    workers: HashMap<PeerId, u64>,
    clients: HashMap<PeerId, u64>,
    /// (client, worker) -> (the client's stream, state).
    sessions: HashMap<(PeerId, PeerId), (u64, State)>,
    expected: HashMap<u64, Vec<Expected>>,
}

impl Model {
    fn expect(&mut self, conn: u64, msg: Expected) {
        self.expected.entry(conn).or_default().push(msg);
    }

    fn refuse(&mut self, conn: u64, worker: PeerId, client: PeerId, code: ErrorCode) {
        self.expect(conn, (RtcEvent::Error, worker, client, code));
    }

    fn client_sends(&mut self, client: PeerId, worker: PeerId, event: RtcEvent) {
        let Some(&conn) = self.clients.get(&client) else { return };
        if !session::is_relayable(Role::Client, event) {
            return self.refuse(conn, worker, client, ErrorCode::InvalidTransition);
        }
        let Some(&worker_conn) = self.workers.get(&worker) else {
            return self.refuse(conn, worker, client, ErrorCode::PeerNotConnected);
        };
        let state = self.sessions.get(&(client, worker)).map(|&(c, state)| {
            assert_eq!(c, conn, "an older stream's sessions ended with its departure");
            state
        });
        match session::step(state, Role::Client, event) {
            Err(_) => self.refuse(conn, worker, client, ErrorCode::InvalidTransition),
            Ok(next) => {
                self.sessions.insert((client, worker), (conn, next));
                self.expect(worker_conn, (event.forwarded(), worker, client, ErrorCode::Unspecified));
            }
        }
    }

    fn worker_sends(&mut self, worker: PeerId, client: PeerId, event: RtcEvent) {
        let Some(&conn) = self.workers.get(&worker) else { return };
        if !session::is_relayable(Role::Worker, event) {
            return self.refuse(conn, worker, client, ErrorCode::InvalidTransition);
        }
        let Some(&(client_conn, state)) = self.sessions.get(&(client, worker)) else {
            return self.refuse(conn, worker, client, ErrorCode::InvalidTransition);
        };
        match session::step(Some(state), Role::Worker, event) {
            Err(_) => self.refuse(conn, worker, client, ErrorCode::InvalidTransition),
            Ok(next) => {
                self.sessions.insert((client, worker), (client_conn, next));
                self.expect(client_conn, (event.forwarded(), worker, client, ErrorCode::Unspecified));
            }
        }
    }

    /// The client's current stream departs: its workers hear `PEER_GONE`.
    fn client_leaves(&mut self, client: PeerId) {
        let Some(conn) = self.clients.remove(&client) else { return };
        let ended: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|((c, _), (s, _))| *c == client && *s == conn)
            .map(|((_, w), _)| *w)
            .collect();
        for worker in ended {
            self.sessions.remove(&(client, worker));
            let worker_conn = self.workers[&worker];
            self.expect(worker_conn, (RtcEvent::PeerGone, worker, client, ErrorCode::Unspecified));
        }
    }

    /// The worker's current stream departs: its clients hear `PEER_GONE`.
    fn worker_leaves(&mut self, worker: PeerId) {
        if self.workers.remove(&worker).is_none() {
            return;
        }
        let ended: Vec<(PeerId, u64)> = self
            .sessions
            .iter()
            .filter(|((_, w), _)| *w == worker)
            .map(|((c, _), (s, _))| (*c, *s))
            .collect();
        for (client, client_conn) in ended {
            self.sessions.remove(&(client, worker));
            self.expect(client_conn, (RtcEvent::PeerGone, worker, client, ErrorCode::Unspecified));
        }
    }
}

/// The router under test, its streams, and the model beside it.
struct World {
    h: Harness,
    model: Model,
    sinks: HashMap<u64, TestSink>,
    next_conn: u64,
}

impl World {
    fn open(&mut self) -> (u64, TestSink) {
        self.next_conn += 1;
        let sink = TestSink::with_capacity(self.next_conn, usize::MAX);
        self.sinks.insert(self.next_conn, sink.clone());
        (self.next_conn, sink)
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Worker(w) => {
                let worker = WORKERS[w];
                let old = self.model.workers.get(&worker).copied();
                let (conn, sink) = self.open();
                self.h.run(Command::RegisterWorker { worker, sink });
                // The old stream is ended (superseded), with its sessions; its own departure
                // comes later and changes nothing.
                self.model.worker_leaves(worker);
                self.model.workers.insert(worker, conn);
                self.model.expect(conn, (RtcEvent::Blank, worker, 0, ErrorCode::Unspecified));
                if let Some(old) = old {
                    assert_eq!(self.sinks[&old].closed(), Some(CloseReason::Superseded));
                    self.h.run(Command::WorkerGone { worker, conn: cid(old) });
                }
            }
            Step::Client(c) => {
                let client = CLIENTS[c];
                let old = self.model.clients.get(&client).copied();
                let (conn, sink) = self.open();
                self.h.run(Command::RegisterClient { client, sink });
                if let Some(old) = old {
                    // What the edge does when a stream is superseded: it departs.
                    assert_eq!(self.sinks[&old].closed(), Some(CloseReason::Superseded));
                    self.h.run(Command::ClientGone { client, conn: cid(old), departure: () });
                    self.model.client_leaves(client);
                }
                self.model.clients.insert(client, conn);
                self.model.expect(conn, (RtcEvent::Blank, 0, client, ErrorCode::Unspecified));
            }
            Step::ClientSends { client, worker, event } => {
                let (client, worker, event) = (CLIENTS[client], WORKERS[worker], EVENTS[event]);
                if let Some(conn) = self.model.clients.get(&client) {
                    let sink = self.sinks[conn].clone();
                    self.h.client_sends(client, &sink, worker, event);
                }
                self.model.client_sends(client, worker, event);
            }
            Step::WorkerSends { worker, client, event } => {
                let (worker, client, event) = (WORKERS[worker], CLIENTS[client], EVENTS[event]);
                if let Some(conn) = self.model.workers.get(&worker) {
                    let sink = self.sinks[conn].clone();
                    self.h.worker_sends(worker, &sink, client, event);
                }
                self.model.worker_sends(worker, client, event);
            }
            Step::ClientLeaves(c) => {
                let client = CLIENTS[c];
                if let Some(&conn) = self.model.clients.get(&client) {
                    self.sinks[&conn].close(CloseReason::Superseded);
                    self.h.run(Command::ClientGone { client, conn: cid(conn), departure: () });
                }
                self.model.client_leaves(client);
            }
            Step::WorkerLeaves(w) => {
                let worker = WORKERS[w];
                if let Some(&conn) = self.model.workers.get(&worker) {
                    self.sinks[&conn].close(CloseReason::Superseded);
                    self.h.run(Command::WorkerGone { worker, conn: cid(conn) });
                }
                self.model.worker_leaves(worker);
            }
        }
    }

    /// Every stream received exactly what the model expected of the last command.
    fn check(&mut self, step: &Step) {
        let expected = std::mem::take(&mut self.model.expected);
        for (conn, sink) in &self.sinks {
            let got: Vec<Expected> =
                sink.take().into_iter().map(|m| (m.event, m.worker, m.client, m.error)).collect();
            let want = expected.get(conn).cloned().unwrap_or_default();
            assert_eq!(got, want, "stream {conn} after {step:?}");
        }
        assert_eq!(self.h.router.session_count(), self.model.sessions.len(), "sessions after {step:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(256)))]

    #[test]
    fn the_router_does_what_the_model_says(steps in prop::collection::vec(step(), 1..80)) {
        let mut world =
            World { h: Harness::new(), model: Model::default(), sinks: HashMap::new(), next_conn: 0 };
        for step in &steps {
            world.apply(step);
            world.check(step);
        }
    }
}
