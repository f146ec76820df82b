//! What a run measured: counts, latency percentiles, errors, the server's CPU and memory.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use distributor::pb::ErrorCode;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{EchoShape, Load};

/// Counts of one pair, merged into the run's.
pub struct Stats {
    /// When the last counted message arrived.
    pub last: Option<Instant>,
    pub hops: u64,
    pub hop_ns: Histogram<u64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub handshakes: u64,
    pub handshake_ns: Option<Histogram<u64>>,
}

/// Nanoseconds from 1 ns to 60 s, at 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            last: None,
            hops: 0,
            hop_ns: histogram(),
            errors: BTreeMap::new(),
            handshakes: 0,
            handshake_ns: None,
        }
    }
}

impl Stats {
    /// One relayed message arrived, `age` after it was sent.
    pub fn hop(&mut self, age_ns: Option<u64>) {
        self.hops += 1;
        self.last = Some(Instant::now());
        if let Some(age) = age_ns {
            self.hop_ns.saturating_record(age.max(1));
        }
    }

    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.as_str_name()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Stats) {
        self.last = self.last.max(other.last);
        self.hops += other.hops;
        let _ = self.hop_ns.add(&other.hop_ns);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.handshakes += other.handshakes;
        match (&mut self.handshake_ns, other.handshake_ns) {
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(&theirs);
            }
            (None, Some(theirs)) => self.handshake_ns = Some(theirs),
            _ => {}
        }
    }
}

#[derive(Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Latency {
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub pairs: usize,
    pub window: usize,
    /// Echo runs: the streams the echo server saw (see `--echo-shape`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_shape: Option<EchoShape>,
    pub size: usize,
    pub seconds: f64,
    /// Relayed (or echoed) messages delivered.
    pub messages: u64,
    pub messages_per_sec: f64,
    pub latency: Option<Latency>,
    pub handshakes: u64,
    pub handshakes_per_sec: f64,
    pub offer_to_answer: Option<Latency>,
    pub errors: BTreeMap<&'static str, u64>,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_us_per_message: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    /// The whole machine's busy CPU in the window: server, load generator and anything else.
    pub machine_cpu_seconds: Option<f64>,
    pub machine_cpu_us_per_message: Option<f64>,
}

impl Report {
    /// `cpu` is the (server, machine) CPU seconds over the measured `elapsed`.
    pub fn new(
        scenario: &'static str,
        load: &Load,
        stats: Stats,
        elapsed: Duration,
        (cpu, machine): (Option<f64>, Option<f64>),
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        // Some virtual machines account no CPU time per process: say so rather than report 0.
        let cpu = cpu.filter(|c| *c > 0.0);
        let counted = if stats.handshakes > 0 { stats.handshakes } else { stats.hops };
        Report {
            scenario,
            pairs: load.pairs,
            window: load.window,
            echo_shape: load.echo.then_some(load.echo_shape),
            size: load.size,
            seconds,
            messages: stats.hops,
            messages_per_sec: stats.hops as f64 / seconds,
            latency: Latency::of(&stats.hop_ns),
            handshakes: stats.handshakes,
            handshakes_per_sec: stats.handshakes as f64 / seconds,
            offer_to_answer: stats.handshake_ns.as_ref().and_then(Latency::of),
            errors: stats.errors,
            server_cpu_seconds: cpu,
            server_cpu_us_per_message: cpu.filter(|_| counted > 0).map(|c| c * 1e6 / counted as f64),
            machine_cpu_seconds: machine,
            machine_cpu_us_per_message: machine.filter(|_| counted > 0).map(|c| c * 1e6 / counted as f64),
            server_peak_rss_mib: load.server_pid.and_then(peak_rss_mib),
        }
    }
}

/// Measures CPU time from now until `deadline` (or until the run ends sooner): the server's
/// (by PID) and the whole machine's (`/proc/stat`, which includes this load generator).
pub struct CpuWindow {
    pid: Option<u32>,
    /// (server, machine) CPU seconds at the window's start, once it started.
    before: Arc<OnceLock<(Option<f64>, Option<f64>)>>,
    at_deadline: tokio::task::JoinHandle<(Option<f64>, Option<f64>)>,
}

