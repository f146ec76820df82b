//! Two bridges in simulated time, each with real routers (inline shards) and real stream queues,
//! joined by a hand-carried "NATS": every frame, heartbeat and locate passes through the test,
//! which may lose, delay or answer them as it likes.
//!
//! Over 500 lines: one scenario per test, each told in full (frames lost, delayed, answered) so
//! that it reads as the case it pins down; the moves have their own file, `tests/moves.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::*;
use crate::cluster::link::{GIVE_UP_AFTER, RESEND_AFTER};
use crate::cluster::liveness::DEAD_AFTER;
use crate::cluster::{Queue, Subjects};
use crate::peer::{ClusterQueue, Conn, Departure, ForClients, OutboundStream};

const A: InstanceId = 0xa;
const B: InstanceId = 0xb;
const MAX_SESSIONS: usize = 2;

/// One instance: its bridge, its routers, and the bridge's queue, pumped by hand.
struct Instance {
    me: InstanceId,
    bridge: Bridge,
    shards: Arc<Shards<Peer>>,
    queue: ClusterQueue,
    commands: mpsc::Receiver<ToCluster>,
    for_clients: ForClients,
    next_conn: u64,
    /// The time commands are handed to the bridge at.
    clock: Instant,
}

/// A peer's stream on an instance: what the edge holds, and what its peer reads.
struct Stream {
    id: PeerId,
    sink: Sink,
    out: OutboundStream<Outbound>,
}

impl Stream {
    /// The next message written to the peer, if one is queued.
    fn next(&mut self) -> Option<Outbound> {
        self.out.next().now_or_never().flatten().map(|m| m.expect("the stream did not end"))
    }

    fn expect(&mut self, event: RtcEvent) -> Outbound {
        let msg = self.next().unwrap_or_else(|| panic!("peer {} expected {event:?}, got nothing", self.id));
        assert_eq!(msg.event, event, "peer {}: {msg:?}", self.id);
        msg
    }

    fn expect_error(&mut self, code: ErrorCode) -> Outbound {
        let msg = self.expect(RtcEvent::Error);
        assert_eq!(msg.error, code, "{msg:?}");
        msg
    }

    fn expect_nothing(&mut self) {
        if let Some(msg) = self.next() {
            panic!("peer {} expected nothing, got {msg:?}", self.id);
        }
    }
}

impl Instance {
    fn new(me: InstanceId) -> Self {
        let Queue { tx, rx, to_clients, for_clients } = Queue::new();
        let elsewhere = Queue::new();
        let elsewhere = Queue { tx: tx.clone(), ..elsewhere };
        // Inline shards: routing happens on the caller, so every step is synchronous.
        let shards = Arc::new(Shards::start(0, 64, MAX_SESSIONS, || Some(elsewhere.elsewhere())).unwrap());
        let bridge =
            Bridge::new(me, shards.clone(), to_clients, MAX_SESSIONS, crate::cluster::links::FRAME_BYTES);
        Instance {
            me,
            bridge,
            shards,
            queue: tx,
            commands: rx,
            for_clients,
            next_conn: 0,
            clock: Instant::now(),
        }
    }

    fn open(&mut self, id: PeerId) -> Stream {
        self.next_conn += 1;
        let (sink, out) = Conn::open(ConnId { at: self.next_conn, instance: self.me }, 64, |m, _| m);
        Stream { id, sink, out }
    }

    fn worker(&mut self, id: PeerId) -> Stream {
        let mut w = self.open(id);
        let register = Command::RegisterWorker { worker: id, sink: Peer::Local(w.sink.clone()) };
        self.route(self.shards.of_worker(id), register);
        w.expect(RtcEvent::Blank);
        w
    }

    fn client(&mut self, id: PeerId) -> Stream {
        let mut c = self.open(id);
        let register = Command::RegisterClient { client: id, sink: Peer::Local(c.sink.clone()) };
        self.route(self.shards.of_client(id), register);
        c.expect(RtcEvent::Blank);
        c
    }

    fn route(&self, shard: usize, command: Command<Peer>) {
        assert!(self.shards.try_send(shard, command).is_ok(), "inline shards take every command");
    }

