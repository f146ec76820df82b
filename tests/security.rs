//! What outsiders and abusive peers cannot do (SECURITY.md): steer instances over NATS without
//! the cluster key, use the local NATS cluster anonymously, hold streams without limit, send
//! without limit, hold sessions without limit, or disturb other peers with a flood.
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::nats::{NatsCluster, PASSWORD, USER};
use common::*;
use distributor::auth::mint_expiring_at;
use distributor::cluster::wire::{self, record::Kind};
use distributor::config::{Config, Limits};
use distributor::core::Role;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ErrorCode, RtcEvent};
use futures::StreamExt;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const PREFIX: &str = "distributor.sec";
const KEY: &str = "the cluster key of this test, 32 bytes or more";

fn limits(f: impl FnOnce(&mut Limits)) -> Config {
    let mut limits = Limits::default();
    f(&mut limits);
    Config { limits, ..Config::default() }
}

/// The `sent_at ‖ kind ‖ version ‖ tag` a sealed message ends with.
const SEAL_TRAILER: usize = 8 + 1 + 1 + 32;

#[tokio::test]
async fn forged_cluster_traffic_is_rejected_and_changes_nothing() {
    let nats = NatsCluster::start().await;
    let (ma, mb) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let creds = [("DISTRIBUTOR_NATS_USER", USER), ("DISTRIBUTOR_NATS_PASSWORD", PASSWORD)];
    let start = |first: usize, metrics: &str| {
        let url = nats.url_from(first);
        let args =
            ["--nats-url", &url, "--nats-prefix", PREFIX, "--cluster-key", KEY, "--metrics-listen", metrics];
        Binary::start(&args, &creds)
    };
    let (a, b) = (start(0, &ma), start(1, &mb));
    let (sa, sb) = (TestServer::external(&a.addr), TestServer::external(&b.addr));
    let mut w = worker(&sb, 7).await;
    let (mut c, cid) = client(&sa).await;
    negotiate(&mut c, cid, &mut w, 7).await;

    // The attacker: a client of the same NATS, with the distributor's own NATS credentials
    // (the worst case), but not the cluster key.
    let attacker = async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into())
        .connect(nats.node_url(2))
        .await
        .unwrap();
    // Instance ids, read off the heartbeats: their bodies are plain protobuf.
    let mut beats = attacker.subscribe(format!("{PREFIX}.hb")).await.unwrap();
    let mut instances = HashSet::new();
    while instances.len() < 2 {
        let beat =
            tokio::time::timeout(Duration::from_secs(5), beats.next()).await.expect("heartbeats").unwrap();
        let body = &beat.payload[..beat.payload.len() - SEAL_TRAILER];
        instances.insert(wire::Heartbeat::decode(body).unwrap().instance);
    }
    let ids: Vec<u64> = instances.into_iter().collect();
    // A locate answerer that lies, for worker 9 (which registers on B) and worker 10 (connected
    // nowhere): it names an instance of its own, and instance 0.
    for worker in [9, 10] {
        let mut lies = attacker.subscribe(format!("{PREFIX}.w.{worker}")).await.unwrap();
        let liar = attacker.clone();
        tokio::spawn(async move {
            while let Some(request) = lies.next().await {
                if let Some(reply) = request.reply {
                    let lie = wire::Located { instance: 12345 }.encode_to_vec();
                    let _ = liar.publish(reply.clone(), lie.into()).await;
                    let _ = liar.publish(reply, Bytes::new()).await;
                }
            }
        });
    }
    attacker.flush().await.unwrap();

    let conn = |instance| Some(wire::Conn { at: u64::MAX, instance });
    for (i, &id) in ids.iter().enumerate() {
        let other = ids[1 - i];
        let claim = wire::Claim { worker: true, id: 7, conn: conn(id), moved_from: 0, now_at: 0 };
        attacker.publish(format!("{PREFIX}.claim"), claim.encode_to_vec().into()).await.unwrap();
        let leaving = wire::Heartbeat { instance: id, leaving: true };
        attacker.publish(format!("{PREFIX}.hb"), leaving.encode_to_vec().into()).await.unwrap();
        let records = [
            Kind::ClientSignal(wire::ClientSignal {
                client: 666,
                conn: conn(other),
                worker: 7,
                event: RtcEvent::Offer as i32,
                payload: "evil offer".into(),
                ..Default::default()
            }),
            Kind::ToClient(wire::ToClient {
                client: cid,
                conn: conn(other),
                worker: 7,
                event: RtcEvent::Answer as i32,
                payload: "evil answer, evil fingerprint".into(),
                error_code: 0,
            }),
            Kind::ToWorker(wire::ToWorker {
                worker: 7,
                client: cid,
                event: RtcEvent::Error as i32,
                payload: "evil".into(),
                error_code: ErrorCode::PeerOverloaded as i32,
            }),
            Kind::ClientGone(wire::ClientGone { client: cid, conn: conn(other), ..Default::default() }),
            Kind::ClientLeft(wire::ClientLeft { conn: conn(other), moves: 0 }),
        ];
        for epoch in [u64::MAX - 1, u64::MAX] {
            let records = records.iter().map(|k| wire::Record { kind: Some(k.clone()) }).collect();
            let frame = wire::Frame { from: other, epoch, seq: 1, records, ..Default::default() };
            attacker.publish(format!("{PREFIX}.i.{id}"), frame.encode_to_vec().into()).await.unwrap();
        }
    }
    attacker.flush().await.unwrap();

    // Worker 9 registers on B; the client on A finds it despite the lying answerer.
    let mut w9 = worker(&sb, 9).await;
    c.send(to_worker(9, RtcEvent::Offer, b"genuine")).await;
    let offer = w9.recv().await;
    assert_eq!((offer.event(), &offer.message[..]), (RtcEvent::Offer, &b"genuine"[..]));
    // Only the liar answers for worker 10: its answers are not believed, the OFFER goes nowhere
    // and is refused (the lookup found no instance that answered truthfully).
    c.send(to_worker(10, RtcEvent::Offer, b"to nobody")).await;
    assert_client_error(&c.recv().await, ErrorCode::ClusterUnavailable, 10);

    // Every forgery is counted as rejected, on each instance that received it.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (metrics, locates) in [(&ma, 2.0), (&mb, 0.0)] {
        loop {
            let text = metrics_text(metrics);
            let got =
                |kind: &str| metric(&text, &format!("distributor_cluster_rejected_total{{kind=\"{kind}\"}}"));
            if got("claim") >= 2.0
                && got("heartbeat") >= 2.0
                && got("frame") >= 2.0
                && got("located") >= locates
            {
                break;
            }
            assert!(Instant::now() < deadline, "rejections not counted on {metrics}:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Nothing was believed: no stream ended, no session ended, nothing forged was delivered.
    w.expect_quiet().await;
    c.expect_quiet().await;
    c.send(to_worker(7, RtcEvent::LocalIceCandidate, b"still here")).await;
    assert_eq!(&w.recv().await.message[..], b"still here");
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"and here")).await;
    assert_eq!(&c.recv().await.message[..], b"and here");
}

