//! The load generator is part of the product: each scenario, run briefly against the real
//! binaries, reports what it measured (and no errors). Runs bounded by `--max-messages` with no
//! warm-up count exactly what they sent.
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Binary, Process, free_port, wait_for_port};
use serde_json::Value;

/// Runs `distributor-load` with `args` (plus a bound on time) and returns its JSON report.
fn load(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_distributor-load"))
        .args(args)
        .args(["--duration", "3s", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run distributor-load");
    assert!(output.status.success(), "distributor-load {args:?} failed");
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

fn assert_clean(report: &Value) {
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
}

/// The latency percentiles are in order and within the run.
fn assert_latency(latency: &Value, report: &Value) {
    let p = |k: &str| latency[k].as_f64().unwrap_or_else(|| panic!("no {k} in {report}"));
    assert!(p("p50_us") > 0.0 && p("p50_us") <= p("p99_us") && p("p99_us") <= p("max_us"), "{report}");
    assert!(p("max_us") < report["seconds"].as_f64().unwrap() * 1e6 + 5e6, "{report}");
}

#[test]
fn relay_reports_every_message_latency_and_the_servers_cost() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let pid = server.pid().to_string();
    let args = ["relay", "--pairs", "20", "--window", "4", "--clients-at", &url, "--server-pid", &pid];
    let report = load(&[&args[..], &["--warmup", "0s", "--max-messages", "400"]].concat());
    assert_eq!(report["scenario"], "relay");
    // Each of the 400 candidates crosses twice: to the worker, and back.
    assert_eq!(report["messages"], 800, "{report}");
    assert_latency(&report["latency"], &report);
    // A distributor with 40 idle-ish peers: a few MiB, far from a leak's hundreds.
    let rss = report["server_peak_rss_mib"].as_f64().unwrap();
    assert!((1.0..256.0).contains(&rss), "server peak RSS {rss} MiB: {report}");
    assert_clean(&report);

    // Paced: about the asked rate, not as fast as it goes.
    let paced = load(&[
        "relay",
        "--pairs",
        "10",
        "--rate",
        "400",
        "--clients-at",
        &url,
        "--first-worker",
        "7000",
        "--warmup",
        "200ms",
    ]);
    let rate = paced["messages_per_sec"].as_f64().unwrap();
    assert!((200.0..=600.0).contains(&rate), "asked 400 msgs/s, got {rate}: {paced}");
    assert_clean(&paced);
}

#[test]
fn handshake_reports_every_handshake_and_offer_to_answer() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let report =
        load(&["handshake", "--pairs", "5", "--clients-at", &url, "--warmup", "0s", "--max-messages", "10"]);
    assert_eq!(report["handshakes"], 10, "{report}");
    // Four candidates each way per handshake (the default).
    assert_eq!(report["messages"], 80, "{report}");
    assert_latency(&report["offer_to_answer"], &report);
    assert_clean(&report);
}

/// The echo ceiling, in both shapes, driven by the same client code.
#[test]
fn echo_server_is_the_tonic_ceiling() {
    let listen = format!("127.0.0.1:{}", free_port());
    let _echo = Process(
        Command::new(env!("CARGO_BIN_EXE_distributor-load"))
            .args(["echo-server", "--listen", &listen])
            .stderr(Stdio::null())
            .spawn()
            .expect("start the echo server"),
    );
    wait_for_port(&listen, Duration::from_secs(10));
    let url = format!("http://{listen}");
    for shape in ["pairs", "relay"] {
        let report = load(&[
            "relay",
            "--echo",
            "--echo-shape",
            shape,
            "--pairs",
            "10",
            "--window",
            "3",
            "--clients-at",
            &url,
            "--warmup",
            "0s",
            "--max-messages",
            "300",
        ]);
        assert_eq!((report["scenario"].as_str(), report["echo_shape"].as_str()), (Some("echo"), Some(shape)));
        assert_eq!(report["messages"], 300, "every echo comes back: {report}");
        assert_clean(&report);
    }
}

#[test]
fn resume_cuts_and_resumes_streams_without_a_gap_or_a_repeat() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let output = Command::new(env!("CARGO_BIN_EXE_distributor-load"))
        .args(["resume", "--pairs", "5", "--resumes", "20", "--cut-every", "100ms", "--every", "10ms"])
        .args(["--clients-at", &url, "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run distributor-load");
    assert!(output.status.success(), "distributor-load resume failed");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!(report["resumes"], 20, "{report}");
    assert_eq!(
        (report["not_resumed"].as_u64(), report["gaps"].as_u64(), report["repeats"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{report}"
    );
    // Each pair's worker sends every 10 ms for 4 x 100 ms: far more than one message a stream.
    assert!(report["received"].as_u64().unwrap() > 100, "{report}");
    let p = |k: &str| report[k].as_f64().unwrap();
    assert!(p("recovery_p50_us") > 0.0 && p("recovery_p50_us") <= p("recovery_p99_us"), "{report}");
}

/// The drain of an instance holding idle resumable workers: each moves to the other instance,
/// and is offered there once the drained one has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_drains_idle_workers_to_the_other_instance() {
    let nats = common::nats::NatsCluster::start().await;
    let creds = [
        ("DISTRIBUTOR_NATS_USER", common::nats::USER),
        ("DISTRIBUTOR_NATS_PASSWORD", common::nats::PASSWORD),
    ];
    let (url, prefix) = (nats.url_from(0), "distributor.loadidle");
    let args = ["--nats-url", &url, "--nats-prefix", prefix, "--drain-timeout", "8s"];
    let (b, d) = (Binary::start(&args, &creds), Binary::start(&args, &creds));
    // Each hears the other's heartbeat (one a second) before the drain.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (b_url, d_url, pid) =
        (format!("http://{}", b.addr), format!("http://{}", d.addr), d.pid().to_string());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_distributor-load"))
            .args(["resume", "--idle-workers", "--pairs", "20", "--drain-pid", &pid, "--json"])
            .args(["--workers-at", &d_url, "--resume-at", &b_url])
            .stderr(Stdio::inherit())
            .output()
            .expect("run distributor-load")
    })
    .await
    .unwrap();
    assert!(output.status.success(), "distributor-load resume --idle-workers failed");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let counts = ["resumes", "not_resumed", "lost", "gaps", "repeats"].map(|k| report[k].as_u64());
    assert_eq!(counts, [Some(20), Some(0), Some(0), Some(0), Some(0)], "{report}");
    let exit = report["drained_exit_us"].as_f64().unwrap();
    assert!(exit < 8e6, "the drained instance held nothing and stopped before its timeout: {report}");
    drop(b);
}

