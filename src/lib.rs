//! distributor: a WebRTC signaling relay. Clients and workers hold bidirectional gRPC streams;
//! the distributor relays their SDP offer/answer and ICE candidates and checks the negotiation.
//!
//! Module map, from the wire inwards:
//! - [`server`]: the one entry point, [`server::run`]: gRPC server, health, reflection, drain.
//! - [`edge`]: the gRPC services; one task per stream decodes and hands messages to a shard,
//!   tonic writes each stream's bounded outbound queue.
//! - [`shards`]: N routing threads joined to the edge by crossbeam channels.
//! - [`core`]: the sans-IO routing state each shard owns, and the session state machine.
//! - [`cluster`]: NATS between instances: the bridge task, reliable links, worker lookup.
//! - [`auth`]: bearer JWTs. [`config`]: flags. [`metrics`]: Prometheus names and exporter.
//!   [`shutdown`]: SIGINT/SIGTERM. [`codec`]: the gRPC codec (small per-stream buffers).

pub mod auth;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod core;
pub mod edge;
pub mod metrics;
pub mod server;
pub mod shards;
pub mod shutdown;

/// Generated from `proto/distributor/v1/signaling.proto`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("distributor.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/distributor_descriptor.bin"));
}
