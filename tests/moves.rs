//! Resumable peers that move home: a peer with nothing to keep on its instance (no session,
//! nothing it has not received) that resumes on another instance lives there from then on,
//! numbered on, instead of being served through a tunnel to the old one. So an instance that
//! drains lets its idle peers go at once and stops early, and they are not lost when it stops.
//! Real gRPC, a real 3-node NATS cluster, the drained instance a real process.
mod common;

use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::*;
use distributor::cluster::NatsConfig;
use distributor::config::Config;
use distributor::pb::{RtcEvent, WorkerRtcMessage};

/// A peer on `here` reaches a worker on `there`, both ways.
async fn reach_each_other(a: &TestServer, b: &TestServer, probe: i64) {
    for (here, there, id) in [(a, b, probe), (b, a, probe + 1)] {
        let mut w = worker(there, id).await;
        let (mut c, cid) = client(here).await;
        negotiate(&mut c, cid, &mut w, id).await;
    }
}

/// An instance in this process, on NATS node 1 first, with two shards.
async fn instance(nats: &NatsCluster, prefix: &str) -> TestServer {
    let nats = NatsConfig {
        url: nats.url_from(1),
        prefix: format!("distributor.{prefix}"),
        user: Some(common::nats::USER.into()),
        password: Some(common::nats::PASSWORD.into()),
        ..Default::default()
    };
    TestServer::with(Config { shards: 2, nats: Some(nats), ..Config::default() }).await
}

/// An instance as its own process (to be drained), on NATS node 0 first.
fn process(nats: &NatsCluster, prefix: &str, drain: &str) -> Binary {
    process_with(nats, prefix, &["--drain-timeout", drain])
}

fn process_with(nats: &NatsCluster, prefix: &str, extra: &[&str]) -> Binary {
    let (url, prefix) = (nats.url_from(0), format!("distributor.{prefix}"));
    let mut args = vec!["--nats-url", &url, "--nats-prefix", &prefix, "--shards", "2"];
    args.extend_from_slice(extra);
    let creds = [
        ("DISTRIBUTOR_NATS_USER", common::nats::USER),
        ("DISTRIBUTOR_NATS_PASSWORD", common::nats::PASSWORD),
    ];
    Binary::start(&args, &creds)
}

/// SIGTERM on an instance whose resumable peers hold no session: each is told `RECONNECT`,
/// resumes on the other instance (`resumed: true`) and moves there, so the drained instance
/// has nothing left to serve and stops long before `--drain-timeout`; afterwards the peers
/// are where they resumed, numbered on without a gap: clients there reach the workers, the
/// clients reach workers, and nobody is told to resume again.
#[tokio::test]
async fn a_drained_instance_lets_its_idle_peers_go_and_stops_early() {
    const PEERS: i64 = 5;
    let nats = NatsCluster::start().await;
    let b = instance(&nats, "m1").await;
    let mut a = process(&nats, "m1", "6s");
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3100).await;
    let after = |n: u64| ("x-resume-after", n.to_string());
    let client_meta = |id: i64, n: u64| [("x-client-id", id.to_string()), after(n)];
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for k in 0..PEERS {
        let (w_id, c_id) = (3200 + k, 32_000 + k);
        let mut w = worker_with(&a_server, w_id, &[after(0)]).await;
        // A session that opened and ended: the worker holds none when the drain begins.
        let (mut visitor, vid) = client(&b).await;
        visitor.send(to_worker(w_id, RtcEvent::Offer, b"offer")).await;
        let offer = w.recv().await;
        assert_eq!((offer.event(), offer.seq), (RtcEvent::Offer, 1), "{offer:?}");
        visitor.close();
        let gone = w.recv().await;
        assert_eq!((gone.event(), gone.client_id, gone.seq), (RtcEvent::PeerGone, vid, 2), "{gone:?}");
        workers.push((w, w_id));
        let (mut c, cid) = client_with(&a_server, &client_meta(c_id, 0)).await;
        assert_eq!(cid, c_id);
        c.send(to_worker(0, RtcEvent::Ping, b"ping")).await;
        assert_eq!(expect_numbered(&mut c, RtcEvent::Ping, 1).await, b"ping");
        clients.push((c, c_id));
    }
    let drained = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = a.terminate();
        (status, Instant::now())
    });
    let mut moved_workers = Vec::new();
    for (mut w, w_id) in workers {
        let reconnect = w.recv().await;
        assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 3), "{reconnect:?}");
        let mut w = open_worker(b.channel().await, &[after(3)], blank(w_id)).await.expect("opens on B");
        let ack = w.recv().await;
        assert_eq!(
            (ack.event(), ack.worker_machine_id, ack.resumed),
            (RtcEvent::Blank, w_id, true),
            "{ack:?}"
        );
        moved_workers.push((w, w_id));
    }
    let mut moved_clients = Vec::new();
    for (mut c, c_id) in clients {
        let reconnect = c.recv().await;
        assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
        let mut c = open_client(b.channel().await, &client_meta(c_id, 2)).await.expect("opens on B");
        let welcome = c.recv().await;
        assert_eq!((welcome.event(), welcome.client_id, welcome.resumed), (RtcEvent::Blank, c_id, true));
        moved_clients.push((c, c_id));
    }
    let (status, exited) = exit.await.unwrap();
    assert!(status.success(), "the drained instance exits cleanly: {status:?}");
    let took = exited.duration_since(drained);
    assert!(took < Duration::from_secs(5), "nothing held there: it stops before its 6 s drain ({took:?})");

    // The drained instance is gone; the peers live on B, numbered on from where they were.
    for ((mut w, w_id), (mut c, c_id)) in moved_workers.into_iter().zip(moved_clients) {
        c.send(to_worker(w_id, RtcEvent::Offer, b"after the move")).await;
        let offer = w.recv().await;
        assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, c_id, 4), "{offer:?}");
        w.send(to_client(c_id, RtcEvent::Answer, b"answer")).await;
        assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 3).await, b"answer");
        c.send(to_worker(w_id, RtcEvent::AcceptAnswer, b"")).await;
        assert_eq!(w.recv().await.seq, 5);
        // Nothing else comes: no RECONNECT, no end.
        w.expect_quiet().await;
        c.expect_quiet().await;
    }
}

