//! The router driven directly, in simulated time, with in-memory peers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::pb::{ErrorCode, RtcEvent};

#[derive(Default)]
struct Peer {
    queue: Vec<Outbound>,
    capacity: usize,
    closed: Option<CloseReason>,
}

#[derive(Clone)]
struct TestSink {
    conn: ConnId,
    peer: Arc<Mutex<Peer>>,
}

struct TestReply(TestSink);

impl Reply for TestReply {
    fn send(self, msg: Outbound) {
        self.0.peer.lock().unwrap().queue.push(msg);
    }
}

impl PeerSink for TestSink {
    type Reply = TestReply;
    type Departure = ();

    fn conn(&self) -> ConnId {
        self.conn
    }

    /// Streams of instance 1 are this instance's; others stand for streams elsewhere.
    fn remote(&self) -> Option<InstanceId> {
        (self.conn.instance != 1).then_some(self.conn.instance)
    }

    fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        let mut peer = self.peer.lock().unwrap();
        if peer.closed.is_some() {
            return Err(DeliverError::Closed);
        }
        if peer.queue.len() >= peer.capacity {
            return Err(DeliverError::Full);
        }
        peer.queue.push(msg);
        Ok(())
    }

    fn deliver_owed(&self, msg: Outbound) {
        let mut peer = self.peer.lock().unwrap();
        if peer.closed.is_none() {
            peer.queue.push(msg);
        }
    }

    fn close(&self, reason: CloseReason) {
        self.peer.lock().unwrap().closed.get_or_insert(reason);
    }
}

impl TestSink {
    fn new(conn: u64) -> Self {
        TestSink { conn: cid(conn), peer: Arc::new(Mutex::new(Peer { capacity: 64, ..Peer::default() })) }
    }

    fn with_capacity(conn: u64, capacity: usize) -> Self {
        let sink = Self::new(conn);
        sink.peer.lock().unwrap().capacity = capacity;
        sink
    }

    fn take(&self) -> Vec<Outbound> {
        std::mem::take(&mut self.peer.lock().unwrap().queue)
    }

    fn events(&self) -> Vec<(RtcEvent, ErrorCode)> {
        self.take().into_iter().map(|m| (m.event, m.error)).collect()
    }

    fn closed(&self) -> Option<CloseReason> {
        self.peer.lock().unwrap().closed
    }
}

struct Harness {
    router: Router<TestSink>,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Harness { router: Router::new(None), now: Instant::now() }
    }

    fn run(&mut self, command: Command<TestSink>) {
        self.now += Duration::from_millis(1);
        let now = self.now;
        self.router.handle(command, || now);
    }

    fn worker(&mut self, id: PeerId, conn: u64) -> TestSink {
        let sink = TestSink::new(conn);
        self.run(Command::RegisterWorker { worker: id, sink: sink.clone() });
        assert_eq!(sink.events(), [(RtcEvent::Blank, ErrorCode::Unspecified)]);
        sink
    }

    fn client(&mut self, id: PeerId, conn: u64) -> TestSink {
        let sink = TestSink::new(conn);
        self.run(Command::RegisterClient { client: id, sink: sink.clone() });
        assert_eq!(sink.events(), [(RtcEvent::Blank, ErrorCode::Unspecified)]);
        sink
    }

    fn client_sends(&mut self, client: PeerId, sink: &TestSink, worker: PeerId, event: RtcEvent) {
        let signal = Signal { event, payload: Bytes::from_static(b"x"), reply: TestReply(sink.clone()) };
        self.run(Command::FromClient { client, sink: sink.clone(), worker, signal });
    }

    fn worker_sends(&mut self, worker: PeerId, sink: &TestSink, client: PeerId, event: RtcEvent) {
        let signal = Signal { event, payload: Bytes::from_static(b"y"), reply: TestReply(sink.clone()) };
        self.run(Command::FromWorker { worker, conn: sink.conn, client, signal });
    }
}

const OK: ErrorCode = ErrorCode::Unspecified;

#[test]
fn relays_a_negotiation_and_counts_sessions() {
    let mut h = Harness::new();
    let w = h.worker(1, 1);
    let c = h.client(100, 2);
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    h.worker_sends(1, &w, 100, RtcEvent::Answer);
    h.client_sends(100, &c, 1, RtcEvent::AcceptAnswer);
    h.client_sends(100, &c, 1, RtcEvent::LocalIceCandidate);
    h.worker_sends(1, &w, 100, RtcEvent::LocalIceCandidate);
    assert_eq!(
        w.events(),
        [(RtcEvent::Offer, OK), (RtcEvent::AcceptAnswer, OK), (RtcEvent::IceCandidate, OK)]
    );
    assert_eq!(c.events(), [(RtcEvent::Answer, OK), (RtcEvent::IceCandidate, OK)]);
    assert_eq!(h.router.session_count(), 1);
}

