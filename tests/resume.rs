//! Resume on one instance (`x-resume-after`): a stream cut without a half-close detaches its
//! peer; a new stream of the same identity takes it over and gets what it missed, numbered.
mod common;

use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::*;
use distributor::config::Config;
use distributor::pb::{ErrorCode, RtcEvent};
use tonic::Code;

fn resumable_client(id: i64, after: u64) -> Vec<(&'static str, String)> {
    vec![("x-client-id", id.to_string()), ("x-resume-after", after.to_string())]
}

fn resumable(after: u64) -> Vec<(&'static str, String)> {
    vec![("x-resume-after", after.to_string())]
}

/// Opens a resumable client stream and checks its welcome: `(resumed, seq)`.
async fn open_resumable(server: &TestServer, id: i64, after: u64) -> (ClientStream, bool, u64) {
    let mut c = open_client(server.channel().await, &resumable_client(id, after)).await.expect("opens");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.client_id), (RtcEvent::Blank, id), "{welcome:?}");
    (c, welcome.resumed, welcome.seq)
}

#[tokio::test]
async fn a_client_cut_mid_negotiation_resumes_and_finishes_it() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 7).await;
    let (c, resumed, seq) = open_resumable(&server, 4242, 0).await;
    assert_eq!((resumed, seq), (false, 0), "a first stream starts afresh");
    c.send(to_worker(7, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    c.cut();
    // The worker answers and trickles while the client is away: it hears nothing back.
    w.send(to_client(4242, RtcEvent::Answer, b"answer")).await;
    w.send(to_client(4242, RtcEvent::LocalIceCandidate, b"w1")).await;
    w.expect_quiet().await;
    let (mut c, resumed, seq) = open_resumable(&server, 4242, 0).await;
    assert_eq!((resumed, seq), (true, 0), "resumed; nothing numbered was received from it");
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 1).await, b"answer");
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 2).await, b"w1");
    c.send(to_worker(7, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::AcceptAnswer, "the session went on");
    w.send(to_client(4242, RtcEvent::LocalIceCandidate, b"w2")).await;
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 3).await, b"w2", "live, numbered on");
}

/// A stream that its client library cancels (an HTTP/2 reset, no half-close) detaches its
/// peer, every time: the worker hears nothing while the client is away, and the client's next
/// stream takes its session over. (tonic reads the reset as the end of the request stream, as
/// it reads a half-close; the edge tells them apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_detaches_its_peer_every_time() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 9).await;
    let mut c = RawClient::open(server.addr, &resumable_client(6060, 0)).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Blank);
    c.send(&to_worker(9, RtcEvent::Offer, b"offer"));
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    w.send(to_client(6060, RtcEvent::Answer, b"answer")).await;
    let answer = c.recv().await;
    assert_eq!((answer.event(), answer.seq), (RtcEvent::Answer, 1));
    for round in 1..=20u8 {
        c.cancel();
        // The quiet that the contract promises the other side of a cut peer.
        w.expect_quiet().await;
        c = RawClient::open(server.addr, &resumable_client(6060, u64::from(round))).await;
        let welcome = c.recv().await;
        assert!(
            welcome.resumed,
            "round {round}: the cancel ended the client instead of detaching it: {welcome:?}"
        );
        c.send(&to_worker(9, RtcEvent::LocalIceCandidate, &[round]));
        assert_eq!(w.recv().await.message.as_ref(), [round], "round {round}: the session went on");
        w.send(to_client(6060, RtcEvent::LocalIceCandidate, &[round])).await;
        let candidate = c.recv().await;
        assert_eq!((candidate.event(), candidate.seq), (RtcEvent::IceCandidate, u64::from(round) + 1));
    }
}

/// A client that does not number its messages sends a burst, which reaches the distributor,
/// and goes on on a new stream without waiting for anything else: everything the old stream
/// carried reaches the worker, in order, before what the new stream sends (what reached the
/// distributor is delivered, whether or not the peer numbers it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_stream_taken_over_at_once_is_delivered_in_order() {
    const BURST: u16 = 300;
    let server = TestServer::start().await;
    let mut w = worker(&server, 10).await;
    let mut c = RawClient::open(server.addr, &resumable_client(7070, 0)).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Blank);
    c.send(&to_worker(10, RtcEvent::Offer, b"offer"));
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    for i in 0..BURST {
        c.send(&to_worker(10, RtcEvent::LocalIceCandidate, &i.to_be_bytes()));
    }
    c.reached().await;
    // At once: the old stream stays open, taken over by the new one.
    let mut next = RawClient::open(server.addr, &resumable_client(7070, 0)).await;
    assert!(next.recv().await.resumed);
    next.send(&to_worker(10, RtcEvent::LocalIceCandidate, b"new"));
    for i in 0..BURST {
        let got = w.recv().await;
        assert_eq!(got.message.as_ref(), i.to_be_bytes(), "candidate {i} of the burst, in order");
    }
    assert_eq!(w.recv().await.message.as_ref(), b"new");
    drop(c);
}