    /// What the edge does with a client's message: reserve its answer, route it.
    fn client_sends(&mut self, c: &Stream, worker: PeerId, event: RtcEvent, payload: &'static [u8]) {
        let reply = PeerReply::Local(c.sink.try_reserve().expect("room for the answer"));
        let signal = Signal { event, payload: Bytes::from_static(payload), reply };
        let command = Command::FromClient { client: c.id, sink: Peer::Local(c.sink.clone()), worker, signal };
        self.route(self.shards.of_worker(worker), command);
        self.pump();
    }

    fn worker_sends(&mut self, w: &Stream, client: PeerId, event: RtcEvent, payload: &'static [u8]) {
        let reply = PeerReply::Local(w.sink.try_reserve().expect("room for the answer"));
        let signal = Signal { event, payload: Bytes::from_static(payload), reply };
        let command = Command::FromWorker { worker: w.id, conn: w.sink.id(), client, signal };
        self.route(self.shards.of_worker(w.id), command);
        self.pump();
    }

    /// What the edge does when a client stream ends (or half-closes: the stream still reads
    /// what it is owed): every shard hears of it, then the cluster.
    fn depart(&mut self, c: &Stream) {
        let departure = Arc::new(Departure::new(c.id, c.sink.id(), self.queue.clone()));
        for shard in 0..self.shards.len() {
            let gone =
                Command::ClientGone { client: c.id, conn: c.sink.id(), departure: Some(departure.clone()) };
            self.route(shard, gone);
        }
        drop(departure);
        self.pump();
    }

    /// A client stream ends for good.
    fn client_leaves(&mut self, c: Stream) {
        self.depart(&c);
    }

    /// Hands the bridge what its queue holds.
    fn pump(&mut self) {
        loop {
            if let Ok(command) = self.commands.try_recv() {
                self.bridge.command(command, self.clock);
            } else if let Some((conn, msg)) = self.for_clients.try_recv() {
                self.bridge.to_client(conn, msg);
            } else {
                break;
            }
        }
    }

    /// Flushes, and returns everything the bridge asks for.
    fn outputs(&mut self, now: Instant) -> Vec<Output> {
        self.pump();
        self.bridge.flush(now);
        std::iter::from_fn(|| self.bridge.poll_output()).collect()
    }
}

/// A sender's clock for heartbeats: later at every call.
fn sent_at() -> u64 {
    static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Hands `to` every frame and heartbeat in `outputs`; returns the locates asked for.
fn carry(outputs: Vec<Output>, to: &mut Instance, now: Instant) -> Vec<PeerId> {
    let mut locates = Vec::new();
    for output in outputs {
        match output {
            Output::ToInstance(instance, frame) => {
                assert_eq!(instance, to.me, "a frame for another instance");
                to.bridge.frame(frame, now);
            }
            Output::Heartbeat(beat) => to.bridge.heartbeat(beat, sent_at(), now),
            Output::Locate(worker) => locates.push(worker),
        }
    }
    locates
}

/// Carries everything both ways until neither has more to say.
fn settle(a: &mut Instance, b: &mut Instance, now: Instant) {
    for _ in 0..10 {
        let (from_a, from_b) = (a.outputs(now), b.outputs(now));
        if from_a.is_empty() && from_b.is_empty() {
            return;
        }
        assert!(carry(from_a, b, now).is_empty(), "unexpected locate");
        assert!(carry(from_b, a, now).is_empty(), "unexpected locate");
    }
    panic!("the bridges keep talking");
}

fn frames(outputs: &[Output]) -> usize {
    outputs.iter().filter(|o| matches!(o, Output::ToInstance(..))).count()
}

/// A client on A with an OFFER delivered to a worker on B.
fn offered(t0: Instant) -> (Instance, Instance, Stream, Stream) {
    let (mut a, mut b) = (Instance::new(A), Instance::new(B));
    let mut w = b.worker(7);
    let c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    assert_eq!(carry(a.outputs(t0), &mut b, t0), [7], "the worker is looked up");
    a.bridge.located(7, Ok(B), t0);
    settle(&mut a, &mut b, t0);
    let offer = w.expect(RtcEvent::Offer);
    assert_eq!((offer.client, &offer.payload[..]), (100, &b"offer"[..]));
    (a, b, c, w)
}

#[test]
fn a_negotiation_crosses_both_ways() {
    let t0 = Instant::now();
    let (mut a, mut b) = (Instance::new(A), Instance::new(B));
    let mut w = b.worker(7);
    let mut c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    let outputs = a.outputs(t0);
    assert_eq!(outputs, [Output::Locate(7)], "the worker is looked up first");
    a.bridge.located(7, Ok(B), t0);
    settle(&mut a, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::Offer).payload[..], b"offer");
    b.worker_sends(&w, 100, RtcEvent::Answer, b"answer");
    settle(&mut a, &mut b, t0);
    assert_eq!(&c.expect(RtcEvent::Answer).payload[..], b"answer");
    a.client_sends(&c, 7, RtcEvent::AcceptAnswer, b"");
    settle(&mut a, &mut b, t0);
    w.expect(RtcEvent::AcceptAnswer);
    // The cached location: no second locate.
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"cand");
    let outputs = a.outputs(t0);
    assert!(!outputs.iter().any(|o| matches!(o, Output::Locate(_))), "{outputs:?}");
    carry(outputs, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"cand");
    // The state machine runs on the worker's instance; its refusal comes back.
    a.client_sends(&c, 7, RtcEvent::AcceptAnswer, b"");
    settle(&mut a, &mut b, t0);
    c.expect_error(ErrorCode::InvalidTransition);
    c.expect_nothing();
}

