//! The peers: client/worker pairs that negotiate, then relay or handshake, timing every hop.
//!
//! Over 500 lines: the relay, handshake and idle scenarios share the pairs' negotiation, their
//! streams and the run's clock.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use distributor::core::Role;
use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Streaming};

use crate::report::{CpuWindow, Progress, Report, Stats};
use crate::{EchoShape, Load};

/// How long a run waits for in-flight messages after it stops sending.
const DRAIN: Duration = Duration::from_secs(2);
/// How long any step of a negotiation may take before the run fails.
const STEP: Duration = Duration::from_secs(10);

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A payload carrying its send time and a sequence number, padded to `size`.
fn stamped(size: usize, seq: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size.max(16));
    buf.put_u64(now_ns());
    buf.put_u64(seq);
    buf.resize(size.max(16), b'x');
    buf.freeze()
}

fn age_ns(payload: &[u8]) -> Option<u64> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some(now_ns().saturating_sub(sent))
}

/// Shared between the pairs of one run.
struct Run {
    load: Load,
    /// The end of the warm-up: what arrives from then on is counted.
    measure_from: Instant,
    deadline: Instant,
    /// Messages (or handshakes) the run may still start.
    budget: AtomicU64,
    delivered: AtomicU64,
}

impl Run {
    /// Whether the measured window is still open: messages arriving later are not counted.
    fn going(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Whether what arrives now is counted: after the warm-up, before the deadline.
    fn measuring(&self) -> bool {
        let now = Instant::now();
        now >= self.measure_from && now < self.deadline
    }

    /// Counts a delivered message (or handshake) if the window is measuring.
    fn count(&self, count: impl FnOnce()) {
        if self.measuring() {
            count();
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The measured time: the whole window, or until the last message if the budget ran out.
    fn elapsed(&self, started: Instant, stats: &Stats) -> Duration {
        let end = match stats.last {
            Some(last) if self.budget.load(Ordering::Relaxed) == 0 => last.min(self.deadline),
            _ => self.deadline,
        };
        end.saturating_duration_since(started)
    }

    fn take_one(&self) -> bool {
        self.going()
            && self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
    }
}

/// The measured part of a run: from after the set-up and the warm-up to the deadline.
struct Window {
    run: Arc<Run>,
    progress: Progress,
    started: Instant,
    cpu: CpuWindow,
}

impl Window {
    fn open(load: &Load) -> Self {
        let measure_from = Instant::now() + load.warmup;
        let run = Arc::new(Run {
            measure_from,
            deadline: measure_from + load.duration,
            budget: AtomicU64::new(load.max_messages),
            delivered: AtomicU64::new(0),
            load: load.clone(),
        });
        let progress = Progress::start(load, run.deadline, {
            let run = run.clone();
            move || run.delivered.load(Ordering::Relaxed)
        });
        let cpu = CpuWindow::start(load.server_pid, measure_from, run.deadline);
        Window { run, progress, started: measure_from, cpu }
    }

    async fn close(self, scenario: &'static str, stats: Stats) -> Report {
        let elapsed = self.run.elapsed(self.started, &stats);
        let cpu = self.cpu.seconds().await;
        self.progress.finish();
        Report::new(scenario, &self.run.load, stats, elapsed, cpu)
    }
}

/// One TCP (and HTTP/2) connection to `url`, as every scenario opens them.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())?.tcp_nodelay(true);
    endpoint.connect().await.with_context(|| format!("connecting to {url}"))
}

async fn channels(url: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        out.push(connect(url).await?);
    }
    Ok(out)
}

fn token(load: &Load, role: Role, id: i64) -> Option<String> {
    Some(format!("Bearer {}", load.auth.token(role, id).ok()??))
}

fn request<M>(load: &Load, rx: mpsc::Receiver<M>, auth: Option<String>) -> Request<ReceiverStream<M>> {
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(auth) = auth.and_then(|a| a.parse().ok()) {
        request.metadata_mut().insert("authorization", auth);
    }
    if load.resumable {
        request.metadata_mut().insert("x-resume-after", tonic::metadata::MetadataValue::from_static("0"));
    }
    request
}

async fn next<M>(stream: &mut Streaming<M>, what: &str) -> anyhow::Result<M> {
    match tokio::time::timeout(STEP, stream.message()).await {
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => bail!("{what}: the stream ended"),
        Ok(Err(status)) => bail!("{what}: {status}"),
        Err(_) => bail!("{what}: nothing within {STEP:?}"),
    }
}

/// One peer's stream as the load generator holds it: its id, what it sends, what it gets.
struct Side<M> {
    id: i64,
    tx: mpsc::Sender<M>,
    rx: Streaming<M>,
}

type WorkerSide = Side<WorkerRtcMessage>;
type ClientSide = Side<ClientRtcMessage>;

async fn open_worker(load: &Load, channel: Channel, id: i64) -> anyhow::Result<WorkerSide> {
    let (tx, rx) = mpsc::channel(load.window.max(16) * 2);
    tx.send(WorkerRtcMessage::register(id)).await?;
    let auth = token(load, Role::Worker, id);
    let mut rx = WorkerServiceClient::new(channel)
        .negotiate_peer_connection(request(load, rx, auth))
        .await?
        .into_inner();
    let ack = next(&mut rx, "worker registration").await?;
    if ack.event() != RtcEvent::Blank {
        bail!("worker {id}: expected the registration BLANK, got {ack:?}");
    }
    Ok(WorkerSide { id, tx, rx })
}

async fn open_client(load: &Load, channel: Channel, id: i64) -> anyhow::Result<ClientSide> {
    let (tx, rx) = mpsc::channel(load.window.max(16) * 2);
    let auth = token(load, Role::Client, id);
    let mut request = request(load, rx, auth);
    request.metadata_mut().insert("x-client-id", id.to_string().parse()?);
    let mut rx = ClientServiceClient::new(channel).negotiate_peer_connection(request).await?.into_inner();
    if load.echo {
        return Ok(ClientSide { id, tx, rx });
    }
    let welcome = next(&mut rx, "client welcome").await?;
    Ok(ClientSide { id: welcome.client_id, tx, rx })
}

/// How a negotiation ended.
enum Negotiated {
    /// Offer, answer, accept: the offer-to-answer time seen by the client.
    Done(Duration),
    /// The distributor refused the offer (its `ERROR` to the client).
    Refused(ErrorCode),
}

/// Offer, answer, accept; or the distributor's refusal of the offer.
async fn negotiate(c: &mut ClientSide, w: &mut WorkerSide) -> anyhow::Result<Negotiated> {
    let offered = Instant::now();
    c.tx.send(ClientRtcMessage::to_worker(w.id, RtcEvent::Offer, &b"v=0 offer"[..])).await?;
    let offer = tokio::select! {
        offer = next(&mut w.rx, "offer") => offer?,
        refusal = next(&mut c.rx, "offer's refusal") => {
            let refusal = refusal?;
            if refusal.event() != RtcEvent::Error {
                bail!("client {}: expected nothing or ERROR before the OFFER arrived, got {refusal:?}", c.id);
            }
            return Ok(Negotiated::Refused(refusal.error_code()));
        }
    };
    if offer.event() != RtcEvent::Offer {
        bail!("worker {}: expected OFFER, got {offer:?}", w.id);
    }
    w.tx.send(WorkerRtcMessage::to_client(c.id, RtcEvent::Answer, &b"v=0 answer"[..])).await?;
    let answer = next(&mut c.rx, "answer").await?;
    if answer.event() != RtcEvent::Answer {
        bail!("client {}: expected ANSWER, got {answer:?}", c.id);
    }
    let took = offered.elapsed();
    c.tx.send(ClientRtcMessage::to_worker(w.id, RtcEvent::AcceptAnswer, Bytes::new())).await?;
    let accept = next(&mut w.rx, "accept").await?;
    if accept.event() != RtcEvent::AcceptAnswer {
        bail!("worker {}: expected ACCEPT_ANSWER, got {accept:?}", w.id);
    }
    Ok(Negotiated::Done(took))
}

/// Opens every pair: workers first, then clients. An echo run opens only client streams: one
/// per pair, or two in the relay's shape (see `--echo-shape`).
async fn pairs(load: &Load) -> anyhow::Result<(Vec<Option<WorkerSide>>, Vec<ClientSide>)> {
    let per_side = load.per_side();
    let mut workers = Vec::with_capacity(load.pairs);
    let (streams, client_connections) = if !load.echo {
        let worker_channels = channels(load.at.workers(), per_side).await?;
        for i in 0..load.pairs {
            let id = load.first_worker + i as i64;
            workers.push(Some(open_worker(load, worker_channels[i % per_side].clone(), id).await?));
        }
        (load.pairs, per_side)
    } else if load.echo_shape == EchoShape::Relay {
        (2 * load.pairs, 2 * per_side)
    } else {
        (load.pairs, per_side)
    };
    workers.resize_with(streams, || None);
    let client_channels = channels(&load.at.clients_at, client_connections).await?;
    let mut clients = Vec::with_capacity(streams);
    for i in 0..streams {
        let id = load.first_worker + 1_000_000_000 + i as i64;
        clients.push(open_client(load, client_channels[i % client_connections].clone(), id).await?);
    }
    Ok((workers, clients))
}

/// Messages each stream (relay: each pair) keeps in flight: in the echo's relay shape, a pair's
/// window is split between its two streams (at window 1, one of them idles).
fn windows(load: &Load, streams: usize) -> Vec<usize> {
    if !load.echo || load.echo_shape == EchoShape::Pairs {
        return vec![load.window; streams];
    }
    (0..streams).map(|i| if i % 2 == 0 { load.window.div_ceil(2) } else { load.window / 2 }).collect()
}

/// Steady-state relay (or echo): every pair keeps `window` messages circulating.
pub async fn relay(load: Load) -> anyhow::Result<Report> {
    anyhow::ensure!(
        load.window >= 1 && load.size >= 16,
        "--window must be at least 1 and --size at least 16"
    );
    let (workers, mut clients) = pairs(&load).await?;
    let mut handshake_ns = crate::report::histogram();
    let mut workers: Vec<Option<WorkerSide>> = workers;
    if !load.echo {
        for (c, w) in clients.iter_mut().zip(workers.iter_mut()) {
            let w = w.as_mut().expect("a worker per pair");
            match negotiate(c, w).await? {
                Negotiated::Done(took) => handshake_ns.saturating_record(took.as_nanos() as u64),
                Negotiated::Refused(code) => bail!("worker {}: the offer was refused: {code:?}", w.id),
            }
        }
    }
    let window = Window::open(&load);
    let run = window.run.clone();
    let windows = windows(&load, clients.len());
    // With --rate, each sending stream (relay: pair) starts a round trip every `interval`.
    let senders = windows.iter().filter(|w| **w > 0).count();
    let per_round_trip = if load.echo { 1.0 } else { 2.0 };
    let interval =
        (load.rate > 0).then(|| Duration::from_secs_f64(per_round_trip * senders as f64 / load.rate as f64));
    let mut tasks = Vec::new();
    let mut sender = 0;
    for ((c, w), window) in clients.into_iter().zip(workers).zip(windows) {
        let run = run.clone();
        // Senders start spread over one interval.
        let pace = interval.map(|i| (i, i.mul_f64(sender as f64 / senders as f64)));
        sender += usize::from(window > 0);
        tasks.push(tokio::spawn(relay_pair(run, c, w, window, pace)));
    }
    let mut stats = Stats::default();
    for task in tasks {
        stats.merge(task.await??);
    }
    stats.handshake_ns = Some(handshake_ns);
    Ok(window.close(if load.echo { "echo" } else { "relay" }, stats).await)
}

/// One pair (or echo stream) keeping `window` messages in flight; with `pace` (interval,
/// offset), one round trip per interval, starting after the offset so that paced load arrives
/// evenly, not in bursts. The worker side runs as a task of its own, so that a message for one
/// side does not poll the other.
async fn relay_pair(
    run: Arc<Run>,
    mut c: ClientSide,
    w: Option<WorkerSide>,
    window: usize,
    pace: Option<(Duration, Duration)>,
) -> anyhow::Result<Stats> {
    if window == 0 {
        // An idle stream of the echo's relay shape: open for the run, sending nothing.
        tokio::time::sleep_until(run.deadline.into()).await;
        return Ok(Stats::default());
    }
    let size = run.load.size;
    let worker_id = w.as_ref().map_or(0, |w| w.id);
    let client_id = c.id;
    let mut seq = 0u64;
    let interval = pace.map(|(interval, _)| interval);
    let mut next_send = tokio::time::Instant::now() + pace.map_or(Duration::ZERO, |(_, offset)| offset);
    if interval.is_some() {
        tokio::time::sleep_until(next_send).await;
    }
    for _ in 0..window {
        if !run.take_one() {
            break;
        }
        seq += 1;
        c.tx.send(ClientRtcMessage::to_worker(worker_id, RtcEvent::LocalIceCandidate, stamped(size, seq)))
            .await?;
    }
    let worker = w.map(|w| tokio::spawn(echo_back(run.clone(), w, client_id)));
    let mut stats = Stats::default();
    let drained = tokio::time::sleep_until((run.deadline + DRAIN).into());
    tokio::pin!(drained);
    while let Some(msg) = next_until(&mut c.rx, drained.as_mut()).await {
        match msg.event() {
            RtcEvent::IceCandidate | RtcEvent::LocalIceCandidate if run.going() => {
                run.count(|| stats.hop(age_ns(&msg.message)));
            }
            RtcEvent::IceCandidate | RtcEvent::LocalIceCandidate => continue,
            RtcEvent::Error => stats.error(msg.error_code()),
            RtcEvent::PeerGone => break,
            _ => continue,
        }
        // One came back (or was refused): send the next, to keep the window full.
        if let Some(interval) = interval {
            next_send += interval;
            tokio::time::sleep_until(next_send).await;
        }
        if !run.take_one() {
            continue;
        }
        seq += 1;
        if c.tx
            .send(ClientRtcMessage::to_worker(worker_id, RtcEvent::LocalIceCandidate, stamped(size, seq)))
            .await
            .is_err()
        {
            break;
        }
    }
    if let Some(worker) = worker {
        stats.merge(worker.await??);
    }
    Ok(stats)
}

/// The worker of a pair: sends every candidate straight back, re-stamped, so that each way is
/// one relayed message with its own latency.
async fn echo_back(run: Arc<Run>, mut w: WorkerSide, client: i64) -> anyhow::Result<Stats> {
    let mut stats = Stats::default();
    let drained = tokio::time::sleep_until((run.deadline + DRAIN).into());
    tokio::pin!(drained);
    while let Some(msg) = next_until(&mut w.rx, drained.as_mut()).await {
        match msg.event() {
            RtcEvent::IceCandidate => {
                if !run.going() {
                    continue;
                }
                run.count(|| stats.hop(age_ns(&msg.message)));
                let mut payload = BytesMut::from(&msg.message[..]);
                payload[..8].copy_from_slice(&now_ns().to_be_bytes());
                let back = WorkerRtcMessage::to_client(client, RtcEvent::LocalIceCandidate, payload.freeze());
                if w.tx.send(back).await.is_err() {
                    break;
                }
            }
            RtcEvent::Error => stats.error(msg.error_code()),
            RtcEvent::PeerGone => break,
            _ => {}
        }
    }
    Ok(stats)
}

/// The next message, or `None` once the stream ends or fails, or `deadline` passes. One
/// deadline serves a whole run, so no timer is registered per message.
async fn next_until<M>(rx: &mut Streaming<M>, deadline: Pin<&mut tokio::time::Sleep>) -> Option<M> {
    tokio::select! {
        biased;
        msg = rx.message() => msg.ok().flatten(),
        _ = deadline => None,
    }
}

/// Full negotiations, one after another on each pair, each on a new client stream.
pub async fn handshake(load: Load) -> anyhow::Result<Report> {
    anyhow::ensure!(!load.echo, "handshake has no echo ceiling");
    let per_side = load.per_side();
    let client_channels = channels(&load.at.clients_at, per_side).await?;
    let worker_channels = channels(load.at.workers(), per_side).await?;
    let mut workers = Vec::new();
    for i in 0..load.pairs {
        let id = load.first_worker + i as i64;
        workers.push(open_worker(&load, worker_channels[i % per_side].clone(), id).await?);
    }
    let window = Window::open(&load);
    let run = window.run.clone();
    let mut tasks = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let (run, channel) = (run.clone(), client_channels[i % per_side].clone());
        tasks.push(tokio::spawn(async move { handshake_pair(&run, channel, w, i).await }));
    }
    let mut stats = Stats::default();
    for task in tasks {
        stats.merge(task.await??);
    }
    Ok(window.close("handshake", stats).await)
}

