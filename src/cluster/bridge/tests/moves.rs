//! Peers moving between instances with their sessions: a worker (its router entry handed
//! over), a client (its stream's id kept, its messages re-routed).

use super::*;
use crate::cluster::tunnels::{MovedClient, MovedSession, MovedWorker};
use crate::core::{HandedSession, PeerSink};

/// Hands worker 7 over from `from` to `to`, as its holder does: its sessions, each with where
/// its client is.
fn export(from: &mut Instance, w: &Stream, to: InstanceId) -> Vec<MovedSession> {
    let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (into, me) = (handed.clone(), from.me);
    let then = Box::new(move |sessions: Vec<HandedSession<Peer>>| {
        into.lock().unwrap().extend(sessions.into_iter().map(|s| MovedSession {
            client: s.client,
            conn: s.sink.conn(),
            at: s.sink.instance(me),
            state: s.state,
        }))
    });
    from.route(from.shards.of_worker(7), Command::ExportWorker { worker: 7, conn: w.sink.id(), to, then });
    std::mem::take(&mut *handed.lock().unwrap())
}

/// Worker 7 arrives at `to` from `from` with `sessions`, numbered on from `first_seq`, and is
/// acknowledged.
fn import(to: &mut Instance, from: InstanceId, first_seq: u64, sessions: Vec<MovedSession>) -> Stream {
    let mut w = to.open(7);
    let worker = MovedWorker { from, first_seq, last_received: 0, messages: Vec::new(), sessions };
    let (done, _imported) = tokio::sync::oneshot::channel();
    let import = ToCluster::ImportWorker { worker: 7, sink: w.sink.clone(), moved: Box::new(worker), done };
    assert!(to.queue.try_send(import).is_ok());
    to.pump();
    w.expect(RtcEvent::Blank);
    w
}

#[test]
fn a_worker_moves_with_its_session_and_what_its_client_sent_meanwhile_follows_it() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    // The worker moves from B to A, where its client is: B hands its session over.
    let sessions = export(&mut b, &w, A);
    let offered = crate::core::session::State::Offered;
    assert_eq!(sessions, [MovedSession { client: 100, conn: c.sink.id(), at: A, state: offered }]);
    // Sent before A took it over: it waits on B for the claim.
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"racing");
    settle(&mut a, &mut b, t0);
    c.expect_nothing();
    w.expect_nothing();

    let mut moved = import(&mut a, B, 2, sessions);
    let claim =
        wire::Claim { worker: true, id: 7, conn: Some(wire_conn(moved.sink.id())), moved_from: B, now_at: 0 };
    b.bridge.claim(claim.encode_to_vec().into(), t0);
    settle(&mut a, &mut b, t0);
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"racing", "it followed the worker");

    // The session goes on at A, in the state it had; B's end changes nothing for it.
    a.worker_sends(&moved, 100, RtcEvent::Answer, b"answer");
    assert_eq!(&c.expect(RtcEvent::Answer).payload[..], b"answer");
    b.bridge.farewell();
    carry(b.outputs(t0), &mut a, t0);
    a.pump();
    a.client_sends(&c, 7, RtcEvent::AcceptAnswer, b"");
    moved.expect(RtcEvent::AcceptAnswer);
    c.expect_nothing();
    moved.expect_nothing();
}

/// Hands each frame in `outputs` to the instance it is for; heartbeats and locates are dropped.
fn carry_to(outputs: Vec<Output>, instances: &mut [&mut Instance], now: Instant) {
    for output in outputs {
        if let Output::ToInstance(instance, frame) = output {
            let to = instances.iter_mut().find(|i| i.me == instance).expect("a frame for a known instance");
            to.bridge.frame(frame, now);
        }
    }
}

const C: InstanceId = 0xc;

