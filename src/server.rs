//! The one entry point: [`run`] serves the relay on a bound listener until `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use crate::auth::Authenticator;
use crate::cluster::seal::Seal;
use crate::cluster::{self, Cluster, ClusterError, Queue};
use crate::config::{Config, ConfigError, MAX_FRAME_BYTES};
use crate::edge::{ClientEdge, Edge, WorkerEdge};
use crate::listener::Incoming;
use crate::pb::client_service_server::ClientServiceServer;
use crate::pb::worker_service_server::WorkerServiceServer;
use crate::peer::ConnClock;
use crate::shards::Shards;

/// Locally reset streams one connection may cause before it is sent GOAWAY (hyper's default,
/// which tonic turns off unless set: RUSTSEC-2024-0003).
const MAX_LOCAL_RESET_STREAMS: usize = 1024;
/// Streams a peer may open and reset before the server accepts them (h2's default).
const MAX_PENDING_RESET_STREAMS: usize = 20;

/// Why the distributor could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("starting the routing shards: {0}")]
    Shards(#[source] std::io::Error),
    #[error("the listener: {0}")]
    Listener(#[source] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves gRPC on `listener` until `shutdown` resolves, then ends every stream (queued messages
/// are written first, then `UNAVAILABLE`) and returns once they are closed, or after
/// `config.drain_timeout`. With `config.nats`, joins the cluster first.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    config.check()?;
    let auth = match &config.auth_secret {
        Some(secret) => Some(
            Authenticator::new(secret.as_bytes(), &config.auth_expect)
                .map_err(|e| ConfigError::ShortSecret(e.0))?,
        ),
        None => {
            tracing::warn!(listen = %config.listen, "no --auth-secret: running open, any peer may claim any id (development only)");
            None
        }
    };
    let instance = rand::random::<u64>() | 1;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ClientServiceServer<ClientEdge>>().await;
    health.set_serving::<WorkerServiceServer<WorkerEdge>>().await;

    let conn_clock = Arc::new(ConnClock::skewed(config.test_clock_skew_ms));
    let (shards, cluster) = match &config.nats {
        None => {
            let shards = Shards::start(
                config.shards,
                config.shard_queue,
                config.limits.max_sessions_per_client,
                || None,
            )
            .map_err(ServerError::Shards)?;
            (Arc::new(shards), None)
        }
        Some(nats) => {
            health.set_service_status(cluster::HEALTH_SERVICE, tonic_health::ServingStatus::NotServing).await;
            let client = Cluster::connect(nats, instance, health.clone()).await?;
            // Every message a peer may send must fit one cross-instance frame.
            let max_payload = client.max_payload();
            if !cluster::links::fits(config.max_message_bytes, max_payload) {
                let most =
                    cluster::links::frame_limit(max_payload).saturating_sub(cluster::links::RECORD_OVERHEAD);
                return Err(ConfigError::OverNatsPayload {
                    max_message_bytes: config.max_message_bytes,
                    max_payload,
                    most,
                }
                .into());
            }
            let queue = Queue::new();
            let shards = Shards::start(
                config.shards,
                config.shard_queue,
                config.limits.max_sessions_per_client,
                || Some(queue.elsewhere()),
            )
            .map_err(ServerError::Shards)?;
            let shards = Arc::new(shards);
            // The key comes from the cluster key, else from the auth secret.
            let seal = match config.cluster_key.as_ref().or(config.auth_secret.as_ref()) {
                Some(secret) => Seal::derived(secret.as_bytes(), &nats.prefix),
                None => {
                    tracing::warn!(
                        "cluster mode without a key: anyone on the NATS cluster can steer this instance (development only)"
                    );
                    Seal::none()
                }
            };
            let member = cluster::Member {
                instance,
                prefix: nats.prefix.clone(),
                seal,
                max_sessions: config.limits.max_sessions_per_client,
                clock: conn_clock.clone(),
            };
            let (cluster, task) = Cluster::start(member, client, queue, shards.clone()).await?;
            tracing::info!(url = %nats.url, prefix = %nats.prefix, "cluster mode");
            (shards, Some((Arc::new(cluster), task)))
        }
    };

    let tasks = TaskTracker::new();
    let edge = Arc::new(Edge {
        cluster: cluster.as_ref().map(|(c, _)| c.clone()),
        auth,
        conn_clock,
        tasks: tasks.clone(),
        ..Edge::new(shards.clone(), instance, &config)
    });
    if let Some(cluster) = &edge.cluster {
        cluster.set_holder(Arc::new(crate::edge::Holding(Arc::downgrade(&edge))));
    }
    if config.metrics_listen.is_some() {
        let edge = Arc::downgrade(&edge);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            while let Some(edge) = {
                every.tick().await;
                edge.upgrade()
            } {
                edge.sample_resumes();
            }
        });
    }

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let local = listener.local_addr().map_err(ServerError::Listener)?;
    let incoming = Incoming::new(listener, config.limits.max_connections);
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = {
        let edge = edge.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: ending streams");
            health.set_not_serving::<ClientServiceServer<ClientEdge>>().await;
            health.set_not_serving::<WorkerServiceServer<WorkerEdge>>().await;
            edge.shut_down();
            tokio::spawn(tell_idle_peers(Arc::downgrade(&edge)));
            let _ = fired_tx.send(());
        }
    };
    let server = Server::builder()
        .layer(crate::edge::cancel::WatchCancelLayer)
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .max_concurrent_streams(config.limits.max_streams_per_connection)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_RESET_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            ClientServiceServer::from_arc(Arc::new(ClientEdge(edge.clone())))
                .max_decoding_message_size(MAX_FRAME_BYTES),
        )
        .add_service(
            WorkerServiceServer::from_arc(Arc::new(WorkerEdge(edge.clone())))
                .max_decoding_message_size(MAX_FRAME_BYTES),
        )
        .serve_with_incoming_shutdown(
            crate::edge::front::split(incoming, edge.clone(), edge.draining.clone()),
            stopping,
        );
    tracing::info!(%local, shards = shards.len(), instance = format!("{instance:x}"), "distributor listening");

    let drain_timeout = config.drain_timeout;
    let deadline = async move {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(deadline);
    let held = edge.held_for_others.clone();
    tokio::select! {
        served = server => {
            served?;
            // The gRPC streams are done; peers held here for streams on other instances are
            // served on until they end, or the drain does.
            let tunnels_done = async {
                while held.load(std::sync::atomic::Ordering::Acquire) > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                _ = tunnels_done => {}
                _ = &mut deadline => tracing::warn!(?drain_timeout, "drain timeout: ending the peers held for other instances"),
            }
        }
        _ = &mut deadline => tracing::warn!(?drain_timeout, "drain timeout: closing the remaining connections"),
    }
    tasks.close();
    // Whatever is left (resumable peers told to reconnect, detached ones) ends now.
    edge.end_all();
    if tokio::time::timeout(drain_timeout, tasks.wait()).await.is_err() {
        tracing::warn!("stream tasks still running after the drain timeout");
    }
    drop(edge);
    if let Some((cluster, task)) = cluster {
        // The streams' departures reach the other instances before this one says it leaves.
        cluster.leave(task, drain_timeout).await;
    }
    // The shard threads stop once the last stream task and the bridge have let go of them.
    if let Err(e) = tokio::task::spawn_blocking(move || drop(shards)).await {
        tracing::error!("a shard thread panicked: {e}");
    }
    tracing::info!("distributor stopped");
    Ok(())
}

/// While the drain lasts: a resumable peer that resumed elsewhere through a tunnel, because it
/// held a session here, is told `RECONNECT` again once it holds none, so that its next resume
/// moves it (and this instance stops holding it); checked every 100 ms.
async fn tell_idle_peers(edge: std::sync::Weak<Edge>) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
    while let Some(edge) = {
        every.tick().await;
        edge.upgrade()
    } {
        if edge.shutdown.is_cancelled() {
            return;
        }
        edge.reconnect(true);
    }
}