#[test]
fn an_overloaded_receiver_gets_nothing_and_the_sender_hears_why() {
    let mut h = Harness::new();
    let w = h.worker(1, 1);
    w.peer.lock().unwrap().capacity = 1;
    let c = h.client(100, 2);
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    h.client_sends(100, &c, 1, RtcEvent::LocalIceCandidate);
    assert_eq!(w.events(), [(RtcEvent::Offer, OK)]);
    let [refused] = c.take().try_into().unwrap();
    assert_eq!(
        (refused.event, refused.error, refused.worker),
        (RtcEvent::Error, ErrorCode::PeerOverloaded, 1)
    );
    assert_eq!(w.closed(), None, "a slow reader is refused messages, not cut off");
    assert_eq!(c.closed(), None);
}

#[test]
fn an_undelivered_answer_can_be_sent_again() {
    let mut h = Harness::new();
    let w = h.worker(1, 1);
    let c = TestSink::with_capacity(2, 1);
    h.run(Command::RegisterClient { client: 100, sink: c.clone() });
    c.take();
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    c.peer.lock().unwrap().queue.push(Outbound::peer_gone(0, 0)); // the client's queue is full
    h.worker_sends(1, &w, 100, RtcEvent::Answer);
    assert_eq!(w.take().last().map(|m| m.error), Some(ErrorCode::PeerOverloaded));
    c.take();
    h.worker_sends(1, &w, 100, RtcEvent::Answer);
    assert_eq!(c.events(), [(RtcEvent::Answer, OK)], "the session stayed in `offered`");
    assert!(w.take().is_empty());
}

#[test]
fn a_newer_worker_stream_ends_the_old_one_and_its_sessions() {
    let mut h = Harness::new();
    let old = h.worker(1, 1);
    let c = h.client(100, 2);
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    let new = h.worker(1, 3);
    assert_eq!(old.closed(), Some(CloseReason::Superseded));
    let gone = c.take();
    assert_eq!((gone[0].event, gone[0].worker), (RtcEvent::PeerGone, 1));
    // The old stream's own departure, arriving later, changes nothing.
    h.run(Command::WorkerGone { worker: 1, conn: cid(1) });
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    assert_eq!(new.events(), [(RtcEvent::Offer, OK)]);
    // An older stream registering late is the one refused.
    let late = TestSink::new(0);
    h.run(Command::RegisterWorker { worker: 1, sink: late.clone() });
    assert_eq!(late.closed(), Some(CloseReason::Superseded));
    assert_eq!(new.closed(), None);
}

#[test]
fn a_newer_client_stream_takes_over_its_sessions() {
    let mut h = Harness::new();
    let w = h.worker(1, 1);
    let old = h.client(100, 2);
    h.client_sends(100, &old, 1, RtcEvent::Offer);
    w.take();
    let new = h.client(100, 3);
    assert_eq!(old.closed(), Some(CloseReason::Superseded));
    // The new stream's OFFER arrives before the old stream's departure: the worker first
    // learns the old session ended.
    h.client_sends(100, &new, 1, RtcEvent::Offer);
    assert_eq!(w.events(), [(RtcEvent::PeerGone, OK), (RtcEvent::Offer, OK)]);
    // The old stream's late messages and departure do not touch the new session.
    h.client_sends(100, &old, 1, RtcEvent::LocalIceCandidate);
    assert_eq!(old.events(), [(RtcEvent::Error, ErrorCode::InvalidTransition)]);
    h.run(Command::ClientGone { client: 100, conn: cid(2), departure: () });
    assert!(w.take().is_empty());
    h.worker_sends(1, &w, 100, RtcEvent::Answer);
    assert_eq!(new.events(), [(RtcEvent::Answer, OK)]);
    h.run(Command::ClientGone { client: 100, conn: cid(3), departure: () });
    assert_eq!(w.events(), [(RtcEvent::PeerGone, OK)]);
    assert_eq!(h.router.session_count(), 0);
}

#[test]
fn what_a_peer_is_owed_reaches_it_even_when_its_queue_is_full() {
    let mut h = Harness::new();
    let w = h.worker(1, 1);
    let c = h.client(100, 2);
    h.client_sends(100, &c, 1, RtcEvent::Offer);
    w.take();
    // The worker reads nothing more; another peer's departure must not end its stream.
    w.peer.lock().unwrap().capacity = 0;
    h.run(Command::ClientGone { client: 100, conn: cid(2), departure: () });
    assert_eq!(w.closed(), None, "not ended for what another peer did");
    let [gone] = w.take().try_into().unwrap();
    assert_eq!((gone.event, gone.client), (RtcEvent::PeerGone, 100));
}

