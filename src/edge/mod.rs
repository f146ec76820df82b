//! The gRPC edge: the two services peers call, each stream served by one task that decodes,
//! checks what needs no session state, and hands the rest to the owning shard.
//!
//! Responses are written by tonic from each stream's bounded queue ([`crate::peer::OutboundStream`]).
//! Errors at this edge are `tonic::Status`: they end a stream. A refused message is not an error
//! of the stream: it gets an `ERROR` message and the stream goes on.

mod client;
pub mod rate;
mod worker;

use futures::FutureExt;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::time::Sleep;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Authenticator, Granted};
use crate::cluster::Cluster;
use crate::config::Limits;
use crate::core::{ConnId, InstanceId, Outbound, PeerId, Role};
use crate::metrics as names;
use crate::pb::{self, ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};
use crate::peer::conn::shutting_down;
use crate::peer::{Close, Conn, ConnClock, OutboundStream, Peer, Permit, Sink};
use crate::shards::Shards;

/// What every stream task shares.
pub struct Edge {
    pub shards: Arc<Shards<Peer>>,
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    pub auth: Option<Authenticator>,
    pub limits: Limits,
    pub max_message_bytes: usize,
    pub peer_queue: usize,
    pub instance: InstanceId,
    pub conn_clock: Arc<ConnClock>,
    /// Open streams, to end them all on shutdown; touched at open and close only.
    pub streams: Mutex<HashMap<ConnId, Weak<Conn>>>,
    /// Set on shutdown: streams opened from then on end at once.
    pub stopping: AtomicBool,
    pub tasks: TaskTracker,
}

impl Edge {
    fn open<M>(&self, encode: fn(Outbound) -> M) -> (Sink, OutboundStream<M>) {
        let id = self.conn_clock.next(self.instance);
        let (sink, stream) = Conn::open(id, self.peer_queue, encode);
        self.streams.lock().expect("not poisoned").insert(id, Arc::downgrade(&sink));
        if self.stopping.load(Ordering::Acquire) {
            sink.end(Close::Drain(Some(shutting_down())));
        }
        (sink, stream)
    }

    /// Forgets a stream whose task ended.
    fn forget(&self, id: ConnId) {
        self.streams.lock().expect("not poisoned").remove(&id);
    }

    /// Ends every stream: what is queued is written, then `UNAVAILABLE`.
    pub fn shut_down(&self) {
        self.stopping.store(true, Ordering::Release);
        let streams = std::mem::take(&mut *self.streams.lock().expect("not poisoned"));
        for conn in streams.values().filter_map(Weak::upgrade) {
            conn.end(Close::Drain(Some(shutting_down())));
        }
    }

    /// What a token grants, when auth is on.
    fn authenticate(&self, metadata: &MetadataMap, role: Role) -> Result<Option<Granted>, Status> {
        let Some(auth) = &self.auth else { return Ok(None) };
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        auth.verify(header, role).map(Some).map_err(|e| match e {
            AuthError::WrongRole { .. } => Status::permission_denied(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        })
    }

    /// Checks what needs no session state. `Err` is the refusal to send back to the sender.
    fn check(&self, event: i32, payload: &Bytes) -> Result<RtcEvent, (ErrorCode, String)> {
        let event = RtcEvent::try_from(event)
            .map_err(|_| (ErrorCode::InvalidTransition, format!("unknown event {event}")))?;
        if payload.len() > self.max_message_bytes {
            let reason =
                format!("message is {} bytes; the limit is {}", payload.len(), self.max_message_bytes);
            return Err((ErrorCode::PayloadTooLarge, reason));
        }
        Ok(event)
    }

    /// Answers what needs no routing (`PING`, and refusals that need no session state, a
    /// message over the stream's rate among them) on the sender's stream; gives back what is for
    /// the other side of a session.
    pub(crate) fn triage(
        &self,
        admitted: Admitted,
        event: i32,
        payload: Bytes,
        worker: PeerId,
        client: PeerId,
    ) -> Option<(RtcEvent, Bytes, Permit)> {
        let permit = match admitted {
            Admitted::Yes(permit) => permit,
            Admitted::OverRate(permit) => {
                let limits = &self.limits;
                let reason = format!(
                    "this stream sends faster than {} messages/s (burst {}); the message was not relayed",
                    limits.peer_rate, limits.peer_burst
                );
                permit.send(Outbound::error(ErrorCode::RateLimited, worker, client, reason));
                return None;
            }
        };
        match self.check(event, &payload) {
            Ok(RtcEvent::Ping) => {
                permit.send(Outbound::relay(RtcEvent::Ping, worker, client, payload));
                None
            }
            Ok(event) => Some((event, payload, permit)),
            Err((code, reason)) => {
                permit.send(Outbound::error(code, worker, client, reason));
                None
            }
        }
    }
}

/// How a stream ends when reading it failed: a frame over the limit is `RESOURCE_EXHAUSTED`
/// (tonic says `OUT_OF_RANGE`); an undecodable frame is the peer's fault, so `INVALID_ARGUMENT`
/// (tonic says `INTERNAL`).
fn read_failed(status: Status) -> Close {
    match status.code() {
        tonic::Code::Internal => {
            Close::Now(Status::invalid_argument(format!("malformed message: {}", status.message())))
        }
        tonic::Code::OutOfRange => Close::Now(Status::resource_exhausted(status.message().to_owned())),
        _ => Close::Now(status),
    }
}

/// Reads one peer's stream until it ends, for whatever reason; forgets it then.
struct Reader<M> {
    inbound: Streaming<M>,
    sink: Sink,
    edge: Arc<Edge>,
    /// How fast the peer may send (`None`: no limit).
    bucket: Option<rate::Bucket>,
    /// The end of the token's validity, when auth is on: the stream ends then.
    expiry: Option<Expiry>,
}

/// When a stream's token expires: checked on every message, and waited for while idle.
struct Expiry {
    at: Instant,
    timer: Pin<Box<Sleep>>,
}

/// A message read, with room reserved for its answer; over the stream's rate or not.
pub(crate) enum Admitted {
    Yes(Permit),
    OverRate(Permit),
}

fn expired() -> Close {
    Close::Now(Status::unauthenticated("the token expired: reconnect with a fresh one"))
}

impl<M> Drop for Reader<M> {
    fn drop(&mut self) {
        self.edge.forget(self.sink.id());
    }
}

impl<M> Reader<M> {
    fn new(edge: &Arc<Edge>, inbound: Streaming<M>, sink: Sink, granted: Option<Granted>) -> Self {
        let now = Instant::now();
        let bucket = rate::Bucket::new(edge.limits.peer_rate, edge.limits.peer_burst, now);
        let expiry = granted.map(|g| {
            let left = g.expires.duration_since(SystemTime::now()).unwrap_or_default();
            Expiry { at: now + left, timer: Box::pin(tokio::time::sleep_until((now + left).into())) }
        });
        Reader { inbound, sink, edge: edge.clone(), bucket, expiry }
    }

