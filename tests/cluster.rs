//! Cluster mode: distributor instances on a real 3-node NATS cluster, peers on different
//! instances. Every behaviour of the contract holds across instances.
//!
//! Over 500 lines: one test per behaviour of the contract across instances, each with its own
//! instances and peers; the moves are in `tests/moves.rs`.
mod common;

use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::*;
use distributor::cluster::NatsConfig;
use distributor::config::Config;
use distributor::pb::{ErrorCode, RtcEvent};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A distributor instance of the cluster, on NATS node `first` first.
async fn instance(nats: &NatsCluster, first: usize, prefix: &str) -> TestServer {
    instance_with(nats, first, prefix, Config::default()).await
}

/// Instances on node 0 route inline (`--shards 0`), the others on two shard threads, so that
/// every cross-instance test covers both.
async fn instance_with(nats: &NatsCluster, first: usize, prefix: &str, config: Config) -> TestServer {
    let nats = nats_config(nats, first, prefix);
    let shards = if first == 0 { 0 } else { 2 };
    TestServer::with(Config { shards, nats: Some(nats), ..config }).await
}

/// An instance as its own process (to be killed), on NATS node `first` first, with two shards.
fn binary_instance(nats: &NatsCluster, first: usize, prefix: &str) -> Binary {
    let (url, prefix) = (nats.url_from(first), format!("distributor.{prefix}"));
    let args = ["--nats-url", &url, "--nats-prefix", &prefix, "--shards", "2"];
    let creds = [
        ("DISTRIBUTOR_NATS_USER", common::nats::USER),
        ("DISTRIBUTOR_NATS_PASSWORD", common::nats::PASSWORD),
    ];
    Binary::start(&args, &creds)
}

/// What an instance needs to join `nats` on node `first`, as the shipped user, under
/// `distributor.<prefix>` (the user may use `distributor.>` only).
fn nats_config(nats: &NatsCluster, first: usize, prefix: &str) -> NatsConfig {
    NatsConfig {
        url: nats.url_from(first),
        prefix: format!("distributor.{prefix}"),
        user: Some(common::nats::USER.into()),
        password: Some(common::nats::PASSWORD.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn full_negotiation_across_instances() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t1").await, instance(&nats, 1, "t1").await);
    let mut w = worker(&b, 42).await;
    // The client offers right after the worker's registration was acknowledged.
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 42).await;
    for i in 0..200u32 {
        c.send(to_worker(42, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
        w.send(to_client(cid, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
    }
    for i in 0..200u32 {
        let to_w = w.recv().await;
        assert_eq!((to_w.event(), to_w.client_id), (RtcEvent::IceCandidate, cid));
        assert_eq!(&to_w.message[..], &i.to_be_bytes()[..], "in order, client to worker");
        let to_c = c.recv().await;
        assert_eq!((to_c.event(), to_c.worker_machine_id), (RtcEvent::IceCandidate, 42));
        assert_eq!(&to_c.message[..], &i.to_be_bytes()[..], "in order, worker to client");
    }
    c.send(to_worker(42, RtcEvent::Ping, b"p")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Ping);
}

#[tokio::test]
async fn a_real_data_channel_opens_across_instances() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t13").await, instance(&nats, 1, "t13").await);
    let mut w = worker(&b, 4242).await;
    let (mut c, cid) = client(&a).await;
    let (at_worker, at_client) = common::webrtc::connect_and_talk(&mut c, cid, &mut w, 4242).await;
    assert_eq!(at_worker, b"hello from the client");
    assert_eq!(at_client, b"hello from the worker");
}

#[tokio::test]
async fn one_client_with_workers_on_three_instances() {
    let nats = NatsCluster::start().await;
    let servers =
        [instance(&nats, 0, "t2").await, instance(&nats, 1, "t2").await, instance(&nats, 2, "t2").await];
    let mut workers = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        workers.push((100 + i as i64, worker(server, 100 + i as i64).await));
    }
    let (mut c, cid) = client(&servers[0]).await;
    for (id, w) in &mut workers {
        negotiate(&mut c, cid, w, *id).await;
    }
}

#[tokio::test]
async fn errors_across_instances() {
    let nats = NatsCluster::start().await;
    let (a, b) = (
        instance(&nats, 0, "t3").await,
        instance_with(&nats, 1, "t3", Config { peer_queue: 4, ..Config::default() }).await,
    );
    let (mut c, cid) = client(&a).await;
    // A worker connected nowhere.
    c.send(to_worker(404, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, ErrorCode::PeerNotConnected, 404);
    // The state machine runs on the worker's instance; its refusal reaches the client.
    let mut w = worker(&b, 7).await;
    c.send(to_worker(7, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    c.send(to_worker(7, RtcEvent::AcceptAnswer, b"")).await;
    assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 7);
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"early")).await;
    assert_worker_error(&w.recv().await, ErrorCode::InvalidTransition, cid);
    // A remote worker that does not read: PEER_OVERLOADED, and nothing lost.
    const SENT: u32 = 300;
    let mut payload = vec![0u8; 16 * 1024];
    for i in 0..SENT {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        c.send(to_worker(7, RtcEvent::LocalIceCandidate, &payload)).await;
    }
    let (delivered, refused) =
        account_for(&mut c, &mut w, 7, SENT as usize, ErrorCode::PeerOverloaded, Duration::from_secs(30))
            .await;
    assert!(refused > 0, "the remote worker's full queue refuses");
    assert!(delivered.windows(2).all(|p| p[0] < p[1]), "delivered in order");
}

#[tokio::test]
async fn peer_gone_across_instances() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t4").await, instance(&nats, 1, "t4").await);
    let mut w = worker(&b, 21).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 21).await;
    drop(c);
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));

    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 21).await;
    drop(w);
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 21));
    c.send(to_worker(21, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, ErrorCode::PeerNotConnected, 21);
}

