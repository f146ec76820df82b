//! One peer's signaling: a resumable stream to the distributor that survives the platform.
//!
//! Every stream is opened with `x-resume-after: N`, N the last `seq` received. The peer numbers
//! its own messages and keeps those the distributor has not acknowledged; a resume's welcome
//! says which it got, and the rest are sent again. What arrives twice (a replay overlapping what
//! was already read) is dropped by its `seq`. When a stream drops, the task connects again with
//! backoff and jitter, trying the endpoints in turn; on `RECONNECT` (the instance drains, or the
//! stream reached its age limit) it opens the next stream first and moves once that stream is
//! welcomed, so nothing waits on a dead stream.
//!
//! The two roles differ only in their wire message and their first message (a worker registers):
//! [`Wire`] covers both.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::{Error, Event};
use distributor_proto::PeerId;
use distributor_proto::client_service_client::ClientServiceClient;
use distributor_proto::worker_service_client::WorkerServiceClient;
use distributor_proto::{ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};

/// A message of a session, in the terms of both roles' wire messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Signal {
    pub event: RtcEvent,
    pub worker: PeerId,
    pub client: PeerId,
    pub payload: Bytes,
    pub error: ErrorCode,
}

impl Signal {
    pub fn new(event: RtcEvent, worker: PeerId, client: PeerId, payload: impl Into<Bytes>) -> Self {
        Signal { event, worker, client, payload: payload.into(), error: ErrorCode::Unspecified }
    }
}

/// What the signaling task hands to its role.
#[derive(Debug)]
pub enum Incoming {
    Signal(Signal),
    /// Connected again, and the distributor did not know the peer any more: every session it
    /// had is gone (the other sides were told `PEER_GONE`).
    Fresh,
}

/// One role's wire message.
pub trait Wire: prost::Message + Default + Clone + Send + Sync + 'static {
    fn build(signal: &Signal, seq: u64) -> Self;
    /// The signal, its `seq` and its `resumed` flag.
    fn open(self) -> (Signal, u64, bool);
    fn call(
        channel: Channel,
        request: Request<ReceiverStream<Self>>,
    ) -> impl Future<Output = Result<Streaming<Self>, Status>> + Send;
}

/// The two wire messages have the same fields: one implementation for both.
macro_rules! wire {
    ($message:ident, $service:ident) => {
        impl Wire for $message {
            fn build(s: &Signal, seq: u64) -> Self {
                $message {
                    worker_machine_id: s.worker,
                    event: s.event as i32,
                    message: s.payload.clone(),
                    client_id: s.client,
                    seq,
                    ..Default::default()
                }
            }
            fn open(self) -> (Signal, u64, bool) {
                let signal = Signal {
                    event: self.event(),
                    worker: self.worker_machine_id,
                    client: self.client_id,
                    error: self.error_code(),
                    payload: self.message,
                };
                (signal, self.seq, self.resumed)
            }
            async fn call(
                channel: Channel,
                request: Request<ReceiverStream<Self>>,
            ) -> Result<Streaming<Self>, Status> {
                Ok($service::new(channel).negotiate_peer_connection(request).await?.into_inner())
            }
        }
    };
}

wire!(ClientRtcMessage, ClientServiceClient);
wire!(WorkerRtcMessage, WorkerServiceClient);

/// Who the peer is and where the distributors are.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Distributor URLs, tried in turn.
    pub endpoints: Vec<String>,
    /// A bearer token (`authorization`), when the distributor checks them.
    pub token: Option<String>,
    /// A client's id in open mode (`x-client-id`); with a token, the token names the peer.
    pub client_id: Option<PeerId>,
    /// A worker's id: its registration, the first message of each stream.
    pub worker_id: Option<PeerId>,
    /// How long a connection and its welcome may take.
    pub connect_timeout: Duration,
}

