//! Every refusal of the contract: the sender gets `ERROR{code}` naming the refused message's
//! address, and its stream stays open.
mod common;

use common::*;
use distributor::pb::{ErrorCode, RtcEvent};

#[tokio::test]
async fn offer_to_a_worker_connected_nowhere() {
    let server = TestServer::start().await;
    let (mut c, _) = client(&server).await;
    c.send(to_worker(404, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, ErrorCode::PeerNotConnected, 404);
    // The stream stays open.
    c.send(to_worker(0, RtcEvent::Ping, b"still here")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Ping);
}

#[tokio::test]
async fn client_events_refused_by_the_state_machine() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 3).await;
    let (mut c, _) = client(&server).await;
    // No session yet: ACCEPT_ANSWER and candidates are refused.
    for event in [RtcEvent::AcceptAnswer, RtcEvent::LocalIceCandidate] {
        c.send(to_worker(3, event, b"x")).await;
        assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 3);
    }
    // Never a client's to send, whatever the state.
    for event in
        [RtcEvent::Answer, RtcEvent::IceCandidate, RtcEvent::Error, RtcEvent::PeerGone, RtcEvent::Blank]
    {
        c.send(to_worker(3, event, b"x")).await;
        assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 3);
    }
    // Offered: ACCEPT_ANSWER before the worker's ANSWER is refused.
    c.send(to_worker(3, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    c.send(to_worker(3, RtcEvent::AcceptAnswer, b"")).await;
    assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 3);
    // Nothing refused reached the worker.
    w.expect_quiet().await;
}

#[tokio::test]
async fn worker_events_refused_by_the_state_machine() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 4).await;
    let (mut c, cid) = client(&server).await;
    // No session with this client yet.
    for event in [RtcEvent::Answer, RtcEvent::LocalIceCandidate] {
        w.send(to_client(cid, event, b"x")).await;
        assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
    }
    // Never a worker's to send.
    for event in
        [RtcEvent::Offer, RtcEvent::AcceptAnswer, RtcEvent::IceCandidate, RtcEvent::Error, RtcEvent::PeerGone]
    {
        w.send(to_client(cid, event, b"x")).await;
        assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
    }
    // Offered: worker candidates only after its ANSWER.
    c.send(to_worker(4, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"early")).await;
    assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
    // A second ANSWER to the same offer.
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    w.send(to_client(cid, RtcEvent::Answer, b"again")).await;
    assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
    // A worker message to a client it has no session with.
    w.send(to_client(cid + 1, RtcEvent::LocalIceCandidate, b"x")).await;
    assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid + 1);
    c.expect_quiet().await;
}

#[tokio::test]
async fn unknown_event_numbers_are_refused() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 8).await;
    let (mut c, cid) = client(&server).await;
    let mut msg = to_worker(8, RtcEvent::Offer, b"x");
    msg.event = 99;
    c.send(msg).await;
    assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 8);
    let mut msg = to_client(cid, RtcEvent::Answer, b"x");
    msg.event = -1;
    w.send(msg).await;
    assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
}

#[tokio::test]
async fn payload_over_the_limit_is_refused_not_relayed() {
    let server =
        TestServer::with(distributor::config::Config { max_message_bytes: 1000, ..Default::default() }).await;
    let mut w = worker(&server, 6).await;
    let (mut c, cid) = client(&server).await;
    c.send(to_worker(6, RtcEvent::Offer, &[b'x'; 1001])).await;
    assert_client_error(&c.recv().await, ErrorCode::PayloadTooLarge, 6);
    w.expect_quiet().await;
    // Exactly at the limit passes.
    c.send(to_worker(6, RtcEvent::Offer, &[b'x'; 1000])).await;
    assert_eq!(w.recv().await.message.len(), 1000);
    w.send(to_client(cid, RtcEvent::Answer, &[b'y'; 1001])).await;
    assert_worker_error(&w.recv().await, ErrorCode::PayloadTooLarge, cid);
    c.expect_quiet().await;
}