#[tokio::test]
async fn newest_registration_wins_across_instances() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t5").await, instance(&nats, 1, "t5").await);
    // A claim is broadcast once: it reaches only the instances whose subscriptions reached the
    // claiming instance's NATS server, which a moment after start may not be all of them.
    reach_each_other(&a, &b, 500).await;
    let mut old = worker(&a, 31).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut old, 31).await;
    let mut new = worker(&b, 31).await;
    assert_eq!(old.ended().await.code(), Code::Aborted);
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 31));
    negotiate(&mut c, cid, &mut new, 31).await;

    let id = [("x-client-id", "9001".to_string())];
    let (mut first, cid) = client_with(&a, &id).await;
    negotiate(&mut first, cid, &mut new, 31).await;
    let (mut second, _) = client_with(&b, &id).await;
    assert_eq!(first.ended().await.code(), Code::Aborted);
    let gone = new.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));
    negotiate(&mut second, cid, &mut new, 31).await;
}

#[tokio::test]
async fn a_clock_running_ahead_cannot_make_an_older_stream_win() {
    let nats = NatsCluster::start().await;
    // A's clock runs a minute ahead (a test-only knob): by wall clocks, every stream it opens is
    // newer than any B opens within that minute.
    let ahead = Config { test_clock_skew_ms: 60_000, ..Config::default() };
    let (a, b) = (instance_with(&nats, 0, "t16", ahead).await, instance(&nats, 1, "t16").await);
    reach_each_other(&a, &b, 1600).await;
    let mut old = worker(&a, 33).await;
    // A client on B negotiates with it: by then B has A's claim of worker 33.
    let (mut c, cid) = client(&b).await;
    negotiate(&mut c, cid, &mut old, 33).await;
    let mut new = worker(&b, 33).await;
    assert_eq!(old.ended().await.code(), Code::Aborted, "the newer stream, on B, wins");
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 33));
    negotiate(&mut c, cid, &mut new, 33).await;

    // The same for a client id: first on A, then on B.
    let id = [("x-client-id", "9016".to_string())];
    let (mut first, cid) = client_with(&a, &id).await;
    negotiate(&mut first, cid, &mut new, 33).await;
    let (mut second, _) = client_with(&b, &id).await;
    assert_eq!(first.ended().await.code(), Code::Aborted);
    assert_eq!(new.recv().await.event(), RtcEvent::PeerGone);
    negotiate(&mut second, cid, &mut new, 33).await;
}

#[tokio::test]
async fn an_instance_that_shuts_down_ends_its_sessions_elsewhere() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t6").await, instance(&nats, 1, "t6").await);
    let mut w = worker(&b, 61).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 61).await;
    let started = Instant::now();
    b.shutdown().await.expect("clean shutdown");
    assert_eq!(w.ended().await.code(), Code::Unavailable);
    let gone = c.recv().await;
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 61));
    assert!(started.elapsed() < Duration::from_secs(3), "graceful: no waiting for the dead-instance timeout");
}

