//! The `chaos` scenario: pairs that keep relaying across the instances of a cluster while it is
//! hurt (instances and NATS nodes killed, restarted, drained), and an exact tally of what
//! became of every message.
//!
//! Each pair is a worker on one instance and a client on another. It negotiates, then relays
//! candidates one at a time, client to worker and back (window 1 each way), so that whatever
//! comes back (the delivery, an `ERROR`, a `PEER_GONE`, the end of a stream) is about the one
//! message outstanding. Both ends live in this process, so a message is known to be delivered
//! when its receiver read it, whatever the sender heard. Every message sent ends in exactly one
//! of: delivered; refused (an `ERROR`, by code); ended by `PEER_GONE` (its session ended before
//! it arrived); cut (the sender's or receiver's own stream ended, as an instance died or
//! drained: the peer sees that and reconnects); lost: nothing at all within `--max-silence`
//! while both streams stayed open. Lost must be 0. A message delivered twice or out of order
//! counts as duplicated (must be 0 too). After any of the last four, the pair reconnects (to
//! the next instances in turn) and negotiates again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use distributor::core::Role;
use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Streaming};

/// What a chaos run drives.
#[derive(Args, Clone, Debug)]
pub struct ChaosLoad {
    /// The instances, comma-separated URLs; each pair's worker and client are on different ones.
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<String>,
    /// Client/worker pairs.
    #[arg(long, default_value_t = 60)]
    pub pairs: usize,
    /// How long the pairs relay; then they finish what is outstanding and the tally is printed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Payload bytes per candidate.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Pause between a pair's round trips (0: as fast as they go).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// A message with no outcome for this long, while both streams are open, is lost.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub max_silence: Duration,
    #[command(flatten)]
    pub auth: crate::Auth,
    /// First worker id; clients are numbered from it plus 1,000,000,000.
    #[arg(long, default_value_t = 5_000_000)]
    pub first_worker: i64,
    /// Print the tally as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What became of every message sent.
#[derive(Default, Debug, Serialize)]
pub struct Tally {
    pub sent: u64,
    pub delivered: u64,
    pub refused: BTreeMap<String, u64>,
    pub peer_gone: u64,
    pub cut: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Negotiations completed, and tries that failed before completing (an instance down).
    pub negotiations: u64,
    pub negotiations_failed: u64,
    /// Why streams ended under the pairs (gRPC status codes), and how often.
    pub stream_ends: BTreeMap<String, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        for (code, n) in other.refused {
            *self.refused.entry(code).or_default() += n;
        }
        self.peer_gone += other.peer_gone;
        self.cut += other.cut;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.negotiations += other.negotiations;
        self.negotiations_failed += other.negotiations_failed;
        for (code, n) in other.stream_ends {
            *self.stream_ends.entry(code).or_default() += n;
        }
    }

    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Every message sent is accounted for once.
    pub fn balances(&self) -> bool {
        self.sent == self.delivered + self.refused_total() + self.peer_gone + self.cut + self.lost
    }
}

pub async fn run(load: ChaosLoad) -> anyhow::Result<()> {
    anyhow::ensure!(load.targets.len() >= 2, "--targets needs at least two instances");
    anyhow::ensure!(load.size >= 16, "--size must be at least 16");
    let load = Arc::new(load);
    let deadline = Instant::now() + load.duration;
    let tasks: Vec<_> = (0..load.pairs).map(|i| tokio::spawn(pair(load.clone(), i, deadline))).collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await?);
    }
    let balances = tally.balances();
    if load.json {
        let mut value = serde_json::to_value(&tally)?;
        value["balances"] = balances.into();
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!(
            "chaos: sent {} delivered {} refused {} {:?} peer_gone {} cut {} lost {} duplicated {} \
             negotiations {} (failed tries {}) stream ends {:?} balances {balances}",
            tally.sent,
            tally.delivered,
            tally.refused_total(),
            tally.refused,
            tally.peer_gone,
            tally.cut,
            tally.lost,
            tally.duplicated,
            tally.negotiations,
            tally.negotiations_failed,
            tally.stream_ends,
        );
    }
    Ok(())
}

/// One peer's stream.
struct Side<M> {
    tx: mpsc::Sender<M>,
    rx: Streaming<M>,
}

/// What one message in flight is: which way, and its number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    ToWorker,
    ToClient,
}

impl Way {
    /// The side such a message goes to.
    fn side(self) -> &'static str {
        match self {
            Way::ToWorker => "worker",
            Way::ToClient => "client",
        }
    }
}

/// How a round of a pair ended.
enum End {
    /// The run is over and nothing is outstanding.
    Done,
    /// The pair must reconnect.
    Again,
}

