//! Prometheus metrics: their names, their help texts, and the `/metrics` listener.
//!
//! Recording goes through the `metrics` facade; handles are looked up once by their owners
//! (see the router), so the per-message cost is an atomic add. Without `--metrics-listen` no
//! recorder is installed and every handle is a no-op.

use std::net::SocketAddr;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const CONNECTED_PEERS: &str = "distributor_connected_peers";
pub const SESSIONS: &str = "distributor_sessions";
pub const MESSAGES_RELAYED: &str = "distributor_messages_relayed_total";
pub const ERRORS: &str = "distributor_errors_total";
pub const QUEUE_DROPS: &str = "distributor_queue_drops_total";
pub const OFFER_TO_ANSWER: &str = "distributor_offer_to_answer_seconds";
pub const STREAMS_ENDED: &str = "distributor_streams_ended_total";

/// Buckets of the offer-to-answer histogram: a worker answers in milliseconds to seconds.
const OFFER_TO_ANSWER_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Serves Prometheus text on `http://addr/metrics` (any path answers) from a background task.
/// Must be called inside a tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(OFFER_TO_ANSWER.into()), OFFER_TO_ANSWER_BUCKETS)?
        .install()?;
    describe();
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
    describe_counter!(STREAMS_ENDED, "Peer streams ended, by role and gRPC status code.");
}
