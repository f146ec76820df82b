//! `datachannel`: real WebRTC data channels through the distributor, with the SDK.
//!
//! Three measurements, each beside its baseline from the same run:
//! - the time to open, over `--opens` sequential opens through the distributor, against as many
//!   opens between the same SDK peers signaling directly in-process (`distributor_sdk::pair_in_process`);
//! - opens per second with `--concurrent` clients opening at once, each with its own signaling
//!   connection and peer connection, to `--workers` workers;
//! - one channel's throughput (`--throughput-mib`), through the SDK against str0m driven
//!   bare in one loop with the same send buffer (its ceiling on this machine).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use distributor::core::Role;
use distributor_sdk::{self as sdk, Client, Worker};
use serde::Serialize;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const OPEN_WITHIN: Duration = Duration::from_secs(30);

#[derive(Args, Clone, Debug)]
pub struct DataChannelLoad {
    #[command(flatten)]
    pub at: crate::Instances,
    #[command(flatten)]
    pub auth: crate::Auth,
    /// Sequential opens through the distributor, then as many directly (0: skip).
    #[arg(long, default_value_t = 200)]
    pub opens: usize,
    /// Clients opening at once, each on its own connection (0: skip).
    #[arg(long, default_value_t = 0)]
    pub concurrent: usize,
    /// Workers the concurrent clients spread over.
    #[arg(long, default_value_t = 10)]
    pub workers: usize,
    /// MiB sent one way over one channel, through the SDK and through bare str0m (0: skip).
    #[arg(long, default_value_t = 0)]
    pub throughput_mib: usize,
    /// Bytes per message of the throughput run.
    #[arg(long, default_value_t = 16 * 1024)]
    pub message_size: usize,
    /// First worker id.
    #[arg(long, default_value_t = 2_000_000)]
    pub first_worker: i64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Default, Debug)]
struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    sequential: Option<Sequential>,
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrent: Option<Concurrent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    throughput: Option<Throughput>,
}

#[derive(Serialize, Debug)]
struct Sequential {
    opens: usize,
    relayed_p50_ms: f64,
    relayed_p99_ms: f64,
    direct_p50_ms: f64,
    direct_p99_ms: f64,
    /// relayed p50 / direct p50.
    ratio_p50: f64,
    /// Whether relayed p50 and p99 are within 1.1 x direct + 2 ms.
    within_target: bool,
}

#[derive(Serialize, Debug)]
struct Concurrent {
    clients: usize,
    workers: usize,
    opened: usize,
    failed: usize,
    opens_per_s: f64,
    open_p50_ms: f64,
    open_p99_ms: f64,
    open_max_ms: f64,
}

#[derive(Serialize, Debug)]
struct Throughput {
    mib: usize,
    message_bytes: usize,
    sdk_mib_s: f64,
    str0m_mib_s: f64,
    /// sdk / str0m.
    ratio: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

impl DataChannelLoad {
    async fn worker(&self, id: i64) -> anyhow::Result<Worker> {
        let mut builder = Worker::builder(self.at.workers()).id(id).bind(LOOPBACK);
        if let Some(token) = self.auth.token(Role::Worker, id)? {
            builder = builder.token(token);
        }
        Ok(builder.connect().await?)
    }

    async fn client(&self, id: i64) -> anyhow::Result<Client> {
        let mut builder = Client::builder(&self.at.clients_at).bind(LOOPBACK).open_timeout(OPEN_WITHIN);
        builder = match self.auth.token(Role::Client, id)? {
            Some(token) => builder.token(token),
            None => builder.id(id),
        };
        Ok(builder.connect().await?)
    }
}

/// Accepts every connection and reads what comes until it ends.
fn serve(mut worker: Worker) {
    tokio::spawn(async move {
        while let Some(connection) = worker.accept().await {
            tokio::spawn(async move {
                let (mut channel, _) = connection.split();
                while channel.recv().await.is_some() {}
            });
        }
    });
}

pub async fn run(load: DataChannelLoad) -> anyhow::Result<()> {
    let mut report = Report::default();
    if load.opens > 0 {
        report.sequential = Some(sequential(&load).await?);
    }
    if load.concurrent > 0 {
        report.concurrent = Some(concurrent(&load).await?);
    }
    if load.throughput_mib > 0 {
        report.throughput = Some(throughput(&load).await?);
    }
    if load.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report:#?}");
    }
    Ok(())
}

