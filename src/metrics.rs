//! Prometheus metrics: their names, their help texts, and the `/metrics` listener.
//!
//! Recording goes through the `metrics` facade; handles are looked up once by their owners
//! (the router, `peer::written`, the cluster links), so the per-message cost is an atomic add. Without `--metrics-listen` no
//! recorder is installed and every handle is a no-op.

use std::net::SocketAddr;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
pub use metrics_exporter_prometheus::BuildError;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const CONNECTED_PEERS: &str = "distributor_connected_peers";
pub const SESSIONS: &str = "distributor_sessions";
pub const MESSAGES_RELAYED: &str = "distributor_messages_relayed_total";
pub const ERRORS: &str = "distributor_errors_total";
pub const QUEUE_DROPS: &str = "distributor_queue_drops_total";
pub const OFFER_TO_ANSWER: &str = "distributor_offer_to_answer_seconds";
pub const NATS_CONNECTED: &str = "distributor_nats_connected";
pub const CLUSTER_FRAMES: &str = "distributor_cluster_frames_total";
pub const CLUSTER_RECORDS: &str = "distributor_cluster_records_total";
pub const CLUSTER_ACK: &str = "distributor_cluster_ack_seconds";
pub const CLUSTER_REJECTED: &str = "distributor_cluster_rejected_total";
pub const CONNECTIONS: &str = "distributor_connections";
pub const TASKS: &str = "distributor_tasks";
pub const RESUMES: &str = "distributor_resumes_total";
pub const DETACHED_PEERS: &str = "distributor_detached_peers";
pub const HELD_MESSAGES: &str = "distributor_held_messages";
pub const TUNNELS: &str = "distributor_tunnels";
pub const PEERS_MOVED: &str = "distributor_peers_moved_total";
pub const OUT_OF_ORDER: &str = "distributor_cluster_out_of_order_total";

/// Buckets of cross-instance latencies: a round trip through NATS takes 0.1 ms to seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0];

/// Buckets of the offer-to-answer histogram: a worker answers in milliseconds to seconds.
const OFFER_TO_ANSWER_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Serves Prometheus text on `http://addr/metrics` (any path answers) from a background task.
/// Must be called inside a tokio runtime, before serving: metric handles are looked up once,
/// and a handle looked up before the recorder is installed counts nothing.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(OFFER_TO_ANSWER.into()), OFFER_TO_ANSWER_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(CLUSTER_ACK.into()), LATENCY_BUCKETS)?
        .install()?;
    describe();
    // The runtime's live tasks (one per stream, and a few more), for soak runs to watch.
    let tasks = metrics::gauge!(TASKS);
    let runtime = tokio::runtime::Handle::current();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            tasks.set(runtime.metrics().num_alive_tasks() as f64);
        }
    });
    Ok(())
}

fn describe() {
    describe_gauge!(CONNECTED_PEERS, "Peers with an open stream, by role.");
    describe_gauge!(SESSIONS, "Sessions by negotiation state.");
    describe_counter!(MESSAGES_RELAYED, "Messages delivered to the other side, by event.");
    describe_counter!(ERRORS, "ERROR messages sent back to senders, by error code.");
    describe_counter!(
        QUEUE_DROPS,
        "Messages owed to a peer whose queue was full; each ends that peer's stream."
    );
    describe_histogram!(
        OFFER_TO_ANSWER,
        Unit::Seconds,
        "Time from a session's OFFER to the worker's ANSWER."
    );
    describe_gauge!(NATS_CONNECTED, "1 while the NATS connection is up (cluster mode).");
    describe_counter!(CLUSTER_FRAMES, "Frames published to other instances: data, ack, resent.");
    describe_counter!(CLUSTER_RECORDS, "Messages carried between instances, by direction.");
    describe_counter!(
        CLUSTER_REJECTED,
        "NATS messages not believed (no valid seal, stale, replayed), by kind; dropped unread."
    );
    describe_gauge!(CONNECTIONS, "Open TCP connections (at most --max-connections).");
    describe_gauge!(TASKS, "Tasks alive on the runtime (sampled each second).");
    describe_counter!(
        RESUMES,
        "Resumable streams by outcome: resumed (took a detached or open peer over), unknown \
         (asked to resume a peer not known here, or whose missed messages are gone), expired \
         (a detached peer that did not come back in time)."
    );
    describe_gauge!(DETACHED_PEERS, "Resumable peers whose stream ended without them leaving (sampled).");
    describe_counter!(
        PEERS_MOVED,
        "Resumable peers with nothing to keep here let go to the instance they resumed on, by role."
    );
    describe_gauge!(HELD_MESSAGES, "Messages queued for detached peers (sampled).");
    describe_counter!(
        OUT_OF_ORDER,
        "Messages of clients that moved between instances, taken without their old instance's word \
         that what the client sent from there had all come (it did not say so within 5 s)."
    );
    describe_gauge!(
        TUNNELS,
        "Resumed streams carried between this instance and the one holding their peer, either way (sampled)."
    );
    describe_histogram!(
        CLUSTER_ACK,
        Unit::Seconds,
        "Time from publishing a frame to another instance to its acknowledgement."
    );
}