#[tokio::test]
async fn local_relay_goes_on_while_nats_is_down_and_recovers() {
    let mut nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t7").await, instance(&nats, 1, "t7").await);
    let mut local_w = worker(&a, 71).await;
    let mut remote_w = worker(&b, 72).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut local_w, 71).await;
    negotiate(&mut c, cid, &mut remote_w, 72).await;
    assert_eq!(cluster_health(&a).await, ServingStatus::Serving);
    for i in 0..3 {
        nats.kill(i);
    }
    // The health service tells, for the cluster only: the relay itself still serves.
    wait_for_health(&a, ServingStatus::NotServing).await;
    // Cross-instance: refused at once, not hanging.
    let asked = Instant::now();
    c.send(to_worker(72, RtcEvent::LocalIceCandidate, b"across")).await;
    let msg = c.recv().await;
    assert_client_error(&msg, ErrorCode::ClusterUnavailable, 72);
    assert!(asked.elapsed() < Duration::from_secs(1), "refused at once: {:?}", asked.elapsed());
    // Same instance: goes on.
    c.send(to_worker(71, RtcEvent::LocalIceCandidate, b"local")).await;
    assert_eq!(&local_w.recv().await.message[..], b"local");
    // The session across the cluster ends once the other instance is given up on. Messages
    // sent just before NATS died whose acknowledgement was lost are refused first.
    let gone = loop {
        let msg = c.recv().await;
        if msg.event() != RtcEvent::Error {
            break msg;
        }
        assert_client_error(&msg, ErrorCode::ClusterUnavailable, 72);
    };
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 72));
    let gone = loop {
        let msg = remote_w.recv().await;
        if msg.event() != RtcEvent::Error {
            break msg;
        }
        assert_worker_error(&msg, ErrorCode::ClusterUnavailable, cid);
    };
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));

    for i in 0..3 {
        nats.restart(i).await;
    }
    nats.wait_routed().await;
    wait_for_health(&a, ServingStatus::Serving).await;
    // Recovery: a new negotiation across instances works once both have reconnected. Until
    // then, each OFFER is refused with an ERROR; none is lost.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.send(to_worker(72, RtcEvent::Offer, b"offer-again")).await;
        tokio::select! {
            offer = remote_w.rx_message() => {
                let offer = offer.unwrap().expect("worker stream open");
                assert_eq!((offer.event(), offer.client_id), (RtcEvent::Offer, cid));
                break;
            }
            refused = c.rx_message() => {
                let refused = refused.unwrap().expect("client stream open");
                assert_eq!(refused.event(), RtcEvent::Error, "{refused:?}");
            }
            _ = tokio::time::sleep(WAIT) => panic!("an OFFER was neither delivered nor refused"),
        }
        assert!(Instant::now() < deadline, "cross-instance relay did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    negotiate_rest(&mut c, cid, &mut remote_w, 72).await;
}

async fn cluster_health(server: &TestServer) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    let request = HealthCheckRequest { service: distributor::cluster::HEALTH_SERVICE.into() };
    health.check(request).await.expect("health check").into_inner().status()
}

