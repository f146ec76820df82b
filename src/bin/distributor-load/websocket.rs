//! Peers over the WebSocket front (`--transport ws`): one connection each, as browsers open
//! them, speaking the protobuf subprotocol.

use anyhow::Context;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::task::AbortOnDropHandle;

use crate::Load;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `http://host:port` as the WebSocket URL of `path` there.
fn url(base: &str, path: &str) -> String {
    let host = base.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
    format!("ws://{host}{path}")
}

async fn open(
    load: &Load,
    base: &str,
    path: &str,
    role: distributor::core::Role,
    id: i64,
) -> anyhow::Result<Socket> {
    let mut request = url(base, path).into_client_request()?;
    let mut protocols = "distributor.v1.proto".to_owned();
    if let Some(token) = load.auth.token(role, id)? {
        protocols = format!("{protocols}, bearer.{token}");
    }
    request.headers_mut().insert("sec-websocket-protocol", protocols.parse()?);
    let (socket, _) =
        tokio_tungstenite::connect_async(request).await.with_context(|| format!("{path} at {base}"))?;
    Ok(socket)
}

/// The first frame that is not a ping or pong, as a message.
async fn first<M: prost::Message + Default>(socket: &mut Socket) -> anyhow::Result<M> {
    loop {
        match socket.next().await.context("the socket ended")?? {
            Message::Binary(bytes) => return Ok(M::decode(bytes)?),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => anyhow::bail!("expected a binary frame, got {other:?}"),
        }
    }
}

/// Registers `--pairs` workers and connects as many clients, each over a socket of its own,
/// each then read by a task of its own (so that the server's pings are answered) until the
/// returned handles are dropped.
pub async fn idle_pairs(load: &Load) -> anyhow::Result<Vec<AbortOnDropHandle<()>>> {
    use distributor::core::Role;
    let mut sockets = Vec::with_capacity(2 * load.pairs);
    for i in 0..load.pairs {
        let id = load.first_worker + i as i64;
        let mut worker = open(load, load.at.workers(), "/v1/worker", Role::Worker, id).await?;
        worker.send(Message::binary(WorkerRtcMessage::register(id).encode_to_vec())).await?;
        let ack: WorkerRtcMessage = first(&mut worker).await?;
        anyhow::ensure!(ack.event() == RtcEvent::Blank, "worker {id}: {ack:?}");
        sockets.push(worker);
    }
    for i in 0..load.pairs {
        let id = load.first_worker + 1_000_000_000 + i as i64;
        let base = format!("{}?client_id={id}", "/v1/client");
        let mut client = open(load, &load.at.clients_at, &base, Role::Client, id).await?;
        let welcome: ClientRtcMessage = first(&mut client).await?;
        anyhow::ensure!(welcome.event() == RtcEvent::Blank, "client {id}: {welcome:?}");
        sockets.push(client);
    }
    let read = |mut socket: Socket| async move { while let Some(Ok(_)) = socket.next().await {} };
    Ok(sockets.into_iter().map(|socket| AbortOnDropHandle::new(tokio::spawn(read(socket)))).collect())
}
