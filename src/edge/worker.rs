//! A worker's stream: registration by its first message, then relay towards its own shard.

use std::sync::Arc;

use tonic::{Status, Streaming};

use super::conn::{Close, Sink};
use super::{Edge, connected, read_failed, reply};
use crate::core::{Command, Outbound, PeerId, Role};
use crate::pb::{RtcEvent, WorkerRtcMessage};

pub fn encode(msg: Outbound) -> WorkerRtcMessage {
    WorkerRtcMessage {
        worker_machine_id: msg.worker,
        event: msg.event as i32,
        message: msg.payload,
        client_id: msg.client,
        error_code: msg.error as i32,
    }
}

/// Reads the registration: `BLANK` with a non-zero id, matching the token's id in auth mode.
async fn registration(
    inbound: &mut Streaming<WorkerRtcMessage>,
    granted: Option<PeerId>,
) -> Result<PeerId, Close> {
    let first = match inbound.message().await {
        Ok(Some(first)) => first,
        Ok(None) => return Err(Close::Drain(None)),
        Err(status) => return Err(read_failed(status)),
    };
    if first.event != RtcEvent::Blank as i32 || first.worker_machine_id == 0 {
        return Err(Close::Now(Status::invalid_argument(
            "a worker's first message must be BLANK with its non-zero worker_machine_id",
        )));
    }
    let worker = first.worker_machine_id;
    match granted {
        Some(id) if id != worker => {
            Err(Close::Now(Status::permission_denied(format!("the token is for worker {id}, not {worker}"))))
        }
        _ => Ok(worker),
    }
}

pub async fn serve(
    edge: Arc<Edge>,
    sink: Sink,
    granted: Option<PeerId>,
    mut inbound: Streaming<WorkerRtcMessage>,
) {
    let shards = &edge.shards;
    let closing = sink.closing();
    tokio::pin!(closing);
    let registered = tokio::select! {
        biased;
        _ = &mut closing => return,
        registered = registration(&mut inbound, granted) => registered,
    };
    let worker = match registered {
        Ok(worker) => worker,
        Err(how) => return sink.end(how),
    };
    let shard = shards.of_worker(worker);
    if shards.send(shard, Command::RegisterWorker { worker, sink: sink.clone() }).await.is_err() {
        return sink.end(Close::Now(Status::unavailable("the distributor is shutting down")));
    }
    let gauge = connected(Role::Worker);
    gauge.increment(1.0);
    tracing::debug!(worker, conn = sink.id().0, "worker registered");
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut closing => break,
            next = inbound.message() => next,
        };
        let msg = match next {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                sink.end(Close::Drain(None));
                break;
            }
            Err(status) => {
                sink.end(read_failed(status));
                break;
            }
        };
        if msg.worker_machine_id != 0 && msg.worker_machine_id != worker {
            sink.end(Close::Now(Status::permission_denied(format!(
                "this stream is registered as worker {worker}, not {}",
                msg.worker_machine_id
            ))));
            break;
        }
        let client = msg.client_id;
        let event = match edge.check(msg.event, &msg.message) {
            Ok(event) => event,
            Err((code, reason)) => {
                reply(&sink, Outbound::error(code, worker, client, reason));
                continue;
            }
        };
        if event == RtcEvent::Ping {
            reply(&sink, Outbound::relay(RtcEvent::Ping, worker, client, msg.message));
            continue;
        }
        let command = Command::FromWorker { worker, sink: sink.clone(), client, event, payload: msg.message };
        if shards.send(shard, command).await.is_err() {
            break;
        }
    }
    if shards.send(shard, Command::WorkerGone { worker, conn: sink.id() }).await.is_err() {
        sink.end(Close::Now(Status::unavailable("the distributor is shutting down")));
    }
    gauge.decrement(1.0);
    tracing::debug!(worker, conn = sink.id().0, "worker stream ended");
}
