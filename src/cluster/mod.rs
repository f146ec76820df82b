//! Clustering over NATS: any client reaches any worker on any instance.
//!
//! A session lives with its worker (see [`crate::core`]). When a local client addresses a worker
//! that is not registered here, its shard hands the message to the [`bridge`], which finds the
//! worker's instance (a request on the worker's subject, cached) and carries the message there
//! on a reliable [`link`]; the worker's shard there runs the state machine as for a local client,
//! with a [`RemoteClient`] standing for the client. What it sends back (relayed messages,
//! refusals, `PEER_GONE`) travels the reverse link. Same-instance traffic never touches NATS.
//!
//! Subjects, under `--nats-prefix` (default `distributor`); ids are decimal numbers, so nothing a
//! peer sends can name another subject:
//! - `<prefix>.i.<instance>`: an instance's inbox: link frames (records and acknowledgements).
//! - `<prefix>.w.<worker>`: subscribed by the instance a worker is registered on, for requests
//!   that locate it.
//! - `<prefix>.claim`: a stream registered a worker or client id; older streams of it end.
//! - `<prefix>.hb`: every instance's heartbeat, each second; one missing for 3 s is dead.

mod bridge;
pub mod link;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::core::{ConnId, DeliverError, Elsewhere, InstanceId, Outbound, PeerId, Role, Signal};
use crate::edge::conn::{Peer, PeerReply, Sink};
use crate::pb::ErrorCode;
use crate::shards::Shards;

pub use bridge::Bridge;

/// Generated from `proto/distributor/cluster/v1/link.proto`.
pub mod wire {
    #![allow(clippy::all)]
    tonic::include_proto!("distributor.cluster.v1");
}

/// How long startup waits for a first NATS connection before serving without one.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Reconnect at once, then back off from 100 ms up to 2 s between attempts.
fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis((50u64 << (n - 1).min(6)).min(2000)),
    }
}

/// The health service name that reports the NATS connection (`grpc.health.v1`).
pub const HEALTH_SERVICE: &str = "distributor.cluster";

/// Commands the bridge task takes, from shards, the edge and its own helpers.
pub enum ToBridge {
    /// A local client's message for a worker not registered on this instance.
    ClientSignal { client: PeerId, sink: Sink, worker: PeerId, signal: Signal<PeerReply> },
    /// A local client stream ended (sent once by each shard).
    ClientGone { client: PeerId, conn: ConnId },
    /// A message for a client stream on another instance.
    ToClient { conn: ConnId, msg: Outbound },
    /// A worker's location, looked up.
    Located { worker: PeerId, found: Result<InstanceId, Lookup> },
    /// Finish: refuse nothing more, tell the others this instance leaves.
    Shutdown { done: tokio::sync::oneshot::Sender<()> },
}

/// Why a worker could not be located.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    Unavailable,
}

/// NATS connection settings.
#[derive(Debug, Clone, Default)]
pub struct NatsConfig {
    /// Comma-separated server URLs.
    pub url: String,
    pub prefix: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey: Option<String>,
    pub creds: Option<std::path::PathBuf>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub require_tls: bool,
}

/// The subjects of one deployment.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects { prefix: prefix.to_owned() }
    }
    pub fn inbox(&self, instance: InstanceId) -> String {
        format!("{}.i.{instance}", self.prefix)
    }
    pub fn worker(&self, worker: PeerId) -> String {
        format!("{}.w.{worker}", self.prefix)
    }
    pub fn claim(&self) -> String {
        format!("{}.claim", self.prefix)
    }
    pub fn heartbeat(&self) -> String {
        format!("{}.hb", self.prefix)
    }
}

/// A client stream on another instance, as a session's owner sees it.
pub struct RemoteClient {
    conn: ConnId,
    bridge: mpsc::Sender<ToBridge>,
}

impl RemoteClient {
    pub fn new(conn: ConnId, bridge: mpsc::Sender<ToBridge>) -> Self {
        RemoteClient { conn, bridge }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Hands `msg` to the link towards the client's instance.
    pub fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        self.bridge
            .try_send(ToBridge::ToClient { conn: self.conn, msg })
            .map_err(|_| DeliverError::Unavailable)
    }

    /// Sends the answer to one of the client's own messages back to its instance.
    pub fn reply(&self, msg: Outbound) {
        if self.try_deliver(msg).is_err() {
            metrics::counter!(crate::metrics::QUEUE_DROPS).increment(1);
            tracing::warn!(conn = %self.conn, "cross-instance queue full: a reply to a remote client was dropped");
        }
    }
}

/// The shards' [`Elsewhere`]: hands messages for workers on other instances to the bridge.
struct ToOtherInstances {
    bridge: mpsc::Sender<ToBridge>,
    instance: InstanceId,
}

impl Elsewhere<Peer> for ToOtherInstances {
    fn to_worker(&mut self, client: PeerId, sink: &Peer, worker: PeerId, signal: Signal<PeerReply>) {
        let Peer::Local(sink) = sink else { return };
        let command = ToBridge::ClientSignal { client, sink: sink.clone(), worker, signal };
        if let Err(e) = self.bridge.try_send(command) {
            let (mpsc::error::TrySendError::Full(command) | mpsc::error::TrySendError::Closed(command)) = e;
            if let ToBridge::ClientSignal { signal, .. } = command {
                let reason = "the cross-instance queue is full";
                refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
            }
        }
    }

