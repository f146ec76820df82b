//! Clustering over NATS: any client reaches any worker on any instance.
//!
//! A session lives with its worker (see [`crate::core`]). When a local client addresses a worker
//! that is not registered here, its shard hands the message to the bridge, which finds the
//! worker's instance (a request on the worker's subject, cached) and carries the message there
//! on a reliable [`link`]; the worker's shard there runs the state machine as for a local client,
//! with a [`RemoteClient`](crate::peer::RemoteClient) standing for the client. What it sends
//! back (relayed messages, refusals, `PEER_GONE`) travels the reverse link. Same-instance
//! traffic never touches NATS.
//!
//! The rooms, each sans-IO with its tests beside it, then the I/O:
//! - [`link`]: one reliable, ordered link between two instances; [`links`]: all of them, with
//!   framing and acknowledgements;
//! - [`directory`]: where workers are, and messages waiting for a locate;
//! - [`clients`]: local clients that talk across; [`liveness`]: which instances are alive;
//! - [`bridge`]: all of the above together, fed events and returning what to publish;
//! - `driver`: the NATS task around the bridge; this module: the connection, registrations and
//!   claims, and the shards' way in ([`Queue::elsewhere`]).
//!
//! Subjects, under `--nats-prefix` (default `distributor`); ids are decimal numbers, so nothing a
//! peer sends can name another subject:
//! - `<prefix>.i.<instance>`: an instance's inbox: link frames (records and acknowledgements).
//! - `<prefix>.w.<worker>`: subscribed by the instance a worker is registered on, for requests
//!   that locate it.
//! - `<prefix>.claim`: a stream registered a worker or client id; older streams of it end. A
//!   worker that moved with its sessions names the instance it came from.
//! - `<prefix>.hb`: every instance's heartbeat, each second; one missing for 3 s is dead.
//! - `<prefix>.resume`: a resumable stream of a peer not held on its instance asks which
//!   instance holds it; each answers, the holder with a [`tunnels`] to the new stream, or,
//!   for a peer with nothing to keep there, letting it go to the new stream's instance, or,
//!   for a worker, moving it there with its sessions ([`moves`]).
//!
//! Over 500 lines: the cluster's public face (its config, subjects, the `Cluster` handle with
//! registration and claims) beside this map of its rooms.

pub mod bridge;
mod clients;
pub mod directory;
mod driver;
pub mod link;
pub mod links;
pub mod liveness;
mod moves;
mod resuming;
pub mod seal;
pub mod tunnels;

use std::sync::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};

use crate::core::{ConnId, Elsewhere, InstanceId, PeerId, Role, Signal, refuse};
use crate::pb::ErrorCode;
use crate::peer::{ClusterQueue, ConnClock, Departure, ForClients, Peer, PeerReply, ToClients, ToCluster};
use crate::shards::Shards;
use bridge::Bridge;
use driver::{Control, Driver};
use seal::{Kind, Seal};
use tunnels::{Holder, TunnelCommand};

/// Generated from `proto/distributor/cluster/v1/link.proto`.
pub mod wire {
    #![allow(clippy::all)]
    tonic::include_proto!("distributor.cluster.v1");
}

/// How long a registration or a claim waits for NATS before the stream goes on without it.
pub const REGISTER_WAIT: Duration = Duration::from_secs(1);

/// How often the NATS client pings its server. A connection that stops answering (a network cut
/// that leaves the TCP connection silent) is noticed after two pings without a pong: within
/// about three intervals, 6 s. Until then cross-instance messages wait in the links; from then on
/// they are refused with `CLUSTER_UNAVAILABLE` and the health of `distributor.cluster` says
/// `NOT_SERVING`.
pub const NATS_PING: Duration = Duration::from_secs(2);

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

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading the NATS credentials file: {0}")]
    Credentials(#[source] std::io::Error),
    #[error("bad NATS URL: {0}")]
    Url(#[source] async_nats::Error),
    #[error("connecting to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("subscribing on NATS: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
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

impl NatsConfig {
    /// Whether every server URL names this machine (loopback), where no one else can reach.
    pub fn is_loopback(&self) -> bool {
        self.url.split(',').all(|url| {
            let url = url.trim();
            let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
            let authority = authority.split('/').next().unwrap_or_default();
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
            let host = match host_port.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or_default(),
                None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
            };
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    }
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
    pub fn resume(&self) -> String {
        format!("{}.resume", self.prefix)
    }
}

/// The shards' [`Elsewhere`]: hands messages for workers on other instances to the bridge.
struct ToOtherInstances {
    queue: ClusterQueue,
}

impl Elsewhere<Peer> for ToOtherInstances {
    fn forward(
        &mut self,
        client: PeerId,
        sink: &Peer,
        worker: PeerId,
        to: InstanceId,
        signal: Signal<PeerReply>,
    ) {
        let command = ToCluster::Forward { client, sink: sink.clone(), worker, to, signal };
        if let Err(e) = self.queue.try_send(command) {
            let (mpsc::error::TrySendError::Full(command) | mpsc::error::TrySendError::Closed(command)) = e;
            if let ToCluster::Forward { signal, .. } = command {
                let reason = "the cross-instance queue is full";
                refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
            }
        }
    }

    fn gone(&mut self, client: PeerId, conn: ConnId, _worker: PeerId, to: InstanceId) {
        // Owed: a full queue is waited for, off the shard's thread.
        let command = ToCluster::ForwardGone { client, conn, to };
        if let Err(mpsc::error::TrySendError::Full(command)) = self.queue.try_send(command) {
            let queue = self.queue.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(async move { queue.send(command).await })),
                Err(_) => drop(queue.blocking_send(command)),
            }
        }
    }

    fn to_worker(&mut self, client: PeerId, sink: &Peer, worker: PeerId, signal: Signal<PeerReply>) {
        let Peer::Local(sink) = sink else {
            // A client elsewhere located the worker here, and it is not (any more): its own
            // instance must not forward the message again.
            let reason = format!("worker {worker} is not connected");
            return refuse(signal.reply, ErrorCode::PeerNotConnected, worker, client, reason);
        };
        let command = ToCluster::ClientSignal { client, sink: sink.clone(), worker, signal };
        if let Err(e) = self.queue.try_send(command) {
            let (mpsc::error::TrySendError::Full(command) | mpsc::error::TrySendError::Closed(command)) = e;
            if let ToCluster::ClientSignal { signal, .. } = command {
                let reason = "the cross-instance queue is full";
                refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason);
            }
        }
    }
}

