//! The WebSocket front, without a browser: a real distributor on a free loopback port serving
//! gRPC and WebSocket peers on the same port, peers spoken with tokio-tungstenite. Both
//! subprotocols, the handshake's refusals (subprotocol, token rules, origins), the close codes,
//! a half-close against a cut, and a gRPC peer and a WebSocket peer in one session.
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use distributor::auth::{Expect, mint};
use distributor::config::Config;
use distributor::core::Role;
use distributor::pb::{ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const JSON: &str = "distributor.v1.json";
const PROTO: &str = "distributor.v1.proto";
const SECRET: &str = "a-websocket-test-secret-of-32-bytes-at-least";

/// Opens `path?query` offering `protocols` (and `origin`, when given); the socket and the
/// subprotocol the server chose, or the handshake's refusal: its status and body.
async fn open(
    server: &TestServer,
    path_and_query: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> Result<(Socket, Option<String>), (u16, String)> {
    let url = format!("ws://{}{path_and_query}", server.addr);
    let mut request = url.into_client_request().unwrap();
    if !protocols.is_empty() {
        request.headers_mut().insert("sec-websocket-protocol", protocols.join(", ").parse().unwrap());
    }
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", origin.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await.expect("in time") {
        Ok((socket, response)) => {
            let chosen =
                response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
            Ok((socket, chosen))
        }
        Err(WsError::Http(response)) => {
            let body =
                response.body().clone().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("the handshake failed: {e}"),
    }
}

/// The refusal of a handshake that must be refused: its status and body.
async fn refused(
    server: &TestServer,
    path_and_query: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> (u16, String) {
    match open(server, path_and_query, protocols, origin).await {
        Ok(_) => panic!("{path_and_query} {protocols:?} {origin:?} was upgraded, not refused"),
        Err(refusal) => refusal,
    }
}

/// The next frame that is not a ping or pong.
async fn next(socket: &mut Socket) -> Message {
    loop {
        match tokio::time::timeout(WAIT, socket.next()).await.expect("a frame in time") {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(msg)) => return msg,
            other => panic!("the socket ended: {other:?}"),
        }
    }
}

async fn next_json(socket: &mut Socket) -> Value {
    match next(socket).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("a JSON message"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn next_worker_proto(socket: &mut Socket) -> WorkerRtcMessage {
    match next(socket).await {
        Message::Binary(bytes) => WorkerRtcMessage::decode(bytes).expect("a protobuf message"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

async fn send_json(socket: &mut Socket, msg: Value) {
    socket.send(Message::text(msg.to_string())).await.expect("sent");
}

async fn send_worker_proto(socket: &mut Socket, msg: WorkerRtcMessage) {
    socket.send(Message::binary(msg.encode_to_vec())).await.expect("sent");
}

/// The close frame the server ends the socket with: its code and reason.
async fn closed(socket: &mut Socket) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, socket.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("the socket failed: {e}"),
        }
    }
}

/// A worker registered over the protobuf subprotocol.
async fn proto_worker(server: &TestServer, id: i64) -> Socket {
    let (mut worker, chosen) = open(server, "/v1/worker", &[PROTO], None).await.expect("upgraded");
    assert_eq!(chosen.as_deref(), Some(PROTO));
    send_worker_proto(&mut worker, WorkerRtcMessage::register(id)).await;
    let ack = next_worker_proto(&mut worker).await;
    assert_eq!((ack.event(), ack.worker_machine_id), (RtcEvent::Blank, id));
    worker
}

#[tokio::test]
async fn a_json_client_and_a_protobuf_worker_negotiate_through_the_same_port_as_grpc() {
    let server = TestServer::start().await;
    let mut worker = proto_worker(&server, 7).await;
    let (mut client, chosen) =
        open(&server, "/v1/client?client_id=4242", &[JSON], None).await.expect("upgraded");
    assert_eq!(chosen.as_deref(), Some(JSON));
    let welcome = next_json(&mut client).await;
    assert_eq!(
        (welcome["event"].as_str(), welcome["clientId"].as_str()),
        (Some("BLANK"), Some("4242")),
        "{welcome}"
    );
    // Input in both spellings, numbers as numbers, the payload in base64.
    send_json(&mut client, json!({"worker_machine_id": 7, "event": "OFFER", "message": "djA="})).await;
    let offer = next_worker_proto(&mut worker).await;
    assert_eq!((offer.event(), offer.client_id, offer.message.as_ref()), (RtcEvent::Offer, 4242, &b"v0"[..]));
    send_worker_proto(
        &mut worker,
        WorkerRtcMessage::to_client(4242, RtcEvent::Answer, Bytes::from_static(b"v1")),
    )
    .await;
    let answer = next_json(&mut client).await;
    assert_eq!(
        (answer["event"].as_str(), answer["workerMachineId"].as_str(), answer["message"].as_str()),
        (Some("ANSWER"), Some("7"), Some("djE=")),
        "{answer}"
    );
    // A gRPC peer in the same session: the same contract on both fronts.
    let (grpc_client, cid) = common::client(&server).await;
    grpc_client.send(to_worker(7, RtcEvent::Offer, b"from grpc")).await;
    let offer = next_worker_proto(&mut worker).await;
    assert_eq!((offer.event(), offer.client_id), (RtcEvent::Offer, cid));
    // Refusals come back as on gRPC: an ERROR naming the code, the socket stays open.
    send_json(&mut client, json!({"workerMachineId": "404", "event": "OFFER"})).await;
    let refused = next_json(&mut client).await;
    assert_eq!(
        (refused["event"].as_str(), refused["errorCode"].as_str()),
        (Some("ERROR"), Some("PEER_NOT_CONNECTED"))
    );
}

#[tokio::test]
async fn the_handshake_refuses_with_the_reason() {
    let server = TestServer::start().await;
    let (status, body) = refused(&server, "/v1/client", &[], None).await;
    assert_eq!(status, 400);
    assert!(body.contains(JSON) && body.contains(PROTO), "the body names both subprotocols: {body}");
    let (status, body) = refused(&server, "/v1/client?token=abc", &[JSON], None).await;
    assert!(status == 400 && body.contains("bearer."), "{status} {body}");
    let (status, _) = refused(&server, "/v1/client?access_token=abc", &[JSON], None).await;
    assert_eq!(status, 400);
    let (status, _) = refused(&server, "/v1/client?resume_after=x", &[JSON], None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_token_rides_as_a_subprotocol_and_is_never_echoed() {
    let config =
        Config { auth_secret: Some(SECRET.into()), auth_expect: Expect::default(), ..Config::default() };
    let server = TestServer::with(config).await;
    let (status, body) = refused(&server, "/v1/client", &[JSON], None).await;
    assert!(status == 401 && !body.is_empty(), "{status} {body}");
    let bad = "bearer.not-a-token";
    let (status, _) = refused(&server, "/v1/client", &[JSON, bad], None).await;
    assert_eq!(status, 401);
    let worker_token =
        format!("bearer.{}", mint(SECRET.as_bytes(), Role::Worker, 9, Duration::from_secs(60)).unwrap());
    let (status, _) = refused(&server, "/v1/client", &[JSON, &worker_token], None).await;
    assert_eq!(status, 403);
    let token =
        format!("bearer.{}", mint(SECRET.as_bytes(), Role::Client, 77, Duration::from_secs(60)).unwrap());
    let (mut client, chosen) = open(&server, "/v1/client", &[&token, JSON], None).await.expect("upgraded");
    assert_eq!(chosen.as_deref(), Some(JSON), "only the format is echoed, never the token");
    let welcome = next_json(&mut client).await;
    assert_eq!(welcome["clientId"].as_str(), Some("77"), "the token names the client");
}

#[tokio::test]
async fn other_origins_are_refused_where_origins_are_set() {
    let config = Config { ws_origins: vec!["https://app.example".into()], ..Config::default() };
    let server = TestServer::with(config).await;
    let (status, body) = refused(&server, "/v1/client", &[JSON], Some("https://evil.example")).await;
    assert!(status == 403 && body.contains("evil.example"), "{status} {body}");
    assert!(open(&server, "/v1/client", &[JSON], Some("https://app.example")).await.is_ok());
    // A client that is not a browser sends no Origin.
    assert!(open(&server, "/v1/client", &[JSON], None).await.is_ok());
}

#[tokio::test]
async fn malformed_and_oversized_frames_close_with_their_codes() {
    let server = TestServer::start().await;
    let (mut client, _) = open(&server, "/v1/client", &[JSON], None).await.expect("upgraded");
    next_json(&mut client).await;
    client.send(Message::text("not json")).await.unwrap();
    let (code, reason) = closed(&mut client).await;
    assert_eq!(code, 4003, "INVALID_ARGUMENT: {reason}");

    let (mut client, _) = open(&server, "/v1/client", &[PROTO], None).await.expect("upgraded");
    next(&mut client).await;
    client.send(Message::text("{}")).await.unwrap();
    assert_eq!(closed(&mut client).await.0, 4003, "text on the protobuf subprotocol");

    let (mut client, _) = open(&server, "/v1/client", &[PROTO], None).await.expect("upgraded");
    next(&mut client).await;
    let _ = client.send(Message::binary(vec![0u8; (1 << 20) + 1])).await;
    assert_eq!(closed(&mut client).await.0, u16::from(CloseCode::Size), "a frame over 1 MiB: 1009");

    // A payload over --max-message-bytes in a frame under 1 MiB: refused, the socket stays.
    let (mut client, _) = open(&server, "/v1/client", &[PROTO], None).await.expect("upgraded");
    next(&mut client).await;
    let big = ClientRtcMessage::to_worker(7, RtcEvent::Offer, vec![b'x'; 200_000]);
    client.send(Message::binary(big.encode_to_vec())).await.unwrap();
    let refused = match next(&mut client).await {
        Message::Binary(bytes) => ClientRtcMessage::decode(bytes).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!((refused.event(), refused.error_code()), (RtcEvent::Error, ErrorCode::PayloadTooLarge));
}

#[tokio::test]
async fn a_close_frame_is_a_half_close_and_a_dropped_socket_a_cut() {
    let server = TestServer::start().await;
    let mut worker = proto_worker(&server, 8).await;
    // Resumable: a dropped socket detaches the client, its worker hears nothing.
    let (mut client, _) =
        open(&server, "/v1/client?client_id=55&resume_after=0", &[JSON], None).await.unwrap();
    next_json(&mut client).await;
    send_json(&mut client, json!({"workerMachineId": "8", "event": "OFFER", "message": ""})).await;
    assert_eq!(next_worker_proto(&mut worker).await.event(), RtcEvent::Offer);
    drop(client);
    let quiet = tokio::time::timeout(QUIET, next_worker_proto(&mut worker)).await;
    assert!(quiet.is_err(), "a cut is not a departure: {quiet:?}");
    let (mut client, _) =
        open(&server, "/v1/client?client_id=55&resume_after=0", &[JSON], None).await.unwrap();
    let welcome = next_json(&mut client).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    // A close frame: the client leaves, its worker hears PEER_GONE at once.
    client.send(Message::Close(None)).await.unwrap();
    let gone = next_worker_proto(&mut worker).await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, 55));
}

#[tokio::test]
async fn a_newer_stream_closes_the_older_socket_with_aborted() {
    let server = TestServer::start().await;
    let _first = proto_worker(&server, 9).await;
    let mut first = _first;
    let _second = proto_worker(&server, 9).await;
    let (code, reason) = closed(&mut first).await;
    assert_eq!(code, 4010, "ABORTED: {reason}");
}

/// A WebSocket worker that does not read: the sender is refused (`PEER_OVERLOADED`) what does
/// not fit, everything else arrives in order once the worker reads; nothing is lost silently.
#[tokio::test]
async fn a_socket_that_does_not_read_loses_nothing_silently() {
    const SENT: u32 = 400;
    let server = TestServer::with(Config { peer_queue: 4, ..Config::default() }).await;
    let mut worker = proto_worker(&server, 63).await;
    let (mut c, _) = common::client(&server).await;
    c.send(to_worker(63, RtcEvent::Offer, b"offer")).await;
    let mut payload = vec![0u8; 16 * 1024];
    for i in 0..SENT {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        c.send(to_worker(63, RtcEvent::LocalIceCandidate, &payload)).await;
    }
    assert_eq!(next_worker_proto(&mut worker).await.event(), RtcEvent::Offer);
    let (mut delivered, mut refused) = (Vec::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while delivered.len() + refused < SENT as usize {
        tokio::select! {
            msg = next_worker_proto(&mut worker) => {
                assert_eq!(msg.event(), RtcEvent::IceCandidate);
                delivered.push(u32::from_be_bytes(msg.message[..4].try_into().unwrap()));
            }
            msg = c.recv() => {
                assert_client_error(&msg, ErrorCode::PeerOverloaded, 63);
                refused += 1;
            }
            _ = tokio::time::sleep_until(deadline) => panic!("{} delivered, {refused} refused of {SENT}", delivered.len()),
        }
    }
    assert!(refused > 0, "an overflowing queue refuses with PEER_OVERLOADED");
    assert!(delivered.is_sorted(), "delivered in order");
}

/// A peer that stops answering the server's pings is cut after `--keepalive` (twice at most):
/// a resumable one is detached, not gone, and its socket closes.
#[tokio::test]
async fn a_socket_that_stops_answering_pings_is_cut() {
    let keepalive = Duration::from_millis(100);
    let server = TestServer::with(Config { keepalive, ..Config::default() }).await;
    let mut worker = proto_worker(&server, 64).await;
    let (mut client, _) =
        open(&server, "/v1/client?client_id=66&resume_after=0", &[JSON], None).await.unwrap();
    next_json(&mut client).await;
    send_json(&mut client, json!({"workerMachineId": "64", "event": "OFFER"})).await;
    assert_eq!(next_worker_proto(&mut worker).await.event(), RtcEvent::Offer);
    // The client reads nothing, so it answers no ping; the worker, reading, answers them.
    let quiet = tokio::time::timeout(keepalive * 5, next_worker_proto(&mut worker)).await;
    assert!(quiet.is_err(), "a cut is not a departure: {quiet:?}");
    let mut ended = false;
    while let Ok(Some(frame)) = tokio::time::timeout(WAIT, client.next()).await {
        if frame.is_err() || matches!(frame, Ok(Message::Close(_))) {
            ended = true;
            break;
        }
    }
    assert!(ended, "the server dropped the silent socket");
    let (mut client, _) =
        open(&server, "/v1/client?client_id=66&resume_after=0", &[JSON], None).await.unwrap();
    assert_eq!(next_json(&mut client).await["resumed"], json!(true));
}