    /// The next message, or `None` once the stream ends (how it ends is recorded on the sink).
    async fn message(&mut self) -> Option<M> {
        if self.sink.is_ended() {
            return None;
        }
        // Fast path: a message already buffered needs no wait (and `message()` is cancel-safe).
        let next = match self.inbound.message().now_or_never() {
            Some(next) => next,
            None => tokio::select! {
                biased;
                _ = self.sink.ended() => return None,
                _ = async { self.expiry.as_mut().expect("guarded").timer.as_mut().await }, if self.expiry.is_some() => {
                    self.sink.end(expired());
                    return None;
                }
                next = self.inbound.message() => next,
            },
        };
        match next {
            Ok(Some(msg)) => Some(msg),
            Ok(None) => {
                self.sink.end(Close::Drain(None));
                None
            }
            Err(status) => {
                self.sink.end(read_failed(status));
                None
            }
        }
    }

    /// The next message with room reserved in the peer's own queue for its answer, and
    /// whether it is within the stream's rate.
    async fn message_with_reply(&mut self) -> Option<(M, Admitted)> {
        let msg = self.message().await?;
        let permit = match self.sink.try_reserve() {
            Some(permit) => permit,
            None => self.sink.reserve().await?,
        };
        if self.bucket.is_none() && self.expiry.is_none() {
            return Some((msg, Admitted::Yes(permit)));
        }
        let now = Instant::now();
        if self.expiry.as_ref().is_some_and(|e| now >= e.at) {
            self.sink.end(expired());
            return None;
        }
        let within = self.bucket.as_mut().is_none_or(|bucket| bucket.take(now));
        Some((msg, if within { Admitted::Yes(permit) } else { Admitted::OverRate(permit) }))
    }
}

fn connected(role: Role) -> metrics::Gauge {
    metrics::gauge!(names::CONNECTED_PEERS, "role" => role.as_str())
}

/// Serves `distributor.v1.ClientService`.
pub struct ClientEdge(pub Arc<Edge>);

/// Serves `distributor.v1.WorkerService`.
pub struct WorkerEdge(pub Arc<Edge>);

#[tonic::async_trait]
impl pb::client_service_server::ClientService for ClientEdge {
    type NegotiatePeerConnectionStream = OutboundStream<ClientRtcMessage>;

    async fn negotiate_peer_connection(
        &self,
        request: Request<Streaming<ClientRtcMessage>>,
    ) -> Result<Response<Self::NegotiatePeerConnectionStream>, Status> {
        let edge = &self.0;
        let granted = edge.authenticate(request.metadata(), Role::Client)?;
        let client = match granted {
            Some(granted) => granted.id,
            None => client::id_from_metadata(request.metadata())?,
        };
        let (sink, outbound) = edge.open(client::encode);
        edge.tasks.spawn(client::serve(edge.clone(), sink, client, granted, request.into_inner()));
        Ok(Response::new(outbound))
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerEdge {
    type NegotiatePeerConnectionStream = OutboundStream<WorkerRtcMessage>;

    async fn negotiate_peer_connection(
        &self,
        request: Request<Streaming<WorkerRtcMessage>>,
    ) -> Result<Response<Self::NegotiatePeerConnectionStream>, Status> {
        let edge = &self.0;
        let granted = edge.authenticate(request.metadata(), Role::Worker)?;
        let (sink, outbound) = edge.open(worker::encode);
        edge.tasks.spawn(worker::serve(edge.clone(), sink, granted, request.into_inner()));
        Ok(Response::new(outbound))
    }
}