#[test]
fn a_lost_frame_is_resent_and_delivered_once_in_order() {
    let t0 = Instant::now();
    let (mut a, mut b, c, mut w) = offered(t0);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"1");
    let lost = a.outputs(t0);
    assert_eq!(frames(&lost), 1);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"2");
    // Frame 2 arrives without frame 1: a gap; B asks again at once.
    let second = a.outputs(t0);
    carry(second.clone(), &mut b, t0);
    w.expect_nothing();
    carry(second, &mut b, t0); // and a duplicate of it changes nothing
    w.expect_nothing();
    let nak = b.outputs(t0);
    assert_eq!(frames(&nak), 1, "one NAK");
    carry(nak, &mut a, t0);
    a.bridge.tick(t0);
    let resent: Vec<Output> = std::iter::from_fn(|| a.bridge.poll_output()).collect();
    assert_eq!(frames(&resent), 2, "go-back-N from the gap");
    carry(resent, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"1");
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"2");
    w.expect_nothing();

    // A frame lost with nothing after it is resent after RESEND_AFTER of silence.
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"3");
    assert_eq!(frames(&a.outputs(t0)), 1);
    let later = t0 + RESEND_AFTER;
    b.outputs(t0); // B acknowledges 1 and 2 (its ack is lost too)
    a.bridge.tick(later);
    let resent: Vec<Output> = std::iter::from_fn(|| a.bridge.poll_output()).collect();
    assert!(frames(&resent) >= 1, "{resent:?}");
    carry(resent, &mut b, later);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"3");
    w.expect_nothing();
}

#[test]
fn a_dead_instance_refuses_what_was_in_flight_and_ends_sessions_on_both_sides() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    // B goes silent; A's candidate is never acknowledged.
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"lost");
    assert_eq!(frames(&a.outputs(t0)), 1);
    a.bridge.tick(t0 + GIVE_UP_AFTER - Duration::from_millis(1));
    c.expect_nothing();
    a.bridge.tick(t0 + GIVE_UP_AFTER);
    c.expect_error(ErrorCode::ClusterUnavailable);
    let gone = c.expect(RtcEvent::PeerGone);
    assert_eq!(gone.worker, 7);
    c.expect_nothing();
    // B, hearing nothing from A, ends the session of A's client after DEAD_AFTER.
    b.bridge.tick(t0);
    w.expect_nothing();
    b.bridge.tick(t0 + DEAD_AFTER);
    assert_eq!(w.expect(RtcEvent::PeerGone).client, 100);
    // A's cache forgot B: the next message looks the worker up again.
    a.client_sends(&c, 7, RtcEvent::Offer, b"again");
    assert!(a.outputs(t0 + GIVE_UP_AFTER).contains(&Output::Locate(7)));
}

