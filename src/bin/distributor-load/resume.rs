//! The `resume` scenario: resumable clients whose streams are cut under load, and resumed.
//!
//! Each pair is a worker and a resumable client (`x-resume-after`) with a session; the worker
//! sends the client a candidate every `--every`. Every `--cut-every`, the client drops its
//! stream without a half-close (as a lost connection does) and at once opens a new one at
//! `--resume-at` (default: where it was) with `x-resume-after` set to the last number it got.
//! What is measured: the time from the cut to the first message of the new stream after its
//! welcome (what was held or sent meanwhile, replayed), and that the numbers the client sees
//! run on without a gap or a repeat across all its streams.
//!
//! With `--drain-pid`, streams are not cut: once every pair is set up, the instance the
//! clients are on is sent SIGTERM; each client waits for its `RECONNECT`, opens its next stream
//! at `--resume-at` (the old one still open) and reads on for `--after-drain`. The time is then
//! from the SIGTERM to the first message after the new stream's welcome.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};

#[derive(Args, Clone, Debug)]
pub struct ResumeLoad {
    /// Worker/client pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    #[command(flatten)]
    pub at: crate::Instances,
    /// The instance clients resume at [default: where they were].
    #[arg(long)]
    pub resume_at: Option<String>,
    /// Resumes in all, over all pairs.
    #[arg(long, default_value_t = 1000)]
    pub resumes: u64,
    /// How often each client's stream is cut.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub cut_every: Duration,
    /// How often each worker sends its client a candidate.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Payload bytes per candidate.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// First worker id; clients are numbered from it plus 1,000,000,000.
    #[arg(long, default_value_t = 7_000_000)]
    pub first_worker: i64,
    /// Drain instead of cutting: SIGTERM this process (the clients' instance) once every pair
    /// is set up; each client resumes at --resume-at when told RECONNECT.
    #[arg(long)]
    pub drain_pid: Option<u32>,
    /// In drain mode: workers only, resumable, holding no session, on --workers-at (the
    /// drained instance); each resumes at --resume-at when told RECONNECT, and is offered there
    /// by a client once the drained instance has exited.
    #[arg(long)]
    pub idle_workers: bool,
    /// With --idle-workers: each worker holds a session mid-negotiation when the drain begins
    /// (a client of its own at --resume-at offered, the worker answered); once the drained
    /// instance has exited, the client accepts the answer, and the worker must get it, numbered
    /// right after its RECONNECT.
    #[arg(long, requires = "idle_workers")]
    pub with_sessions: bool,
    /// With --idle-workers, instead of --drain-pid: drain by running this shell command, which
    /// returns once the instance has exited (e.g. `docker stop`).
    #[arg(long, requires = "idle_workers", conflicts_with = "drain_pid")]
    pub drain_cmd: Option<String>,
    /// In drain mode, how long each client reads on after resuming.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub after_drain: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Default)]
pub struct ResumeReport {
    pub resumes: u64,
    /// Resumes whose welcome said `resumed: false` (the peer started afresh).
    pub not_resumed: u64,
    /// Numbers the client never saw, and numbers it saw twice, over all its streams.
    pub gaps: u64,
    pub repeats: u64,
    /// Messages the clients received, over all their streams.
    pub received: u64,
    /// From the cut to the first message after the new stream's welcome, in microseconds.
    pub recovery_p50_us: f64,
    pub recovery_p99_us: f64,
    pub recovery_max_us: f64,
    /// Drain of idle workers: from the SIGTERM to the drained instance's exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained_exit_us: Option<f64>,
    /// Drain of idle workers: workers not offered where they resumed once the drained
    /// instance was gone (their stream ended with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

struct Pair {
    load: Arc<ResumeLoad>,
    worker: i64,
    client: i64,
    /// Drain mode: every pair and the drainer meet here once set up; then the SIGTERM's time.
    ready: Arc<tokio::sync::Barrier>,
    drained_at: tokio::sync::watch::Receiver<Option<Instant>>,
}

pub async fn run(load: ResumeLoad) -> anyhow::Result<()> {
    let load = Arc::new(load);
    if load.idle_workers {
        let drain = match (load.drain_pid, &load.drain_cmd) {
            (Some(pid), _) => crate::idle::Drain::Pid(pid),
            (None, Some(command)) => crate::idle::Drain::Command(command.clone()),
            (None, None) => anyhow::bail!("--idle-workers drains: give --drain-pid or --drain-cmd"),
        };
        let report = crate::idle::run(load.clone(), drain).await?;
        return print(&load, &report);
    }
    let per_pair = if load.drain_pid.is_some() { 1 } else { load.resumes.div_ceil(load.pairs.max(1) as u64) };
    let ready = Arc::new(tokio::sync::Barrier::new(load.pairs + 1));
    let (drained, drained_at) = tokio::sync::watch::channel(None);
    let mut tasks = Vec::new();
    for i in 0..load.pairs {
        let worker = load.first_worker + i as i64;
        let (ready, drained_at) = (ready.clone(), drained_at.clone());
        let pair = Pair { load: load.clone(), worker, client: worker + 1_000_000_000, ready, drained_at };
        tasks.push(tokio::spawn(async move { pair.run(per_pair).await }));
    }
    if let Some(pid) = load.drain_pid {
        ready.wait().await;
        let _ = drained.send(Some(Instant::now()));
        sigterm(pid)?;
    }
    let mut report = ResumeReport::default();
    let mut recovery = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let (r, h) = task.await??;
        report.add(&r);
        recovery.add(&h)?;
    }
    report.recovery(&recovery);
    print(&load, &report)
}

impl ResumeReport {
    /// Adds one pair's (or worker's) counts.
    pub fn add(&mut self, r: &ResumeReport) {
        self.resumes += r.resumes;
        self.not_resumed += r.not_resumed;
        self.gaps += r.gaps;
        self.repeats += r.repeats;
        self.received += r.received;
        if let Some(lost) = r.lost {
            self.lost = Some(self.lost.unwrap_or(0) + lost);
        }
    }

