//! distributor: a WebRTC signaling relay. Clients and workers hold bidirectional gRPC streams;
//! the distributor relays their SDP offer/answer and ICE candidates and checks the negotiation.
//!
//! Module map, in layers: each module imports only from the layers above it.
//! 1. [`pb`]: the wire messages. [`core`]: the sans-IO routing state each shard owns, and the
//!    session state machine. [`metrics`]: Prometheus names and exporter.
//! 2. [`peer`]: peers as the core sees them: a local stream's bounded queue, a client on
//!    another instance, and the queue towards the cluster. [`shards`]: where routers run
//!    (threads joined by crossbeam channels, or inline).
//! 3. [`cluster`]: NATS between instances: reliable links, the worker directory, the sans-IO
//!    bridge and its NATS driver.
//! 4. [`edge`]: the gRPC services; one task per stream decodes and hands messages to a shard.
//!    [`auth`]: bearer JWTs.
//! 5. [`server`]: the one entry point, [`server::run`]: gRPC server, health, reflection, drain.
//!    [`config`]: flags. [`shutdown`]: SIGINT/SIGTERM.
//!
//! Beside the server, in crates of their own: `distributor-proto` (the contract, here [`pb`]) and
//! `distributor-sdk` (the peer side), which the `client` and `worker` commands use (`peers`,
//! cargo feature `peers`).

// The server's docs are for those who work on it: they link its private items.
#![allow(rustdoc::private_intra_doc_links)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod core;
pub mod edge;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod listener;
pub mod metrics;
pub mod peer;
#[cfg(feature = "peers")]
pub mod peers;
pub mod server;
pub mod shards;
pub mod shutdown;
pub mod throttle;

/// The wire contract: the crate `distributor-proto`.
pub use distributor_proto as pb;

/// Cases each property test runs: `default`, or `DISTRIBUTOR_PROPTEST_CASES` (`scripts/fuzz.sh`
/// sets it for long runs).
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("DISTRIBUTOR_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