#[tokio::test]
async fn a_resume_replays_only_what_the_peer_says_it_missed() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 8).await;
    let (mut c, _, _) = open_resumable(&server, 5151, 0).await;
    c.send(to_worker(8, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    w.send(to_client(5151, RtcEvent::Answer, b"answer")).await;
    for i in 1..=3u8 {
        w.send(to_client(5151, RtcEvent::LocalIceCandidate, &[i])).await;
    }
    for seq in 1..=4 {
        assert_eq!(c.recv().await.seq, seq, "numbered from 1");
    }
    // The peer numbers its own messages: the welcome of its next stream says the last one.
    c.send(distributor::pb::ClientRtcMessage { seq: 17, ..to_worker(8, RtcEvent::LocalIceCandidate, b"c") })
        .await;
    assert_eq!(w.recv().await.event(), RtcEvent::IceCandidate);
    c.cut();
    // It says it got up to 2: 3 and 4 come again, with their numbers.
    let (mut c, resumed, seq) = open_resumable(&server, 5151, 2).await;
    assert_eq!((resumed, seq), (true, 17));
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 3).await, [2]);
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 4).await, [3]);
    c.expect_quiet().await;
}

#[tokio::test]
async fn a_half_close_still_means_peer_gone_at_once() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 9).await;
    let (mut c, _, _) = open_resumable(&server, 6161, 0).await;
    c.send(to_worker(9, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    c.close();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, 6161));
    assert_eq!(c.ended().await.code(), Code::Ok);
    let (_c, resumed, _) = open_resumable(&server, 6161, 1).await;
    assert!(!resumed, "a peer that left is not resumed");
}

#[tokio::test]
async fn when_the_grace_runs_out_the_other_side_hears_peer_gone() {
    let grace = Duration::from_millis(800);
    let server = TestServer::with(Config { resume_grace: grace, ..Config::default() }).await;
    let mut w = worker(&server, 10).await;
    let (c, _, _) = open_resumable(&server, 7171, 0).await;
    c.send(to_worker(10, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    let cut_at = Instant::now();
    c.cut();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, 7171));
    assert!(cut_at.elapsed() >= grace, "not before the grace ran out: {:?}", cut_at.elapsed());
    let (_c, resumed, _) = open_resumable(&server, 7171, 0).await;
    assert!(!resumed, "too late: it starts afresh");
}

#[tokio::test]
async fn a_stream_without_the_header_is_as_before() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 11).await;
    let (mut c, cid) = client(&server).await;
    c.send(to_worker(11, RtcEvent::Offer, b"offer")).await;
    let offer = w.recv().await;
    assert_eq!((offer.seq, offer.resumed), (0, false), "unnumbered");
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    let answer = c.recv().await;
    assert_eq!((answer.event(), answer.seq, answer.resumed), (RtcEvent::Answer, 0, false));
    // Cut, it is gone at once: no grace without the header.
    c.cut();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));
}

#[tokio::test]
async fn a_worker_resumes_and_gets_what_was_held_for_it() {
    let server = TestServer::start().await;
    let mut w = worker_with(&server, 12, &resumable(0)).await;
    let (mut c, cid) = client(&server).await;
    c.send(to_worker(12, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    c.recv().await;
    w.cut();
    for i in 1..=3u8 {
        c.send(to_worker(12, RtcEvent::LocalIceCandidate, &[i])).await;
    }
    c.expect_quiet().await;
    let mut w = open_worker(server.channel().await, &resumable(1), blank(12)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.worker_machine_id, ack.resumed), (RtcEvent::Blank, 12, true));
    for (i, seq) in (1..=3u8).zip(2..) {
        let held = w.recv().await;
        assert_eq!((held.event(), held.seq, &held.message[..]), (RtcEvent::IceCandidate, seq, &[i][..]));
    }
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"back")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::IceCandidate, "the session goes on");
}

