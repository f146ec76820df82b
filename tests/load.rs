//! The load generator is part of the product: each scenario, run briefly against the real
//! binaries, reports what it measured (and no errors).
mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Binary;
use serde_json::Value;

/// Runs `distributor-load` with `args` (plus short bounds) and returns its JSON report.
fn load(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_distributor-load"))
        .args(args)
        .args(["--duration", "1s", "--warmup", "200ms", "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run distributor-load");
    assert!(output.status.success(), "distributor-load {args:?} failed");
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

fn assert_clean(report: &Value) {
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
}

#[test]
fn relay_reports_messages_latency_and_the_servers_cost() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let pid = server.pid().to_string();
    let report =
        load(&["relay", "--pairs", "20", "--window", "4", "--clients-at", &url, "--server-pid", &pid]);
    assert_eq!(report["scenario"], "relay");
    assert!(report["messages"].as_u64().unwrap() > 100, "{report}");
    assert!(report["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["server_peak_rss_mib"].as_f64().unwrap() > 1.0, "{report}");
    assert_clean(&report);

    // Paced: about the asked rate, not as fast as it goes.
    let paced =
        load(&["relay", "--pairs", "10", "--rate", "400", "--clients-at", &url, "--first-worker", "7000"]);
    let rate = paced["messages_per_sec"].as_f64().unwrap();
    assert!((200.0..=600.0).contains(&rate), "asked 400 msgs/s, got {rate}: {paced}");
    assert_clean(&paced);
}

#[test]
fn handshake_reports_handshakes_and_offer_to_answer() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let report = load(&["handshake", "--pairs", "5", "--clients-at", &url]);
    assert!(report["handshakes"].as_u64().unwrap() > 5, "{report}");
    assert!(report["offer_to_answer"]["p50_us"].as_f64().unwrap() > 0.0, "{report}");
    assert_clean(&report);
}

/// The echo ceiling, in both shapes, driven by the same client code.
#[test]
fn echo_server_is_the_tonic_ceiling() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let echo = EchoServer(
        Command::new(env!("CARGO_BIN_EXE_distributor-load"))
            .args(["echo-server", "--listen", &listen])
            .stderr(Stdio::null())
            .spawn()
            .expect("start the echo server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "the echo server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
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
        ]);
        assert_eq!((report["scenario"].as_str(), report["echo_shape"].as_str()), (Some("echo"), Some(shape)));
        assert!(report["messages"].as_u64().unwrap() > 100, "{report}");
        assert_clean(&report);
    }
    drop(echo);
}

/// Stops the echo server by its PID when the test ends, passing or not.
struct EchoServer(Child);

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
