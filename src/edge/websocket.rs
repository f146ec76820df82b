//! The WebSocket front (RFC 6455): browsers speak the same contract as gRPC peers, on the same
//! port, through the same edge (limits, rate limits, resume, numbering, drains, the cluster).
//!
//! `GET /v1/client` and `GET /v1/worker` upgrade to a WebSocket whose frames are
//! `ClientRtcMessage`s or `WorkerRtcMessage`s, in one of two subprotocols the peer offers in
//! `Sec-WebSocket-Protocol`: `distributor.v1.json` (text frames, the proto3 JSON mapping) or
//! `distributor.v1.proto` (binary frames, one protobuf message each). The token rides as one
//! more offered subprotocol, `bearer.<jwt>`, never echoed back (or `Authorization: Bearer`
//! from a non-browser client); a token in the query string is refused, so that none reaches an
//! access log. `?client_id=` (open mode) and `?resume_after=` stand for `x-client-id` and
//! `x-resume-after`. After the upgrade the stream is the gRPC one: a stream-ending status
//! closes the socket with 4000 + its gRPC code and its message as the reason; a frame over 1
//! MiB closes it with 1009; a close frame from the peer is its half-close, a socket that drops
//! without one is a cut. The server pings every `--keepalive`; no pong within as long is a cut.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::{Edge, Inbound, PeerStream, client, worker};
use crate::auth::Granted;
use crate::core::Role;
use crate::pb::{ClientRtcMessage, WorkerRtcMessage};

/// The subprotocol of JSON text frames.
pub const JSON: &str = "distributor.v1.json";
/// The subprotocol of protobuf binary frames.
pub const PROTO: &str = "distributor.v1.proto";
/// The prefix of the subprotocol that carries the bearer token.
pub const BEARER: &str = "bearer.";
/// The largest frame taken, as on the gRPC front.
pub const MAX_FRAME: usize = 1 << 20;
/// Close codes: the gRPC status code plus this, for a stream the distributor ends.
pub const CLOSE_STATUS_BASE: u16 = 4000;
/// RFC 6455: a message too big to process.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Bytes read from a socket at once. tungstenite's default (128 KiB, and as much again to write)
/// is most of what an idle peer would cost; signaling messages are a few hundred bytes, an
/// offer a few KiB, and a larger frame is read in several reads. Writes are not buffered
/// beyond the frame being written (`write_buffer_size(0)`): each message is one frame.
const READ_BUFFER: usize = 4 * 1024;
/// The longest close reason a close frame carries (125 bytes less the code's two).
const REASON_BYTES: usize = 123;

/// The routes of the WebSocket front, served on HTTP/1.1 connections.
pub fn routes(edge: Arc<Edge>) -> axum::Router {
    axum::Router::new()
        .route("/v1/client", axum::routing::get(client_socket))
        .route("/v1/worker", axum::routing::get(worker_socket))
        .with_state(edge)
}

/// One of the two message formats, chosen per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Proto,
}

/// A refusal before the upgrade: the HTTP status and a body that says why.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.1).into_response()
    }
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Refusal {
    Refusal(status, why.into())
}

/// The subprotocols a handshake offers, in order.
fn offered(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Checks a handshake and turns it into the metadata the gRPC front reads: a refusal says why.
fn handshake(
    edge: &Edge,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(Format, MetadataMap), Refusal> {
    if query.contains_key("token") || query.contains_key("access_token") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a token is never taken from the URL (it would end up in access logs): offer it as the \
             subprotocol `bearer.<token>` in Sec-WebSocket-Protocol, or send `Authorization: Bearer <token>`",
        ));
    }
    if !edge.ws_origins.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or_default();
        if !edge.ws_origins.iter().any(|allowed| allowed == origin) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("origin {origin:?} is not allowed (--ws-origins)"),
            ));
        }
    }
    let offered = offered(headers);
    let format = offered.iter().find_map(|p| match p.as_str() {
        JSON => Some(Format::Json),
        PROTO => Some(Format::Proto),
        _ => None,
    });
    let Some(format) = format else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "offer a subprotocol in Sec-WebSocket-Protocol: `{JSON}` (JSON text frames) or `{PROTO}` (protobuf binary frames)"
            ),
        ));
    };
    let mut metadata = MetadataMap::new();
    let bearer = offered.iter().find_map(|p| p.strip_prefix(BEARER)).map(str::to_owned);
    let authorization = match bearer {
        Some(token) => Some(format!("Bearer {token}")),
        None => headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    if let Some(authorization) = authorization {
        let value = MetadataValue::try_from(authorization)
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "the token is not a valid header value"))?;
        metadata.insert("authorization", value);
    }
    for (query_name, metadata_name) in
        [("client_id", "x-client-id"), ("resume_after", super::resumable::RESUME_AFTER)]
    {
        if let Some(value) = query.get(query_name) {
            let value = MetadataValue::try_from(value.as_str())
                .map_err(|_| refuse(StatusCode::BAD_REQUEST, format!("?{query_name}= must be a number")))?;
            metadata.insert(metadata_name, value);
        }
    }
    Ok((format, metadata))
}