    /// The recovery times' quantiles.
    pub fn recovery(&mut self, recovery: &Histogram<u64>) {
        self.recovery_p50_us = recovery.value_at_quantile(0.5) as f64;
        self.recovery_p99_us = recovery.value_at_quantile(0.99) as f64;
        self.recovery_max_us = recovery.max() as f64;
    }
}

/// Sends SIGTERM to `pid` (the instance a drain mode drains).
pub fn sigterm(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "cannot send SIGTERM to {pid}");
    Ok(())
}

fn print(load: &ResumeLoad, report: &ResumeReport) -> anyhow::Result<()> {
    if load.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "resume: {} resumes ({} not resumed), {} messages received, {} gaps, {} repeats; \
             cut to first replayed message p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            report.resumes,
            report.not_resumed,
            report.received,
            report.gaps,
            report.repeats,
            report.recovery_p50_us,
            report.recovery_p99_us,
            report.recovery_max_us
        );
        if let Some(exit) = report.drained_exit_us {
            println!(
                "(idle workers: SIGTERM to the acknowledgement of the next stream; the drained instance exited {:.0} ms after its SIGTERM; {} workers lost with it)",
                exit / 1000.0,
                report.lost.unwrap_or(0)
            );
        }
    }
    Ok(())
}

pub async fn next<M>(rx: &mut Streaming<M>, what: &str) -> anyhow::Result<M> {
    match timeout(Duration::from_secs(10), rx.message()).await {
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => anyhow::bail!("{what}: the stream ended"),
        Ok(Err(status)) => anyhow::bail!("{what}: {status}"),
        Err(_) => anyhow::bail!("{what}: nothing within 10 s"),
    }
}

/// A resumable client stream: its sender and what it receives.
struct ClientStream {
    tx: mpsc::Sender<ClientRtcMessage>,
    rx: Streaming<ClientRtcMessage>,
}

impl Pair {
    async fn open_client(&self, url: &str, after: u64) -> anyhow::Result<(ClientStream, ClientRtcMessage)> {
        let (tx, rx) = mpsc::channel(64);
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("x-client-id", self.client.to_string().parse()?);
        request.metadata_mut().insert("x-resume-after", after.to_string().parse()?);
        let mut rx = ClientServiceClient::new(crate::peers::connect(url).await?)
            .negotiate_peer_connection(request)
            .await?
            .into_inner();
        let welcome = next(&mut rx, "welcome").await?;
        anyhow::ensure!(welcome.event() == RtcEvent::Blank, "expected the welcome, got {welcome:?}");
        Ok((ClientStream { tx, rx }, welcome))
    }

    /// The worker, the client and their session (offer, answer); and the number of the last
    /// message the client read (a refused offer's `ERROR` is numbered).
    async fn setup(
        &self,
    ) -> anyhow::Result<(mpsc::Sender<WorkerRtcMessage>, Streaming<WorkerRtcMessage>, ClientStream, u64)>
    {
        let load = &self.load;
        let (wtx, wrx) = mpsc::channel(64);
        wtx.send(WorkerRtcMessage::register(self.worker)).await?;
        let mut wrx = WorkerServiceClient::new(crate::peers::connect(load.at.workers()).await?)
            .negotiate_peer_connection(Request::new(ReceiverStream::new(wrx)))
            .await?
            .into_inner();
        next(&mut wrx, "registration").await?;
        let (mut c, _) = self.open_client(&load.at.clients_at, 0).await?;
        let mut read = 0;
        // Offered until it arrives: with a thousand pairs starting at once, a locate may be
        // refused (`CLUSTER_UNAVAILABLE`, too many at once); the client hears so and offers again.
        for attempt in 1.. {
            c.tx.send(ClientRtcMessage::to_worker(self.worker, RtcEvent::Offer, &b"v=0 offer"[..])).await?;
            tokio::select! {
                offer = next(&mut wrx, "offer") => {
                    let offer = offer?;
                    anyhow::ensure!(offer.event() == RtcEvent::Offer, "worker {}: expected the OFFER, got {offer:?}", self.worker);
                    break;
                }
                refused = next(&mut c.rx, "the OFFER's refusal") => {
                    let refused = refused?;
                    read = refused.seq;
                    anyhow::ensure!(attempt < 20 && refused.event() == RtcEvent::Error, "client {}: {refused:?}", self.client);
                    sleep(Duration::from_millis(100)).await;
                }
            }
        }
        wtx.send(WorkerRtcMessage::to_client(self.client, RtcEvent::Answer, &b"v=0 answer"[..])).await?;
        Ok((wtx, wrx, c, read))
    }