/// A peer that holds a session stays on its instance when it resumes elsewhere (served through
/// a tunnel); once its last session ends, its next resume moves it.
#[tokio::test]
async fn a_peer_with_a_session_is_tunnelled_and_moves_once_it_holds_none() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, "m2").await, instance(&nats, "m2").await);
    reach_each_other(&a, &b, 3300).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a, 34, &after(0)).await;
    let (mut c, cid) = client(&a).await;
    c.send(to_worker(34, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.cut();
    let mut w = open_worker(b.channel().await, &after(1), blank(34)).await.unwrap();
    assert!(w.recv().await.resumed, "served through A, which holds its session");
    // The session is on A: its client there reaches the worker through the tunnel.
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    c.close();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.seq), (RtcEvent::PeerGone, 2), "{gone:?}");
    // No session any more: the next resume moves the worker to B, and A, which ends its old
    // stream, serves it no longer.
    w.cut();
    let mut w = open_worker(b.channel().await, &after(2), blank(34)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "{ack:?}");
    let shut = a.shutdown();
    tokio::time::timeout(Duration::from_secs(10), shut).await.expect("A stops").expect("cleanly");
    let (c, cid) = client(&b).await;
    c.send(to_worker(34, RtcEvent::Offer, b"on B")).await;
    let offer = w.recv().await;
    assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, cid, 3), "{offer:?}");
    w.expect_quiet().await;
}

/// During a drain, a worker that resumed elsewhere through a tunnel (it held a session) is told
/// `RECONNECT` again once its last session has ended, and its next resume moves it: the drained
/// instance stops before its drain timeout, and the worker is reached where it moved.
#[tokio::test]
async fn during_a_drain_a_peer_whose_last_session_ends_is_told_to_reconnect_and_moves() {
    let nats = NatsCluster::start().await;
    let b = instance(&nats, "m3").await;
    let mut a = process(&nats, "m3", "6s");
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3500).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 36, &after(0)).await;
    let (mut c, cid) = client(&b).await;
    c.send(to_worker(36, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    let drained = Instant::now();
    let exit = tokio::task::spawn_blocking(move || (a.terminate(), Instant::now()));
    let reconnect = w.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
    let mut w = open_worker(b.channel().await, &after(2), blank(36)).await.unwrap();
    assert!(w.recv().await.resumed, "through a tunnel to A, which holds its session");
    c.close();
    let gone = w.recv().await;
    assert_eq!((gone.event(), gone.seq), (RtcEvent::PeerGone, 3), "{gone:?}");
    let again = w.recv().await;
    assert_eq!((again.event(), again.seq), (RtcEvent::Reconnect, 4), "told again, idle now: {again:?}");
    let mut w = open_worker(b.channel().await, &after(4), blank(36)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "{ack:?}");
    let (status, exited) = exit.await.unwrap();
    assert!(status.success(), "{status:?}");
    let took = exited.duration_since(drained);
    assert!(
        took < Duration::from_secs(5),
        "it held nothing any more: stopped before its 6 s drain ({took:?})"
    );
    let (c, cid) = client(&b).await;
    c.send(to_worker(36, RtcEvent::Offer, b"after the drain")).await;
    let offer = w.recv().await;
    assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, cid, 5), "{offer:?}");
}

/// Out of any drain: an idle worker cut on one instance and back on another moves there (the
/// first counts it), so that the first may die without taking the worker with it.
#[tokio::test]
async fn an_idle_peer_cut_on_one_instance_moves_to_the_one_it_resumes_on() {
    let nats = NatsCluster::start().await;
    let b = instance(&nats, "m4").await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut a = process_with(&nats, "m4", &["--metrics-listen", &metrics]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3700).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 38, &after(0)).await;
    w.send(WorkerRtcMessage { event: RtcEvent::Ping as i32, seq: 1, ..Default::default() }).await;
    let pong = w.recv().await;
    assert_eq!((pong.event(), pong.seq), (RtcEvent::Ping, 1), "{pong:?}");
    w.cut();
    let mut w = open_worker(b.channel().await, &after(1), blank(38)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed, ack.seq), (RtcEvent::Blank, true, 1), "{ack:?}");
    let moved = metric(&metrics_text(&metrics), "distributor_peers_moved_total{role=\"worker\"}");
    assert_eq!(moved, 1.0);
    // A client on A reaches it on B (A heard its claim); then A dies, and it stays.
    let (c, cid) = client(&a_server).await;
    c.send(to_worker(38, RtcEvent::Offer, b"from A")).await;
    let offer = w.recv().await;
    assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, cid, 2), "{offer:?}");
    a.kill();
    // Within the liveness bound (about 4 s).
    let gone = tokio::time::timeout(Duration::from_secs(8), w.rx_message()).await.expect("in time");
    let gone = gone.expect("the stream goes on").expect("a message");
    assert_eq!(
        (gone.event(), gone.client_id, gone.seq),
        (RtcEvent::PeerGone, cid, 3),
        "its client died with A"
    );
    let (c, cid) = client(&b).await;
    c.send(to_worker(38, RtcEvent::Offer, b"from B")).await;
    let offer = w.recv().await;
    assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, cid, 4), "{offer:?}");
}
