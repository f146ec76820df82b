//! Relay: full negotiations, many sessions at once, PING, order.
mod common;

use common::*;
use distributor::pb::RtcEvent;

#[tokio::test]
async fn full_negotiation_then_candidates_and_ping() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 42).await;
    let (mut c, cid) = client(&server).await;

    negotiate(&mut c, cid, &mut w, 42).await;

    c.send(to_worker(42, RtcEvent::LocalIceCandidate, b"client-candidate")).await;
    let cand = w.recv().await;
    assert_eq!((cand.event(), cand.client_id, cand.worker_machine_id), (RtcEvent::IceCandidate, cid, 42));
    assert_eq!(&cand.message[..], b"client-candidate");

    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"worker-candidate")).await;
    let cand = c.recv().await;
    assert_eq!((cand.event(), cand.worker_machine_id), (RtcEvent::IceCandidate, 42));
    assert_eq!(&cand.message[..], b"worker-candidate");

    c.send(to_worker(42, RtcEvent::Ping, b"c-ping")).await;
    let pong = c.recv().await;
    assert_eq!((pong.event(), &pong.message[..]), (RtcEvent::Ping, &b"c-ping"[..]));
    w.send(to_client(0, RtcEvent::Ping, b"w-ping")).await;
    let pong = w.recv().await;
    assert_eq!((pong.event(), &pong.message[..]), (RtcEvent::Ping, &b"w-ping"[..]));
    // PING is never relayed.
    c.expect_quiet().await;
    w.expect_quiet().await;
}

#[tokio::test]
async fn inline_routing_relays_the_same() {
    let server = TestServer::with(distributor::config::Config { shards: 0, ..Default::default() }).await;
    let mut w = worker(&server, 43).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 43).await;
    for i in 0..100u32 {
        c.send(to_worker(43, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
    }
    for i in 0..100u32 {
        assert_eq!(&w.recv().await.message[..], &i.to_be_bytes()[..], "in order");
    }
    drop(c);
    assert_eq!(w.recv().await.event(), RtcEvent::PeerGone);
}

#[tokio::test]
async fn client_trickles_candidates_before_the_answer_and_order_holds() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 7).await;
    let (mut c, cid) = client(&server).await;
    c.send(to_worker(7, RtcEvent::Offer, b"offer")).await;
    for i in 0..200u32 {
        c.send(to_worker(7, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
    }
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    for i in 0..200u32 {
        let cand = w.recv().await;
        assert_eq!((cand.event(), cand.client_id), (RtcEvent::IceCandidate, cid));
        assert_eq!(&cand.message[..], &i.to_be_bytes()[..], "in order");
    }
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    for i in 0..200u32 {
        w.send(to_client(cid, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
    }
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    for i in 0..200u32 {
        assert_eq!(&c.recv().await.message[..], &i.to_be_bytes()[..], "in order");
    }
}

#[tokio::test]
async fn one_client_with_three_workers() {
    let server = TestServer::start().await;
    let mut workers = Vec::new();
    for id in [101, 102, 103] {
        workers.push((id, worker(&server, id).await));
    }
    let (mut c, cid) = client(&server).await;
    for (id, _) in &workers {
        c.send(to_worker(*id, RtcEvent::Offer, format!("offer-{id}").as_bytes())).await;
    }
    for (id, w) in &mut workers {
        let offer = w.recv().await;
        assert_eq!((offer.event(), offer.client_id), (RtcEvent::Offer, cid));
        assert_eq!(offer.message, format!("offer-{id}").into_bytes());
        w.send(to_client(cid, RtcEvent::Answer, format!("answer-{id}").as_bytes())).await;
    }
    let mut answered = Vec::new();
    for _ in 0..3 {
        let answer = c.recv().await;
        assert_eq!(answer.event(), RtcEvent::Answer);
        assert_eq!(answer.message, format!("answer-{}", answer.worker_machine_id).into_bytes());
        answered.push(answer.worker_machine_id);
    }
    answered.sort();
    assert_eq!(answered, [101, 102, 103]);
}

#[tokio::test]
async fn three_clients_with_one_worker() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 9).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&server).await);
    }
    for (c, cid) in &clients {
        c.send(to_worker(9, RtcEvent::Offer, &cid.to_be_bytes())).await;
    }
    let mut offered = Vec::new();
    for _ in 0..3 {
        let offer = w.recv().await;
        assert_eq!(offer.event(), RtcEvent::Offer);
        assert_eq!(&offer.message[..], &offer.client_id.to_be_bytes()[..]);
        offered.push(offer.client_id);
        w.send(to_client(offer.client_id, RtcEvent::Answer, &offer.client_id.to_be_bytes())).await;
    }
    for (c, cid) in &mut clients {
        assert!(offered.contains(cid));
        let answer = c.recv().await;
        assert_eq!((answer.event(), answer.worker_machine_id), (RtcEvent::Answer, 9));
        assert_eq!(&answer.message[..], &cid.to_be_bytes()[..], "each client gets its own answer");
        c.send(to_worker(9, RtcEvent::AcceptAnswer, b"")).await;
    }
    for _ in 0..3 {
        assert_eq!(w.recv().await.event(), RtcEvent::AcceptAnswer);
    }
}

#[tokio::test]
async fn renegotiation_restarts_the_session() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 5).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 5).await;
    negotiate(&mut c, cid, &mut w, 5).await;
}

#[tokio::test]
async fn client_id_comes_from_metadata_or_is_random() {
    let server = TestServer::start().await;
    let (_c, cid) = client_with(&server, &[("x-client-id", "777".into())]).await;
    assert_eq!(cid, 777);
    let (_a, a) = client(&server).await;
    let (_b, b) = client(&server).await;
    assert!(a > 0 && b > 0 && a != b, "fresh random ids: {a} {b}");
}