#[test]
fn refusals_name_the_address_and_a_reason() {
    let mut h = Harness::new();
    let c = h.client(100, 2);
    h.client_sends(100, &c, 9, RtcEvent::Offer);
    let w = h.worker(1, 1);
    h.worker_sends(1, &w, 555, RtcEvent::Answer);
    let [to_client] = c.take().try_into().unwrap();
    assert_eq!(
        (to_client.event, to_client.error, to_client.worker),
        (RtcEvent::Error, ErrorCode::PeerNotConnected, 9)
    );
    assert!(std::str::from_utf8(&to_client.payload).unwrap().contains("worker 9"));
    let [to_worker] = w.take().try_into().unwrap();
    assert_eq!((to_worker.error, to_worker.client), (ErrorCode::InvalidTransition, 555));
    assert!(!to_worker.payload.is_empty());
}

fn cid(at: u64) -> ConnId {
    ConnId { at, instance: 1 }
}

/// The router against a reference model (property test).
mod model;

/// Where a router sends what is not for its own workers: (client, worker, instance, event),
/// instance 0 for a local client's message to a worker registered elsewhere.
#[derive(Clone, Default)]
struct Sent(Arc<Mutex<Vec<SentTo>>>);

type SentTo = (PeerId, PeerId, InstanceId, RtcEvent);

impl Elsewhere<TestSink> for Sent {
    fn to_worker(&mut self, client: PeerId, _: &TestSink, worker: PeerId, signal: Signal<TestReply>) {
        self.0.lock().unwrap().push((client, worker, 0, signal.event));
    }

    fn forward(
        &mut self,
        client: PeerId,
        _: &TestSink,
        worker: PeerId,
        to: InstanceId,
        signal: Signal<TestReply>,
    ) {
        self.0.lock().unwrap().push((client, worker, to, signal.event));
    }

    fn gone(&mut self, client: PeerId, _: ConnId, worker: PeerId, to: InstanceId) {
        self.0.lock().unwrap().push((client, worker, to, RtcEvent::PeerGone));
    }
}