async fn wait_for_health(server: &TestServer, wanted: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster_health(server).await != wanted {
        assert!(Instant::now() < deadline, "cluster health never became {wanted:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut health = HealthClient::new(server.channel().await);
    let overall = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving, "the relay itself keeps serving");
}

/// Finishes a negotiation whose OFFER was delivered.
async fn negotiate_rest(c: &mut ClientStream, cid: i64, w: &mut WorkerStream, id: i64) {
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!((c.recv().await.event()), RtcEvent::Answer);
    c.send(to_worker(id, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::AcceptAnswer);
}

/// What one side received: the other's numbered candidates, and refusals of its own.
#[derive(Default, Debug)]
struct Tally {
    delivered: Vec<u32>,
    refused: usize,
    other: Vec<String>,
}

impl Tally {
    fn take(&mut self, event: RtcEvent, payload: &[u8], debug: impl FnOnce() -> String) {
        match event {
            RtcEvent::IceCandidate => self.delivered.push(number(payload)),
            RtcEvent::Error => self.refused += 1,
            _ => self.other.push(debug()),
        }
    }

    /// Whether every one of the other side's `sent` candidates, and its last one (`sent`
    /// itself, sent once the failures are over), is accounted for: delivered here or refused
    /// there.
    fn complete(&self, refused_there: usize, sent: u32) -> bool {
        self.delivered.iter().filter(|n| **n < sent).count() + refused_there >= sent as usize
            && self.delivered.last() == Some(&sent)
    }
}

#[tokio::test]
async fn nats_nodes_killed_mid_stream_lose_nothing_silently() {
    let mut nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t8").await, instance(&nats, 1, "t8").await);
    let mut w = worker(&b, 81).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 81).await;

    const SENT: u32 = 1500;
    let (c_tx, mut c_rx) = (c.sender(), c.take_receiver());
    let (w_tx, mut w_rx) = (w.sender(), w.take_receiver());
    // Both sides are read while they send, until every message is accounted for.
    let tallies = tokio::spawn(async move {
        let (mut at_client, mut at_worker) = (Tally::default(), Tally::default());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !(at_worker.complete(at_client.refused, SENT) && at_client.complete(at_worker.refused, SENT)) {
            tokio::select! {
                msg = c_rx.message() => {
                    let msg = msg.expect("client stream open").expect("client stream open");
                    at_client.take(msg.event(), &msg.message, || format!("{msg:?}"));
                }
                msg = w_rx.message() => {
                    let msg = msg.expect("worker stream open").expect("worker stream open");
                    at_worker.take(msg.event(), &msg.message, || format!("{msg:?}"));
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        (at_client, at_worker)
    });
    for i in 0..SENT {
        c_tx.send(to_worker(81, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await.unwrap();
        w_tx.send(to_client(cid, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await.unwrap();
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Two of the three NATS nodes die, one after the other, while messages flow.
        if i == SENT / 3 {
            nats.kill(0);
        }
        if i == 2 * SENT / 3 {
            nats.kill(1);
        }
    }
    // Traffic resumes on the last node.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c_tx.send(to_worker(81, RtcEvent::LocalIceCandidate, &SENT.to_be_bytes())).await.unwrap();
    w_tx.send(to_client(cid, RtcEvent::LocalIceCandidate, &SENT.to_be_bytes())).await.unwrap();

    let (at_client, at_worker) = tallies.await.unwrap();
    for (side, own, other) in [("client", &at_client, &at_worker), ("worker", &at_worker, &at_client)] {
        assert!(own.other.is_empty(), "{side} got unexpected messages: {:?}", own.other);
        assert!(own.delivered.windows(2).all(|p| p[0] < p[1]), "{side}: delivered in order");
        assert_eq!(
            other.delivered.iter().filter(|n| **n < SENT).count() + own.refused,
            SENT as usize,
            "{side}'s messages: delivered + refused = sent"
        );
        assert_eq!(other.delivered.last(), Some(&SENT), "{side}'s traffic resumed after the failures");
    }
    drop((a, b, c_tx, w_tx));
}

#[tokio::test]
async fn a_killed_instance_ends_its_sessions_elsewhere_within_bounded_time() {
    let nats = NatsCluster::start().await;
    let a = instance(&nats, 0, "t9").await;
    let mut b = binary_instance(&nats, 1, "t9");
    let b_server = TestServer::external(&b.addr);
    let mut w = worker(&b_server, 91).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 91).await;
    let killed = Instant::now();
    b.kill();
    let mut gone = tokio::time::timeout(Duration::from_secs(8), c.rx_message())
        .await
        .expect("PEER_GONE within the bound")
        .unwrap()
        .unwrap();
    if gone.event() == RtcEvent::Error {
        // The ACCEPT_ANSWER arrived, but B died before acknowledging it: it is refused too
        // (`docs/cluster.md`, "messages whose acknowledgement was lost"), then PEER_GONE follows.
        assert_client_error(&gone, ErrorCode::ClusterUnavailable, 91);
        gone = c.recv().await;
    }
    assert_eq!((gone.event(), gone.worker_machine_id), (RtcEvent::PeerGone, 91));
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(5), "PEER_GONE after {took:?}, documented bound is 3 s + 1 s");
    c.send(to_worker(91, RtcEvent::Offer, b"offer")).await;
    assert_client_error(&c.recv().await, ErrorCode::PeerNotConnected, 91);
}

#[tokio::test]
async fn nats_token_auth() {
    let nats = NatsCluster::start_with_token(Some("nats-s3cret")).await;
    let with_token = |first: usize| NatsConfig {
        url: nats.url_from(first),
        prefix: "t10".into(),
        token: Some("nats-s3cret".into()),
        ..Default::default()
    };
    let a = TestServer::with(Config { nats: Some(with_token(0)), ..Config::default() }).await;
    let b = TestServer::with(Config { nats: Some(with_token(1)), ..Config::default() }).await;
    assert_eq!(cluster_health(&a).await, ServingStatus::Serving);
    let mut w = worker(&b, 101).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_registrations_go_on_while_nats_is_down_and_its_queue_is_full() {
    let mut nats = NatsCluster::start().await;
    let a = instance(&nats, 0, "t14").await;
    for i in 0..3 {
        nats.kill(i);
    }
    wait_for_health(&a, ServingStatus::NotServing).await;
    // Enough registrations to fill async-nats' command queue (16,384 commands; each takes a
    // subscribe and a publish), over 12 connections of at most 1,000 streams each.
    const WORKERS: i64 = 10_000;
    let channels: Vec<_> = futures::future::join_all((0..12).map(|_| a.channel())).await;
    let started = Instant::now();
    let registrations = futures::future::join_all((0..WORKERS).map(|i| {
        let channel = channels[i as usize % channels.len()].clone();
        async move {
            let mut w = open_worker(channel, &[], blank(1_000 + i)).await.expect("a worker stream opens");
            let ack = w.recv().await;
            assert_eq!(ack.event(), RtcEvent::Blank, "registered");
            w
        }
    }))
    .await;
    eprintln!("{WORKERS} registrations with NATS down took {:?}", started.elapsed());
    // Same-instance relay goes on, as for a fresh pair.
    let asked = Instant::now();
    let mut w = worker(&a, 77).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 77).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "a local pair took {:?}", asked.elapsed());
    drop(registrations);
}

#[tokio::test]
async fn frames_fit_a_small_nats_max_payload() {
    let nats = NatsCluster::start_with(None, "64KB").await;
    // A message limit that cannot cross NATS is refused at start, saying why.
    let too_big = Config {
        max_message_bytes: 64 * 1024,
        nats: Some(nats_config(&nats, 0, "t15")),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = distributor::server::run(listener, too_big, std::future::pending());
    let refused = tokio::time::timeout(WAIT, run).await.expect("refused at start").unwrap_err().to_string();
    assert!(refused.contains("max_payload is 65536"), "{refused}");
    // Within the limit, a burst of large messages crosses in frames that fit, in order.
    let config = Config { max_message_bytes: 16 * 1024, ..Config::default() };
    let (a, b) =
        (instance_with(&nats, 0, "t15", config.clone()).await, instance_with(&nats, 1, "t15", config).await);
    let mut w = worker(&b, 151).await;
    let (mut c, cid) = client(&a).await;
    negotiate(&mut c, cid, &mut w, 151).await;
    const SENT: u32 = 200;
    let mut payload = vec![0u8; 16 * 1024];
    for i in 0..SENT {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        c.send(to_worker(151, RtcEvent::LocalIceCandidate, &payload)).await;
    }
    for i in 0..SENT {
        let got = w.recv().await;
        assert_eq!(
            (got.event(), number(&got.message), got.message.len()),
            (RtcEvent::IceCandidate, i, 16 * 1024)
        );
    }
    c.expect_quiet().await;
}

#[tokio::test]
async fn a_killed_instances_resumable_peer_starts_afresh_elsewhere() {
    let nats = NatsCluster::start().await;
    let a = instance(&nats, 0, "t17").await;
    let mut b = binary_instance(&nats, 1, "t17");
    let b_server = TestServer::external(&b.addr);
    reach_each_other(&a, &b_server, 1700).await;
    let mut w = worker(&a, 97).await;
    let resumable = |after: u64| [("x-client-id", "9797".to_string()), ("x-resume-after", after.to_string())];
    let (mut c, cid) = client_with(&b_server, &resumable(0)).await;
    negotiate(&mut c, cid, &mut w, 97).await;
    let killed = Instant::now();
    b.kill();
    // The client comes back on A, which knows nothing of it: it starts afresh.
    let mut c = open_client(a.channel().await, &resumable(1)).await.expect("opens on A");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, false), "{welcome:?}");
    // The worker hears its old session end within the liveness bound.
    peer_gone_within_the_bound(&mut w, 9797).await;
    assert!(killed.elapsed() <= Duration::from_secs(5), "PEER_GONE after {:?}", killed.elapsed());
    negotiate(&mut c, 9797, &mut w, 97).await;
}

/// A worker whose client's instance died hears `PEER_GONE` within the liveness bound (after a
/// refusal of its last relay, if that instance died before acknowledging it).
async fn peer_gone_within_the_bound(w: &mut WorkerStream, client: i64) {
    let mut gone = tokio::time::timeout(Duration::from_secs(8), w.rx_message())
        .await
        .expect("PEER_GONE within the bound")
        .unwrap()
        .unwrap();
    if gone.event() == RtcEvent::Error {
        assert_worker_error(&gone, ErrorCode::ClusterUnavailable, client);
        gone = w.recv().await;
    }
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, client));
}

/// A resumable client cut mid-negotiation comes back on another instance: the instance that
/// holds it takes it over through a tunnel, what the worker sent meanwhile comes with
/// consecutive numbers, the negotiation finishes; back on its first instance, it resumes
/// there; a half-close through the tunnel is a departure at once.
#[tokio::test]
async fn a_client_cut_mid_negotiation_resumes_on_another_instance_and_finishes_it() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t18").await, instance(&nats, 1, "t18").await);
    reach_each_other(&a, &b, 1800).await;
    let mut w = worker(&a, 98).await;
    let resumable = |after: u64| [("x-client-id", "9898".to_string()), ("x-resume-after", after.to_string())];
    let (c, cid) = client_with(&b, &resumable(0)).await;
    c.send(to_worker(98, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    // Cut (no half-close): the worker answers and trickles while the client is away.
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"w1")).await;
    w.expect_quiet().await;
    let back = Instant::now();
    let mut c = open_client(a.channel().await, &resumable(0)).await.expect("opens on A");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed, welcome.seq), (RtcEvent::Blank, true, 0), "{welcome:?}");
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 1).await, b"answer");
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 2).await, b"w1");
    assert!(back.elapsed() < Duration::from_secs(2), "replayed after {:?}", back.elapsed());
    c.send(to_worker(98, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::AcceptAnswer, "the session went on");
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"w2")).await;
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 3).await, b"w2", "live, numbered on");
    // Cut again, while the worker trickles; back on B, which holds it, with what it got.
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"w3")).await;
    let mut c = open_client(b.channel().await, &resumable(3)).await.expect("opens on B");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
    assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 4).await, b"w3");
    // Through a tunnel again, the client leaves: PEER_GONE at once.
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = open_client(a.channel().await, &resumable(4)).await.expect("opens on A");
    assert!(c.recv().await.resumed);
    c.close();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, cid));
    assert_eq!(c.ended().await.code(), Code::Ok);
    w.expect_quiet().await;
}