    fn client_gone(&mut self, client: PeerId, conn: ConnId) {
        if conn.instance != self.instance {
            return;
        }
        // Never dropped: a full queue waits for room. The bridge never waits for a shard (it
        // parks what a full shard queue refuses), so this cannot deadlock. Inline shards run on
        // the runtime, where blocking is not allowed: a task waits instead, after what this
        // shard already queued.
        let gone = ToBridge::ClientGone { client, conn };
        match self.bridge.try_send(gone) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(gone)) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let bridge = self.bridge.clone();
                    runtime.spawn(async move { bridge.send(gone).await });
                }
                Err(_) => {
                    let _ = self.bridge.blocking_send(gone);
                }
            },
        }
    }
}

/// Refuses a client's message with `code`.
fn refuse(reply: PeerReply, code: ErrorCode, worker: PeerId, client: PeerId, reason: impl Into<Bytes>) {
    crate::edge::reply(reply, Outbound::error(code, worker, client, reason));
}

/// This instance's membership of the cluster: the NATS client and the bridge task.
pub struct Cluster {
    pub instance: InstanceId,
    nats: async_nats::Client,
    subjects: Subjects,
    bridge: mpsc::Sender<ToBridge>,
}

/// Holds a worker's registration in the cluster: while it lives, requests locating the worker
/// are answered here.
pub struct Registration(AbortHandle);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Cluster {
    /// Connects to NATS (retrying in the background if no server answers yet).
    pub async fn connect(
        config: &NatsConfig,
        instance: InstanceId,
        health: tonic_health::server::HealthReporter,
    ) -> anyhow::Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("distributor-{instance:x}"))
            .no_echo()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .subscription_capacity(1 << 16)
            .client_capacity(1 << 14)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let health = health.clone();
                async move { bridge::on_event(event, health).await }
            });
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &config.nkey {
            options = options.nkey(seed.clone());
        }
        if let Some(creds) = &config.creds {
            options = options.credentials_file(creds).await?;
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if config.require_tls {
            options = options.require_tls(true);
        }
        let urls: Vec<async_nats::ServerAddr> =
            config.url.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>()?;
        let client = options.connect(urls).await?;
        // Serve only once connected, so that the first peers find the cluster; if NATS stays
        // unreachable, serve anyway (local relay works) and keep trying in the background.
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(url = %config.url, "NATS unreachable: serving anyway, cross-instance messages are refused until it answers");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(client)
    }

    /// The bridge's command queue.
    pub fn channel() -> (mpsc::Sender<ToBridge>, mpsc::Receiver<ToBridge>) {
        mpsc::channel(bridge::QUEUE)
    }

    pub fn elsewhere(bridge: &mpsc::Sender<ToBridge>, instance: InstanceId) -> Box<dyn Elsewhere<Peer>> {
        Box::new(ToOtherInstances { bridge: bridge.clone(), instance })
    }

    pub fn new(
        instance: InstanceId,
        nats: async_nats::Client,
        prefix: &str,
        bridge: mpsc::Sender<ToBridge>,
    ) -> Self {
        Cluster { instance, nats, subjects: Subjects::new(prefix), bridge }
    }

    pub fn bridge(&self) -> &mpsc::Sender<ToBridge> {
        &self.bridge
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn is_connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Registers a worker cluster-wide: older streams of it anywhere end, and requests locating
    /// it are answered here. Returns once the NATS server has the subscription, so that an
    /// instance asking right after finds it; at once while NATS is unreachable (the
    /// subscription is made when it comes back).
    pub async fn register_worker(&self, worker: PeerId, conn: ConnId) -> Option<Registration> {
        let subscriber = match self.nats.subscribe(self.subjects.worker(worker)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(worker, "cannot subscribe the worker's subject: {e}");
                return None;
            }
        };
        let located = Bytes::from(wire::Located { instance: self.instance }.encode_to_vec());
        let nats = self.nats.clone();
        let responder = tokio::spawn(bridge::answer_locates(subscriber, nats, located));
        self.claim(Role::Worker, worker, conn).await;
        if self.is_connected() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
        }
        Some(Registration(responder.abort_handle()))
    }

    /// Announces that `conn` is now the stream of this id: older streams of it elsewhere end.
    pub async fn claim(&self, role: Role, id: PeerId, conn: ConnId) {
        let claim = wire::Claim { worker: role == Role::Worker, id, conn: Some(bridge::wire_conn(conn)) };
        if let Err(e) = self.nats.publish(self.subjects.claim(), claim.encode_to_vec().into()).await {
            tracing::warn!(id, "cannot publish a claim: {e}");
        }
    }

    /// Runs the bridge until shutdown.
    pub async fn run_bridge(
        &self,
        rx: mpsc::Receiver<ToBridge>,
        shards: Arc<Shards<Peer>>,
    ) -> anyhow::Result<()> {
        Bridge::new(self.instance, self.nats.clone(), self.subjects.clone(), shards, self.bridge.clone())
            .run(rx)
            .await
    }
}
