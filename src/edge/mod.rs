//! The gRPC edge: the two services peers call, each stream served by one task that decodes,
//! checks what needs no session state, and hands the rest to the owning shard.
//!
//! Responses are written by tonic from each stream's bounded queue ([`crate::peer::OutboundStream`]).
//! Errors at this edge are `tonic::Status`: they end a stream. A refused message is not an error
//! of the stream: it gets an `ERROR` message and the stream goes on.

pub mod cancel;
mod client;
pub mod front;
mod inbound;
pub mod rate;
mod resumable;
mod tunnel;
pub mod websocket;
mod worker;

pub use resumable::{Attached, Opening, RESUME_AFTER, resume_after};
pub use tunnel::Holding;

/// How a worker's response writer encodes a message (for the writer's bench).
pub mod encode {
    pub use super::worker::encode as for_worker;
}

use futures::FutureExt;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

pub use self::inbound::{Inbound, PeerInbound};
use crate::auth::{AuthError, Authenticator, Granted};
use crate::cluster::{Cluster, Registration};
use crate::config::{Config, Limits};
use crate::core::{ConnId, InstanceId, Outbound, PeerId, Role};
use crate::metrics as names;
use crate::pb::{self, ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};
use crate::peer::conn::shutting_down;
use crate::peer::resume::{Attachment, Resumables, Resumed};
use crate::peer::{Close, Conn, ConnClock, Encode, OutboundStream, Peer, Permit, Sink};
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
    /// How long a resumable peer stays detached before it is gone (zero: resume is off).
    pub resume_grace: Duration,
    /// A resumable stream is told `RECONNECT` once it is this old (less up to a tenth, at
    /// random, so that streams opened together do not reconnect together); zero: never.
    pub max_stream_age: Duration,
    /// Resumable peers by id: clients, workers.
    pub clients: Resumables<ClientRtcMessage>,
    pub workers: Resumables<WorkerRtcMessage>,
    /// Cancelled on shutdown: detached peers are then gone at once.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain begins: streams fronting for a peer held elsewhere end, so
    /// that their peers reconnect to an instance that stays.
    pub draining: CancellationToken,
    /// Peers held here whose streams are on other instances (see [`Holding`]): a drain serves
    /// them until they end or it does, as it serves this instance's own streams.
    pub held_for_others: Arc<std::sync::atomic::AtomicUsize>,
    /// Workers' cluster registrations, held until the worker is gone (a resumable worker's
    /// across its streams), by the worker's stream.
    pub registrations: Mutex<HashMap<ConnId, Registration>>,
    /// How often a WebSocket peer is pinged, and how long it has to answer.
    pub keepalive: Duration,
    /// The `Origin`s browsers may open a WebSocket from; empty: any.
    pub ws_origins: Vec<String>,
}

/// The response stream of one peer's stream: its own queue, or a resumable peer's.
pub enum PeerStream<M> {
    Plain(OutboundStream<M>),
    Resumable(Resumed<M>),
}

impl<M> tokio_stream::Stream for PeerStream<M> {
    type Item = Result<M, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut() {
            PeerStream::Plain(stream) => Pin::new(stream).poll_next(cx),
            PeerStream::Resumable(stream) => Pin::new(stream).poll_next(cx),
        }
    }
}

impl Edge {
    /// The edge of `instance` over `shards`, with `config`'s limits; alone (no cluster), open
    /// (no auth), its own stream clock and tasks. [`crate::server::run`] adds the rest.
    pub fn new(shards: Arc<Shards<Peer>>, instance: InstanceId, config: &Config) -> Self {
        Edge {
            shards,
            cluster: None,
            auth: None,
            limits: config.limits.clone(),
            max_message_bytes: config.max_message_bytes,
            peer_queue: config.peer_queue,
            instance,
            conn_clock: Default::default(),
            streams: Default::default(),
            stopping: Default::default(),
            tasks: Default::default(),
            resume_grace: config.resume_grace,
            max_stream_age: config.max_stream_age,
            clients: Default::default(),
            workers: Default::default(),
            shutdown: Default::default(),
            draining: Default::default(),
            held_for_others: Default::default(),
            registrations: Default::default(),
            keepalive: config.keepalive,
            ws_origins: config.ws_origins.clone(),
        }
    }

    fn open<M>(&self, encode: Encode<M>) -> (Sink, OutboundStream<M>) {
        let id = self.conn_clock.next(self.instance);
        let (sink, stream) = Conn::open(id, self.peer_queue, encode);
        self.track(&sink);
        (sink, stream)
    }