/// A resumable worker cut on its instance comes back on another: it gets what its clients sent
/// meanwhile, numbered, and its sessions go on.
#[tokio::test]
async fn a_worker_resumes_on_another_instance_and_gets_what_was_held_for_it() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t19").await, instance(&nats, 1, "t19").await);
    reach_each_other(&a, &b, 1900).await;
    let resumable = |after: u64| [("x-resume-after", after.to_string())];
    let mut w = worker_with(&a, 12, &resumable(0)).await;
    let (mut c, cid) = client(&b).await;
    c.send(to_worker(12, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    w.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 1..=3u8 {
        c.send(to_worker(12, RtcEvent::LocalIceCandidate, &[i])).await;
    }
    c.expect_quiet().await;
    let mut w = open_worker(b.channel().await, &resumable(1), blank(12)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.worker_machine_id, ack.resumed), (RtcEvent::Blank, 12, true), "{ack:?}");
    for (i, seq) in (1..=3u8).zip(2..) {
        let held = w.recv().await;
        assert_eq!((held.event(), held.seq, &held.message[..]), (RtcEvent::IceCandidate, seq, &[i][..]));
    }
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"back")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::IceCandidate, "the session goes on");
    c.send(to_worker(12, RtcEvent::LocalIceCandidate, b"more")).await;
    let more = w.recv().await;
    assert_eq!((more.event(), more.seq, &more.message[..]), (RtcEvent::IceCandidate, 5, &b"more"[..]));
}