/// `--opens` opens one after the other through the distributor, then as many directly.
async fn sequential(load: &DataChannelLoad) -> anyhow::Result<Sequential> {
    let worker_id = load.first_worker;
    serve(load.worker(worker_id).await.context("the worker registers")?);
    let client = load.client(load.first_worker - 1).await.context("the client connects")?;
    let mut relayed = Vec::with_capacity(load.opens);
    for _ in 0..load.opens {
        let started = Instant::now();
        let connection = client.open(worker_id).await.context("an open through the distributor")?;
        relayed.push(started.elapsed());
        drop(connection);
    }
    let mut direct = Vec::with_capacity(load.opens);
    for _ in 0..load.opens {
        let started = Instant::now();
        let pair = sdk::pair_in_process(LOOPBACK, OPEN_WITHIN).await.context("a direct open")?;
        direct.push(started.elapsed());
        drop(pair);
    }
    relayed.sort();
    direct.sort();
    let (r50, r99, d50, d99) = (
        percentile(&relayed, 0.5),
        percentile(&relayed, 0.99),
        percentile(&direct, 0.5),
        percentile(&direct, 0.99),
    );
    let target = |d: Duration| d.mul_f64(1.1) + Duration::from_millis(2);
    Ok(Sequential {
        opens: load.opens,
        relayed_p50_ms: ms(r50),
        relayed_p99_ms: ms(r99),
        direct_p50_ms: ms(d50),
        direct_p99_ms: ms(d99),
        ratio_p50: r50.as_secs_f64() / d50.as_secs_f64(),
        within_target: r50 <= target(d50) && r99 <= target(d99),
    })
}

/// `--concurrent` clients, each with its own connection, open at once.
async fn concurrent(load: &DataChannelLoad) -> anyhow::Result<Concurrent> {
    let first = load.first_worker + 10;
    for i in 0..load.workers as i64 {
        serve(load.worker(first + i).await.context("a worker registers")?);
    }
    let mut clients = Vec::with_capacity(load.concurrent);
    for i in 0..load.concurrent as i64 {
        clients.push(load.client(first - 100_000 - i).await.context("a client connects")?);
    }
    let started = Instant::now();
    let opens = clients.iter().enumerate().map(|(i, client)| async move {
        let at = Instant::now();
        client.open(first + (i % load.workers) as i64).await.map(|c| (c, at.elapsed()))
    });
    let results = futures::future::join_all(opens).await;
    let elapsed = started.elapsed();
    let mut times = Vec::new();
    let mut failed = 0;
    for result in &results {
        match result {
            Ok((_, took)) => times.push(*took),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("an open failed: {e}");
                }
            }
        }
    }
    times.sort();
    Ok(Concurrent {
        clients: load.concurrent,
        workers: load.workers,
        opened: times.len(),
        failed,
        opens_per_s: times.len() as f64 / elapsed.as_secs_f64(),
        open_p50_ms: ms(percentile(&times, 0.5)),
        open_p99_ms: ms(percentile(&times, 0.99)),
        open_max_ms: ms(percentile(&times, 1.0)),
    })
}

/// One channel's throughput through the SDK, then through bare str0m.
async fn throughput(load: &DataChannelLoad) -> anyhow::Result<Throughput> {
    let total = load.throughput_mib << 20;
    let size = load.message_size.clamp(1, sdk::MAX_MESSAGE);
    let (client, worker) = sdk::pair_in_process(LOOPBACK, OPEN_WITHIN).await?;
    let (mut receiving, _) = worker.split();
    let sender = client.channel.sender();
    let started = Instant::now();
    let reading = tokio::spawn(async move {
        let mut got = 0;
        while got < total {
            got += receiving.recv().await.context("the channel ended early")?.len();
        }
        anyhow::Ok(started.elapsed())
    });
    let message = Bytes::from(vec![7u8; size]);
    let mut sent = 0;
    while sent < total {
        let n = size.min(total - sent);
        sender.send(message.slice(..n)).await?;
        sent += n;
    }
    let sdk_took = reading.await??;
    let bare_took = bare::throughput(total, size).await?;
    let mib_s = |d: Duration| load.throughput_mib as f64 / d.as_secs_f64();
    Ok(Throughput {
        mib: load.throughput_mib,
        message_bytes: size,
        sdk_mib_s: mib_s(sdk_took),
        str0m_mib_s: mib_s(bare_took),
        ratio: bare_took.as_secs_f64() / sdk_took.as_secs_f64(),
    })
}

/// str0m with nothing around it: two `Rtc`s driven by one loop on two UDP sockets.
mod bare {
    use super::*;
    use str0m::change::SdpOffer;
    use str0m::channel::ChannelId;
    use str0m::net::{Protocol, Receive};
    use str0m::{Candidate, Event, Input, Output, Rtc};
    use tokio::net::UdpSocket;