/// Who this instance is in the cluster.
pub struct Member {
    pub instance: InstanceId,
    /// The subjects' prefix (`--nats-prefix`).
    pub prefix: String,
    /// Authenticates what instances say to each other.
    pub seal: Seal,
    /// Sessions a local client may hold, here and across (0: no cap).
    pub max_sessions: usize,
    /// The clock of this instance's streams, which the claims of others move forward.
    pub clock: Arc<ConnClock>,
}

/// This instance's membership of the cluster: the NATS client and the bridge's queues.
pub struct Cluster {
    pub instance: InstanceId,
    nats: async_nats::Client,
    subjects: Subjects,
    seal: Seal,
    queue: ClusterQueue,
    control: mpsc::UnboundedSender<Control>,
    replies: driver::Replies,
    tunnels: mpsc::UnboundedSender<TunnelCommand>,
    /// The other instances heard from lately, as the bridge last counted them.
    /// The other instances known alive (the driver updates it), for the resume asks.
    alive: Arc<Mutex<Vec<InstanceId>>>,
    /// Who takes a peer held here over for a stream on another instance (the edge).
    holder: Arc<OnceLock<Arc<dyn Holder>>>,
}

/// Holds a worker's registration in the cluster: while it lives, requests locating the worker
/// are answered here.
pub struct Registration(AbortHandle);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The bridge's queues, before the bridge runs: the shards are made with their sending ends.
pub struct Queue {
    tx: ClusterQueue,
    rx: mpsc::Receiver<ToCluster>,
    to_clients: ToClients,
    for_clients: ForClients,
}