#[test]
fn a_leaving_instance_ends_its_sessions_at_once() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    b.bridge.leave(t0);
    assert!(b.bridge.ready_to_leave(t0), "nothing in flight");
    b.bridge.farewell();
    carry(std::iter::from_fn(|| b.bridge.poll_output()).collect(), &mut a, t0);
    assert_eq!(c.expect(RtcEvent::PeerGone).worker, 7);
    w.expect_nothing();
}

#[test]
fn a_replayed_older_heartbeat_is_not_believed() {
    let t0 = Instant::now();
    let (mut a, _b, mut c, _w) = offered(t0);
    let beat = |leaving| Bytes::from(wire::Heartbeat { instance: B, leaving }.encode_to_vec());
    a.bridge.heartbeat(beat(false), 2_000, t0);
    // A `leaving` heartbeat older than the last one believed: a replay.
    a.bridge.heartbeat(beat(true), 1_000, t0);
    c.expect_nothing();
    a.bridge.heartbeat(beat(true), 2_001, t0);
    assert_eq!(c.expect(RtcEvent::PeerGone).worker, 7);
}

#[test]
fn offers_across_count_against_the_clients_session_cap() {
    let t0 = Instant::now();
    let (mut a, mut b) = (Instance::new(A), Instance::new(B));
    let mut workers: Vec<Stream> = (1..=3).map(|id| b.worker(id)).collect();
    let mut c = a.client(100);
    for id in 1..=3 {
        a.client_sends(&c, id, RtcEvent::Offer, b"offer");
        let locates = carry(a.outputs(t0), &mut b, t0);
        assert_eq!(locates, [id]);
        a.bridge.located(id, Ok(B), t0);
        settle(&mut a, &mut b, t0);
    }
    workers[0].expect(RtcEvent::Offer);
    workers[1].expect(RtcEvent::Offer);
    workers[2].expect_nothing();
    c.expect_error(ErrorCode::TooManySessions);
    // A session ends (its worker leaves): the third OFFER goes through.
    drop(workers.remove(0));
    let gone = Command::WorkerGone { worker: 1, conn: ConnId { at: 1, instance: B } };
    b.route(b.shards.of_worker(1), gone);
    settle(&mut a, &mut b, t0);
    assert_eq!(c.expect(RtcEvent::PeerGone).worker, 1);
    a.client_sends(&c, 3, RtcEvent::Offer, b"offer");
    settle(&mut a, &mut b, t0);
    workers[1].expect(RtcEvent::Offer);
}

#[test]
fn a_locate_is_answered_by_the_workers_claim() {
    let t0 = Instant::now();
    let (mut a, mut b) = (Instance::new(A), Instance::new(B));
    let mut w = b.worker(7);
    let c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    assert_eq!(a.outputs(t0), [Output::Locate(7)]);
    // The worker's claim reaches A before any locate answer.
    let claim =
        wire::Claim { worker: true, id: 7, conn: Some(wire_conn(w.sink.id())), moved_from: 0, now_at: 0 };
    a.bridge.claim(claim.encode_to_vec().into(), t0);
    settle(&mut a, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::Offer).payload[..], b"offer");
    // The locate's own late answer changes nothing.
    a.bridge.located(7, Err(Lookup::NotFound), t0);
    settle(&mut a, &mut b, t0);
    w.expect_nothing();
}

#[test]
fn a_worker_found_nowhere_is_refused() {
    let t0 = Instant::now();
    let mut a = Instance::new(A);
    let mut c = a.client(100);
    a.client_sends(&c, 404, RtcEvent::Offer, b"offer");
    a.client_sends(&c, 404, RtcEvent::LocalIceCandidate, b"cand");
    assert_eq!(a.outputs(t0), [Output::Locate(404)], "one locate for both");
    a.bridge.located(404, Err(Lookup::NotFound), t0);
    for _ in 0..2 {
        let refused = c.expect_error(ErrorCode::PeerNotConnected);
        assert_eq!(refused.worker, 404);
        assert!(std::str::from_utf8(&refused.payload).unwrap().contains("not connected"));
    }
}

