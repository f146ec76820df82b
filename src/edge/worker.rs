//! A worker's stream: registration by its first message, then relay towards its own shard.

use std::sync::Arc;

use tonic::{Status, Streaming};

use super::{Edge, Reader, connected};
use crate::auth::Granted;
use crate::core::{Command, Outbound, PeerId, Role, Signal};
use crate::pb::{RtcEvent, WorkerRtcMessage};
use crate::peer::conn::shutting_down;
use crate::peer::{Close, Peer, PeerReply, Sink};

pub fn encode(msg: Outbound) -> WorkerRtcMessage {
    WorkerRtcMessage {
        worker_machine_id: msg.worker,
        event: msg.event as i32,
        message: msg.payload,
        client_id: msg.client,
        error_code: msg.error as i32,
    }
}

/// Checks the registration: `BLANK` with a non-zero id, matching the token's id in auth mode.
fn registration(first: &WorkerRtcMessage, granted: Option<Granted>) -> Result<PeerId, Status> {
    if first.event != RtcEvent::Blank as i32 || first.worker_machine_id == 0 {
        return Err(Status::invalid_argument(
            "a worker's first message must be BLANK with its non-zero worker_machine_id",
        ));
    }
    let worker = first.worker_machine_id;
    match granted.map(|g| g.id) {
        Some(id) if id != worker => {
            Err(Status::permission_denied(format!("the token is for worker {id}, not {worker}")))
        }
        _ => Ok(worker),
    }
}

pub async fn serve(
    edge: Arc<Edge>,
    sink: Sink,
    granted: Option<Granted>,
    inbound: Streaming<WorkerRtcMessage>,
) {
    let shards = &edge.shards;
    let mut reader = Reader::new(&edge, inbound, sink.clone(), granted);
    let within = edge.limits.register_timeout;
    let first = match tokio::time::timeout(within, reader.message()).await {
        Ok(Some(first)) => first,
        Ok(None) => return,
        Err(_) => {
            let status = Status::invalid_argument(format!("no registration BLANK within {within:?}"));
            return sink.end(Close::Now(status));
        }
    };
    let worker = match registration(&first, granted) {
        Ok(worker) => worker,
        Err(status) => return sink.end(Close::Now(status)),
    };
    let shard = shards.of_worker(worker);
    // In a cluster, the registration is acknowledged only once other instances can find it.
    let _registration = match &edge.cluster {
        Some(cluster) => Some(cluster.register_worker(worker, sink.id()).await),
        None => None,
    };
    let register = Command::RegisterWorker { worker, sink: Peer::Local(sink.clone()) };
    if shards.send(shard, register).await.is_err() {
        return sink.end(Close::Now(shutting_down()));
    }
    let gauge = connected(Role::Worker);
    gauge.increment(1.0);
    tracing::debug!(worker, conn = %sink.id(), "worker registered");
    while let Some((msg, admitted)) = reader.message_with_reply().await {
        if msg.worker_machine_id != 0 && msg.worker_machine_id != worker {
            sink.end(Close::Now(Status::permission_denied(format!(
                "this stream is registered as worker {worker}, not {}",
                msg.worker_machine_id
            ))));
            break;
        }
        let client = msg.client_id;
        let Some((event, payload, permit)) = edge.triage(admitted, msg.event, msg.message, worker, client)
        else {
            continue;
        };
        let signal = Signal { event, payload, reply: PeerReply::Local(permit) };
        let command = Command::FromWorker { worker, conn: sink.id(), client, signal };
        if shards.send(shard, command).await.is_err() {
            break;
        }
    }
    if shards.send(shard, Command::WorkerGone { worker, conn: sink.id() }).await.is_err() {
        sink.end(Close::Now(shutting_down()));
    }
    gauge.decrement(1.0);
    tracing::debug!(worker, conn = %sink.id(), "worker stream ended");
}