#[tokio::test]
async fn a_new_stream_takes_over_one_still_open() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 13).await;
    let (mut old, _, _) = open_resumable(&server, 8181, 0).await;
    old.send(to_worker(13, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    let (mut new, resumed, _) = open_resumable(&server, 8181, 0).await;
    assert!(resumed);
    assert_eq!(old.ended().await.code(), Code::Aborted);
    w.expect_quiet().await;
    w.send(to_client(8181, RtcEvent::Answer, b"answer")).await;
    assert_eq!(expect_numbered(&mut new, RtcEvent::Answer, 1).await, b"answer");
}

#[tokio::test]
async fn held_messages_are_bounded_and_a_resume_too_far_behind_starts_afresh() {
    let server = TestServer::with(Config { peer_queue: 4, ..Config::default() }).await;
    let mut w = worker(&server, 14).await;
    let (c, _, _) = open_resumable(&server, 9191, 0).await;
    c.send(to_worker(14, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    c.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.send(to_client(9191, RtcEvent::Answer, b"answer")).await;
    for i in 0..5u8 {
        w.send(to_client(9191, RtcEvent::LocalIceCandidate, &[i])).await;
    }
    // Four held (the queue's bound); the next two are refused to the worker.
    for _ in 0..2 {
        let refused = w.recv().await;
        assert_eq!((refused.event(), refused.error_code()), (RtcEvent::Error, ErrorCode::PeerOverloaded));
    }
    let (mut c, resumed, _) = open_resumable(&server, 9191, 0).await;
    assert!(resumed);
    for seq in 1..=4 {
        assert_eq!(c.recv().await.seq, seq);
    }
    c.cut();
    // The last 4 are kept (here, all of them): a resume after 0 is caught up again; one after
    // a number never sent is not believed, and the peer starts afresh.
    let (_c, resumed, _) = open_resumable(&server, 9191, 0).await;
    assert!(resumed, "1..4 are all kept");
    let (_c, resumed, _) = open_resumable(&server, 9191, 5).await;
    assert!(!resumed, "5 was never sent");
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, 9191), "its session ended");
}

#[tokio::test]
async fn a_stream_at_its_age_is_told_to_reconnect_and_resumes() {
    let age = Duration::from_millis(600);
    let server = TestServer::with(Config { max_stream_age: age, ..Config::default() }).await;
    let mut w = worker(&server, 15).await;
    let opened = Instant::now();
    let (mut c, _, _) = open_resumable(&server, 1515, 0).await;
    c.send(to_worker(15, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    w.send(to_client(1515, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.seq, 1);
    let reconnect = c.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "numbered like any message");
    let after = opened.elapsed();
    assert!(after >= age.mul_f64(0.9) - Duration::from_millis(50), "not before its age: {after:?}");
    // The peer does as told: a new stream, resuming after the RECONNECT.
    let (mut new, resumed, _) = open_resumable(&server, 1515, 2).await;
    assert!(resumed);
    assert_eq!(c.ended().await.code(), Code::Aborted);
    w.send(to_client(1515, RtcEvent::LocalIceCandidate, b"w1")).await;
    assert_eq!(expect_numbered(&mut new, RtcEvent::IceCandidate, 3).await, b"w1");
    w.expect_quiet().await;
}

#[tokio::test]
async fn on_shutdown_resumable_peers_are_told_to_reconnect_and_served_until_the_drain_ends() {
    let drain = Duration::from_millis(1500);
    let server = TestServer::with(Config { drain_timeout: drain, ..Config::default() }).await;
    let mut w = worker_with(&server, 16, &resumable(0)).await;
    let (mut plain, _) = client(&server).await;
    let (mut c, _, _) = open_resumable(&server, 1616, 0).await;
    c.send(to_worker(16, RtcEvent::Offer, b"offer")).await;
    w.recv().await;
    let stopping = tokio::spawn(server.shutdown());
    let reconnect = c.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 1));
    assert_eq!(plain.ended().await.code(), Code::Unavailable, "a plain stream ends as before");
    let reconnect = w.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "after the OFFER, 1");
    // Still served during the drain: the worker's answer reaches the resumable client.
    w.send(to_client(1616, RtcEvent::Answer, b"answer")).await;
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 2).await, b"answer");
    assert_eq!(c.ended().await.code(), Code::Unavailable, "then it ends with the drain");
    assert_eq!(w.ended().await.code(), Code::Unavailable);
    stopping.await.unwrap().unwrap();
}