    /// Holds a worker's cluster registration until [`Self::unkeep`].
    fn keep(&self, sink: &Sink, registration: Registration) {
        self.registrations.lock().expect("not poisoned").insert(sink.id(), registration);
    }

    /// The worker is gone: other instances no longer find it here.
    fn unkeep(&self, sink: &Sink) {
        self.registrations.lock().expect("not poisoned").remove(&sink.id());
    }

    /// Tracks a stream, to end it on shutdown.
    fn track(&self, sink: &Sink) {
        self.streams.lock().expect("not poisoned").insert(sink.id(), Arc::downgrade(sink));
        if self.stopping.load(Ordering::Acquire) {
            sink.end(Close::Drain(Some(shutting_down())));
        }
    }

    /// Forgets a stream whose task ended.
    fn forget(&self, id: ConnId) {
        self.streams.lock().expect("not poisoned").remove(&id);
    }

    /// The drain begins (SIGTERM): every resumable peer with an open stream is told
    /// `RECONNECT` and served on until it has resumed elsewhere or [`Self::end_all`]; every
    /// other stream ends: what is queued is written, then `UNAVAILABLE`. Streams opened from now
    /// on end at once.
    pub fn shut_down(&self) {
        self.stopping.store(true, Ordering::Release);
        self.draining.cancel();
        let told = self.reconnect(false);
        let streams = self.streams.lock().expect("not poisoned");
        for conn in streams.values().filter_map(Weak::upgrade) {
            if !told.contains(&conn.id()) {
                conn.end(Close::Drain(Some(shutting_down())));
            }
        }
    }

    /// Tells resumable peers `RECONNECT` (see [`Resumables::reconnect`]): during a drain, every
    /// one at first, then those that came to hold nothing here (`idle_only`).
    pub fn reconnect(&self, idle_only: bool) -> Vec<ConnId> {
        let client = |id| Outbound::relay(RtcEvent::Reconnect, 0, id, Bytes::new());
        let worker = |id| Outbound::relay(RtcEvent::Reconnect, id, 0, Bytes::new());
        let mut told = self.clients.reconnect(idle_only, client);
        told.extend(self.workers.reconnect(idle_only, worker));
        told
    }

