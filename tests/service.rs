//! What operators and tooling see: health, reflection, the binary, metrics, SIGTERM.
mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::*;
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

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
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

    let text = http_get(&metrics, "/metrics");
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
        .args(["token", "--role", "worker", "--id", "42", "--ttl", "1h"])
        .env("DISTRIBUTOR_AUTH_SECRET", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = distributor::auth::Authenticator::new(b"s3cret");
    assert_eq!(
        auth.verify(Some(&format!("Bearer {}", token.trim())), distributor::core::Role::Worker),
        Ok(42)
    );
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

#[tokio::test]
async fn the_port_variable_is_honoured() {
    let port = free_port();
    let _server = Process(
        Command::new(env!("CARGO_BIN_EXE_distributor"))
            .env("PORT", port.to_string())
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
