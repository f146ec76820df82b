//! The `storm` scenario: `--pairs` workers and as many clients connecting at once, each on a
//! connection of its own, as after a drain or a network blip. Measures how fast the
//! distributor takes them: peers connected per second, and the time from the start of each
//! peer's TCP connect to its welcome (clients) or acknowledgement (workers).

use std::time::Duration;

use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Barrier, mpsc};
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;

use crate::Load;

/// How long one peer may take from its connect to its welcome before it counts as failed.
const WITHIN: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct StormReport {
    scenario: &'static str,
    peers: usize,
    connected: usize,
    failed: usize,
    /// Why peers failed, and how many.
    failures: std::collections::BTreeMap<String, usize>,
    /// From the first connect to the last welcome.
    seconds: f64,
    peers_per_sec: f64,
    connect_to_welcome_p50_ms: f64,
    connect_to_welcome_p99_ms: f64,
    connect_to_welcome_max_ms: f64,
    server_peak_rss_mib: Option<f64>,
}

/// What one peer holds open until the storm is over.
#[expect(dead_code, reason = "held open, never read")]
enum Held {
    Worker(mpsc::Sender<WorkerRtcMessage>, tonic::Streaming<WorkerRtcMessage>),
    Client(mpsc::Sender<ClientRtcMessage>, tonic::Streaming<ClientRtcMessage>),
}

async fn connect(load: &Load, worker: bool, id: i64) -> anyhow::Result<Held> {
    let url = if worker { load.at.workers() } else { &load.at.clients_at };
    let channel = crate::peers::connect(url).await?;
    if worker {
        let (tx, rx) = mpsc::channel(4);
        tx.send(WorkerRtcMessage::register(id)).await?;
        let mut rx = WorkerServiceClient::new(channel)
            .negotiate_peer_connection(Request::new(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        let ack = rx.message().await?.ok_or_else(|| anyhow::anyhow!("ended before the acknowledgement"))?;
        anyhow::ensure!(ack.event() == RtcEvent::Blank, "expected the acknowledgement, got {ack:?}");
        Ok(Held::Worker(tx, rx))
    } else {
        let (tx, rx) = mpsc::channel(4);
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("x-client-id", id.to_string().parse()?);
        let mut rx = ClientServiceClient::new(channel).negotiate_peer_connection(request).await?.into_inner();
        let welcome = rx.message().await?.ok_or_else(|| anyhow::anyhow!("ended before the welcome"))?;
        anyhow::ensure!(welcome.event() == RtcEvent::Blank, "expected the welcome, got {welcome:?}");
        Ok(Held::Client(tx, rx))
    }
}

pub async fn run(load: Load) -> anyhow::Result<()> {
    let peers = 2 * load.pairs;
    let barrier = std::sync::Arc::new(Barrier::new(peers + 1));
    let load = std::sync::Arc::new(load);
    let mut tasks = Vec::with_capacity(peers);
    for i in 0..peers {
        let (load, barrier) = (load.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let worker = i % 2 == 0;
            let id = load.first_worker + (i / 2) as i64 + if worker { 0 } else { 1_000_000_000 };
            barrier.wait().await;
            let started = Instant::now();
            let held = timeout(WITHIN, connect(&load, worker, id)).await;
            let took = started.elapsed();
            (held.map_err(|_| anyhow::anyhow!("no welcome within {WITHIN:?}")).and_then(|h| h), took)
        }));
    }
    // Everyone is ready: go.
    barrier.wait().await;
    let start = Instant::now();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let (mut held, mut failures) = (Vec::with_capacity(peers), std::collections::BTreeMap::new());
    let mut last = start;
    for task in tasks {
        let (outcome, took) = task.await?;
        match outcome {
            Ok(h) => {
                latency.saturating_record(took.as_micros() as u64);
                last = last.max(start + took);
                held.push(h);
            }
            Err(e) => *failures.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let seconds = last.saturating_duration_since(start).as_secs_f64();
    let report = StormReport {
        scenario: "storm",
        peers,
        connected: held.len(),
        failed: peers - held.len(),
        failures,
        seconds,
        peers_per_sec: held.len() as f64 / seconds.max(1e-9),
        connect_to_welcome_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        connect_to_welcome_p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        connect_to_welcome_max_ms: latency.max() as f64 / 1000.0,
        server_peak_rss_mib: load.server_pid.and_then(crate::report::peak_rss_mib),
    };
    if load.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "storm: {} of {} peers connected in {:.2} s ({:.0}/s), {} failed {:?}; connect to welcome \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            report.connected,
            report.peers,
            report.seconds,
            report.peers_per_sec,
            report.failed,
            report.failures,
            report.connect_to_welcome_p50_ms,
            report.connect_to_welcome_p99_ms,
            report.connect_to_welcome_max_ms
        );
    }
    drop(held);
    Ok(())
}