    /// The drain is over: every stream left ends (what is queued is written, then
    /// `UNAVAILABLE`), and detached peers are gone.
    pub fn end_all(&self) {
        self.stopping.store(true, Ordering::Release);
        self.shutdown.cancel();
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

/// Whether reading failed because of what the peer sent (a malformed or oversized message),
/// rather than because its connection went away.
fn is_peer_fault(status: &Status) -> bool {
    matches!(status.code(), tonic::Code::Internal | tonic::Code::OutOfRange)
}

/// Reads one peer's stream until it ends, for whatever reason; forgets it then.
struct Reader<M, I> {
    inbound: I,
    sink: Sink,
    /// A resumable peer's stream: its end is not the peer's unless the peer half-closes.
    attachment: Option<Arc<Attachment<M>>>,
    edge: Arc<Edge>,
    /// How fast the peer may send (`None`: no limit).
    bucket: Option<rate::Bucket>,
    /// The end of the token's validity, when auth is on: the stream ends then.
    expiry: Option<Expiry>,
    /// A resumable stream's age limit: when it fires, the peer is told this `RECONNECT`.
    reconnect: Option<(Pin<Box<Sleep>>, Outbound)>,
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

impl<M, I> Drop for Reader<M, I> {
    fn drop(&mut self) {
        if let Some(attachment) = &self.attachment {
            attachment.stop_reading();
        }
        // A resumable peer outlives its streams: it is forgotten when it departs.
        if self.attachment.is_none() {
            self.edge.forget(self.sink.id());
        }
    }
}

impl<M: pb::Numbered, I: Inbound<M>> Reader<M, I> {
    fn new(
        edge: &Arc<Edge>,
        inbound: I,
        sink: Sink,
        attachment: Option<Arc<Attachment<M>>>,
        granted: Option<Granted>,
    ) -> Self {
        let now = Instant::now();
        let bucket = rate::Bucket::new(edge.limits.peer_rate, edge.limits.peer_burst, now);
        let expiry = granted.map(|g| {
            let left = g.expires.duration_since(SystemTime::now()).unwrap_or_default();
            Expiry { at: now + left, timer: Box::pin(tokio::time::sleep_until((now + left).into())) }
        });
        Reader { inbound, sink, attachment, edge: edge.clone(), bucket, expiry, reconnect: None }
    }

    /// Tells the peer `reconnect` once its stream is `--max-stream-age` old (resumable streams).
    fn reconnect_at_age(mut self, reconnect: Outbound) -> Self {
        let age = self.edge.max_stream_age;
        if self.attachment.is_some() && !age.is_zero() {
            let at = Instant::now() + age.mul_f64(1.0 - rand::random::<f64>() / 10.0);
            self.reconnect = Some((Box::pin(tokio::time::sleep_until(at.into())), reconnect));
        }
        self
    }

    /// The next message, or `None` once the stream ends (how it ends is recorded on the sink).
    async fn message(&mut self) -> Option<M> {
        if self.sink.is_ended() || self.attachment.as_ref().is_some_and(|a| a.is_ended()) {
            return None;
        }
        // Fast path: a message already buffered needs no wait (and `message()` is cancel-safe).
        let next = match self.inbound.message().now_or_never() {
            Some(next) => next,
            None => loop {
                tokio::select! {
                    biased;
                    _ = self.sink.ended() => return None,
                    _ = async { self.attachment.as_ref().expect("guarded").ended().await }, if self.attachment.is_some() => {
                        return None;
                    }
                    _ = async { self.expiry.as_mut().expect("guarded").timer.as_mut().await }, if self.expiry.is_some() => {
                        self.sink.end(expired());
                        return None;
                    }
                    _ = async { self.reconnect.as_mut().expect("guarded").0.as_mut().await }, if self.reconnect.is_some() => {
                        let (_, reconnect) = self.reconnect.take().expect("guarded");
                        self.sink.deliver_owed(reconnect);
                    }
                    next = self.inbound.message() => break next,
                }
            },
        };
        match next {
            Ok(Some(msg)) => Some(msg),
            // A half-close: the peer leaves.
            Ok(None) => {
                self.sink.end(Close::Drain(None));
                None
            }
            Err(status) => {
                match &self.attachment {
                    // The connection went away: a resumable peer is detached, not gone.
                    Some(attachment) if !is_peer_fault(&status) => attachment.end(None),
                    _ => self.sink.end(read_failed(status)),
                }
                None
            }
        }
    }

    /// Waits for room in the peer's queue for an answer; `None` once the stream ends, or its
    /// resumable peer goes on on another stream (which takes the queue over, with its reading
    /// task waiting for the same room). What was read then is neither routed nor counted as
    /// received: the new stream's welcome says what was, and the peer sends the rest again.
    async fn reserve(&self) -> Option<Permit> {
        let Some(attachment) = &self.attachment else { return self.sink.reserve().await };
        tokio::select! {
            biased;
            _ = attachment.ended() => None,
            permit = self.sink.reserve() => permit,
        }
    }

    /// The next message with room reserved in the peer's own queue for its answer, and
    /// whether it is within the stream's rate.
    async fn message_with_reply(&mut self) -> Option<(M, Admitted)> {
        let msg = self.message().await?;
        let permit = match self.sink.try_reserve() {
            Some(permit) => permit,
            None => self.reserve().await?,
        };
        // Counted once routed for sure: a peer let go to another instance meanwhile (see
        // `Conn::end_if_idle`) resends it there.
        if self.attachment.is_some() {
            self.sink.received(msg.seq());
        }
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
    type NegotiatePeerConnectionStream = PeerStream<ClientRtcMessage>;

    async fn negotiate_peer_connection(
        &self,
        request: Request<Streaming<ClientRtcMessage>>,
    ) -> Result<Response<Self::NegotiatePeerConnectionStream>, Status> {
        let edge = &self.0;
        let granted = edge.authenticate(request.metadata(), Role::Client)?;
        let client = client::id(granted, request.metadata())?;
        let (opening, stream) = edge.opening(request.metadata(), client::encode)?;
        edge.tasks.spawn(client::serve(edge.clone(), opening, client, granted, PeerInbound::new(request)));
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerEdge {
    type NegotiatePeerConnectionStream = PeerStream<WorkerRtcMessage>;

    async fn negotiate_peer_connection(
        &self,
        request: Request<Streaming<WorkerRtcMessage>>,
    ) -> Result<Response<Self::NegotiatePeerConnectionStream>, Status> {
        let edge = &self.0;
        let granted = edge.authenticate(request.metadata(), Role::Worker)?;
        let (opening, stream) = edge.opening(request.metadata(), worker::encode)?;
        edge.tasks.spawn(worker::serve(edge.clone(), opening, granted, PeerInbound::new(request)));
        Ok(Response::new(stream))
    }
}
