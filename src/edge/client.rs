//! A client's stream: welcome, then relay towards the addressed workers' shards.

use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

use bytes::Bytes;

use super::{Edge, Inbound, Opening, Reader, connected, tunnel};
use crate::auth::Granted;
use crate::cluster::tunnels::Resumption;
use crate::core::{Command, Outbound, PeerId, Role, Signal};
use crate::pb::{ClientRtcMessage, RtcEvent};
use crate::peer::conn::shutting_down;
use crate::peer::resume::Released;
use crate::peer::{Close, Numbering, Peer, PeerReply, Sink};

/// A client's id: its token's, else (open mode) as [`id_from_metadata`] says.
pub fn id(granted: Option<Granted>, metadata: &MetadataMap) -> Result<PeerId, Status> {
    match granted {
        Some(granted) => Ok(granted.id),
        None => id_from_metadata(metadata),
    }
}

/// The client id of an open (no auth) distributor: `x-client-id` if given, else a fresh random
/// one. Random ids are 63-bit, so two instances practically never hand out the same one.
pub fn id_from_metadata(metadata: &MetadataMap) -> Result<PeerId, Status> {
    match metadata.get("x-client-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<PeerId>().ok())
            .filter(|id| *id != 0)
            .ok_or_else(|| Status::invalid_argument("x-client-id must be a non-zero decimal id")),
        None => Ok(loop {
            let id = (rand::random::<u64>() >> 1) as PeerId;
            if id != 0 {
                break id;
            }
        }),
    }
}

pub fn encode(msg: Outbound, numbering: Numbering) -> ClientRtcMessage {
    ClientRtcMessage {
        worker_machine_id: msg.worker,
        event: msg.event as i32,
        message: msg.payload,
        client_id: msg.client,
        error_code: msg.error as i32,
        seq: numbering.seq,
        resumed: numbering.resumed,
    }
}

pub async fn serve(
    edge: Arc<Edge>,
    opening: Opening<ClientRtcMessage>,
    client: PeerId,
    granted: Option<Granted>,
    inbound: impl Inbound<ClientRtcMessage>,
) {
    let shards = &edge.shards;
    // A client that moved here with its sessions (from its holder's answer).
    let mut imported = None;
    let (sink, attachment, resumed) = match opening {
        Opening::Plain(sink) => (sink, None, false),
        Opening::Resumable { after, attachment } => {
            let peers = &edge.clients;
            let held = edge.held_elsewhere(peers, Role::Client, client, after, granted.as_ref(), &inbound);
            let welcome = Outbound::relay(RtcEvent::Blank, 0, client, Bytes::new());
            let attached = match held.await {
                Some(Resumption::Tunnel(tx, rx)) => {
                    return tunnel::front(edge, (tx, rx), attachment, None, inbound).await;
                }
                Some(Resumption::Moved(released)) => {
                    edge.adopt(&edge.clients, client, &attachment, encode, (released, None))
                }
                Some(Resumption::MovedClient(moved)) => {
                    let released = Released { next_seq: moved.first_seq, last_received: moved.last_received };
                    let attached =
                        edge.adopt(&edge.clients, client, &attachment, encode, (released, Some(moved.conn)));
                    imported = Some(moved);
                    attached
                }
                // Only a worker moves with its sessions.
                Some(Resumption::MovedWith(_)) | None => {
                    edge.attach(&edge.clients, client, after, &attachment, welcome, encode)
                }
            };
            if let Some(replaced) = attached.replaced {
                depart(edge.clone(), client, replaced).await;
            }
            (attached.sink, Some(attachment), attached.resumed)
        }
    };
    let gauge = connected(Role::Client);
    gauge.increment(1.0);
    tracing::debug!(client, conn = %sink.id(), resumed, "client connected");
    let reconnect = Outbound::relay(RtcEvent::Reconnect, 0, client, Bytes::new());
    let mut reader =
        Reader::new(&edge, inbound, sink.clone(), attachment.clone(), granted).reconnect_at_age(reconnect);
    let registered = if resumed {
        Ok(())
    } else if let (Some(cluster), Some(moved)) = (&edge.cluster, imported) {
        // Its sessions are its new stream's (and it is registered here) before its claim; what
        // it sent from its old home to workers here comes before what it sends now.
        let readable = cluster.import_client(client, sink.clone(), moved).await;
        readable.await;
        Ok(())
    } else {
        if let Some(cluster) = &edge.cluster {
            cluster.claim(Role::Client, client, sink.id()).await;
        }
        let register = Command::RegisterClient { client, sink: Peer::Local(sink.clone()) };
        shards.send(shards.of_client(client), register).await.map_err(|_| ())
    };
    while registered.is_ok() {
        let Some((msg, admitted)) = reader.message_with_reply().await else { break };
        let worker = msg.worker_machine_id;
        let Some((event, payload, permit)) = edge.triage(admitted, msg.event, msg.message, worker, client)
        else {
            continue;
        };
        let signal = Signal { event, payload, reply: PeerReply::Local(permit) };
        let command = Command::FromClient { client, sink: Peer::Local(sink.clone()), worker, signal };
        if shards.send(shards.of_worker(worker), command).await.is_err() {
            break;
        }
    }
    drop(reader);
    gauge.decrement(1.0);
    let depart = move |edge, sink| depart(edge, client, sink);
    edge.finish(|edge| &edge.clients, client, sink, attachment, depart).await;
}

/// A client stream is gone for good: every shard hears of it after its last message; in a
/// cluster, the other instances hear of it once the last shard is done with it (see
/// `peer::Departure`).
async fn depart(edge: Arc<Edge>, client: PeerId, sink: Sink) {
    let shards = &edge.shards;
    let departure = edge.cluster.as_ref().map(|cluster| cluster.departure(client, sink.id()));
    let gone = || Command::ClientGone { client, conn: sink.id(), departure: departure.clone() };
    if shards.send_all(gone).await.is_err() {
        sink.end(Close::Now(shutting_down()));
    }
    drop(departure);
    tracing::debug!(client, conn = %sink.id(), "client stream ended");
}
