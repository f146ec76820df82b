//! The one entry point: [`run`] serves the relay on a bound listener until `shutdown` resolves.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::auth::Authenticator;
use crate::cluster::{self, Cluster, ToBridge};
use crate::config::{Config, MAX_FRAME_BYTES};
use crate::edge::conn::ConnClock;
use crate::edge::{ClientEdge, Edge, WorkerEdge};
use crate::pb::client_service_server::ClientServiceServer;
use crate::pb::worker_service_server::WorkerServiceServer;
use crate::shards::Shards;

/// Serves gRPC on `listener` until `shutdown` resolves, then ends every stream (queued messages
/// are written first, then `UNAVAILABLE`) and returns once they are closed, or after
/// `config.drain_timeout`. With `config.nats`, joins the cluster first.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.check()?;
    if config.auth_secret.is_none() {
        tracing::warn!("no --auth-secret: running open, any peer may claim any id (development only)");
    }
    let instance = rand::random::<u64>() | 1;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ClientServiceServer<ClientEdge>>().await;
    health.set_serving::<WorkerServiceServer<WorkerEdge>>().await;

    let (shards, cluster) = match &config.nats {
        None => (Arc::new(Shards::start(config.shards, config.shard_queue, || None)?), None),
        Some(nats) => {
            health.set_service_status(cluster::HEALTH_SERVICE, tonic_health::ServingStatus::NotServing).await;
            let client = Cluster::connect(nats, instance, health.clone()).await?;
            let (bridge, commands) = Cluster::channel();
            let shards = Arc::new(Shards::start(config.shards, config.shard_queue, || {
                Some(Cluster::elsewhere(&bridge, instance))
            })?);
            let cluster = Arc::new(Cluster::new(instance, client, &nats.prefix, bridge));
            let task = {
                let (cluster, shards) = (cluster.clone(), shards.clone());
                tokio::spawn(async move { cluster.run_bridge(commands, shards).await })
            };
            tracing::info!(url = %nats.url, prefix = %nats.prefix, "cluster mode");
            (shards, Some((cluster, task)))
        }
    };

    let tasks = TaskTracker::new();
    let edge = Arc::new(Edge {
        shards: shards.clone(),
        cluster: cluster.as_ref().map(|(c, _)| c.clone()),
        auth: config.auth_secret.as_deref().map(|s| Authenticator::new(s.as_bytes())),
        max_message_bytes: config.max_message_bytes,
        peer_queue: config.peer_queue,
        instance,
        conn_clock: ConnClock::default(),
        streams: Default::default(),
        stopping: Default::default(),
        tasks: tasks.clone(),
    });

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let local = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
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
            let _ = fired_tx.send(());
        }
    };
    let server = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
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
        .serve_with_incoming_shutdown(incoming, stopping);
    tracing::info!(%local, shards = shards.len(), instance = format!("{instance:x}"), "distributor listening");

    let drain_timeout = config.drain_timeout;
    let deadline = async move {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        _ = deadline => tracing::warn!(?drain_timeout, "drain timeout: closing the remaining connections"),
    }
    tasks.close();
    edge.shut_down();
    if tokio::time::timeout(drain_timeout, tasks.wait()).await.is_err() {
        tracing::warn!("stream tasks still running after the drain timeout");
    }
    drop(edge);
    if let Some((cluster, task)) = cluster {
        // The streams' departures reach the other instances before this one says it leaves.
        let (done, left) = tokio::sync::oneshot::channel();
        if cluster.bridge().send(ToBridge::Shutdown { done }).await.is_ok() {
            let _ = tokio::time::timeout(drain_timeout, left).await;
        }
        task.abort();
        let _ = task.await;
        if let Ok(cluster) = Arc::try_unwrap(cluster) {
            let _ = cluster.nats().drain().await;
        }
    }
    // The shard threads stop once the last stream task and the bridge have let go of them.
    tokio::task::spawn_blocking(move || drop(shards)).await?;
    tracing::info!("distributor stopped");
    Ok(())
}
