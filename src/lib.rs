//! distributor: a WebRTC signaling relay. Clients and workers hold bidirectional gRPC streams;
//! the distributor relays their SDP offer/answer and ICE candidates and checks the negotiation.
//!
//! Module map, in layers: a module uses only modules of the layers above its own (checked by
//! `tests/architecture.rs`, which reads this list).
//! 1. [`metrics`]: Prometheus names and exporter. [`throttle`]: log lines outsiders can cause,
//!    throttled. [`shutdown`]: SIGINT/SIGTERM as a future.
//! 2. [`core`]: the sans-IO routing state each shard owns, and the session state machine.
//!    [`listener`]: the accept loop (a connection cap, a pause when out of file descriptors).
//! 3. [`peer`]: peers as the core sees them: a local stream's bounded queue, a client on
//!    another instance, and the queue towards the cluster. [`shards`]: where routers run
//!    (threads joined by crossbeam channels, or inline). [`auth`]: bearer JWTs.
//! 4. [`cluster`]: NATS between instances: reliable links, the worker directory, the sans-IO
//!    bridge and its NATS driver. [`peers`]: the `client` and `worker` commands (cargo feature
//!    `peers`), peers of the SDK.
//! 5. [`config`]: flags, checked before anything binds.
//! 6. [`edge`]: the gRPC services and the WebSocket front, on one port; one task per stream
//!    decodes and hands messages to a shard.
//! 7. [`server`]: the one entry point, [`server::run`]: gRPC server, health, reflection, drain.
//!    [`fuzzing`]: entry points for property tests and cargo-fuzz (cargo feature `fuzzing`).
//!
//! Every layer uses the wire contract, [`pb`]: the crate `distributor-proto`. The peer side is
//! the crate `distributor-sdk`, apart from the server.

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