/// Client 100 on A offers worker 7 on C, then moves to B (its stream keeps its id), where the
/// worker's messages reach it in order, and its own reach the worker. Returns A, B, C, the
/// worker and the client.
fn client_moved_from_a_to_b(t0: Instant) -> (Instance, Instance, Instance, Stream, Stream) {
    let (mut a, mut b, mut y) = (Instance::new(A), Instance::new(B), Instance::new(C));
    let mut w = y.worker(7);
    let mut c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    assert_eq!(carry(a.outputs(t0), &mut y, t0), [7]);
    a.bridge.located(7, Ok(C), t0);
    settle(&mut a, &mut y, t0);
    w.expect(RtcEvent::Offer);
    c.expect_nothing();

    // The client leaves A for B: what comes for it on A is held until its claim.
    let conn = c.sink.id();
    let leaving = a.bridge.client_leaving(100, conn, B);
    assert_eq!((&leaving.sessions[..], leaving.moves), (&[(7, C)][..], 1));
    y.worker_sends(&w, 100, RtcEvent::Answer, b"before the claim");
    carry(y.outputs(t0), &mut a, t0);
    let from_a = a.outputs(t0);
    assert!(from_a.iter().all(|o| !matches!(o, Output::ToInstance(B, _))), "held on A");
    // What A sends the worker's instance: that the client left.
    carry_to(from_a, &mut [&mut y], t0);
    c.expect_nothing();

    // B takes it over, keeping its stream's id, and claims it.
    let (mut moved, mut started) = arrives_at_b(&mut b, conn, leaving, t0);
    assert_eq!(started.try_recv(), Ok(()), "no worker of B's had a session with it: read at once");
    let claim = wire::Claim { worker: false, id: 100, conn: Some(wire_conn(conn)), moved_from: A, now_at: B };
    a.bridge.claim(claim.encode_to_vec().into(), t0);
    y.bridge.claim(claim.encode_to_vec().into(), t0);
    // The worker's next message goes to B at once, and overtakes the one A passes on: B holds
    // it until the worker's instance's marker has come through A.
    y.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"after the claim");
    let from_y = y.outputs(t0);
    carry_to(from_y, &mut [&mut a, &mut b], t0);
    moved.expect_nothing();
    for _ in 0..4 {
        let from_a = a.outputs(t0);
        carry_to(from_a, &mut [&mut b, &mut y], t0);
        let from_b = b.outputs(t0);
        carry_to(from_b, &mut [&mut a, &mut y], t0);
    }
    assert_eq!(&moved.expect(RtcEvent::Answer).payload[..], b"before the claim");
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"after the claim");
    moved.expect_nothing();

    // Its messages reach the worker as its stream's, by the id it kept.
    b.client_sends(&moved, 7, RtcEvent::AcceptAnswer, b"");
    assert_eq!(b.outputs(t0), [Output::Locate(7)]);
    b.bridge.located(7, Ok(C), t0);
    let from_b = b.outputs(t0);
    carry_to(from_b, &mut [&mut a, &mut y], t0);
    w.expect(RtcEvent::AcceptAnswer);
    moved.expect_nothing();
    (a, b, y, w, moved)
}

#[test]
fn a_client_moves_with_its_session_and_its_worker_s_messages_reach_it_in_order() {
    let t0 = Instant::now();
    let (_a, mut b, mut y, w, mut moved) = client_moved_from_a_to_b(t0);
    // Then the worker moves to B too: the client's stream there is local, whatever instance
    // its kept id names, so the session needs no other instance any more.
    let sessions = export(&mut y, &w, B);
    let w = import(&mut b, C, 1, sessions);
    b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"here");
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"here", "delivered here, at once");
    assert!(b.outputs(t0).iter().all(|o| !matches!(o, Output::ToInstance(..))), "nothing crosses");
}