    struct Peer {
        rtc: Rtc,
        socket: UdpSocket,
        local: SocketAddr,
        buf: Vec<u8>,
        open: Option<ChannelId>,
        received: usize,
    }

    impl Peer {
        async fn new() -> anyhow::Result<Self> {
            let socket = UdpSocket::bind((LOOPBACK, 0)).await?;
            let local = socket.local_addr()?;
            let rtc = Rtc::builder()
                .set_sctp_max_buffered_amount(32 * 1024 + sdk::MAX_MESSAGE)
                .build(Instant::now());
            let mut peer = Peer { rtc, socket, local, buf: vec![0; 2048], open: None, received: 0 };
            let candidate = Candidate::host(local, "udp")?;
            peer.rtc.add_local_candidate(candidate);
            Ok(peer)
        }

        /// Polls until str0m wants time to pass.
        async fn drain(&mut self) -> anyhow::Result<Instant> {
            loop {
                match self.rtc.poll_output()? {
                    Output::Timeout(at) => return Ok(at),
                    Output::Transmit(t) => {
                        let _ = self.socket.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(Event::ChannelOpen(id, _)) => self.open = Some(id),
                    Output::Event(Event::ChannelData(d)) => self.received += d.data.len(),
                    Output::Event(_) => {}
                }
            }
        }

        fn receive(&mut self, n: usize, source: SocketAddr) {
            if let Ok(contents) = self.buf[..n].try_into() {
                let receive = Receive { proto: Protocol::Udp, source, destination: self.local, contents };
                let _ = self.rtc.handle_input(Input::Receive(Instant::now(), receive));
            }
        }
    }

    /// Runs one peer until `done` holds: its socket, its timers, and `write` after each input.
    async fn drive(
        peer: &mut Peer,
        mut write: impl FnMut(&mut Rtc, Option<ChannelId>) -> anyhow::Result<()>,
        done: impl Fn(&Peer) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(peer) {
            anyhow::ensure!(Instant::now() < deadline, "bare str0m: not done in 120 s");
            write(&mut peer.rtc, peer.open)?;
            let wake = peer.drain().await?;
            tokio::select! {
                r = peer.socket.recv_from(&mut peer.buf) => if let Ok((n, from)) = r { peer.receive(n, from) },
                _ = tokio::time::sleep_until(wake.into()) => peer.rtc.handle_input(Input::Timeout(Instant::now()))?,
            }
        }
        Ok(())
    }

    /// Sends `total` bytes in messages of `size` from one peer to the other, each peer on its
    /// own task (as the SDK runs them), writing as fast as the send buffer allows; returns the
    /// time from the first write to the last byte received.
    pub async fn throughput(total: usize, size: usize) -> anyhow::Result<Duration> {
        let (mut a, mut b) = (Peer::new().await?, Peer::new().await?);
        let mut change = a.rtc.sdp_api();
        change.add_channel("bare".into());
        let (offer, pending) = change.apply().context("an offer")?;
        let offer = SdpOffer::from_sdp_string(&offer.to_sdp_string())?;
        let answer = b.rtc.sdp_api().accept_offer(offer)?;
        a.rtc.sdp_api().accept_answer(pending, answer)?;
        a.rtc.add_remote_candidate(Candidate::host(b.local, "udp")?);
        b.rtc.add_remote_candidate(Candidate::host(a.local, "udp")?);
        let started = std::sync::Arc::new(std::sync::OnceLock::new());
        let first_write = started.clone();
        let receiver = tokio::spawn(async move {
            drive(&mut b, |_, _| Ok(()), |b| b.received >= total).await?;
            anyhow::Ok(Instant::now())
        });
        let sender = tokio::spawn(async move {
            let message = vec![7u8; size];
            let mut sent = 0;
            let write = |rtc: &mut Rtc, open: Option<ChannelId>| {
                let Some(mut channel) = open.and_then(|id| rtc.channel(id)) else { return Ok(()) };
                while sent < total && channel.buffered_amount() < 32 * 1024 {
                    let n = size.min(total - sent);
                    if !channel.write(true, &message[..n])? {
                        break;
                    }
                    let _ = first_write.set(Instant::now());
                    sent += n;
                }
                Ok(())
            };
            drive(&mut a, write, |_| false).await
        });
        let finished = receiver.await??;
        sender.abort();
        let started = started.get().copied().context("nothing was written")?;
        Ok(finished - started)
    }
}
