//! The `client` and `worker` commands (cargo feature `peers`), peers of the SDK
//! (`distributor-sdk`). `distributor worker` (an echo worker) and `distributor client` (opens a data channel to a
//! worker, checks its echo byte for byte, and reports the time to open, round trips and
//! throughput).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Args;

use crate::core::{PeerId, Role};
use distributor_sdk::{Client, Connection, DataChannel, Error, OpenTimes, Worker};

/// How a peer reaches the distributor.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// Distributor URL; repeat (or separate with commas) for others to move to when one drains.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    pub connect: Vec<String>,
    /// A bearer token for the distributor.
    #[arg(long, env = "DISTRIBUTOR_TOKEN", hide_env_values = true, conflicts_with = "secret")]
    pub token: Option<String>,
    /// The distributor's auth secret: the peer mints its own token (for tests and demos).
    #[arg(long, env = "DISTRIBUTOR_AUTH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The one address the UDP sockets bind and announce [default: every interface address
    /// but loopback and link-local; 127.0.0.1 when there is none].
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// A STUN server (host:port) for a server-reflexive candidate beside the host one.
    #[arg(long)]
    pub stun: Option<SocketAddr>,
}

impl PeerArgs {
    fn token(&self, role: Role, id: PeerId) -> anyhow::Result<Option<String>> {
        match (&self.token, &self.secret) {
            (Some(token), _) => Ok(Some(token.clone())),
            (None, Some(secret)) => {
                let exp = SystemTime::now() + Duration::from_secs(24 * 3600);
                Ok(Some(crate::auth::mint_expiring_at(secret.as_bytes(), role, id, exp)?))
            }
            (None, None) => Ok(None),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The worker's id.
    #[arg(long)]
    pub id: PeerId,
    #[command(flatten)]
    pub peer: PeerArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The worker to open a data channel to.
    #[arg(long)]
    pub worker: PeerId,
    /// The client's id (with --secret, or on a distributor without auth) [default: random].
    #[arg(long)]
    pub id: Option<PeerId>,
    /// Messages to echo (one at a time for round trips, then all at once for throughput).
    #[arg(long, default_value_t = 100)]
    pub messages: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// How long opening the data channel may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub peer: PeerArgs,
}

/// Serves as an echo worker until stopped: every message on every channel comes back.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let mut endpoints = args.peer.connect.iter();
    let mut builder = Worker::builder(endpoints.next().cloned().unwrap_or_default()).id(args.id);
    for url in endpoints {
        builder = builder.endpoint(url.clone());
    }
    if let Some(token) = args.peer.token(Role::Worker, args.id)? {
        builder = builder.token(token);
    }
    if let Some(ip) = args.peer.bind {
        builder = builder.bind(ip);
    }
    if let Some(server) = args.peer.stun {
        builder = builder.stun(server);
    }
    let mut worker = builder.connect().await?;
    eprintln!("worker {} registered; echoing", args.id);
    while let Some(connection) = worker.accept().await {
        eprintln!("client {} opened a data channel in {:?}", connection.peer, connection.times.channel);
        tokio::spawn(echo_all(connection));
    }
    anyhow::bail!("the signaling ended")
}

/// Echoes every channel of one connection.
async fn echo_all(connection: Connection) {
    let (first, mut channels) = connection.split();
    tokio::spawn(echo(first));
    while let Some(channel) = channels.recv().await {
        tokio::spawn(echo(channel));
    }
}

async fn echo(mut channel: DataChannel) {
    while let Some(data) = channel.recv().await {
        if channel.send(data).await.is_err() {
            return;
        }
    }
}

/// What `distributor client` measured.
#[derive(Debug)]
struct Report {
    open: Duration,
    times: OpenTimes,
    rtts: Vec<Duration>,
    throughput_bytes: usize,
    throughput_time: Duration,
}

pub async fn client(args: ClientArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 8, "--size must be at least 8 bytes (each message carries its index)");
    let mut endpoints = args.peer.connect.iter();
    let mut builder =
        Client::builder(endpoints.next().cloned().unwrap_or_default()).open_timeout(args.timeout);
    for url in endpoints {
        builder = builder.endpoint(url.clone());
    }
    let id = args.id.unwrap_or_else(|| rand::random_range(1..i64::MAX));
    match args.peer.token(Role::Client, id)? {
        Some(token) => builder = builder.token(token),
        None => builder = builder.id(id),
    }
    if let Some(ip) = args.peer.bind {
        builder = builder.bind(ip);
    }
    if let Some(server) = args.peer.stun {
        builder = builder.stun(server);
    }
    let started = Instant::now();
    let client = builder.connect().await?;
    let mut connection = client.open(args.worker).await?;
    let open = started.elapsed();
    let channel = &mut connection.channel;