/// A worker moves to a fourth instance after its client moved: its new home writes to the
/// client where it is now, not through the instance the client left (which may be gone).
#[test]
fn a_worker_moving_after_its_client_moved_reaches_the_client_where_it_is() {
    const D: InstanceId = 0xd;
    let t0 = Instant::now();
    let (_a, mut b, mut y, w, mut moved) = client_moved_from_a_to_b(t0);
    let sessions = export(&mut y, &w, D);
    assert_eq!(sessions.iter().map(|s| (s.conn.instance, s.at)).collect::<Vec<_>>(), [(A, B)]);
    let mut d = Instance::new(D);
    let w = import(&mut d, C, 1, sessions);
    // Straight to B, not through A (which may be gone by now).
    d.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"from D");
    let from_d = d.outputs(t0);
    assert!(from_d.iter().all(|o| !matches!(o, Output::ToInstance(A, _))), "not through A");
    carry_to(from_d, &mut [&mut b, &mut y], t0);
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"from D");
    moved.expect_nothing();
}

/// Client 100 on A with a session with worker 7 on `worker_on` (`y`): the client's `OFFER`
/// reached the worker. Returns A, the worker's instance, the worker and the client.
fn offered_from_a(worker_on: InstanceId, t0: Instant) -> (Instance, Instance, Stream, Stream) {
    let (mut a, mut y) = (Instance::new(A), Instance::new(worker_on));
    let mut w = y.worker(7);
    let c = a.client(100);
    a.client_sends(&c, 7, RtcEvent::Offer, b"offer");
    carry(a.outputs(t0), &mut y, t0);
    a.bridge.located(7, Ok(worker_on), t0);
    settle(&mut a, &mut y, t0);
    w.expect(RtcEvent::Offer);
    (a, y, w, c)
}

/// The client leaves A for B (`b`), which imports it: the stream B reads it from, and whether
/// B reads it yet.
fn moves_to_b(
    a: &mut Instance,
    b: &mut Instance,
    c: &Stream,
    t0: Instant,
) -> (Stream, tokio::sync::oneshot::Receiver<()>) {
    let leaving = a.bridge.client_leaving(100, c.sink.id(), B);
    arrives_at_b(b, c.sink.id(), leaving, t0)
}

/// Client 100, which left A (`leaving`), arrives at B with its stream's id `conn`, welcomed.
fn arrives_at_b(
    b: &mut Instance,
    conn: ConnId,
    leaving: crate::peer::remote::Leaving,
    t0: Instant,
) -> (Stream, tokio::sync::oneshot::Receiver<()>) {
    let (sink, out) = Conn::open(conn, 64, |m, _| m);
    let mut moved = Stream { id: 100, sink, out };
    let client = MovedClient {
        from: A,
        conn,
        first_seq: 1,
        last_received: 0,
        messages: Vec::new(),
        sessions: leaving.sessions,
        moves: leaving.moves,
    };
    let (start, started) = tokio::sync::oneshot::channel();
    b.bridge.import_client(100, moved.sink.clone(), client, start, t0);
    moved.expect(RtcEvent::Blank);
    (moved, started)
}

#[test]
fn what_a_client_sent_before_moving_reaches_a_worker_on_a_third_instance_before_what_it_sent_after() {
    let t0 = Instant::now();
    let (mut a, mut y, mut w, c) = offered_from_a(C, t0);
    // Sent from A; its frame is slow (NATS lost it, and A sends it again later).
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"before the move");
    let mut b = Instance::new(B);
    let (moved, mut started) = moves_to_b(&mut a, &mut b, &c, t0);
    assert_eq!(started.try_recv(), Ok(()), "no worker of B's had a session with it");
    let slow = a.outputs(t0);
    // Sent from B once it moved: it comes first, and waits.
    b.client_sends(&moved, 7, RtcEvent::LocalIceCandidate, b"after the move");
    assert_eq!(b.outputs(t0), [Output::Locate(7)]);
    b.bridge.located(7, Ok(C), t0);
    let from_b = b.outputs(t0);
    carry_to(from_b, &mut [&mut y], t0);
    w.expect_nothing();
    carry_to(slow, &mut [&mut y], t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"before the move");
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"after the move");
    w.expect_nothing();
    // From then on, at once.
    b.client_sends(&moved, 7, RtcEvent::LocalIceCandidate, b"later");
    let from_b = b.outputs(t0);
    carry_to(from_b, &mut [&mut y], t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"later");
}

