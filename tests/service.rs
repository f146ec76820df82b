//! What operators and tooling see: health, reflection, the binary, metrics, SIGTERM.
mod common;

use std::process::{Command, Stdio};

use common::*;
use distributor::auth::{Authenticator, Expect};
use distributor::core::Role;

const SECRET: &str = "a service-test secret of 32 bytes or more";
use distributor::pb::RtcEvent;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_both_services_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "distributor.v1.ClientService", "distributor.v1.WorkerService"] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in ["distributor.v1.ClientService", "distributor.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
}

#[tokio::test]
async fn the_binary_serves_metrics_and_stops_on_sigterm() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut bin = Binary::start(&["--metrics-listen", &metrics, "--shards", "2"], &[]);
    let server = TestServer::external(&bin.addr);
    let mut w = worker(&server, 71).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 71).await;
    c.send(to_worker(404, RtcEvent::Offer, b"x")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Error);

    let text = metrics_text(&metrics);
    for line in [
        "distributor_connected_peers{role=\"client\"} 1",
        "distributor_connected_peers{role=\"worker\"} 1",
        "distributor_sessions{state=\"accepted\"} 1",
        "distributor_messages_relayed_total{event=\"OFFER\"} 1",
        "distributor_messages_relayed_total{event=\"ANSWER\"} 1",
        "distributor_errors_total{code=\"PEER_NOT_CONNECTED\"} 1",
        "distributor_offer_to_answer_seconds_count 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }

    let status = tokio::task::spawn_blocking(move || bin.terminate()).await.unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    assert_eq!(c.ended().await.code(), tonic::Code::Unavailable);
    assert_eq!(w.ended().await.code(), tonic::Code::Unavailable);
}

#[test]
fn token_command_prints_a_token_the_server_accepts() {
    let out = Command::new(env!("CARGO_BIN_EXE_distributor"))
        .args(["token", "--role", "worker", "--id", "42", "--ttl", "1h", "--audience", "relay"])
        .env("DISTRIBUTOR_AUTH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let expect = Expect { audience: Some("relay".into()), ..Expect::default() };
    let auth = Authenticator::new(SECRET.as_bytes(), &expect).unwrap();
    let granted = auth.verify(Some(&format!("Bearer {}", token.trim())), Role::Worker).unwrap();
    assert_eq!(granted.id, 42);

    // A secret too short to sign with is refused, by the command and by the server.
    let out = Command::new(env!("CARGO_BIN_EXE_distributor"))
        .args(["token", "--role", "worker", "--id", "42", "--secret", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"), "{out:?}");
}

#[test]
fn bad_flags_are_refused_before_binding() {
    let out = Command::new(env!("CARGO_BIN_EXE_distributor"))
        .args(["--listen", "127.0.0.1:0", "--max-message-bytes", "2000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-message-bytes"), "{out:?}");
}

/// Runs the binary with `args` and `envs` until it exits (it must refuse to start).
fn refused(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distributor"));
    command.args(args).env_remove("DISTRIBUTOR_LISTEN").env_remove("DISTRIBUTOR_AUTH_SECRET");
    // Killed by PID if it starts after all, rather than hanging the test.
    let mut child = Process(
        command
            .env_remove("DISTRIBUTOR_ALLOW_OPEN")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{args:?} {envs:?} started instead of refusing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let out = std::process::Output { status, stdout: Vec::new(), stderr: stderr.into_bytes() };
    assert!(!out.status.success(), "started: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn open_mode_off_loopback_is_refused_with_one_line() {
    for (args, envs) in [
        (&["--listen", "0.0.0.0:0"][..], &[][..]),
        (&[][..], &[("PORT", "0")][..]),
        (&["--listen", "127.0.0.1:0", "--nats-url", "nats://10.1.2.3:4222"][..], &[][..]),
    ] {
        let stderr = refused(args, envs);
        assert!(stderr.contains("--allow-open"), "{args:?} {envs:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let stderr = refused(&["--listen", "127.0.0.1:0"], &[("DISTRIBUTOR_AUTH_SECRET", "short")]);
    assert!(stderr.contains("at least 32"), "{stderr}");
}

/// Boolean variables take what deployment tools and shells write: 1/0, true/false, yes/no.
#[test]
fn boolean_variables_take_one_and_zero_yes_and_no() {
    // Taken as true: the start goes on to the next check (a bad flag, refused before binding).
    for yes in ["1", "true", "yes", "on"] {
        let stderr = refused(
            &["--listen", "127.0.0.1:0", "--max-message-bytes", "2000000"],
            &[("DISTRIBUTOR_ALLOW_OPEN", yes), ("DISTRIBUTOR_NATS_REQUIRE_TLS", yes)],
        );
        assert!(stderr.contains("--max-message-bytes"), "DISTRIBUTOR_ALLOW_OPEN={yes}: {stderr}");
    }
    // Taken as false: open mode off loopback is refused.
    for no in ["0", "false", "no", "off"] {
        let stderr = refused(&["--listen", "0.0.0.0:0"], &[("DISTRIBUTOR_ALLOW_OPEN", no)]);
        assert!(stderr.contains("--allow-open") && !stderr.contains("invalid value"), "{no}: {stderr}");
    }
    let stderr = refused(&["--listen", "127.0.0.1:0"], &[("DISTRIBUTOR_ALLOW_OPEN", "maybe")]);
    assert!(stderr.contains("invalid value 'maybe'") && stderr.contains("--allow-open"), "{stderr}");
}

#[tokio::test]
async fn the_port_variable_is_honoured() {
    let port = free_port();
    let _server = Process(
        Command::new(env!("CARGO_BIN_EXE_distributor"))
            .env("PORT", port.to_string())
            .env("DISTRIBUTOR_ALLOW_OPEN", "true")
            .env_remove("DISTRIBUTOR_LISTEN")
            .env_remove("DISTRIBUTOR_AUTH_SECRET")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || wait_for_port(&addr, WAIT)
    })
    .await
    .unwrap();
    // What listens on $PORT is the distributor: it speaks gRPC and relays.
    let server = TestServer::external(&addr);
    let mut health = HealthClient::new(server.channel().await);
    let status = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
    let mut w = worker(&server, 5).await;
    let (mut c, cid) = client(&server).await;
    negotiate(&mut c, cid, &mut w, 5).await;
}

#[test]
fn health_command_says_whether_a_distributor_is_serving() {
    let health = |addr: &str| {
        Command::new(env!("CARGO_BIN_EXE_distributor"))
            .args(["health", "--addr", addr, "--timeout", "2s"])
            .output()
            .unwrap()
    };
    let bin = Binary::start(&[], &[]);
    let serving = health(&format!("http://{}", bin.addr));
    assert!(serving.status.success(), "{serving:?}");
    assert_eq!(String::from_utf8_lossy(&serving.stdout).trim(), "SERVING");
    // Nothing listens there: a one-line error, and a failure exit.
    let nobody = health(&format!("http://127.0.0.1:{}", free_port()));
    assert!(!nobody.status.success());
    let error = String::from_utf8_lossy(&nobody.stderr);
    assert!(
        error.starts_with("distributor: asking http://127.0.0.1:") && error.trim().lines().count() == 1,
        "{error}"
    );
}