async fn pair(load: Arc<ChaosLoad>, index: usize, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let worker = load.first_worker + index as i64;
    let client = worker + 1_000_000_000;
    let mut seq = 0u64;
    for attempt in 0usize.. {
        if Instant::now() >= deadline {
            break;
        }
        let n = load.targets.len();
        let (w_at, c_at) = (&load.targets[(index + attempt) % n], &load.targets[(index + attempt + 1) % n]);
        let Some((mut w, mut c)) = connect(&load, w_at, c_at, worker, client, &mut tally).await else {
            tally.negotiations_failed += 1;
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        tally.negotiations += 1;
        match relay(&load, deadline, worker, client, &mut w, &mut c, &mut seq, &mut tally).await {
            End::Done => break,
            End::Again => sleep(Duration::from_millis(50)).await,
        }
    }
    tally
}

/// A connection to `url`, if one opens within 2 s (an instance may be down).
async fn channel(url: &str) -> Option<Channel> {
    timeout(Duration::from_secs(2), crate::peers::connect(url)).await.ok()?.ok()
}

fn request<M>(load: &ChaosLoad, rx: mpsc::Receiver<M>, role: Role, id: i64) -> Request<ReceiverStream<M>> {
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Ok(Some(token)) = load.auth.token(role, id)
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    if role == Role::Client
        && let Ok(value) = id.to_string().parse()
    {
        request.metadata_mut().insert("x-client-id", value);
    }
    request
}

async fn next<M>(side: &mut Side<M>) -> Option<M> {
    timeout(Duration::from_secs(5), side.rx.message()).await.ok()?.ok()?
}

/// Opens the worker at `w_at` and the client at `c_at`, and negotiates.
async fn connect(
    load: &ChaosLoad,
    w_at: &str,
    c_at: &str,
    worker: i64,
    client: i64,
    tally: &mut Tally,
) -> Option<(Side<WorkerRtcMessage>, Side<ClientRtcMessage>)> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(WorkerRtcMessage::register(worker)).await.ok()?;
    let mut service = WorkerServiceClient::new(channel(w_at).await?);
    let stream = service.negotiate_peer_connection(request(load, rx, Role::Worker, worker));
    let mut w = Side { tx, rx: timeout(Duration::from_secs(5), stream).await.ok()?.ok()?.into_inner() };
    (next(&mut w).await?.event() == RtcEvent::Blank).then_some(())?;
    let (tx, rx) = mpsc::channel(16);
    let mut service = ClientServiceClient::new(channel(c_at).await?);
    let stream = service.negotiate_peer_connection(request(load, rx, Role::Client, client));
    let mut c = Side { tx, rx: timeout(Duration::from_secs(5), stream).await.ok()?.ok()?.into_inner() };
    (next(&mut c).await?.event() == RtcEvent::Blank).then_some(())?;
    // A worker that registered a moment ago elsewhere may take up to 2 s to be found.
    c.tx.send(ClientRtcMessage::to_worker(worker, RtcEvent::Offer, &b"v=0 offer"[..])).await.ok()?;
    let offer = next(&mut w).await?;
    if offer.event() != RtcEvent::Offer {
        *tally.stream_ends.entry(format!("negotiation: worker got {:?}", offer.event())).or_default() += 1;
        return None;
    }
    w.tx.send(WorkerRtcMessage::to_client(client, RtcEvent::Answer, &b"v=0 answer"[..])).await.ok()?;
    (next(&mut c).await?.event() == RtcEvent::Answer).then_some(())?;
    c.tx.send(ClientRtcMessage::to_worker(worker, RtcEvent::AcceptAnswer, Bytes::new())).await.ok()?;
    (next(&mut w).await?.event() == RtcEvent::AcceptAnswer).then_some(())?;
    Some((w, c))
}

fn numbered(size: usize, seq: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64(seq);
    buf.resize(size, b'x');
    buf.freeze()
}