impl Sent {
    fn take(&self) -> Vec<SentTo> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

#[test]
fn a_worker_exported_with_its_sessions_goes_on_where_it_is_imported() {
    use crate::core::session::State;
    let sent = Sent::default();
    let mut a = Harness { router: Router::new(Some(Box::new(sent.clone()))), now: Instant::now() };
    let w = a.worker(1, 1);
    let (c, c2) = (a.client(100, 2), a.client(101, 4));
    a.client_sends(100, &c, 1, RtcEvent::Offer);
    a.worker_sends(1, &w, 100, RtcEvent::Answer);
    a.client_sends(101, &c2, 1, RtcEvent::Offer);
    w.take();
    c.take();
    let handed = Arc::new(Mutex::new(None));
    let into = handed.clone();
    let then = Box::new(move |sessions| *into.lock().unwrap() = Some(sessions));
    a.run(Command::ExportWorker { worker: 1, conn: cid(1), to: 0xb, then });
    let sessions = handed.lock().unwrap().take().expect("handed over at once");
    let mut states: Vec<_> = sessions.iter().map(|s| (s.client, s.state)).collect();
    states.sort_by_key(|(client, _)| *client);
    assert_eq!(states, [(100, State::Answered), (101, State::Offered)]);
    assert_eq!(a.router.session_count(), 0);
    assert!(w.take().is_empty() && c.take().is_empty(), "nobody hears of the move");
    // Meanwhile, what its clients send it waits for its claim, in order, then follows it.
    a.client_sends(100, &c, 1, RtcEvent::AcceptAnswer);
    a.client_sends(100, &c, 1, RtcEvent::LocalIceCandidate);
    assert!(sent.take().is_empty() && c.take().is_empty());
    a.run(Command::Evict { role: Role::Worker, id: 1, newer: ConnId { at: 9, instance: 0xb } });
    assert_eq!(
        sent.take(),
        [(100, 1, 0xb, RtcEvent::AcceptAnswer), (100, 1, 0xb, RtcEvent::LocalIceCandidate)]
    );
    // Once the claim is heard, this instance's own clients find it as any worker elsewhere.
    a.client_sends(101, &c2, 1, RtcEvent::LocalIceCandidate);
    assert_eq!(sent.take(), [(101, 1, 0, RtcEvent::LocalIceCandidate)]);

    // Its new home: acknowledged, then what it had not received, then its sessions go on.
    let mut b = Harness::new();
    let moved = TestSink::new(5);
    let held = Outbound::relay(RtcEvent::IceCandidate, 1, 100, Bytes::from_static(b"held"));
    b.run(Command::ImportWorker { worker: 1, sink: moved.clone(), sessions, messages: vec![held] });
    assert_eq!(moved.events(), [(RtcEvent::Blank, OK), (RtcEvent::IceCandidate, OK)]);
    assert_eq!(b.router.session_count(), 2);
    b.client_sends(100, &c, 1, RtcEvent::AcceptAnswer);
    b.client_sends(100, &c, 1, RtcEvent::AcceptAnswer);
    assert_eq!(moved.events(), [(RtcEvent::AcceptAnswer, OK)], "the state came along");
    assert_eq!(c.events(), [(RtcEvent::Error, ErrorCode::InvalidTransition)]);
    b.worker_sends(1, &moved, 101, RtcEvent::Answer);
    assert_eq!(c2.events(), [(RtcEvent::Answer, OK)]);
    b.run(Command::ClientGone { client: 101, conn: cid(4), departure: () });
    assert_eq!(moved.events(), [(RtcEvent::PeerGone, OK)]);
}

#[test]
fn what_waits_for_a_moved_worker_that_never_arrives_is_refused() {
    let sent = Sent::default();
    let mut a = Harness { router: Router::new(Some(Box::new(sent.clone()))), now: Instant::now() };
    a.worker(1, 1);
    a.worker(2, 3);
    let c = a.client(100, 2);
    a.client_sends(100, &c, 1, RtcEvent::Offer);
    a.client_sends(100, &c, 2, RtcEvent::Offer);
    for worker in [1, 2] {
        let then = Box::new(|_| {});
        a.run(Command::ExportWorker { worker, conn: cid(if worker == 1 { 1 } else { 3 }), to: 0xb, then });
    }
    a.client_sends(100, &c, 1, RtcEvent::LocalIceCandidate);
    a.client_sends(100, &c, 2, RtcEvent::LocalIceCandidate);
    // The instance it went to dies: it is gone.
    a.run(Command::InstanceGone { instance: 0xb });
    assert_eq!(c.events(), [(RtcEvent::Error, ErrorCode::PeerNotConnected); 2]);
    // A claim never came within MOVING_FOR: the same, and later messages are as for any
    // worker not registered here.
    a.run(Command::ExportWorker { worker: 1, conn: cid(1), to: 0xc, then: Box::new(|_| {}) });
    let w = a.worker(1, 6);
    let then = Box::new(|_| {});
    a.run(Command::ExportWorker { worker: 1, conn: cid(6), to: 0xc, then });
    a.client_sends(100, &c, 1, RtcEvent::Offer);
    assert!(c.take().is_empty() && w.take().is_empty(), "waits");
    a.now += MOVING_FOR;
    a.client_sends(100, &c, 1, RtcEvent::Offer);
    assert_eq!(c.events(), [(RtcEvent::Error, ErrorCode::PeerNotConnected)]);
    assert_eq!(sent.take(), [(100, 1, 0, RtcEvent::Offer)]);
}

#[test]
fn a_departure_that_crosses_a_worker_s_move_follows_it() {
    let sent = Sent::default();
    let mut a = Harness { router: Router::new(Some(Box::new(sent.clone()))), now: Instant::now() };
    let w = a.worker(1, 1);
    // Two clients on instance 0xc, each with a session.
    let remote = |at| TestSink { conn: ConnId { at, instance: 0xc }, ..TestSink::new(at) };
    let (c1, c2) = (remote(2), remote(3));
    a.client_sends(100, &c1, 1, RtcEvent::Offer);
    a.client_sends(101, &c2, 1, RtcEvent::Offer);
    w.take();
    a.run(Command::ExportWorker { worker: 1, conn: cid(1), to: 0xb, then: Box::new(|_| {}) });
    // One leaves before the worker's claim is heard: its departure waits, then follows.
    a.run(Command::ClientGone { client: 100, conn: c1.conn, departure: () });
    assert!(sent.take().is_empty());
    a.run(Command::Evict { role: Role::Worker, id: 1, newer: ConnId { at: 9, instance: 0xb } });
    assert_eq!(sent.take(), [(100, 1, 0xb, RtcEvent::PeerGone)]);
    // The other after: at once; and once only.
    a.run(Command::ClientGone { client: 101, conn: c2.conn, departure: () });
    a.run(Command::ClientGone { client: 101, conn: c2.conn, departure: () });
    assert_eq!(sent.take(), [(101, 1, 0xb, RtcEvent::PeerGone)]);
    assert!(w.take().is_empty(), "the worker hears of it where it is");
}