impl Settings {
    /// A peer of `url`, known by its token or the builder's id.
    pub fn new(url: impl Into<String>) -> Self {
        Settings {
            endpoints: vec![url.into()],
            token: None,
            client_id: None,
            worker_id: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Own messages kept until a resume says the distributor has them (more than a peer has in
/// flight: a negotiation is a handful of messages).
const UNACKED: usize = 4096;

/// Reconnection backoff: from 100 ms, doubling, up to 5 s, each less up to half at random.
fn backoff(attempt: u32) -> Duration {
    let full = Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5));
    full.mul_f64(1.0 - rand::random::<f64>() / 2.0)
}

/// Whether a stream that ended with `status` is worth opening again.
fn is_final(status: &Status) -> bool {
    use tonic::Code::*;
    matches!(status.code(), Unauthenticated | PermissionDenied | InvalidArgument | FailedPrecondition)
}

/// One open stream, welcomed.
struct Stream<M> {
    tx: mpsc::Sender<M>,
    rx: Streaming<M>,
    /// Which endpoint it is on.
    endpoint: usize,
}

/// The handle of a peer's signaling task.
pub struct Signaling {
    /// The peer's own messages, in order.
    pub out: mpsc::Sender<Signal>,
    pub incoming: mpsc::Receiver<Incoming>,
    pub events: broadcast::Sender<Event>,
    /// Ends the task (and with it the stream: a half-close, the peer leaves).
    pub stop: Stop,
}

/// Ends the signaling task when dropped: the stream half-closes (the peer leaves, and the other
/// side of each session hears `PEER_GONE` at once), then the task reads what is left and stops.
pub struct Stop(Option<oneshot::Sender<()>>);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// How long a leaving peer waits for the distributor to end its stream after its half-close.
const LEAVING: Duration = Duration::from_secs(2);

impl Signaling {
    /// Opens the first stream (errors are returned: a wrong URL or token fails here), then runs
    /// the task that keeps one open.
    pub async fn connect<M: Wire>(settings: Settings) -> Result<Signaling, Error> {
        let state = State { last_seen: 0, next_seq: 1, unacked: VecDeque::new() };
        let (stream, _) = open::<M>(&settings, 0, 0).await?;
        let (out, out_rx) = mpsc::channel(256);
        let (in_tx, incoming) = mpsc::channel(256);
        let (events, _) = broadcast::channel(64);
        let task = Task { settings, state, out_rx, in_tx, events: events.clone() };
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(task.run(stream, stopped));
        let stop = Stop(Some(stop));
        Ok(Signaling { out, incoming, events, stop })
    }
}

/// A stream's welcome (or a worker's acknowledgement).
#[derive(Clone, Copy, Debug)]
struct Welcome {
    /// The distributor took the peer over from its earlier stream.
    resumed: bool,
    /// The last of the peer's own numbered messages the distributor received.
    acked: u64,
}

/// Opens a stream on `endpoint` resuming after `after`, and waits for its welcome.
async fn open<M: Wire>(
    settings: &Settings,
    endpoint: usize,
    after: u64,
) -> Result<(Stream<M>, Welcome), Error> {
    let endpoint = endpoint % settings.endpoints.len();
    let (welcome, stream) = tokio::time::timeout(settings.connect_timeout, async {
        let url = &settings.endpoints[endpoint];
        let connect_error =
            |e: tonic::transport::Error| Error::Connect { url: url.clone(), cause: Arc::new(e) };
        let channel = Endpoint::from_shared(url.clone())
            .map_err(connect_error)?
            .connect_timeout(settings.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(connect_error)?;
        let (tx, rx) = mpsc::channel(64);
        if let Some(worker) = settings.worker_id {
            let register = Signal::new(RtcEvent::Blank, worker, 0, Bytes::new());
            tx.send(M::build(&register, 0)).await.map_err(|_| Error::Closed)?;
        }
        let mut request = Request::new(ReceiverStream::new(rx));
        let metadata = request.metadata_mut();
        metadata.insert(distributor_proto::RESUME_AFTER, MetadataValue::from(after));
        if let Some(token) = &settings.token {
            let bearer =
                format!("Bearer {token}").parse().map_err(|_| Error::Invalid("the token is not ASCII"))?;
            metadata.insert("authorization", bearer);
        }
        if let Some(client) = settings.client_id {
            metadata.insert("x-client-id", MetadataValue::from(client));
        }
        let mut rx = M::call(channel, request).await.map_err(|s| stream_error(url, s))?;
        let welcome = match rx.message().await {
            Ok(Some(welcome)) => welcome,
            Ok(None) => return Err(Error::Ended("the stream ended before its welcome".into())),
            Err(status) => return Err(stream_error(url, status)),
        };
        let (signal, acked, resumed) = welcome.open();
        if signal.event != RtcEvent::Blank {
            return Err(Error::Ended(format!("the welcome was {:?}, not BLANK", signal.event)));
        }
        Ok((Welcome { resumed, acked }, Stream { tx, rx, endpoint }))
    })
    .await
    .map_err(|_| Error::Timeout { what: "the distributor's welcome", after: settings.connect_timeout })??;
    Ok((stream, welcome))
}

fn stream_error(url: &str, status: Status) -> Error {
    if is_final(&status) {
        Error::Ended(format!("{:?}: {}", status.code(), status.message()))
    } else {
        Error::Connect { url: url.to_owned(), cause: Arc::new(status) }
    }
}

/// Numbering both ways.
struct State<M> {
    /// The last `seq` received: what a resume asks to be replayed after.
    last_seen: u64,
    next_seq: u64,
    /// Own numbered messages not known to have reached the distributor.
    unacked: VecDeque<(u64, M)>,
}

struct Task<M> {
    settings: Settings,
    state: State<M>,
    out_rx: mpsc::Receiver<Signal>,
    in_tx: mpsc::Sender<Incoming>,
    events: broadcast::Sender<Event>,
}

/// A stream being opened to replace the current one.
type Opening<M> = Pin<Box<dyn Future<Output = Result<(Stream<M>, Welcome), Error>> + Send>>;

impl<M: Wire> Task<M> {
    async fn run(mut self, mut stream: Stream<M>, mut stopped: oneshot::Receiver<()>) {
        let mut next: Option<Opening<M>> = None;
        loop {
            let ended = tokio::select! {
                biased;
                _ = &mut stopped => {
                    // Leaving: a half-close, then the distributor ends the stream.
                    let Stream { tx, mut rx, .. } = stream;
                    drop(tx);
                    let _ = tokio::time::timeout(LEAVING, async { while let Ok(Some(_)) = rx.message().await {} }).await;
                    return;
                }
                opened = async { next.as_mut().expect("guarded").await }, if next.is_some() => {
                    next = None;
                    match opened {
                        Ok((new, welcome)) => {
                            // Welcomed: the distributor has moved the peer, and the old stream
                            // ends (ABORTED) on its own.
                            stream = new;
                            if !self.welcomed(&stream, welcome).await {
                                return;
                            }
                        }
                        Err(e) => tracing::debug!("moving to a new stream failed: {e}; staying"),
                    }
                    continue;
                }
                out = self.out_rx.recv() => {
                    let Some(signal) = out else { return };
                    self.send(&stream, &signal).await;
                    continue;
                }
                msg = stream.rx.message() => msg,
            };
            match ended {
                Ok(Some(msg)) => {
                    let (signal, seq, _) = msg.open();
                    if seq != 0 {
                        if seq <= self.state.last_seen {
                            continue;
                        }
                        self.state.last_seen = seq;
                    }
                    if signal.event == RtcEvent::Reconnect {
                        let _ =
                            self.events.send(Event::Reconnecting { reason: "the distributor asked".into() });
                        let (settings, after) = (self.settings.clone(), self.state.last_seen);
                        let endpoint = stream.endpoint + 1;
                        next = Some(Box::pin(async move { open::<M>(&settings, endpoint, after).await }));
                        continue;
                    }
                    if self.in_tx.send(Incoming::Signal(signal)).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) if next.is_some() => {
                    // The move is under way: the old stream ended first.
                    let opening = next.take().expect("guarded");
                    let opened = tokio::select! {
                        biased;
                        _ = &mut stopped => return,
                        opened = opening => opened,
                    };
                    match opened {
                        Ok((new, welcome)) => {
                            stream = new;
                            if !self.welcomed(&stream, welcome).await {
                                return;
                            }
                        }
                        Err(_) => match self.reconnect(stream.endpoint + 1, &mut stopped).await {
                            Some(new) => stream = new,
                            None => return,
                        },
                    }
                }
                Ok(None) => match self.reconnect(stream.endpoint, &mut stopped).await {
                    Some(new) => stream = new,
                    None => return,
                },
                Err(status) if is_final(&status) || status.code() == tonic::Code::Aborted => {
                    let reason = format!("{:?}: {}", status.code(), status.message());
                    let _ = self.events.send(Event::Closed { reason });
                    return;
                }
                Err(status) => {
                    let reason = format!("{:?}: {}", status.code(), status.message());
                    tracing::debug!("signaling stream dropped: {reason}");
                    let _ = self.events.send(Event::Reconnecting { reason });
                    match self.reconnect(stream.endpoint, &mut stopped).await {
                        Some(new) => stream = new,
                        None => return,
                    }
                }
            }
        }
    }

    /// Numbers and sends one of the peer's messages; kept until acknowledged.
    async fn send(&mut self, stream: &Stream<M>, signal: &Signal) {
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        let msg = M::build(signal, seq);
        if self.state.unacked.len() == UNACKED {
            self.state.unacked.pop_front();
        }
        self.state.unacked.push_back((seq, msg.clone()));
        // A stream that is gone is noticed by its reader; the message is sent again on resume.
        let _ = stream.tx.send(msg).await;
    }

    /// Opens a new stream, from `endpoint` on, until one is welcomed, a final error, or the
    /// role's handle is dropped (`stopped`).
    async fn reconnect(&mut self, endpoint: usize, stopped: &mut oneshot::Receiver<()>) -> Option<Stream<M>> {
        tokio::select! {
            biased;
            _ = stopped => None,
            reconnected = self.reconnect_until_welcomed(endpoint) => reconnected,
        }
    }

    async fn reconnect_until_welcomed(&mut self, endpoint: usize) -> Option<Stream<M>> {
        let mut attempt = 0;
        loop {
            let after = self.state.last_seen;
            match open::<M>(&self.settings, endpoint + attempt as usize, after).await {
                Ok((stream, welcome)) => return self.welcomed(&stream, welcome).await.then_some(stream),
                Err(e @ Error::Ended(_)) => {
                    let _ = self.events.send(Event::Closed { reason: e.to_string() });
                    return None;
                }
                Err(e) => {
                    tracing::debug!(attempt, "reconnecting: {e}");
                    if self.in_tx.is_closed() {
                        return None;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// A new stream was welcomed: sends again what the distributor did not get (resumed), or
    /// starts afresh. `false` once the role is gone.
    async fn welcomed(&mut self, stream: &Stream<M>, welcome: Welcome) -> bool {
        let _ = self.events.send(Event::Resumed { recovered: welcome.resumed });
        if welcome.resumed {
            let unacked = &mut self.state.unacked;
            while unacked.front().is_some_and(|(seq, _)| *seq <= welcome.acked) {
                unacked.pop_front();
            }
            for (_, msg) in unacked.iter() {
                let _ = stream.tx.send(msg.clone()).await;
            }
            true
        } else {
            self.state.unacked.clear();
            self.state.last_seen = 0;
            self.in_tx.send(Incoming::Fresh).await.is_ok()
        }
    }
}