#[test]
fn a_departure_racing_the_first_signal_comes_after_it() {
    let t0 = Instant::now();
    let (mut a, mut b) = (Instance::new(A), Instance::new(B));
    let mut w = b.worker(7);
    let c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    assert_eq!(a.outputs(t0), [Output::Locate(7)]);
    // The client leaves while its first message waits for the locate: the message is handled
    // as if it had stayed, then the worker hears of the departure.
    a.client_leaves(c);
    assert!(a.outputs(t0).is_empty(), "the departure waits for the locate");
    a.bridge.located(7, Ok(B), t0);
    let outputs = a.outputs(t0);
    assert_eq!(frames(&outputs), 1);
    carry(outputs, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::Offer).payload[..], b"offer");
    assert_eq!(w.expect(RtcEvent::PeerGone).client, 100);
    w.expect_nothing();
}

#[test]
fn a_departure_racing_a_failed_locate_still_answers_the_message() {
    let t0 = Instant::now();
    let mut a = Instance::new(A);
    let mut c = a.client(100);
    a.client_sends(&c, 404, RtcEvent::Offer, b"offer");
    a.outputs(t0);
    // The stream is half-closed (it still reads what it is owed), and its departure reaches
    // the bridge before the locate's answer.
    let departure = Arc::new(Departure::new(c.id, c.sink.id(), a.queue.clone()));
    for shard in 0..a.shards.len() {
        let gone =
            Command::ClientGone { client: c.id, conn: c.sink.id(), departure: Some(departure.clone()) };
        a.route(shard, gone);
    }
    drop(departure);
    a.pump();
    a.bridge.located(404, Err(Lookup::NotFound), t0);
    c.expect_error(ErrorCode::PeerNotConnected);
    assert!(a.outputs(t0).is_empty(), "no session anywhere: nothing to tell");
}

#[test]
fn a_departure_follows_the_last_signal_on_the_link() {
    let t0 = Instant::now();
    let (mut a, mut b, c, mut w) = offered(t0);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"last words");
    a.client_leaves(c);
    let outputs = a.outputs(t0);
    assert_eq!(frames(&outputs), 1, "the candidate and the departure in one frame");
    carry(outputs, &mut b, t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"last words");
    assert_eq!(w.expect(RtcEvent::PeerGone).client, 100);
    w.expect_nothing();
}

#[test]
fn while_nats_is_down_messages_across_are_refused_at_once() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    a.bridge.set_connected(false);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"1");
    assert!(a.outputs(t0).is_empty());
    let refused = c.expect_error(ErrorCode::ClusterUnavailable);
    assert_eq!(refused.worker, 7);
    // The worker's relay to the client, while B's NATS is down: refused on the worker's stream.
    b.bridge.set_connected(false);
    b.worker_sends(&w, 100, RtcEvent::Answer, b"answer");
    let refused = w.expect_error(ErrorCode::ClusterUnavailable);
    assert_eq!(refused.client, 100);
    assert!(b.outputs(t0).is_empty());
}

#[test]
fn a_relay_for_a_client_that_left_is_refused_to_the_worker() {
    let t0 = Instant::now();
    let (mut a, mut b, c, mut w) = offered(t0);
    // The client's stream ends on A while the worker's ANSWER is on its way from B.
    let conn = c.sink.id();
    a.client_leaves(c);
    assert!(!a.bridge.clients.contains(conn));
    b.worker_sends(&w, 100, RtcEvent::Answer, b"answer");
    settle(&mut a, &mut b, t0);
    // The departure reaches B first, then A's refusal of the ANSWER it could not deliver.
    assert_eq!(w.expect(RtcEvent::PeerGone).client, 100);
    let refused = w.expect_error(ErrorCode::PeerNotConnected);
    assert_eq!(refused.client, 100);
    w.expect_nothing();
}

#[test]
fn subjects_name_instances_and_workers_by_number() {
    let s = Subjects::new("p");
    assert_eq!(
        (s.inbox(10), s.worker(7), s.claim(), s.heartbeat()),
        ("p.i.10".into(), "p.w.7".into(), "p.claim".into(), "p.hb".into())
    );
}

