//! `resume --idle-workers --drain-pid P` (or `--drain-cmd 'docker stop ...'`): the drain of an
//! instance whose resumable workers hold no session (workers between clients). Each worker
//! registers at `--workers-at` (the drained instance) with `x-resume-after: 0`, on a
//! connection of its own; once all are registered, the instance gets SIGTERM. Each worker, told `RECONNECT`, opens its next stream at
//! `--resume-at` (its old one still open, as the SDK does) and should move there: `resumed:
//! true`, numbered on. Once the drained instance has exited, a client of its own at
//! `--resume-at` offers each worker, which must get the `OFFER` numbered right after its
//! `RECONNECT`: it lives on where it resumed, not through the instance that is gone.
//!
//! With `--with-sessions`, each worker holds a session when the drain begins instead: a client
//! of its own at `--resume-at` has offered and the worker answered. Once the drained instance
//! has exited, the client accepts the answer, which the worker must get, numbered right after
//! its `RECONNECT`: the session moved with it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use hdrhistogram::Histogram;
use tokio::sync::{Barrier, mpsc, watch};
use tokio::time::{Instant, sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};

use crate::resume::{ResumeLoad, ResumeReport, next, sigterm};

/// Opens a resumable worker stream at `url` after `after` and reads its acknowledgement.
async fn open_worker(
    url: &str,
    worker: i64,
    after: u64,
) -> anyhow::Result<(mpsc::Sender<WorkerRtcMessage>, Streaming<WorkerRtcMessage>, WorkerRtcMessage)> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(WorkerRtcMessage::register(worker)).await?;
    let mut request = Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("x-resume-after", after.to_string().parse()?);
    let mut rx = WorkerServiceClient::new(crate::peers::connect(url).await?)
        .negotiate_peer_connection(request)
        .await?
        .into_inner();
    let ack = next(&mut rx, "the registration's acknowledgement").await?;
    anyhow::ensure!(
        ack.event() == RtcEvent::Blank,
        "worker {worker}: expected the acknowledgement, got {ack:?}"
    );
    Ok((tx, rx, ack))
}

/// One idle worker through the drain; what it saw, and the time from the SIGTERM to its
/// acknowledgement at `--resume-at`, in microseconds.
async fn worker(
    load: Arc<ResumeLoad>,
    id: i64,
    ready: Arc<Barrier>,
    mut sigtermed: watch::Receiver<Option<Instant>>,
    mut exited: watch::Receiver<bool>,
) -> anyhow::Result<(ResumeReport, u64)> {
    let mut report = ResumeReport::default();
    let drained = load.at.workers();
    let resume_at = load.resume_at.as_deref().unwrap_or(drained);
    let mut set_up = open_worker(drained, id, 0).await;
    let session = match (&mut set_up, load.with_sessions) {
        (Ok((tx, rx, _)), true) => Some(mid_negotiation(resume_at, id, tx, rx).await),
        _ => None,
    };
    ready.wait().await;
    let (old_tx, mut old_rx, _) = set_up?;
    let session = session.transpose()?;
    let reconnect = next(&mut old_rx, "RECONNECT").await?;
    anyhow::ensure!(
        reconnect.event() == RtcEvent::Reconnect,
        "worker {id}: expected RECONNECT, got {reconnect:?}"
    );
    report.received += 1;
    let (_tx, mut rx, ack) = open_worker(resume_at, id, reconnect.seq).await?;
    report.resumes += 1;
    let took = sigtermed.wait_for(Option::is_some).await?.expect("set").elapsed().as_micros() as u64;
    if !ack.resumed {
        report.not_resumed += 1;
    }
    drop((old_tx, old_rx));
    exited.wait_for(|e| *e).await?;
    // Its client accepts the answer, or a client of its own offers it, at the instance it
    // moved to.
    let (expected, (ctx, client)) = match session {
        Some((ctx, client)) => {
            ctx.send(ClientRtcMessage::to_worker(id, RtcEvent::AcceptAnswer, &b""[..])).await?;
            (RtcEvent::AcceptAnswer, (ctx, client))
        }
        None => {
            let offer = ClientRtcMessage::to_worker(id, RtcEvent::Offer, &b"v=0 offer"[..]);
            (RtcEvent::Offer, open_client(resume_at, Some(offer)).await?)
        }
    };
    let offer = match next(&mut rx, "the client's message after the drain").await {
        Ok(offer) if offer.event() == expected => offer,
        // Its stream ended with the drained instance, or its client was refused.
        other => {
            eprintln!("worker {id} lost: {other:?}");
            report.lost = Some(1);
            return Ok((report, took));
        }
    };
    report.received += 1;
    match offer.seq {
        seq if ack.resumed && seq == reconnect.seq + 1 => {}
        seq if seq <= reconnect.seq => report.repeats += 1,
        seq if ack.resumed => report.gaps += seq - reconnect.seq - 1,
        _ => {}
    }
    drop((ctx, client));
    Ok((report, took))
}