async fn handshake_pair(
    run: &Run,
    channel: Channel,
    mut w: WorkerSide,
    index: usize,
) -> anyhow::Result<Stats> {
    let mut stats = Stats { handshake_ns: Some(crate::report::histogram()), ..Stats::default() };
    let mut round = 0i64;
    // With --rate, each pair starts a handshake every `pairs / rate` seconds, spread evenly.
    let load = &run.load;
    let interval = (load.rate > 0).then(|| Duration::from_secs_f64(load.pairs as f64 / load.rate as f64));
    let mut next_start = tokio::time::Instant::now()
        + interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / load.pairs.max(1) as f64));
    while run.take_one() {
        if let Some(interval) = interval {
            tokio::time::sleep_until(next_start).await;
            next_start += interval;
        }
        round += 1;
        let id = run.load.first_worker + 2_000_000_000 + (index as i64) * 1_000_000 + round;
        let mut c = open_client(&run.load, channel.clone(), id).await?;
        let took = match negotiate(&mut c, &mut w).await? {
            Negotiated::Done(took) => took,
            // Refused (the worker's instance cannot be reached, say): counted by code, and the
            // pair tries again with a new client.
            Negotiated::Refused(code) => {
                run.count(|| stats.error(code));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut hops = Vec::with_capacity(2 * run.load.candidates);
        for k in 0..run.load.candidates {
            c.tx.send(ClientRtcMessage::to_worker(
                w.id,
                RtcEvent::LocalIceCandidate,
                stamped(run.load.size, k as u64),
            ))
            .await?;
            w.tx.send(WorkerRtcMessage::to_client(
                c.id,
                RtcEvent::LocalIceCandidate,
                stamped(run.load.size, k as u64),
            ))
            .await?;
        }
        for _ in 0..run.load.candidates {
            let to_w = next(&mut w.rx, "client candidate").await?;
            hops.push(age_ns(&to_w.message));
            let to_c = next(&mut c.rx, "worker candidate").await?;
            hops.push(age_ns(&to_c.message));
        }
        drop(c.tx);
        let gone = next(&mut w.rx, "PEER_GONE").await?;
        if gone.event() != RtcEvent::PeerGone {
            bail!("worker {}: expected PEER_GONE, got {gone:?}", w.id);
        }
        run.count(|| {
            stats.handshakes += 1;
            if let Some(h) = stats.handshake_ns.as_mut() {
                h.saturating_record(took.as_nanos() as u64);
            }
            hops.into_iter().for_each(|age| stats.hop(age));
        });
    }
    Ok(stats)
}

/// Idle peers: what each costs the server in memory, and what idling costs in CPU.
pub async fn idle(load: Load) -> anyhow::Result<()> {
    let pid = load.server_pid.context("idle needs --server-pid")?;
    let rss = || crate::report::rss_kib(pid).context("cannot read the server's memory");
    let before = rss()?;
    let (workers, clients, sockets) = match load.transport {
        crate::Transport::Grpc => {
            let (workers, clients) = pairs(&load).await?;
            (workers, clients, Vec::new())
        }
        crate::Transport::Ws => (Vec::new(), Vec::new(), crate::websocket::idle_pairs(&load).await?),
    };
    let peers = workers.iter().flatten().count() + clients.len() + sockets.len();
    // Let the server settle (allocator caches, HTTP/2 windows) before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected = rss()?;
    let now = Instant::now();
    let cpu = CpuWindow::start(Some(pid), now, now + load.duration);
    tokio::time::sleep(load.duration).await;
    let (cpu, machine) = cpu.seconds().await;
    let per_peer = (connected.saturating_sub(before)) as f64 / peers.max(1) as f64;
    let report = serde_json::json!({
        "scenario": "idle",
        "transport": format!("{:?}", load.transport).to_lowercase(),
        "peers": peers,
        "server_rss_before_mib": before as f64 / 1024.0,
        "server_rss_connected_mib": connected as f64 / 1024.0,
        "server_rss_per_peer_kib": per_peer,
        "idle_seconds": load.duration.as_secs_f64(),
        "server_cpu_seconds": cpu,
        "machine_cpu_seconds": machine,
    });
    if load.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("idle peers          {peers}");
        println!(
            "server RSS          {:.1} MiB before, {:.1} MiB connected",
            before as f64 / 1024.0,
            connected as f64 / 1024.0
        );
        println!("per peer            {per_peer:.1} KiB");
        println!("idle CPU            {:?} s server, {:?} s machine over {:?}", cpu, machine, load.duration);
    }
    drop((workers, clients, sockets));
    Ok(())
}
