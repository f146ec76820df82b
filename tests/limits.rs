//! Bad input ends only the offending stream, and a peer that does not read loses nothing silently.
mod common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use distributor::config::Config;
use distributor::pb::{ClientRtcMessage, ErrorCode, RtcEvent};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Sends and receives frames as raw bytes, so a test can put anything on the wire.
#[derive(Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[tokio::test]
async fn malformed_bytes_end_that_stream_only() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 61).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 61).await;

    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = "/distributor.v1.ClientService/NegotiatePeerConnection".parse().unwrap();
    let mut raw = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await
        .expect("stream opens")
        .into_inner();
    let welcome = ClientRtcMessage::decode(raw.message().await.unwrap().unwrap()).unwrap();
    assert_eq!(welcome.event(), RtcEvent::Blank);
    // A varint that never ends is not a protobuf message.
    tx.send(Bytes::from_static(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]))
        .await
        .unwrap();
    let status = tokio::time::timeout(WAIT, raw.message()).await.unwrap().expect_err("stream ends");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The other session keeps flowing.
    c.send(to_worker(61, RtcEvent::LocalIceCandidate, b"still flowing")).await;
    assert_eq!(&w.recv().await.message[..], b"still flowing");
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"both ways")).await;
    assert_eq!(&c.recv().await.message[..], b"both ways");
}

#[tokio::test]
async fn a_frame_over_one_mebibyte_ends_the_stream_with_resource_exhausted() {
    let server = TestServer::start().await;
    let mut w = worker(&server, 62).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 62).await;
    let (mut big, _) = client(&server).await;
    big.send(to_worker(62, RtcEvent::Offer, &vec![0u8; 1024 * 1024 + 1])).await;
    assert_eq!(big.ended().await.code(), Code::ResourceExhausted);
    c.send(to_worker(62, RtcEvent::LocalIceCandidate, b"unaffected")).await;
    assert_eq!(&w.recv().await.message[..], b"unaffected");
}

#[tokio::test]
async fn a_worker_that_does_not_read_gets_nothing_lost() {
    let server = TestServer::with(Config { peer_queue: 4, ..Config::default() }).await;
    let mut w = worker(&server, 63).await;
    let (mut c, _) = client(&server).await;
    c.send(to_worker(63, RtcEvent::Offer, b"offer")).await;
    // The worker does not read while the client sends far more than the HTTP/2 windows and
    // its queue hold.
    const SENT: u32 = 400;
    let mut payload = vec![0u8; 16 * 1024];
    for i in 0..SENT {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        c.send(to_worker(63, RtcEvent::LocalIceCandidate, &payload)).await;
    }
    // Now the worker reads: everything not refused arrives, in order.
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    let (delivered, refused) =
        account_for(&mut c, &mut w, 63, SENT as usize, ErrorCode::PeerOverloaded, Duration::from_secs(30))
            .await;
    assert!(refused > 0, "an overflowing queue refuses with PEER_OVERLOADED");
    assert!(delivered.windows(2).all(|p| p[0] < p[1]), "delivered in order");
    assert!(w.is_open().await, "a slow reader is refused messages, not cut off");
}

/// Fills worker 64's queue from a new client `id` (x-client-id), until refused, and returns it.
async fn fill_the_workers_queue(server: &TestServer, id: i64) -> ClientStream {
    let (mut c, _) = client_with(server, &[("x-client-id", id.to_string())]).await;
    c.send(to_worker(64, RtcEvent::Offer, b"offer")).await;
    let payload = vec![7u8; 16 * 1024];
    for _ in 0..200 {
        c.send(to_worker(64, RtcEvent::LocalIceCandidate, &payload)).await;
    }
    // Wait for the first refusal: the worker's queue is full.
    loop {
        let msg = c.recv().await;
        if msg.event() == RtcEvent::Error {
            assert_client_error(&msg, ErrorCode::PeerOverloaded, 64);
            return c;
        }
    }
}

#[tokio::test]
async fn a_client_cannot_disconnect_a_busy_worker() {
    let server = TestServer::with(Config { peer_queue: 4, ..Config::default() }).await;
    let mut w = worker(&server, 64).await;
    let (mut bystander, bid) = client(&server).await;
    negotiate(&mut bystander, bid, &mut w, 64).await;
    // A client fills the slow worker's queue and leaves; another does, and is replaced by a
    // newer stream of its own id. Each ends a session whose PEER_GONE finds the queue full.
    let leaving = fill_the_workers_queue(&server, 7001).await;
    drop(leaving);
    let replaced = fill_the_workers_queue(&server, 7002).await;
    let (_newer, _) = client_with(&server, &[("x-client-id", "7002".to_string())]).await;
    // The worker is not ended: it reads what was queued, then both PEER_GONEs.
    let mut gone = Vec::new();
    while gone.len() < 2 {
        let msg = w.recv().await;
        match msg.event() {
            RtcEvent::PeerGone => gone.push(msg.client_id),
            RtcEvent::Offer | RtcEvent::IceCandidate => {}
            other => panic!("unexpected {other:?}: {msg:?}"),
        }
    }
    gone.sort();
    assert_eq!(gone, [7001, 7002]);
    drop(replaced);
    // Its other session goes on.
    bystander.send(to_worker(64, RtcEvent::LocalIceCandidate, b"still here")).await;
    assert_eq!(&w.recv().await.message[..], b"still here");
    w.send(to_client(bid, RtcEvent::LocalIceCandidate, b"and here")).await;
    assert_eq!(&bystander.recv().await.message[..], b"and here");
}
