//! The NATS ceiling: raw publish to subscribe through a cluster, in the pattern `relay` uses
//! (pairs, each keeping a window of messages going one way and back, one hop per message).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use futures::StreamExt;

use crate::Load;
use crate::report::{Report, Stats};

#[derive(Args, Clone, Debug)]
pub struct NatsLoad {
    /// Where the "client side" connects (e.g. the first node of the cluster).
    #[arg(long)]
    pub nats_url: String,
    /// Where the "worker side" connects [default: --nats-url].
    #[arg(long)]
    pub nats_url_b: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "DISTRIBUTOR_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "DISTRIBUTOR_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[command(flatten)]
    pub load: Load,
}

pub async fn ceiling(args: NatsLoad) -> anyhow::Result<Report> {
    let load = args.load;
    let options = || match (&args.nats_user, &args.nats_password) {
        (Some(user), Some(password)) => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        _ => async_nats::ConnectOptions::new(),
    };
    let a = options().connect(&args.nats_url).await?;
    let b = options().connect(args.nats_url_b.as_deref().unwrap_or(&args.nats_url)).await?;
    // Under `distributor.`, which the local cluster's user may use.
    let prefix = format!("distributor.ceiling{}", rand::random::<u32>());
    // Side B sends every message straight back; side A counts, times, and keeps the window.
    let mut b_in = b.subscribe(format!("{prefix}.b.>")).await?;
    let mut a_in = a.subscribe(format!("{prefix}.a.>")).await?;
    a.flush().await?;
    b.flush().await?;
    // Core NATS drops what nobody is subscribed to yet: wait until each side's subscription has
    // reached the other side's server, by probing until a probe arrives.
    for (from, to, to_subject) in
        [(&a, &mut b_in, format!("{prefix}.b.probe")), (&b, &mut a_in, format!("{prefix}.a.probe"))]
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            from.publish(to_subject.clone(), Bytes::from_static(b"probe")).await?;
            from.flush().await?;
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), to.next()).await {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the two NATS connections cannot reach each other");
        }
        // Drop any further probes still in flight.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), to.next()).await {}
    }
    let base = Instant::now();
    let stamp = move |seq: u64, size: usize| {
        let mut buf = BytesMut::with_capacity(size.max(16));
        buf.put_u64(base.elapsed().as_nanos() as u64);
        buf.put_u64(seq);
        buf.resize(size.max(16), b'x');
        buf.freeze()
    };
    let age = move |p: &[u8]| -> Option<u64> {
        let sent = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
        Some((base.elapsed().as_nanos() as u64).saturating_sub(sent))
    };
    let measure_from = Instant::now() + load.warmup;
    let deadline = measure_from + load.duration;
    // Counted: what arrives after the warm-up and before the deadline.
    let measuring = move || (measure_from..deadline).contains(&Instant::now());
    let budget = Arc::new(AtomicU64::new(load.max_messages));
    let take = {
        let budget = budget.clone();
        move || {
            Instant::now() < deadline
                && budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
        }
    };
    let cpu = crate::report::CpuWindow::start(load.server_pid, measure_from, deadline);
    for pair in 0..load.pairs {
        for seq in 0..load.window as u64 {
            if take() {
                a.publish(format!("{prefix}.b.{pair}"), stamp(seq, load.size)).await?;
            }
        }
    }
    let b_side = {
        let (b, prefix) = (b.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut stats = Stats::default();
            while let Ok(Some(msg)) =
                tokio::time::timeout_at((deadline + Duration::from_secs(2)).into(), b_in.next()).await
            {
                if measuring() {
                    stats.hop(age(&msg.payload));
                }
                let pair = msg.subject.rsplit('.').next().unwrap_or("0").to_owned();
                if Instant::now() < deadline {
                    let mut payload = BytesMut::from(&msg.payload[..]);
                    payload[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
                    let _ = b.publish(format!("{prefix}.a.{pair}"), payload.freeze()).await;
                }
            }
            stats
        })
    };
    let mut stats = Stats::default();
    let mut seq = 0u64;
    while let Ok(Some(msg)) =
        tokio::time::timeout_at((deadline + Duration::from_secs(2)).into(), a_in.next()).await
    {
        if measuring() {
            stats.hop(age(&msg.payload));
        }
        if take() {
            seq += 1;
            let pair = msg.subject.rsplit('.').next().unwrap_or("0").to_owned();
            a.publish(format!("{prefix}.b.{pair}"), stamp(seq, load.size)).await?;
        }
    }
    stats.merge(b_side.await?);
    let end = match stats.last {
        Some(last) if budget.load(Ordering::Relaxed) == 0 => last.min(deadline),
        _ => deadline,
    };
    let cpu = cpu.seconds().await;
    Ok(Report::new("nats-ceiling", &load, stats, end.saturating_duration_since(measure_from), cpu))
}