#[test]
fn a_moved_client_s_stream_is_read_once_what_it_sent_its_new_home_s_workers_before_came() {
    let t0 = Instant::now();
    let (mut a, mut b, mut w, c) = offered_from_a(B, t0);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"before the move");
    let (_moved, mut started) = moves_to_b(&mut a, &mut b, &c, t0);
    // B's worker has a session with it: what it sent from A comes first, and until then B does
    // not read what it sends from B.
    assert!(started.try_recv().is_err(), "not read yet");
    w.expect_nothing();
    let slow = a.outputs(t0);
    carry_to(slow, &mut [&mut b], t0);
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"before the move");
    assert_eq!(started.try_recv(), Ok(()), "read from now on");
}

#[test]
fn a_moved_client_s_messages_do_not_wait_for_an_old_home_that_is_gone() {
    let t0 = Instant::now();
    let (mut a, mut y, mut w, c) = offered_from_a(C, t0);
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"lost with A");
    let mut b = Instance::new(B);
    let (moved, _started) = moves_to_b(&mut a, &mut b, &c, t0);
    drop(a.outputs(t0));
    let conn = Some(wire_conn(c.sink.id()));
    let claim = wire::Claim { worker: false, id: 100, conn, moved_from: A, now_at: B };
    y.bridge.claim(claim.encode_to_vec().into(), t0);
    b.client_sends(&moved, 7, RtcEvent::LocalIceCandidate, b"after the move");
    b.bridge.located(7, Ok(C), t0);
    let from_b = b.outputs(t0 + Duration::from_secs(1));
    carry_to(from_b, &mut [&mut y], t0 + Duration::from_secs(1));
    w.expect_nothing();
    // A is never heard from again: once it is known dead, the message is taken.
    y.bridge.tick(t0 + DEAD_AFTER + Duration::from_millis(500));
    assert_eq!(&w.expect(RtcEvent::IceCandidate).payload[..], b"after the move");
    w.expect_nothing();
}

#[test]
fn a_worker_s_message_through_the_old_home_reaches_a_client_that_moved_to_its_instance_before_its_next() {
    let t0 = Instant::now();
    let (mut a, mut b, mut w, c) = offered_from_a(B, t0);
    // The worker answers while its client is on A: the frame to A is slow.
    b.worker_sends(&w, 100, RtcEvent::Answer, b"before the move");
    let slow = b.outputs(t0);
    let (mut moved, _started) = moves_to_b(&mut a, &mut b, &c, t0);
    let conn = Some(wire_conn(c.sink.id()));
    let claim = wire::Claim { worker: false, id: 100, conn, moved_from: A, now_at: B };
    a.bridge.claim(claim.encode_to_vec().into(), t0);
    // Its next message, here, waits for the one that went through A.
    b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"after the move");
    moved.expect_nothing();
    carry_to(slow, &mut [&mut a], t0);
    for _ in 0..4 {
        let from_a = a.outputs(t0);
        carry_to(from_a, &mut [&mut b], t0);
        let from_b = b.outputs(t0);
        carry_to(from_b, &mut [&mut a], t0);
    }
    assert_eq!(&moved.expect(RtcEvent::Answer).payload[..], b"before the move");
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"after the move");
    moved.expect_nothing();
    // From then on, at once; and the session is the stream's: the worker leaving ends it.
    b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"later");
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"later");
    assert_eq!(moved.sink.sessions(), 1);
    b.route(b.shards.of_worker(7), Command::WorkerGone { worker: 7, conn: w.sink.id() });
    b.pump();
    assert_eq!(moved.expect(RtcEvent::PeerGone).worker, 7);
    assert_eq!(moved.sink.sessions(), 0);
    w.expect_nothing();
}