/// What a cut client has not received, more than a move takes along: it stays on its holder,
/// served through a tunnel.
async fn backlog(w: &WorkerStream, client: i64) {
    for i in 0..300u32 {
        w.send(to_client(client, RtcEvent::LocalIceCandidate, &i.to_be_bytes())).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The instance holding a tunnelled peer dies: the stream on the other instance ends
/// `UNAVAILABLE`, and the peer's next resume starts afresh (nothing is known of it any more).
#[tokio::test]
async fn when_the_holder_dies_its_tunnelled_peer_starts_afresh() {
    let nats = NatsCluster::start().await;
    let a = instance(&nats, 0, "t20").await;
    let mut b = binary_instance(&nats, 1, "t20");
    let b_server = TestServer::external(&b.addr);
    reach_each_other(&a, &b_server, 2000).await;
    let mut w = worker(&a, 96).await;
    let resumable = |after: u64| [("x-client-id", "9696".to_string()), ("x-resume-after", after.to_string())];
    let (mut c, cid) = client_with(&b_server, &resumable(0)).await;
    negotiate(&mut c, cid, &mut w, 96).await;
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    backlog(&w, cid).await;
    // Back on A, served through a tunnel by B, which holds it.
    let mut c = open_client(a.channel().await, &resumable(1)).await.expect("opens on A");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
    b.kill();
    let ended = tokio::time::timeout(Duration::from_secs(8), c.ended()).await.expect("ends within the bound");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let mut c = open_client(a.channel().await, &resumable(2)).await.expect("opens on A");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, false), "{welcome:?}");
    peer_gone_within_the_bound(&mut w, 9696).await;
    negotiate(&mut c, 9696, &mut w, 96).await;
}