/// A refusal of the gRPC front's checks, before the upgrade: 401 for a missing or bad token,
/// 403 for a token of the other role, 400 for the rest.
fn refuse_status(status: Status) -> Refusal {
    let code = match status.code() {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    refuse(code, status.message().to_owned())
}

/// A handshake checked and authenticated as the gRPC front would: its format, its metadata and
/// what its token grants.
fn admit(
    edge: &Edge,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    role: Role,
) -> Result<(Format, MetadataMap, Option<Granted>), Refusal> {
    let (format, metadata) = handshake(edge, headers, query)?;
    let granted = edge.authenticate(&metadata, role).map_err(refuse_status)?;
    Ok((format, metadata, granted))
}

/// Upgrades to the WebSocket: its writer on a task of the edge's, its reader handed to `serve`.
fn upgrade<M, F, Fut>(
    ws: WebSocketUpgrade,
    edge: Arc<Edge>,
    format: Format,
    stream: PeerStream<M>,
    serve: F,
) -> Response
where
    M: prost::Message + serde::Serialize + Send + 'static,
    F: FnOnce(Arc<Edge>, SocketInbound) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ws = ws
        .protocols([JSON, PROTO])
        .max_frame_size(MAX_FRAME)
        .max_message_size(MAX_FRAME)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    ws.on_upgrade(move |socket| async move {
        // Both halves on the edge's tracked tasks, as a gRPC stream's are.
        let (inbound, writer) = split(socket, format, edge.keepalive);
        let tasks = edge.tasks.clone();
        tasks.spawn(writer.run(stream));
        tasks.spawn(serve(edge, inbound));
    })
}

async fn client_socket(
    State(edge): State<Arc<Edge>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let opened = admit(&edge, &headers, &query, Role::Client).and_then(|(format, metadata, granted)| {
        let client = client::id(granted, &metadata).map_err(refuse_status)?;
        let (opening, stream) = edge.opening(&metadata, client::encode).map_err(refuse_status)?;
        Ok((format, granted, client, opening, stream))
    });
    match opened {
        Ok((format, granted, client, opening, stream)) => {
            upgrade(ws, edge, format, stream, move |edge, inbound| {
                client::serve(edge, opening, client, granted, inbound)
            })
        }
        Err(refused) => refused.into_response(),
    }
}

async fn worker_socket(
    State(edge): State<Arc<Edge>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let opened = admit(&edge, &headers, &query, Role::Worker).and_then(|(format, metadata, granted)| {
        let (opening, stream) = edge.opening(&metadata, worker::encode).map_err(refuse_status)?;
        Ok((format, granted, opening, stream))
    });
    match opened {
        Ok((format, granted, opening, stream)) => upgrade(ws, edge, format, stream, move |edge, inbound| {
            worker::serve(edge, opening, granted, inbound)
        }),
        Err(refused) => refused.into_response(),
    }
}

/// What the two halves of one socket share.
struct Shared {
    format: Format,
    /// The peer sent a frame over [`MAX_FRAME`]: the close says 1009.
    too_big: AtomicBool,
    /// Cancelled when the peer stopped answering pings: reading ends as for a cut.
    silent: CancellationToken,
    /// Set by the reader on every pong.
    ponged: AtomicBool,
}

/// Splits a socket into the edge's two halves: the reader it serves, the writer of its stream.
fn split(socket: WebSocket, format: Format, keepalive: Duration) -> (SocketInbound, SocketWriter) {
    let (sink, stream) = socket.split();
    let shared = Arc::new(Shared {
        format,
        too_big: AtomicBool::new(false),
        silent: CancellationToken::new(),
        ponged: AtomicBool::new(true),
    });
    (SocketInbound { stream, shared: shared.clone() }, SocketWriter { sink, shared, keepalive })
}

/// The reading half: the peer's frames, decoded, as the edge reads a gRPC stream.
pub struct SocketInbound {
    stream: SplitStream<WebSocket>,
    shared: Arc<Shared>,
}

/// A message the WebSocket front decodes: protobuf or JSON.
pub trait Frame: prost::Message + Default + serde::de::DeserializeOwned + Send + 'static {}
impl Frame for ClientRtcMessage {}
impl Frame for WorkerRtcMessage {}

