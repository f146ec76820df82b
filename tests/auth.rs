//! Bearer-token authentication of both services.
mod common;

use std::time::{Duration, SystemTime};

use common::*;
use distributor::auth::{mint, mint_expiring_at};
use distributor::config::Config;
use distributor::core::Role;
use distributor::pb::RtcEvent;
use tonic::Code;

const SECRET: &str = "an integration-test secret of 32 bytes or more";

async fn server() -> TestServer {
    TestServer::with(Config { auth_secret: Some(SECRET.into()), ..Config::default() }).await
}

fn bearer(role: Role, id: i64) -> (&'static str, String) {
    (
        "authorization",
        format!("Bearer {}", mint(SECRET.as_bytes(), role, id, Duration::from_secs(60)).unwrap()),
    )
}

#[tokio::test]
async fn a_valid_token_sets_the_peer_ids() {
    let server = server().await;
    let mut w = worker_with(&server, 42, &[bearer(Role::Worker, 42)]).await;
    // x-client-id is ignored in auth mode: the token's id is the client's id.
    let (mut c, cid) = client_with(&server, &[bearer(Role::Client, 1001), ("x-client-id", "5".into())]).await;
    assert_eq!(cid, 1001);
    negotiate(&mut c, cid, &mut w, 42).await;
}

#[tokio::test]
async fn missing_bad_or_expired_tokens_are_unauthenticated() {
    let server = server().await;
    let expired =
        mint_expiring_at(SECRET.as_bytes(), Role::Client, 9, SystemTime::now() - Duration::from_secs(3600));
    let forged =
        mint(b"not the secret, though as long as it", Role::Client, 9, Duration::from_secs(60)).unwrap();
    let cases: [&[(&'static str, String)]; 4] = [
        &[],
        &[("authorization", "Bearer not-a-jwt".into())],
        &[("authorization", format!("Bearer {}", expired.unwrap()))],
        &[("authorization", format!("Bearer {forged}"))],
    ];
    for metadata in cases {
        let status = open_client(server.channel().await, metadata).await.err().expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{metadata:?}: {status:?}");
        let status = open_worker(server.channel().await, metadata, blank(9)).await.err().expect("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{metadata:?}: {status:?}");
    }
}

#[tokio::test]
async fn a_token_of_the_other_role_is_permission_denied() {
    let server = server().await;
    let status =
        open_client(server.channel().await, &[bearer(Role::Worker, 3)]).await.err().expect("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = open_worker(server.channel().await, &[bearer(Role::Client, 3)], blank(3))
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_worker_may_register_only_its_own_id() {
    let server = server().await;
    let mut w = open_worker(server.channel().await, &[bearer(Role::Worker, 3)], blank(4)).await.unwrap();
    assert_eq!(w.ended().await.code(), Code::PermissionDenied);
    // Worker 4 was never registered.
    let (mut c, _) = client_with(&server, &[bearer(Role::Client, 77)]).await;
    c.send(to_worker(4, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, distributor::pb::ErrorCode::PeerNotConnected, 4);
}
