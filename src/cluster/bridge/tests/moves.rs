//! Peers moving between instances with their sessions: a worker (its router entry handed
//! over), a client (its stream's id kept, its messages re-routed).

use super::*;
use crate::cluster::tunnels::{MovedClient, MovedWorker};
use crate::core::{HandedSession, PeerSink};

#[test]
fn a_worker_moves_with_its_session_and_what_its_client_sent_meanwhile_follows_it() {
    let t0 = Instant::now();
    let (mut a, mut b, mut c, mut w) = offered(t0);
    // The worker moves from B to A, where its client is: B hands its session over.
    let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = handed.clone();
    let then = Box::new(move |sessions: Vec<HandedSession<Peer>>| {
        let sessions = sessions.into_iter().map(|s| (s.client, s.sink.conn(), s.state));
        into.lock().unwrap().extend(sessions)
    });
    b.route(b.shards.of_worker(7), Command::ExportWorker { worker: 7, conn: w.sink.id(), to: A, then });
    let sessions = std::mem::take(&mut *handed.lock().unwrap());
    assert_eq!(sessions, [(100, c.sink.id(), crate::core::session::State::Offered)]);
    // Sent before A took it over: it waits on B for the claim.
    a.client_sends(&c, 7, RtcEvent::LocalIceCandidate, b"racing");
    settle(&mut a, &mut b, t0);
    c.expect_nothing();
    w.expect_nothing();

    let mut moved = a.open(7);
    let (done, _imported) = tokio::sync::oneshot::channel();
    let worker = MovedWorker { from: B, first_seq: 2, last_received: 0, messages: Vec::new(), sessions };
    let import =
        ToCluster::ImportWorker { worker: 7, sink: moved.sink.clone(), moved: Box::new(worker), done };
    assert!(a.queue.try_send(import).is_ok());
    a.pump();
    moved.expect(RtcEvent::Blank);
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

#[test]
fn a_client_moves_with_its_session_and_its_worker_s_messages_reach_it_in_order() {
    const C: InstanceId = 0xc;
    let t0 = Instant::now();
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
    let (across, _stand_in) = a.bridge.client_leaving(100, conn, B);
    assert_eq!(across, [(7, C)]);
    y.worker_sends(&w, 100, RtcEvent::Answer, b"before the claim");
    carry(y.outputs(t0), &mut a, t0);
    assert!(a.outputs(t0).iter().all(|o| !matches!(o, Output::ToInstance(B, _))), "held on A");
    c.expect_nothing();

    // B takes it over, keeping its stream's id, and claims it.
    let (sink, out) = Conn::open(conn, 64, |m, _| m);
    let mut moved = Stream { id: 100, sink, out };
    let client =
        MovedClient { from: A, conn, first_seq: 1, last_received: 0, messages: Vec::new(), sessions: across };
    b.bridge.import_client(100, moved.sink.clone(), client);
    moved.expect(RtcEvent::Blank);
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

    // Then the worker moves to B too: the client's stream there is local, whatever instance
    // its kept id names, so the session needs no other instance any more.
    let handed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = handed.clone();
    let then = Box::new(move |sessions: Vec<HandedSession<Peer>>| {
        into.lock().unwrap().extend(sessions.into_iter().map(|s| (s.client, s.sink.conn(), s.state)))
    });
    y.route(y.shards.of_worker(7), Command::ExportWorker { worker: 7, conn: w.sink.id(), to: B, then });
    let sessions = std::mem::take(&mut *handed.lock().unwrap());
    let mut w = b.open(7);
    let worker = MovedWorker { from: C, first_seq: 1, last_received: 0, messages: Vec::new(), sessions };
    let (done, _imported) = tokio::sync::oneshot::channel();
    let import = ToCluster::ImportWorker { worker: 7, sink: w.sink.clone(), moved: Box::new(worker), done };
    assert!(b.queue.try_send(import).is_ok());
    b.pump();
    w.expect(RtcEvent::Blank);
    b.worker_sends(&w, 100, RtcEvent::LocalIceCandidate, b"here");
    assert_eq!(&moved.expect(RtcEvent::IceCandidate).payload[..], b"here", "delivered here, at once");
    assert!(b.outputs(t0).iter().all(|o| !matches!(o, Output::ToInstance(..))), "nothing crosses");
}