#[tokio::test]
async fn anonymous_nats_clients_are_refused_by_the_shipped_configs() {
    let nats = NatsCluster::start().await;
    let anonymous = async_nats::ConnectOptions::new().connect(nats.node_url(0)).await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let wrong = async_nats::ConnectOptions::with_user_and_password(USER.into(), "guess".into())
        .connect(nats.node_url(0))
        .await;
    assert!(wrong.is_err(), "a wrong password was let in");
    // The shipped node configs use the same file.
    for n in 1..=3 {
        let conf = std::fs::read_to_string(format!("{}/nats/n{n}.conf", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            conf.lines().any(|l| l.trim() == "include ./auth.conf"),
            "n{n}.conf does not include auth.conf"
        );
    }
}

#[tokio::test]
async fn streams_on_one_connection_are_capped() {
    const OPENED: usize = 1200;
    let server = TestServer::with(limits(|l| l.register_timeout = Duration::from_secs(2))).await;
    let channel = server.channel().await;
    let mut opening = futures::stream::FuturesUnordered::new();
    let mut senders = Vec::new();
    for _ in 0..OPENED {
        let (tx, rx) = tokio::sync::mpsc::channel::<distributor::pb::WorkerRtcMessage>(1);
        senders.push(tx);
        let mut client = WorkerServiceClient::new(channel.clone());
        opening.push(async move { client.negotiate_peer_connection(ReceiverStream::new(rx)).await });
    }
    // The first thousand (the default cap) are answered; the rest wait for room.
    let mut open = Vec::new();
    let settle = tokio::time::sleep(Duration::from_millis(1500));
    tokio::pin!(settle);
    loop {
        tokio::select! {
            Some(response) = opening.next() => open.push(response.expect("a stream opens").into_inner()),
            _ = &mut settle => break,
        }
    }
    assert_eq!(open.len(), Limits::default().max_streams_per_connection as usize, "streams open at once");
    // None of them registers: each ends after the registration timeout, and the waiting ones
    // get their turn, and end the same way.
    for mut stream in open {
        let status = tokio::time::timeout(WAIT, stream.message()).await.unwrap().expect_err("ended");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let late = tokio::time::timeout(Duration::from_secs(10), opening.next()).await.unwrap().unwrap();
    let status = late.unwrap().into_inner().message().await.expect_err("ended");
    assert_eq!(status.code(), Code::InvalidArgument);
    drop(senders);
}

#[tokio::test]
async fn an_unregistered_worker_stream_ends_within_its_timeout() {
    let server = TestServer::with(limits(|l| l.register_timeout = Duration::from_millis(300))).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<distributor::pb::WorkerRtcMessage>(1);
    let started = Instant::now();
    let mut stream = WorkerServiceClient::new(server.channel().await)
        .negotiate_peer_connection(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(WAIT, stream.message()).await.unwrap().expect_err("ended");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("registration"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    drop(tx);
}

#[tokio::test]
async fn a_stream_over_its_rate_is_refused_with_rate_limited_and_stays_open() {
    let server = TestServer::with(limits(|l| (l.peer_rate, l.peer_burst) = (20, 5))).await;
    let mut w = worker(&server, 3).await;
    let (mut c, cid) = client(&server).await;
    for i in 0..12u8 {
        c.send(to_worker(3, RtcEvent::Ping, &[i])).await;
    }
    let (mut echoed, mut limited) = (0, 0);
    for _ in 0..12 {
        let msg = c.recv().await;
        match msg.event() {
            RtcEvent::Ping => echoed += 1,
            _ => {
                assert_client_error(&msg, ErrorCode::RateLimited, 3);
                limited += 1;
            }
        }
    }
    // The burst, and perhaps a token or two refilled meanwhile; the rest refused.
    assert!((5..=7).contains(&echoed), "{echoed} echoed");
    assert_eq!(echoed + limited, 12);
    // The stream stays open and serves again once tokens refill; others are not limited.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(to_worker(3, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
}

#[tokio::test]
async fn the_session_cap_refuses_the_offer_that_would_exceed_it() {
    let server = TestServer::with(limits(|l| l.max_sessions_per_client = 2)).await;
    let mut workers = Vec::new();
    for id in 1..=3 {
        workers.push(worker(&server, id).await);
    }
    let (mut c, _) = client(&server).await;
    c.send(to_worker(1, RtcEvent::Offer, b"1")).await;
    c.send(to_worker(2, RtcEvent::Offer, b"2")).await;
    assert_eq!(workers[0].recv().await.event(), RtcEvent::Offer);
    assert_eq!(workers[1].recv().await.event(), RtcEvent::Offer);
    c.send(to_worker(3, RtcEvent::Offer, b"3")).await;
    let refused = c.recv().await;
    assert_client_error(&refused, ErrorCode::TooManySessions, 3);
    assert!(String::from_utf8_lossy(&refused.message).contains("2 sessions"), "{refused:?}");
    // Renegotiating an existing session is not a new one.
    c.send(to_worker(2, RtcEvent::Offer, b"2 again")).await;
    assert_eq!(&workers[1].recv().await.message[..], b"2 again");
    // A session that ends frees its place.
    drop(workers.remove(0));
    assert_eq!(c.recv().await.event(), RtcEvent::PeerGone);
    c.send(to_worker(3, RtcEvent::Offer, b"3")).await;
    assert_eq!(&workers[1].recv().await.message[..], b"3");
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    const SECRET: &str = "the auth secret of this test, 32 bytes or more";
    let server = TestServer::with(Config { auth_secret: Some(SECRET.into()), ..Config::default() }).await;
    // Expired 3 s ago, within the 5 s leeway: let in, and ended 1-2 s later (`exp` is in whole
    // seconds).
    let exp = SystemTime::now() - Duration::from_secs(3);
    let token = mint_expiring_at(SECRET.as_bytes(), Role::Client, 44, exp).unwrap();
    let started = Instant::now();
    let (mut c, cid) = client_with(&server, &[("authorization", format!("Bearer {token}"))]).await;
    assert_eq!(cid, 44);
    let status =
        tokio::time::timeout(Duration::from_secs(6), c.rx_message()).await.unwrap().expect_err("ended");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "ended after {took:?}");
}