/// Opens a plain client stream at `url`, sending `first` if given.
async fn open_client(
    url: &str,
    first: Option<ClientRtcMessage>,
) -> anyhow::Result<(mpsc::Sender<ClientRtcMessage>, Streaming<ClientRtcMessage>)> {
    let (tx, rx) = mpsc::channel(4);
    if let Some(first) = first {
        tx.send(first).await?;
    }
    let client = ClientServiceClient::new(crate::peers::connect(url).await?)
        .negotiate_peer_connection(Request::new(ReceiverStream::new(rx)))
        .await?
        .into_inner();
    Ok((tx, client))
}

/// Opens a session with worker `id` from a client at `url`: the client offers, the worker
/// (`tx`, `rx`) answers, the client gets the answer. An `OFFER` refused (the client's instance
/// looking up too many workers at once, in a storm of them) is sent again, 20 times at most.
/// Returns the client.
async fn mid_negotiation(
    url: &str,
    id: i64,
    tx: &mpsc::Sender<WorkerRtcMessage>,
    rx: &mut Streaming<WorkerRtcMessage>,
) -> anyhow::Result<(mpsc::Sender<ClientRtcMessage>, Streaming<ClientRtcMessage>)> {
    let offer = || ClientRtcMessage::to_worker(id, RtcEvent::Offer, &b"v=0 offer"[..]);
    let (ctx, mut client) = open_client(url, Some(offer())).await?;
    let welcome = next(&mut client, "the client's welcome").await?;
    let mut tries = 0;
    loop {
        tokio::select! {
            offer = next(rx, "the OFFER") => {
                let offer = offer?;
                anyhow::ensure!(offer.event() == RtcEvent::Offer, "worker {id}: expected the OFFER, got {offer:?}");
                break;
            }
            refused = next(&mut client, "the OFFER's refusal") => {
                let refused = refused?;
                tries += 1;
                anyhow::ensure!(tries < 20, "worker {id}'s client: the OFFER refused 20 times: {refused:?}");
                sleep(Duration::from_millis(50 * tries)).await;
                ctx.send(offer()).await?;
            }
        }
    }
    tx.send(WorkerRtcMessage::to_client(welcome.client_id, RtcEvent::Answer, &b"v=0 answer"[..])).await?;
    let answer = next(&mut client, "the ANSWER").await?;
    anyhow::ensure!(
        answer.event() == RtcEvent::Answer,
        "worker {id}'s client: expected the ANSWER, got {answer:?}"
    );
    Ok((ctx, client))
}

/// How the instance is drained.
pub enum Drain {
    /// SIGTERM to this process; drained once it has exited.
    Pid(u32),
    /// This shell command, which returns once the instance has exited.
    Command(String),
}

/// Runs the idle workers' drain (see the module docs).
pub async fn run(load: Arc<ResumeLoad>, drain: Drain) -> anyhow::Result<ResumeReport> {
    let ready = Arc::new(Barrier::new(load.pairs + 1));
    let (sigterm_tx, sigtermed) = watch::channel(None);
    let (exited_tx, exited) = watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..load.pairs {
        let id = load.first_worker + i as i64;
        let (load, ready, sigtermed, exited) =
            (load.clone(), ready.clone(), sigtermed.clone(), exited.clone());
        tasks.push(tokio::spawn(worker(load, id, ready, sigtermed, exited)));
    }
    ready.wait().await;
    let at = Instant::now();
    let _ = sigterm_tx.send(Some(at));
    match drain {
        Drain::Pid(pid) => {
            sigterm(pid)?;
            while running(pid)? {
                anyhow::ensure!(
                    at.elapsed() < Duration::from_secs(30),
                    "{pid} still runs 30 s after SIGTERM"
                );
                sleep(Duration::from_millis(5)).await;
            }
        }
        Drain::Command(command) => {
            let shell = command.clone();
            let run = move || std::process::Command::new("sh").args(["-c", &shell]).status();
            let status = tokio::task::spawn_blocking(run).await??;
            anyhow::ensure!(status.success(), "the drain command failed ({status}): {command}");
        }
    }
    let exit = at.elapsed();
    let _ = exited_tx.send(true);
    let mut report =
        ResumeReport { drained_exit_us: Some(exit.as_micros() as f64), lost: Some(0), ..Default::default() };
    let mut recovery = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let (r, took) = task.await??;
        report.add(&r);
        recovery.saturating_record(took);
    }
    report.recovery(&recovery);
    Ok(report)
}

/// Whether process `pid` still runs: not once it has exited, even if its parent has not reaped
/// it yet (a zombie, which `kill -0` still finds).
fn running(pid: u32) -> anyhow::Result<bool> {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command's name, which is in parentheses.
        return Ok(!stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])));
    }
    if std::path::Path::new("/proc/self/stat").exists() {
        return Ok(false);
    }
    let status =
        std::process::Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status()?;
    Ok(status.success())
}