    async fn run(self, resumes: u64) -> anyhow::Result<(ResumeReport, Histogram<u64>)> {
        let load = &self.load;
        let mut report = ResumeReport::default();
        let mut recovery = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let (wtx, wrx, mut c, read) = match self.setup().await {
            Ok(set_up) => set_up,
            Err(e) => {
                // The drain waits for every pair: this one says it is done, and why it failed.
                if load.drain_pid.is_some() {
                    self.ready.wait().await;
                }
                return Err(e.context(format!("pair of worker {}", self.worker)));
            }
        };
        // The worker trickles on its own until the pair is done.
        let (size, every, client) = (load.size, load.every, self.client);
        let trickle = tokio::spawn(async move {
            let payload = Bytes::from(vec![b'c'; size]);
            loop {
                sleep(every).await;
                let msg = WorkerRtcMessage::to_client(client, RtcEvent::LocalIceCandidate, payload.clone());
                if wtx.send(msg).await.is_err() {
                    break;
                }
            }
            drop(wrx);
        });
        let mut last = read;
        let resume_at = load.resume_at.clone().unwrap_or_else(|| load.at.clients_at.clone());
        if load.drain_pid.is_some() {
            self.drained(c, last, &resume_at, &mut report, &mut recovery).await?;
            trickle.abort();
            return Ok((report, recovery));
        }
        for _ in 0..resumes {
            let cut_at = Instant::now() + load.cut_every;
            while Instant::now() < cut_at {
                let Ok(msg) = timeout(cut_at - Instant::now(), next(&mut c.rx, "relay")).await else { break };
                self.count(&msg?, &mut last, &mut report);
            }
            // The cut: the response side is dropped (the RPC is reset). The sending side is
            // kept a moment: dropped at once, its end of stream could reach the server before
            // the reset and read as a half-close, which means the peer leaves.
            let cut = Instant::now();
            let ClientStream { tx, rx } = c;
            drop(rx);
            tokio::spawn(async move {
                sleep(Duration::from_secs(1)).await;
                drop(tx);
            });
            let (resumed, welcome) = self.open_client(&resume_at, last).await?;
            c = resumed;
            report.resumes += 1;
            if !welcome.resumed {
                report.not_resumed += 1;
                last = 0;
                continue;
            }
            let what = format!("client {}: the first message after resuming after {last}", self.client);
            let first = next(&mut c.rx, &what).await?;
            recovery.saturating_record(cut.elapsed().as_micros() as u64);
            self.count(&first, &mut last, &mut report);
        }
        trickle.abort();
        Ok((report, recovery))
    }

    /// Drain mode: waits for the drain's `RECONNECT`, resumes at `resume_at` (the old stream
    /// still open, as a client does) and reads on for `--after-drain`.
    async fn drained(
        mut self,
        mut c: ClientStream,
        mut last: u64,
        resume_at: &str,
        report: &mut ResumeReport,
        recovery: &mut Histogram<u64>,
    ) -> anyhow::Result<()> {
        self.ready.wait().await;
        loop {
            let msg = next(&mut c.rx, "RECONNECT").await?;
            self.count(&msg, &mut last, report);
            if msg.event() == RtcEvent::Reconnect {
                break;
            }
        }
        let what = || format!("client {}: resuming after {last}", self.client);
        let (mut resumed, welcome) = self.open_client(resume_at, last).await.with_context(what)?;
        report.resumes += 1;
        if !welcome.resumed {
            report.not_resumed += 1;
            return Ok(());
        }
        let first = next(&mut resumed.rx, "the first message after resuming").await?;
        let sigterm = self.drained_at.wait_for(Option::is_some).await?.expect("set");
        recovery.saturating_record(sigterm.elapsed().as_micros() as u64);
        self.count(&first, &mut last, report);
        let until = Instant::now() + self.load.after_drain;
        while let Ok(msg) =
            timeout(until.saturating_duration_since(Instant::now()), next(&mut resumed.rx, "relay")).await
        {
            self.count(&msg?, &mut last, report);
        }
        drop(c);
        Ok(())
    }

    /// Checks that `msg` is numbered right after `last`.
    fn count(&self, msg: &ClientRtcMessage, last: &mut u64, report: &mut ResumeReport) {
        report.received += 1;
        match msg.seq {
            0 => {}
            seq if seq == *last + 1 => *last = seq,
            seq if seq <= *last => report.repeats += 1,
            seq => {
                report.gaps += seq - *last - 1;
                *last = seq;
            }
        }
    }
}
