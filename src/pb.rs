//! The wire messages, generated from `proto/distributor/v1/signaling.proto`, and constructors
//! for the messages peers send, shared by the tests, the load generator and the examples.

#![allow(clippy::all)]
tonic::include_proto!("distributor.v1");

use bytes::Bytes;

/// The metadata that makes a stream resumable: the last `seq` the peer received (see the
/// resume contract in the README).
pub const RESUME_AFTER: &str = "x-resume-after";

/// The encoded descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/distributor_descriptor.bin"));

impl ClientRtcMessage {
    /// A client's message for `worker`.
    pub fn to_worker(worker: i64, event: RtcEvent, payload: impl Into<Bytes>) -> Self {
        ClientRtcMessage {
            worker_machine_id: worker,
            event: event as i32,
            message: payload.into(),
            ..Default::default()
        }
    }
}

impl WorkerRtcMessage {
    /// A worker's registration, its first message.
    pub fn register(worker: i64) -> Self {
        WorkerRtcMessage { worker_machine_id: worker, event: RtcEvent::Blank as i32, ..Default::default() }
    }

    /// A worker's message for `client`.
    pub fn to_client(client: i64, event: RtcEvent, payload: impl Into<Bytes>) -> Self {
        WorkerRtcMessage {
            client_id: client,
            event: event as i32,
            message: payload.into(),
            ..Default::default()
        }
    }
}

/// A peer's message, which it may number (resumable streams; 0: unnumbered).
pub trait Numbered {
    fn seq(&self) -> u64;
}

impl Numbered for ClientRtcMessage {
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl Numbered for WorkerRtcMessage {
    fn seq(&self) -> u64 {
        self.seq
    }
}