    let mut rtts = Vec::with_capacity(args.messages);
    for i in 0..args.messages {
        let msg = message(i, args.size);
        let sent = Instant::now();
        channel.send(msg.clone()).await?;
        let echoed = channel.recv().await.ok_or(Error::Closed)?;
        rtts.push(sent.elapsed());
        check(i, &msg, &echoed)?;
    }
    let started = Instant::now();
    let sender = channel.sender();
    let (sent, received) = tokio::join!(
        async {
            for i in 0..args.messages {
                sender.send(message(i, args.size)).await?;
            }
            Ok::<_, Error>(())
        },
        async {
            for i in 0..args.messages {
                let echoed = channel.recv().await.ok_or(Error::Closed)?;
                check(i, &message(i, args.size), &echoed)?;
            }
            Ok::<_, anyhow::Error>(())
        }
    );
    sent?;
    received?;
    let report = Report {
        open,
        times: connection.times,
        rtts,
        throughput_bytes: args.messages * args.size,
        throughput_time: started.elapsed(),
    };
    print(&args, report);
    Ok(())
}

/// Message `i`: its index, then a pattern that depends on it.
fn message(i: usize, size: usize) -> Bytes {
    let mut msg = vec![0u8; size];
    msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
    for (j, b) in msg[8..].iter_mut().enumerate() {
        *b = (i.wrapping_mul(31).wrapping_add(j)) as u8;
    }
    Bytes::from(msg)
}

fn check(i: usize, sent: &[u8], echoed: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        sent == echoed,
        "message {i}: the echo differs ({} bytes sent, {} back)",
        sent.len(),
        echoed.len()
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn print(args: &ClientArgs, mut report: Report) {
    report.rtts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99, max) =
        (percentile(&report.rtts, 0.5), percentile(&report.rtts, 0.99), percentile(&report.rtts, 1.0));
    let mib_s = report.throughput_bytes as f64 / report.throughput_time.as_secs_f64() / (1 << 20) as f64;
    let t = report.times;
    if args.json {
        println!(
            "{{\"worker\":{},\"messages\":{},\"size\":{},\"open_ms\":{:.3},\"signaling_ms\":{:.3},\"ice_ms\":{:.3},\"dtls_ms\":{:.3},\"channel_ms\":{:.3},\"rtt_p50_ms\":{:.3},\"rtt_p99_ms\":{:.3},\"rtt_max_ms\":{:.3},\"throughput_mib_s\":{:.2}}}",
            args.worker,
            args.messages,
            args.size,
            ms(report.open),
            ms(t.signaling),
            ms(t.ice),
            ms(t.dtls),
            ms(t.channel),
            ms(p50),
            ms(p99),
            ms(max),
            mib_s
        );
    } else {
        println!(
            "data channel to worker {} open in {:.1} ms (signaling {:.1}, ICE {:.1}, DTLS {:.1}, channel {:.1} ms after the first offer)",
            args.worker,
            ms(report.open),
            ms(t.signaling),
            ms(t.ice),
            ms(t.dtls),
            ms(t.channel)
        );
        println!(
            "{} echoes of {} B, byte for byte: round trip p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            args.messages,
            args.size,
            ms(p50),
            ms(p99),
            ms(max)
        );
        println!("pipelined: {:.1} MiB/s each way", mib_s);
    }
}