fn number(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// What one of the two streams said.
enum Heard {
    Message(Got),
    /// The stream ended (how, as a gRPC code).
    Ended(String),
}

/// A message received, whichever side's.
struct Got {
    event: RtcEvent,
    number: Option<u64>,
    code: String,
}

fn got(event: RtcEvent, payload: &[u8], code: distributor::pb::ErrorCode) -> Got {
    Got { event, number: number(payload), code: code.as_str_name().into() }
}

async fn hear<M>(side: &mut Side<M>, read: impl FnOnce(M) -> Got) -> Heard {
    match side.rx.message().await {
        Ok(Some(msg)) => Heard::Message(read(msg)),
        Ok(None) => Heard::Ended("OK".into()),
        Err(status) => Heard::Ended(format!("{:?}", status.code())),
    }
}

/// Whether the message outstanding (`way`, `number`) reached its receiver after all: read from
/// the receiver's stream what already arrived (a short wait: it was sent before the end that
/// was just heard of).
async fn arrived(
    way: Way,
    number_out: u64,
    w: &mut Side<WorkerRtcMessage>,
    c: &mut Side<ClientRtcMessage>,
) -> bool {
    let until = Instant::now() + Duration::from_millis(200);
    loop {
        let got = match way {
            Way::ToWorker => timeout_at_message(until, w).await.map(|m| (m.event(), number(&m.message))),
            Way::ToClient => timeout_at_message(until, c).await.map(|m| (m.event(), number(&m.message))),
        };
        match got {
            Some((RtcEvent::IceCandidate, n)) if n == Some(number_out) => return true,
            Some(_) => continue,
            None => return false,
        }
    }
}

async fn timeout_at_message<M>(until: Instant, side: &mut Side<M>) -> Option<M> {
    tokio::time::timeout_at(until, side.rx.message()).await.ok()?.ok()?
}

/// Counts the outstanding message as delivered, or as `otherwise` says.
fn settle(delivered: bool, tally: &mut Tally, otherwise: impl FnOnce(&mut Tally)) {
    if delivered {
        tally.delivered += 1;
    } else {
        otherwise(tally);
    }
}

/// Relays one candidate at a time, each way in turn, until the run is over or the pair must
/// reconnect; accounts for every message sent.
#[allow(clippy::too_many_arguments)]
async fn relay(
    load: &ChaosLoad,
    deadline: Instant,
    worker: i64,
    client: i64,
    w: &mut Side<WorkerRtcMessage>,
    c: &mut Side<ClientRtcMessage>,
    seq: &mut u64,
    tally: &mut Tally,
) -> End {
    // The one message in flight, and the time by which something must be heard of it.
    let mut outstanding: Option<(Way, u64)> = None;
    let mut silent_by = Instant::now() + load.max_silence;
    loop {
        if outstanding.is_none() {
            if Instant::now() >= deadline {
                return End::Done;
            }
            if !load.pause.is_zero() {
                sleep(load.pause).await;
            }
            *seq += 1;
            let msg =
                ClientRtcMessage::to_worker(worker, RtcEvent::LocalIceCandidate, numbered(load.size, *seq));
            tally.sent += 1;
            outstanding = Some((Way::ToWorker, *seq));
            silent_by = Instant::now() + load.max_silence;
            if c.tx.send(msg).await.is_err() {
                *tally.stream_ends.entry("client (on sending)".into()).or_default() += 1;
                tally.cut += 1;
                return End::Again;
            }
        }
        let (way, number_out) = outstanding.expect("just set");
        // `at`: who heard something, named by the way a message to it goes.
        let (at, heard) = tokio::select! {
            heard = hear(w, |m: WorkerRtcMessage| got(m.event(), &m.message, m.error_code())) => (Way::ToWorker, heard),
            heard = hear(c, |m: ClientRtcMessage| got(m.event(), &m.message, m.error_code())) => (Way::ToClient, heard),
            _ = sleep_until(silent_by) => {
                tally.lost += 1;
                eprintln!("lost: pair {worker}/{client}, message {number_out} {way:?}: nothing heard within {:?}", load.max_silence);
                return End::Again;
            }
        };
        match heard {
            Heard::Message(got) => match got.event {
                RtcEvent::IceCandidate => {
                    if way != at || got.number != Some(number_out) {
                        tally.duplicated += 1;
                        continue;
                    }
                    tally.delivered += 1;
                    outstanding = None;
                    if at == Way::ToWorker {
                        // The worker answers with a candidate of the same number.
                        tally.sent += 1;
                        outstanding = Some((Way::ToClient, number_out));
                        silent_by = Instant::now() + load.max_silence;
                        let back = numbered(load.size, number_out);
                        if w.tx
                            .send(WorkerRtcMessage::to_client(client, RtcEvent::LocalIceCandidate, back))
                            .await
                            .is_err()
                        {
                            *tally.stream_ends.entry("worker (on sending)".into()).or_default() += 1;
                            tally.cut += 1;
                            return End::Again;
                        }
                    }
                }
                // A refusal reaches the sender: the side the message did not go to.
                RtcEvent::Error if way != at => {
                    *tally.refused.entry(got.code).or_default() += 1;
                    outstanding = None;
                }
                RtcEvent::PeerGone => {
                    settle(arrived(way, number_out, w, c).await, tally, |t| t.peer_gone += 1);
                    return End::Again;
                }
                other => {
                    *tally
                        .stream_ends
                        .entry(format!("unexpected {other:?} to the {}", at.side()))
                        .or_default() += 1
                }
            },
            Heard::Ended(code) => {
                *tally.stream_ends.entry(format!("{} {code}", at.side())).or_default() += 1;
                // The other side's stream may still hold the message.
                settle(way != at && arrived(way, number_out, w, c).await, tally, |t| t.cut += 1);
                return End::Again;
            }
        }
    }
}