impl Queue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(driver::QUEUE);
        let (to_clients, for_clients) = crate::peer::to_clients();
        Queue { tx, rx, to_clients, for_clients }
    }

    /// What a shard hands messages for workers on other instances to.
    pub fn elsewhere(&self) -> Box<dyn Elsewhere<Peer>> {
        Box::new(ToOtherInstances { queue: self.tx.clone() })
    }
}

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    /// Connects to NATS (retrying in the background if no server answers yet).
    pub async fn connect(
        config: &NatsConfig,
        instance: InstanceId,
        health: tonic_health::server::HealthReporter,
    ) -> Result<async_nats::Client, ClusterError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("distributor-{instance:x}"))
            .no_echo()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(NATS_PING)
            .subscription_capacity(1 << 16)
            .client_capacity(1 << 14)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let health = health.clone();
                async move { driver::on_event(event, health).await }
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
            options = options.credentials_file(creds).await.map_err(ClusterError::Credentials)?;
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
        let urls: Vec<async_nats::ServerAddr> = config
            .url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e: std::io::Error| ClusterError::Url(e.into()))?;
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

    /// Starts the bridge task on `queue`, feeding `shards`.
    pub async fn start(
        member: Member,
        nats: async_nats::Client,
        queue: Queue,
        shards: Arc<Shards<Peer>>,
    ) -> Result<(Self, JoinHandle<()>), ClusterError> {
        let Member { instance, prefix, seal, max_sessions, clock } = member;
        let subjects = Subjects::new(&prefix);
        let replies = driver::Replies::start(&nats).await?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (tunnels, tunnels_rx) = mpsc::unbounded_channel();
        let (alive, holder) = (Arc::new(Mutex::new(Vec::new())), Arc::new(OnceLock::new()));
        let driver = Driver {
            bridge: Bridge::new(
                instance,
                shards,
                queue.to_clients,
                max_sessions,
                links::frame_limit(nats.max_payload()),
            )
            .with_clock(clock),
            me: instance,
            nats: nats.clone(),
            subjects: subjects.clone(),
            seal: seal.clone(),
            replies: replies.clone(),
            control: control.clone(),
            tunnels: tunnels.clone(),
            alive: alive.clone(),
            holder: holder.clone(),
            asked: Default::default(),
        };
        let subscriptions = driver.subscribe().await?;
        let inputs = driver::Inputs {
            queue: queue.rx,
            for_clients: queue.for_clients,
            control: control_rx,
            tunnels: tunnels_rx,
        };
        let task = tokio::spawn(driver.run(subscriptions, inputs));
        let cluster = Cluster {
            instance,
            nats,
            subjects,
            seal,
            queue: queue.tx,
            control,
            replies,
            tunnels,
            alive,
            holder,
        };
        Ok((cluster, task))
    }

    /// Sets who takes peers held here over for streams on other instances (the edge, once).
    pub fn set_holder(&self, holder: Arc<dyn Holder>) {
        let _ = self.holder.set(holder);
    }

    pub fn is_connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// What a local client's departure carries through the shards (see [`Departure`]).
    pub fn departure(&self, client: PeerId, conn: ConnId) -> Arc<Departure> {
        Arc::new(Departure::new(client, conn, self.queue.clone()))
    }

    /// Registers a worker cluster-wide: older streams of it anywhere end, and requests locating
    /// it are answered here. Returns once the NATS server has the subscription, so that an
    /// instance asking right after finds it; or after [`REGISTER_WAIT`] at most: while NATS is
    /// unreachable, async-nats stops taking commands once its queue is full, and a local
    /// registration must not wait for that. The subscription and the claim go on in the
    /// background and reach NATS when it is back.
    /// A worker that moved here with its sessions (`moved_from`) says so in its claim.
    pub async fn register_worker(
        &self,
        worker: PeerId,
        conn: ConnId,
        moved_from: Option<InstanceId>,
    ) -> Registration {
        let (ready, registered) = oneshot::channel();
        let (nats, seal, me) = (self.nats.clone(), self.seal.clone(), self.instance);
        let claim = self.sealed_claim(Role::Worker, worker, conn, moved_from);
        let subject = self.subjects.worker(worker);
        let claims = self.subjects.claim();
        let task = tokio::spawn(async move {
            let subscriber = match nats.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    return crate::warn_throttled!(worker, "cannot subscribe the worker's subject: {e}");
                }
            };
            publish_claim(&nats, claims, claim, worker).await;
            if nats.connection_state() == async_nats::connection::State::Connected {
                let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
            }
            let _ = ready.send(());
            driver::answer_locates(subscriber, nats, seal, me).await;
        });
        if tokio::time::timeout(REGISTER_WAIT, registered).await.is_err() {
            crate::warn_throttled!(
                worker,
                "NATS does not take the registration: registered here; other instances find the worker once NATS is back"
            );
        }
        Registration(task.abort_handle())
    }

    /// Announces that `conn` is now the stream of this id: older streams of it elsewhere end.
    /// Waits [`REGISTER_WAIT`] at most (see [`Self::register_worker`]); the claim goes out
    /// when NATS takes it.
    pub async fn claim(&self, role: Role, id: PeerId, conn: ConnId) {
        let (nats, subject, claim) =
            (self.nats.clone(), self.subjects.claim(), self.sealed_claim(role, id, conn, None));
        let publish = tokio::spawn(async move { publish_claim(&nats, subject, claim, id).await });
        if tokio::time::timeout(REGISTER_WAIT, publish).await.is_err() {
            crate::warn_throttled!(id, "NATS does not take the claim: it goes out once NATS is back");
        }
    }

    fn sealed_claim(
        &self,
        role: Role,
        id: PeerId,
        conn: ConnId,
        moved_from: Option<InstanceId>,
    ) -> bytes::Bytes {
        let claim = wire::Claim {
            worker: role == Role::Worker,
            id,
            conn: Some(bridge::wire_conn(conn)),
            moved_from: moved_from.unwrap_or(0),
            now_at: 0,
        };
        self.seal.seal(Kind::Claim, &self.subjects.claim(), &claim.encode_to_vec(), driver::now_ms())
    }

    /// Leaves the cluster: once this instance's departures are acknowledged (or `within`
    /// passes), says `leaving`, so that the other instances end its sessions at once; then
    /// drains the NATS connection.
    pub async fn leave(&self, task: JoinHandle<()>, within: Duration) {
        let (done, left) = oneshot::channel();
        if self.control.send(Control::Shutdown { done }).is_ok() {
            let _ = tokio::time::timeout(within, left).await;
        }
        task.abort();
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!("cluster bridge panicked: {e}");
        }
        let _ = self.nats.drain().await;
    }
}

/// Publishes a sealed claim of `id` on `subject`.
async fn publish_claim(nats: &async_nats::Client, subject: String, claim: bytes::Bytes, id: PeerId) {
    if let Err(e) = nats.publish(subject, claim).await {
        crate::warn_throttled!(id, "cannot publish a claim: {e}");
    }
}
