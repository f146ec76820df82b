//! A worker's stream: registration by its first message, then relay towards its own shard.

use std::sync::Arc;

use tonic::Status;

use bytes::Bytes;

use super::{Edge, Inbound, Opening, Reader, connected, tunnel};
use crate::auth::Granted;
use crate::cluster::tunnels::Resumption;
use crate::core::{Command, Outbound, PeerId, Role, Signal};
use crate::pb::{RtcEvent, WorkerRtcMessage};
use crate::peer::conn::shutting_down;
use crate::peer::resume::Released;
use crate::peer::{Close, Numbering, Peer, PeerReply, Sink};

pub fn encode(msg: Outbound, numbering: Numbering) -> WorkerRtcMessage {
    WorkerRtcMessage {
        worker_machine_id: msg.worker,
        event: msg.event as i32,
        message: msg.payload,
        client_id: msg.client,
        error_code: msg.error as i32,
        seq: numbering.seq,
        resumed: numbering.resumed,
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
    opening: Opening<WorkerRtcMessage>,
    granted: Option<Granted>,
    inbound: impl Inbound<WorkerRtcMessage>,
) {
    let mut inbound = Some(inbound);
    let within = edge.limits.register_timeout;
    // The registration, read before the peer is known (a resumable worker is known by it).
    let (first, plain_reader) = match &opening {
        Opening::Plain(sink) => {
            let inbound = inbound.take().expect("not read yet");
            let mut reader = Reader::new(&edge, inbound, sink.clone(), None, granted);
            let first = match tokio::time::timeout(within, reader.message()).await {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(_) => return sink.end(Close::Now(no_registration(within))),
            };
            (first, Some(reader))
        }
        Opening::Resumable { attachment, .. } => {
            let raw = inbound.as_mut().expect("not read yet");
            let first = tokio::select! {
                first = tokio::time::timeout(within, raw.message()) => first,
                _ = attachment.ended() => return,
            };
            let first = match first {
                Ok(Ok(Some(first))) => first,
                Ok(Ok(None)) => return attachment.end(None),
                Ok(Err(status)) => return attachment.end(Some(status)),
                Err(_) => return attachment.end(Some(no_registration(within))),
            };
            (first, None)
        }
    };
    let worker = match registration(&first, granted) {
        Ok(worker) => worker,
        Err(status) => {
            return match &opening {
                Opening::Plain(sink) => sink.end(Close::Now(status)),
                Opening::Resumable { attachment, .. } => attachment.end(Some(status)),
            };
        }
    };
    // A worker that moved here with its sessions (from its holder's answer).
    let mut imported = None;
    let (sink, mut reader, attachment, resumed) = match opening {
        Opening::Plain(sink) => (sink, plain_reader.expect("read the registration"), None, false),
        Opening::Resumable { after, attachment } => {
            let (peers, raw) = (&edge.workers, inbound.as_ref().expect("read only the registration"));
            let held = edge.held_elsewhere(peers, Role::Worker, worker, after, granted.as_ref(), raw);
            let welcome = Outbound::relay(RtcEvent::Blank, worker, 0, Bytes::new());
            let attached = match held.await {
                Some(Resumption::Tunnel(tx, rx)) => {
                    let inbound = inbound.take().expect("read only the registration");
                    return tunnel::front(edge, (tx, rx), attachment, Some(first), inbound).await;
                }
                Some(Resumption::Moved(released)) => {
                    edge.adopt(&edge.workers, worker, &attachment, encode, (released, None))
                }
                Some(Resumption::MovedWith(moved)) => {
                    let released = Released { next_seq: moved.first_seq, last_received: moved.last_received };
                    let attached = edge.adopt(&edge.workers, worker, &attachment, encode, (released, None));
                    imported = Some(moved);
                    attached
                }
                // Only a client moves with its stream's id.
                Some(Resumption::MovedClient(_)) | None => {
                    edge.attach(&edge.workers, worker, after, &attachment, welcome, encode)
                }
            };
            if let Some(replaced) = attached.replaced {
                depart(edge.clone(), worker, replaced).await;
            }
            attached.sink.received(first.seq);
            let inbound = inbound.take().expect("read only the registration");
            let reader =
                Reader::new(&edge, inbound, attached.sink.clone(), Some(attachment.clone()), granted);
            (attached.sink, reader, Some(attachment), attached.resumed)
        }
    };
    let shards = &edge.shards;
    let shard = shards.of_worker(worker);
    if !resumed {
        // In a cluster, the registration is acknowledged only once other instances can find
        // it; it is held as long as the worker is (a resumable one's across its streams).
        // A moved worker's sessions are in its shard before its claim tells other instances.
        if let (Some(cluster), Some(moved)) = (&edge.cluster, imported) {
            let from = moved.from;
            cluster.import_worker(worker, sink.clone(), moved).await;
            let registration = cluster.register_worker(worker, sink.id(), Some(from)).await;
            edge.keep(&sink, registration);
        } else {
            if let Some(cluster) = &edge.cluster {
                let registration = cluster.register_worker(worker, sink.id(), None).await;
                edge.keep(&sink, registration);
            }
            let register = Command::RegisterWorker { worker, sink: Peer::Local(sink.clone()) };
            if shards.send(shard, register).await.is_err() {
                return sink.end(Close::Now(shutting_down()));
            }
        }
    }
    let gauge = connected(Role::Worker);
    gauge.increment(1.0);
    tracing::debug!(worker, conn = %sink.id(), resumed, "worker registered");
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
    drop(reader);
    gauge.decrement(1.0);
    let depart = move |edge, sink| depart(edge, worker, sink);
    edge.finish(|edge| &edge.workers, worker, sink, attachment, depart).await;
}

fn no_registration(within: std::time::Duration) -> Status {
    Status::invalid_argument(format!("no registration BLANK within {within:?}"))
}

/// A worker stream is gone for good: its shard ends its sessions.
pub(super) async fn depart(edge: Arc<Edge>, worker: PeerId, sink: Sink) {
    let shards = &edge.shards;
    if shards.send(shards.of_worker(worker), Command::WorkerGone { worker, conn: sink.id() }).await.is_err() {
        sink.end(Close::Now(shutting_down()));
    }
    edge.unkeep(&sink);
    tracing::debug!(worker, conn = %sink.id(), "worker stream ended");
}