impl CpuWindow {
    /// Measures from `from` (now or later) to `deadline`, or to when it is read, if earlier.
    pub fn start(pid: Option<u32>, from: Instant, deadline: Instant) -> Self {
        let before = Arc::new(OnceLock::new());
        let at_start = before.clone();
        let at_deadline = tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            let _ = at_start.set((server_cpu(pid), machine_cpu()));
            tokio::time::sleep_until(deadline.into()).await;
            (server_cpu(pid), machine_cpu())
        });
        CpuWindow { pid, before, at_deadline }
    }

    /// CPU seconds used in the window: (server, machine); none if it never started.
    pub async fn seconds(self) -> (Option<f64>, Option<f64>) {
        let after = if self.at_deadline.is_finished() {
            self.at_deadline.await.unwrap_or((None, None))
        } else {
            self.at_deadline.abort();
            (server_cpu(self.pid), machine_cpu())
        };
        let Some(&before) = self.before.get() else { return (None, None) };
        let delta = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        (delta(after.0, before.0), delta(after.1, before.1))
    }
}

/// Busy CPU seconds of the whole machine so far (all but idle and iowait), from `/proc/stat`.
pub fn machine_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<f64> = line.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let busy: f64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Some(busy / 100.0)
}

/// The server's user + system CPU seconds so far, from `/proc/<pid>/stat`.
pub fn server_cpu(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// The server's resident memory now, in KiB, from `/proc/<pid>/status` (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The server's peak resident memory, from `/proc/<pid>/status` (VmHWM).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("scenario            {}", report.scenario);
    println!("pairs / window      {} / {}   ({} B messages)", report.pairs, report.window, report.size);
    if let Some(shape) = report.echo_shape {
        println!("echo shape          {shape:?}");
    }
    println!("measured            {:.2} s", report.seconds);
    if report.handshakes > 0 {
        println!("handshakes          {} ({:.0}/s)", report.handshakes, report.handshakes_per_sec);
    }
    println!("messages            {} ({:.0}/s)", report.messages, report.messages_per_sec);
    let row = |name: &str, l: &Option<Latency>| {
        if let Some(l) = l {
            println!(
                "{name:<19} p50 {:.0} µs  p90 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            );
        }
    };
    row("latency", &report.latency);
    row("offer-to-answer", &report.offer_to_answer);
    if report.errors.is_empty() {
        println!("errors              none");
    }
    for (code, n) in &report.errors {
        println!("errors              {code}: {n}");
    }
    if let Some(cpu) = report.server_cpu_seconds {
        println!(
            "server CPU          {cpu:.2} s ({:.2} µs per message)",
            report.server_cpu_us_per_message.unwrap_or(0.0)
        );
    }
    if let Some(cpu) = report.machine_cpu_seconds {
        let per = report.machine_cpu_us_per_message.unwrap_or(0.0);
        println!("machine CPU         {cpu:.2} s ({per:.2} µs per message, load generator included)");
    }
    if let Some(rss) = report.server_peak_rss_mib {
        println!("server peak RSS     {rss:.1} MiB");
    }
    Ok(())
}

/// A progress bar on a terminal while a run goes (nothing with --json or without a terminal).
pub struct Progress(Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>);

impl Progress {
    pub fn start(load: &Load, deadline: Instant, count: impl Fn() -> u64 + Send + 'static) -> Self {
        if load.json || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let total = load.duration.as_millis() as u64;
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("a valid template"),
        );
        let task = {
            let bar = bar.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                while Instant::now() < deadline {
                    bar.set_position(start.elapsed().as_millis() as u64);
                    bar.set_message(format!("{} delivered", count()));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        Progress(Some((bar, task)))
    }

    pub fn finish(self) {
        if let Some((bar, task)) = self.0 {
            task.abort();
            bar.finish_and_clear();
        }
    }
}