#[test]
fn storm_connects_every_peer_on_a_connection_of_its_own() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let pid = server.pid().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_distributor-load"))
        .args(["storm", "--pairs", "100", "--clients-at", &url, "--server-pid", &pid, "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run distributor-load");
    assert!(output.status.success(), "distributor-load storm failed");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!((report["peers"].as_u64(), report["connected"].as_u64()), (Some(200), Some(200)), "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let ms = |k: &str| report[k].as_f64().unwrap();
    assert!(
        ms("connect_to_welcome_p50_ms") > 0.0
            && ms("connect_to_welcome_p50_ms") <= ms("connect_to_welcome_max_ms"),
        "{report}"
    );
}

#[test]
fn datachannel_opens_real_channels_and_compares_with_direct_signaling() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let output = Command::new(env!("CARGO_BIN_EXE_distributor-load"))
        .args(["datachannel", "--opens", "5", "--concurrent", "20", "--workers", "3"])
        .args(["--throughput-mib", "2", "--clients-at", &url, "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run distributor-load");
    assert!(output.status.success(), "distributor-load datachannel failed");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let f = |section: &str, k: &str| {
        report[section][k].as_f64().unwrap_or_else(|| panic!("{section}.{k}: {report}"))
    };
    // Every open finished within the generator's bound (30 s), through the distributor or not.
    let within = |k: &str| (0.0..=30e3).contains(&f("sequential", k));
    assert!(within("relayed_p50_ms") && within("relayed_p99_ms") && within("direct_p50_ms"), "{report}");
    assert!(f("sequential", "relayed_p50_ms") <= f("sequential", "relayed_p99_ms"), "{report}");
    assert_eq!(
        (report["concurrent"]["opened"].as_u64(), report["concurrent"]["failed"].as_u64()),
        (Some(20), Some(0))
    );
    // 20 opens at once, each within 30 s: at least 20 / 30 a second.
    assert!(f("concurrent", "opens_per_s") >= 20.0 / 30.0, "{report}");
    // 2 MiB each way within the test's own patience (a stalled SCTP stream falls far below).
    let (sdk, bare) = (f("throughput", "sdk_mib_s"), f("throughput", "str0m_mib_s"));
    assert!(sdk >= 0.1 && bare >= 0.1, "{report}");
    assert!(
        (f("throughput", "ratio") - sdk / bare).abs() < 1e-6 * sdk / bare,
        "the ratio is sdk / str0m: {report}"
    );
}