impl<M: Frame> Inbound<M> for SocketInbound {
    const TUNNEL: bool = false;

    async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.shared.silent.cancelled() => {
                    return Err(Status::unavailable("the peer did not answer a ping in time"));
                }
                frame = self.stream.next() => frame,
            };
            let msg = match frame {
                // A socket that drops without a close frame: a cut.
                None => return Err(Status::unavailable("the connection dropped")),
                Some(Err(e)) => {
                    if is_too_big(&e) {
                        self.shared.too_big.store(true, Ordering::Release);
                        return Err(Status::out_of_range(format!("a frame over {MAX_FRAME} bytes")));
                    }
                    return Err(Status::unavailable(format!("the connection failed: {e}")));
                }
                // A close frame: the peer leaves, as with a half-close.
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Pong(_))) => {
                    self.shared.ponged.store(true, Ordering::Release);
                    continue;
                }
                Some(Ok(Message::Ping(_))) => continue,
                Some(Ok(msg)) => msg,
            };
            return match (self.shared.format, msg) {
                (Format::Json, Message::Text(text)) => serde_json::from_str(text.as_str())
                    .map(Some)
                    .map_err(|e| Status::internal(format!("not a message in the JSON mapping: {e}"))),
                (Format::Proto, Message::Binary(bytes)) => M::decode(bytes)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("not a protobuf message: {e}"))),
                (Format::Json, _) => Err(Status::internal(format!("{JSON} takes text frames"))),
                (Format::Proto, _) => Err(Status::internal(format!("{PROTO} takes binary frames"))),
            };
        }
    }
}

/// Whether reading failed on a frame over the limit (tungstenite's capacity error, under
/// axum's).
fn is_too_big(e: &axum::Error) -> bool {
    std::iter::successors(std::error::Error::source(e), |cause| cause.source()).any(|cause| {
        matches!(cause.downcast_ref::<tungstenite::Error>(), Some(tungstenite::Error::Capacity(_)))
    })
}

/// The writing half: the peer's stream, encoded; pings; the close.
struct SocketWriter {
    sink: SplitSink<WebSocket, Message>,
    shared: Arc<Shared>,
    keepalive: Duration,
}

impl SocketWriter {
    async fn run<M: prost::Message + serde::Serialize + Send + 'static>(mut self, mut stream: PeerStream<M>) {
        let mut pings = tokio::time::interval(self.keepalive);
        pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pings.tick().await;
        let close = loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(msg)) => {
                        let frame = match self.shared.format {
                            Format::Json => match serde_json::to_string(&msg) {
                                Ok(text) => Message::Text(Utf8Bytes::from(text)),
                                Err(e) => break close_frame(&Status::internal(e.to_string()), false),
                            },
                            Format::Proto => Message::Binary(msg.encode_to_vec().into()),
                        };
                        if self.sink.send(frame).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(status)) => break close_frame(&status, self.shared.too_big.load(Ordering::Acquire)),
                    None => break CloseFrame { code: 1000, reason: Utf8Bytes::from_static("") },
                },
                _ = pings.tick() => {
                    if !self.shared.ponged.swap(false, Ordering::AcqRel) {
                        // No pong since the last ping: gone, as a cut.
                        self.shared.silent.cancel();
                        return;
                    }
                    if self.sink.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
            }
        };
        let _ = self.sink.send(Message::Close(Some(close))).await;
        let _ = self.sink.close().await;
    }
}

/// The close frame for a stream ended with `status`: 4000 + its code, its message as the
/// reason (cut to what a close frame holds), or 1009 for a frame over the limit.
fn close_frame(status: &Status, too_big: bool) -> CloseFrame {
    let code = if too_big { CLOSE_TOO_BIG } else { CLOSE_STATUS_BASE + status.code() as u16 };
    let mut reason = status.message();
    if reason.len() > REASON_BYTES {
        let mut end = REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    CloseFrame { code, reason: Utf8Bytes::from(reason.to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_closes_with_its_code_and_a_reason_a_frame_can_hold() {
        let frame = close_frame(&Status::aborted("this peer resumed on a newer stream"), false);
        assert_eq!((frame.code, frame.reason.as_str()), (4010, "this peer resumed on a newer stream"));
        assert_eq!(close_frame(&Status::unavailable("shutting down"), false).code, 4014);
        assert_eq!(close_frame(&Status::resource_exhausted("queue full"), false).code, 4008);
        assert_eq!(close_frame(&Status::resource_exhausted("frame"), true).code, 1009);
        let long = "é".repeat(100);
        let frame = close_frame(&Status::internal(long), false);
        assert!(frame.reason.len() <= REASON_BYTES && frame.reason.as_str().chars().all(|c| c == 'é'));
    }
}