/// SIGTERM on an instance whose resumable clients are mid-negotiation with workers elsewhere:
/// each is told `RECONNECT`, resumes on the other instance (`resumed: true`), moving there
/// with its session, and finishes its negotiation there: every message is delivered once,
/// numbered on without a gap. The drained instance has nothing left to serve and stops; the
/// sessions go on without it.
#[tokio::test]
async fn on_a_drain_resumable_clients_resume_on_another_instance_and_finish_their_negotiations() {
    const PAIRS: i64 = 20;
    let nats = NatsCluster::start().await;
    let b = instance(&nats, 0, "t21").await;
    let (url, prefix) = (nats.url_from(1), "distributor.t21".to_string());
    let args = ["--nats-url", &url, "--nats-prefix", &prefix, "--shards", "2", "--drain-timeout", "3s"];
    let creds = [
        ("DISTRIBUTOR_NATS_USER", common::nats::USER),
        ("DISTRIBUTOR_NATS_PASSWORD", common::nats::PASSWORD),
    ];
    let mut a = Binary::start(&args, &creds);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 2100).await;
    let resumable =
        |id: i64, after: u64| [("x-client-id", id.to_string()), ("x-resume-after", after.to_string())];
    let mut pairs = Vec::new();
    for k in 0..PAIRS {
        let (w_id, c_id) = (2200 + k, 22_000 + k);
        let mut w = worker(&b, w_id).await;
        let (c, _) = client_with(&a_server, &resumable(c_id, 0)).await;
        c.send(to_worker(w_id, RtcEvent::Offer, b"offer")).await;
        assert_eq!(w.recv().await.event(), RtcEvent::Offer);
        w.send(to_client(c_id, RtcEvent::Answer, b"answer")).await;
        pairs.push((w, c, w_id, c_id));
    }
    let drained = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = a.terminate();
        (a, status)
    });
    let mut resumed = Vec::new();
    for (mut w, mut c, w_id, c_id) in pairs {
        let answer = c.recv().await;
        assert_eq!((answer.event(), answer.seq), (RtcEvent::Answer, 1), "{answer:?}");
        let reconnect = c.recv().await;
        assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
        let mut c = open_client(b.channel().await, &resumable(c_id, 2)).await.expect("opens on B");
        let welcome = c.recv().await;
        assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
        c.send(to_worker(w_id, RtcEvent::AcceptAnswer, b"")).await;
        let accept = w.recv().await;
        assert_eq!(
            accept.event(),
            RtcEvent::AcceptAnswer,
            "pair {w_id} after {:?}: {accept:?}",
            drained.elapsed()
        );
        for i in 0..3u8 {
            c.send(to_worker(w_id, RtcEvent::LocalIceCandidate, &[i])).await;
            w.send(to_client(c_id, RtcEvent::LocalIceCandidate, &[i])).await;
        }
        for (i, seq) in (0..3u8).zip(3..) {
            let got = w.recv().await;
            assert_eq!((got.event(), &got.message[..]), (RtcEvent::IceCandidate, &[i][..]));
            assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, seq).await, [i]);
        }
        resumed.push((w, c, w_id, c_id));
    }
    assert!(
        drained.elapsed() < Duration::from_secs(3),
        "all resumed within the drain: {:?}",
        drained.elapsed()
    );
    let (_a, status) = exit.await.unwrap();
    assert!(status.success(), "the drained instance exits cleanly: {status:?}");
    for (mut w, mut c, w_id, c_id) in resumed {
        c.send(to_worker(w_id, RtcEvent::LocalIceCandidate, b"after")).await;
        let got = w.recv().await;
        assert_eq!(
            (got.event(), got.client_id, &got.message[..]),
            (RtcEvent::IceCandidate, c_id, &b"after"[..])
        );
        w.send(to_client(c_id, RtcEvent::LocalIceCandidate, b"after")).await;
        assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, 6).await, b"after");
    }
}

