//! The records of the cluster wire that the bridge makes and reads.

use super::super::wire::{self, record::Kind};
use crate::core::{ConnId, InstanceId, Outbound};
use crate::metrics as names;

/// Counts and reports a record this instance cannot act on. Records come only from instances
/// that hold the cluster's key, so this is a version mismatch or a bug, never a peer's doing.
pub(super) fn malformed(from: InstanceId, what: &str) {
    metrics::counter!(names::CLUSTER_REJECTED, "kind" => "record").increment(1);
    crate::warn_throttled!(instance = format!("{from:x}"), "record dropped: {what}");
}

pub(super) fn to_client_record(conn: ConnId, msg: Outbound) -> Kind {
    Kind::ToClient(wire::ToClient {
        client: msg.client,
        conn: Some(wire_conn(conn)),
        worker: msg.worker,
        event: msg.event as i32,
        payload: msg.payload,
        error_code: msg.error as i32,
    })
}

pub(super) fn to_worker_record(msg: Outbound) -> Kind {
    Kind::ToWorker(wire::ToWorker {
        worker: msg.worker,
        client: msg.client,
        event: msg.event as i32,
        payload: msg.payload,
        error_code: msg.error as i32,
    })
}

pub fn wire_conn(conn: ConnId) -> wire::Conn {
    wire::Conn { at: conn.at, instance: conn.instance }
}

pub fn conn_id(conn: wire::Conn) -> ConnId {
    ConnId { at: conn.at, instance: conn.instance }
}