#[test]
fn what_is_owed_across_waits_while_nats_is_down_and_goes_when_it_is_back() {
    let t0 = Instant::now();
    let (mut a, mut b, c, mut w) = offered(t0);
    let w8 = b.worker(8);
    let mut c2 = a.client(101);
    a.client_sends(&c2, 8, RtcEvent::Offer, b"offer");
    assert_eq!(carry(a.outputs(t0), &mut b, t0), [8]);
    a.bridge.located(8, Ok(B), t0);
    settle(&mut a, &mut b, t0);
    // A blip on both sides: client 100 leaves on A, worker 8 leaves on B. Neither PEER_GONE
    // can leave now, and neither is lost.
    a.bridge.set_connected(false);
    b.bridge.set_connected(false);
    a.client_leaves(c);
    b.route(b.shards.of_worker(8), Command::WorkerGone { worker: 8, conn: w8.sink.id() });
    assert!(a.outputs(t0).is_empty() && b.outputs(t0).is_empty(), "NATS is down");
    a.bridge.set_connected(true);
    b.bridge.set_connected(true);
    settle(&mut a, &mut b, t0);
    assert_eq!(w.expect(RtcEvent::PeerGone).client, 100);
    assert_eq!(c2.expect(RtcEvent::PeerGone).worker, 8);
    w.expect_nothing();
    c2.expect_nothing();
}

#[test]
fn a_peer_gone_passes_a_full_window_when_relays_do_not() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    b.worker_sends(&w, 100, RtcEvent::Answer, b"answer");
    settle(&mut a, &mut b, t0);
    c.expect(RtcEvent::Answer);
    // A stops acknowledging: B's link to A fills with the worker's candidates, one frame each.
    let mut in_flight = Vec::new();
    for _ in 0..crate::cluster::link::WINDOW {
        b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"c");
        in_flight.extend(b.outputs(t0));
    }
    assert!(b.bridge.links.is_full(A));
    b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"one too many");
    assert_eq!(w.expect_error(ErrorCode::ClusterUnavailable).client, 100);
    // The worker leaves: the PEER_GONE owed to the client goes all the same.
    b.route(b.shards.of_worker(7), Command::WorkerGone { worker: 7, conn: w.sink.id() });
    in_flight.extend(b.outputs(t0));
    assert_eq!(frames(&in_flight), crate::cluster::link::WINDOW + 1);
    carry(in_flight, &mut a, t0);
    // The client's queue (64) took what it could, the rest is refused back to the worker; the
    // PEER_GONE came last, past the queue's bound.
    for _ in 0..64 {
        c.expect(RtcEvent::IceCandidate);
    }
    assert_eq!(c.expect(RtcEvent::PeerGone).worker, 7);
    c.expect_nothing();
}

#[test]
fn a_client_signal_with_an_event_this_instance_does_not_know_is_refused_to_the_client() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    // What an instance of a newer version may send: an event unknown here.
    let signal = wire::ClientSignal {
        client: 100,
        conn: Some(wire_conn(c.sink.id())),
        worker: 7,
        event: 99,
        payload: Bytes::from_static(b"?"),
        ..Default::default()
    };
    a.bridge.links.push(B, Kind::ClientSignal(signal), Origin::Owed);
    settle(&mut a, &mut b, t0);
    let refused = c.expect_error(ErrorCode::InvalidTransition);
    assert_eq!(refused.worker, 7);
    assert!(std::str::from_utf8(&refused.payload).unwrap().contains("unknown event 99"));
    w.expect_nothing();
    // And the other way: a message for the client with an unknown event is refused to the worker.
    let msg = wire::ToClient {
        client: 100,
        conn: Some(wire_conn(c.sink.id())),
        worker: 7,
        event: 99,
        payload: Bytes::new(),
        error_code: 0,
    };
    b.bridge.links.push(A, Kind::ToClient(msg), Origin::Owed);
    settle(&mut a, &mut b, t0);
    assert_eq!(w.expect_error(ErrorCode::InvalidTransition).client, 100);
    c.expect_nothing();
}

mod moves;