/// With auth, the instance a stream comes back on checks its token; the holder ends the peer
/// when that token expires, as for a stream of its own: through the tunnel, `UNAUTHENTICATED`.
#[tokio::test]
async fn a_tunnelled_stream_ends_when_its_token_expires() {
    use distributor::auth::{mint, mint_expiring_at};
    use distributor::core::Role;
    use std::time::SystemTime;
    const SECRET: &str = "the auth secret of this cluster test, 32 bytes or more";
    let nats = NatsCluster::start().await;
    let config = || Config { auth_secret: Some(SECRET.into()), ..Config::default() };
    let (a, b) =
        (instance_with(&nats, 0, "t22", config()).await, instance_with(&nats, 1, "t22", config()).await);
    let bearer =
        |role, id| format!("Bearer {}", mint(SECRET.as_bytes(), role, id, Duration::from_secs(60)).unwrap());
    let mut w = worker_with(&a, 23, &[("authorization", bearer(Role::Worker, 23))]).await;
    let resumable =
        |token: String, after: u64| [("authorization", token), ("x-resume-after", after.to_string())];
    let (mut c, cid) = client_with(&b, &resumable(bearer(Role::Client, 2323), 0)).await;
    assert_eq!(cid, 2323);
    negotiate(&mut c, cid, &mut w, 23).await;
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    backlog(&w, cid).await;
    // Back on A with a token that expired 3 s ago, within the 5 s leeway: let in, resumed
    // through B, and ended 1-2 s later (`exp` is in whole seconds).
    let exp = SystemTime::now() - Duration::from_secs(3);
    let token = format!("Bearer {}", mint_expiring_at(SECRET.as_bytes(), Role::Client, 2323, exp).unwrap());
    let started = Instant::now();
    let mut c = open_client(a.channel().await, &resumable(token, 1)).await.expect("opens on A");
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(6), c.rx_message()).await.expect("ends in time") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "ended after {took:?}");
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.client_id), (RtcEvent::PeerGone, 2323), "the peer ended for good");
}

/// A resume ask replayed on NATS (within the seal's freshness) is not answered again: the peer's
/// stream, tunnelled since the real ask, is not taken over a second time.
#[tokio::test]
async fn a_replayed_resume_ask_changes_nothing() {
    use futures::StreamExt;
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0, "t23").await, instance(&nats, 1, "t23").await);
    reach_each_other(&a, &b, 2300).await;
    let probe = async_nats::ConnectOptions::with_user_and_password(
        common::nats::USER.into(),
        common::nats::PASSWORD.into(),
    )
    .connect(nats.node_url(2))
    .await
    .unwrap();
    let mut asks = probe.subscribe("distributor.t23.resume").await.unwrap();
    probe.flush().await.unwrap();
    let mut w = worker(&a, 24).await;
    let resumable = |after: u64| [("x-client-id", "2424".to_string()), ("x-resume-after", after.to_string())];
    let (mut c, cid) = client_with(&b, &resumable(0)).await;
    negotiate(&mut c, cid, &mut w, 24).await;
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = open_client(a.channel().await, &resumable(1)).await.expect("opens on A");
    assert!(c.recv().await.resumed, "resumed through B");
    // The asks seen: the first stream's (on B, nobody held it), then the resume's (on A).
    let mut last = None;
    while let Ok(Some(ask)) = tokio::time::timeout(Duration::from_millis(300), asks.next()).await {
        last = Some(ask);
    }
    let ask = last.expect("the resume's ask was seen");
    probe
        .publish_with_reply(ask.subject.clone(), ask.reply.clone().unwrap(), ask.payload.clone())
        .await
        .unwrap();
    probe.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The tunnelled stream goes on, numbered on, and nothing ended it.
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"after the replay")).await;
    let got = c.recv().await;
    assert_eq!(
        (got.event(), &got.message[..]),
        (RtcEvent::IceCandidate, &b"after the replay"[..]),
        "{got:?}"
    );
    c.send(to_worker(24, RtcEvent::LocalIceCandidate, b"from the client")).await;
    assert_eq!(&w.recv().await.message[..], b"from the client");
    c.expect_quiet().await;
}
