//! A worker and a client negotiate through one or two distributors, printing every message.
//!
//! ```sh
//! cargo run --example negotiate -- --client-at http://127.0.0.1:50051 --worker-at http://127.0.0.1:50052
//! ```
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

#[derive(Parser)]
struct Args {
    /// The distributor the client connects to.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    client_at: String,
    /// The distributor the worker connects to.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    worker_at: String,
    /// The worker's id.
    #[arg(long, default_value_t = 42)]
    worker_id: i64,
    /// ICE candidates each side trickles.
    #[arg(long, default_value_t = 3)]
    candidates: u32,
}

const WAIT: Duration = Duration::from_secs(5);

async fn next<M>(stream: &mut Streaming<M>, who: &str) -> anyhow::Result<M> {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => bail!("{who}: stream ended"),
        Ok(Err(status)) => bail!("{who}: {status}"),
        Err(_) => bail!("{who}: nothing within {WAIT:?}"),
    }
}

fn show_c(start: Instant, msg: &ClientRtcMessage) {
    println!(
        "{:>8.2} ms  client <- {:?} worker={} {:?}",
        start.elapsed().as_secs_f64() * 1e3,
        msg.event(),
        msg.worker_machine_id,
        String::from_utf8_lossy(&msg.message)
    );
}

fn show_w(start: Instant, msg: &WorkerRtcMessage) {
    println!(
        "{:>8.2} ms  worker <- {:?} client={} {:?}",
        start.elapsed().as_secs_f64() * 1e3,
        msg.event(),
        msg.client_id,
        String::from_utf8_lossy(&msg.message)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let w_id = args.worker_id;

    let (w_tx, rx) = mpsc::channel(64);
    w_tx.send(WorkerRtcMessage::register(w_id)).await?;
    let channel = Endpoint::from_shared(args.worker_at.clone())?.connect().await;
    let mut worker =
        WorkerServiceClient::new(channel.with_context(|| format!("connecting to {}", args.worker_at))?);
    let mut w_rx = worker.negotiate_peer_connection(ReceiverStream::new(rx)).await?.into_inner();
    let ack = next(&mut w_rx, "worker").await?;
    show_w(start, &ack);

    let (c_tx, rx) = mpsc::channel(64);
    let channel = Endpoint::from_shared(args.client_at.clone())?.connect().await;
    let mut client =
        ClientServiceClient::new(channel.with_context(|| format!("connecting to {}", args.client_at))?);
    let mut c_rx = client.negotiate_peer_connection(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = next(&mut c_rx, "client").await?;
    show_c(start, &welcome);
    let c_id = welcome.client_id;

    let to_worker = |event: RtcEvent, text: &str| ClientRtcMessage::to_worker(w_id, event, text.to_owned());
    let to_client = |event: RtcEvent, text: &str| WorkerRtcMessage::to_client(c_id, event, text.to_owned());

    c_tx.send(to_worker(RtcEvent::Offer, "v=0 (offer)")).await?;
    show_w(start, &next(&mut w_rx, "worker").await?);
    w_tx.send(to_client(RtcEvent::Answer, "v=0 (answer)")).await?;
    show_c(start, &next(&mut c_rx, "client").await?);
    c_tx.send(to_worker(RtcEvent::AcceptAnswer, "")).await?;
    show_w(start, &next(&mut w_rx, "worker").await?);
    for i in 0..args.candidates {
        c_tx.send(to_worker(RtcEvent::LocalIceCandidate, &format!("candidate:c{i}"))).await?;
        w_tx.send(to_client(RtcEvent::LocalIceCandidate, &format!("candidate:w{i}"))).await?;
        show_w(start, &next(&mut w_rx, "worker").await?);
        show_c(start, &next(&mut c_rx, "client").await?);
    }
    drop(c_tx);
    let gone = next(&mut w_rx, "worker").await?;
    show_w(start, &gone);
    if gone.event() != RtcEvent::PeerGone {
        bail!("expected PEER_GONE after the client left, got {gone:?}");
    }
    println!("negotiated client {c_id} <-> worker {w_id} in {:.2} ms", start.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
