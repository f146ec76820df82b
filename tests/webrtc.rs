//! A real WebRTC data channel negotiated through one distributor: SDP and trickled ICE
//! candidates go through the relay, then the peers talk directly over UDP on loopback.
mod common;

use common::webrtc::connect_and_talk;
use common::*;

#[tokio::test]
async fn a_real_data_channel_opens_through_the_relay() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 4242).await;
    let (mut c, cid) = client(&server).await;

    let (at_worker, at_client) = connect_and_talk(&mut c, cid, &mut w, 4242).await;

    assert_eq!(at_worker, b"hello from the client");
    assert_eq!(at_client, b"hello from the worker");
    // The session ends like any other: the client leaves, the worker hears it.
    drop(c);
    assert_eq!(w.recv().await.event(), distributor::pb::RtcEvent::PeerGone);
}
