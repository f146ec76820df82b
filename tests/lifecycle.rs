//! Streams coming and going: registration, PEER_GONE, newest-wins, shutdown.
mod common;

use common::*;
use distributor::pb::{RtcEvent, WorkerRtcMessage};
use tonic::Code;

#[tokio::test]
async fn worker_first_message_must_be_a_blank_with_an_id() {
    let server = TestServer::start().await;
    let not_blank = to_client(1, RtcEvent::Answer, b"x");
    let mut w = open_worker(server.channel().await, &[], not_blank).await.unwrap();
    assert_eq!(w.ended().await.code(), Code::InvalidArgument);
    let mut w = open_worker(server.channel().await, &[], blank(0)).await.unwrap();
    assert_eq!(w.ended().await.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn worker_speaking_for_another_id_is_cut_off() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 11).await;
    // Zero and its own id are fine.
    w.send(WorkerRtcMessage { worker_machine_id: 11, ..to_client(0, RtcEvent::Ping, b"a") }).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Ping);
    w.send(WorkerRtcMessage { worker_machine_id: 12, ..to_client(0, RtcEvent::Ping, b"b") }).await;
    assert_eq!(w.ended().await.code(), Code::PermissionDenied);
    // It is gone: an offer to it is refused.
    let (mut c, _) = client(&server).await;
    c.send(to_worker(11, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, distributor::pb::ErrorCode::PeerNotConnected, 11);
}

#[tokio::test]
async fn peer_gone_when_the_client_leaves() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 21).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 21).await;
    c.close();
    assert_eq!(c.ended().await.code(), Code::Ok, "a client's clean end is answered with OK");
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id, gone.worker_machine_id), (RtcEvent::PeerGone, cid, 21));
    // The session is gone with it.
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"late")).await;
    assert_worker_error(&w.recv().await, distributor::pb::ErrorCode::InvalidTransition, cid);
}

#[tokio::test]
async fn peer_gone_when_the_client_connection_drops() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 22).await;
    let (c, cid) = client(&server).await;
    c.send(to_worker(22, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    drop(c);
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));
}

#[tokio::test]
async fn peer_gone_when_the_worker_leaves() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 23).await;
    let mut other = worker(&server, 24).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 23).await;
    negotiate(&mut c, cid, &mut other, 24).await;
    drop(w);
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 23));
    // The other session is untouched.
    c.send(to_worker(24, RtcEvent::LocalIceCandidate, b"cand")).await;
    assert_eq!(other.recv().await.event(), RtcEvent::IceCandidate);
    c.send(to_worker(23, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, distributor::pb::ErrorCode::PeerNotConnected, 23);
}

#[tokio::test]
async fn newest_worker_registration_wins() {
    let server = TestServer::start().await;
    let mut old = worker(&server, 31).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut old, 31).await;
    let mut new = worker(&server, 31).await;
    assert_eq!(old.ended().await.code(), Code::Aborted);
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 31));
    // The new stream takes the sessions from now on.
    negotiate(&mut c, cid, &mut new, 31).await;
}

#[tokio::test]
async fn newest_client_stream_wins() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 41).await;
    let id = [("x-client-id", "4242".to_string())];
    let (mut old, cid) = client_with(&server, &id).await;
    negotiate(&mut old, cid, &mut w, 41).await;
    let (mut new, same) = client_with(&server, &id).await;
    assert_eq!(same, cid);
    assert_eq!(old.ended().await.code(), Code::Aborted);
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));
    negotiate(&mut new, cid, &mut w, 41).await;
}

#[tokio::test]
async fn shutdown_ends_every_stream_and_returns() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 51).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 51).await;
    let addr = server.addr;
    let stopped = tokio::spawn(server.shutdown());
    assert_eq!(c.ended().await.code(), Code::Unavailable);
    assert_eq!(w.ended().await.code(), Code::Unavailable);
    tokio::time::timeout(WAIT, stopped).await.expect("run() returns").unwrap().expect("clean shutdown");
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
