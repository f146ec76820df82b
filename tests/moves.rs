//! Resumable peers that move home: a peer with nothing to keep on its instance (no session,
//! nothing it has not received), and a worker with its sessions, that resumes on another
//! instance lives there from then on, numbered on, instead of being served through a tunnel to
//! the old one. So an instance that drains lets its peers go at once and stops early, and they
//! are not lost when it stops.
//! Real gRPC, a real 3-node NATS cluster, the drained instance a real process.
mod common;

use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::*;
use distributor::pb::{ErrorCode, RtcEvent, WorkerRtcMessage};

/// SIGTERM on an instance whose resumable peers hold no session: each is told `RECONNECT`,
/// resumes on the other instance (`resumed: true`) and moves there, so the drained instance
/// has nothing left to serve and stops long before `--drain-timeout`; afterwards the peers
/// are where they resumed, numbered on without a gap: clients there reach the workers, the
/// clients reach workers, and nobody is told to resume again.
#[tokio::test]
async fn a_drained_instance_lets_its_idle_peers_go_and_stops_early() {
    const PEERS: i64 = 5;
    let nats = NatsCluster::start().await;
    let b = nats.instance("m1").await;
    let mut a = nats.process("m1", &["--drain-timeout", "6s"]);
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

/// A worker that holds sessions and resumes on another instance moves there with them: what
/// was held for it while it was cut comes first, numbered on; its clients on a third instance
/// and on its old one reach it where it is; and when its old instance dies, only the session
/// of the client that died with it ends.
#[tokio::test]
async fn a_worker_with_sessions_moves_with_them_and_outlives_its_old_instance() {
    let nats = NatsCluster::start().await;
    let (b, c) = (nats.instance("m2").await, nats.instance("m2").await);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut a = nats.process("m2", &["--metrics-listen", &metrics]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3300).await;
    reach_each_other(&c, &b, 3310).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 34, &after(0)).await;
    // A client on a third instance, mid-negotiation (answered), and one on A (offered).
    let (mut far, far_id) = client(&c).await;
    far.send(to_worker(34, RtcEvent::Offer, b"offer far")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(far_id, RtcEvent::Answer, b"answer far")).await;
    assert_eq!(far.recv().await.event(), RtcEvent::Answer);
    let (mut near, near_id) = client(&a_server).await;
    near.send(to_worker(34, RtcEvent::Offer, b"offer near")).await;
    assert_eq!(w.recv().await.seq, 2);
    w.cut();
    // Held on A while the worker is away: numbered 3 when written, on B.
    tokio::time::sleep(Duration::from_millis(200)).await;
    far.send(to_worker(34, RtcEvent::LocalIceCandidate, b"held")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut w = open_worker(b.channel().await, &after(2), blank(34)).await.unwrap();
    // Sent while the worker moves: whether it reaches A before the move, while the worker is
    // on its way (it follows), or B after C heard the claim, it arrives right after the rest.
    far.send(to_worker(34, RtcEvent::LocalIceCandidate, b"racing")).await;
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "{ack:?}");
    let held = w.recv().await;
    assert_eq!((held.event(), held.client_id, held.seq), (RtcEvent::IceCandidate, far_id, 3), "{held:?}");
    assert_eq!(&held.message[..], b"held");
    let racing = w.recv().await;
    assert_eq!(
        (racing.event(), racing.seq, &racing.message[..]),
        (RtcEvent::IceCandidate, 4, &b"racing"[..])
    );
    let moved = metric(&metrics_text(&metrics), "distributor_peers_moved_total{role=\"worker\"}");
    assert_eq!(moved, 1.0, "A counts the move");

    // Both sessions go on from where they stood, on B.
    far.send(to_worker(34, RtcEvent::AcceptAnswer, b"")).await;
    let accepted = w.recv().await;
    assert_eq!((accepted.event(), accepted.client_id, accepted.seq), (RtcEvent::AcceptAnswer, far_id, 5));
    w.send(to_client(near_id, RtcEvent::Answer, b"answer near")).await;
    let answer = near.recv().await;
    assert_eq!((answer.event(), &answer.message[..]), (RtcEvent::Answer, &b"answer near"[..]));
    near.send(to_worker(34, RtcEvent::LocalIceCandidate, b"near candidate")).await;
    let candidate = w.recv().await;
    assert_eq!((candidate.event(), candidate.client_id, candidate.seq), (RtcEvent::IceCandidate, near_id, 6));
    // The state machine moved too: the far client's answer was accepted already.
    far.send(to_worker(34, RtcEvent::AcceptAnswer, b"")).await;
    assert_client_error(&far.recv().await, ErrorCode::InvalidTransition, 34);

    // A dies: the client on it goes with it; the far client's session stays, on B.
    a.kill();
    let gone = tokio::time::timeout(Duration::from_secs(8), w.rx_message()).await.expect("in time");
    let gone = gone.expect("the stream goes on").expect("a message");
    assert_eq!((gone.event(), gone.client_id, gone.seq), (RtcEvent::PeerGone, near_id, 7), "{gone:?}");
    w.send(to_client(far_id, RtcEvent::LocalIceCandidate, b"after A")).await;
    let candidate = far.recv().await;
    assert_eq!((candidate.event(), &candidate.message[..]), (RtcEvent::IceCandidate, &b"after A"[..]));
    far.send(to_worker(34, RtcEvent::LocalIceCandidate, b"still here")).await;
    assert_eq!(w.recv().await.seq, 8);
    far.expect_quiet().await;
    w.expect_quiet().await;
}

/// A drain, for peers mid-negotiation: a worker (its client on another instance) and a client
/// (its workers on the instance it resumes on and on a third): each, told `RECONNECT`, resumes
/// on the other instance and moves there with its sessions, so that the drained instance has
/// nothing left to serve and stops early, and every negotiation finishes after it stopped.
#[tokio::test]
async fn a_drained_instance_moves_its_peers_with_their_sessions_and_stops_early() {
    let nats = NatsCluster::start().await;
    let (b, c3) = (nats.instance("m3").await, nats.instance("m3").await);
    let mut a = nats.process("m3", &["--drain-timeout", "6s"]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3500).await;
    reach_each_other(&c3, &b, 3510).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 36, &after(0)).await;
    let (mut c, cid) = client(&b).await;
    c.send(to_worker(36, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::Answer);
    // A resumable client on A, with a worker on B (answered) and one on a third instance.
    let (mut w37, mut w38) = (worker(&b, 37).await, worker(&c3, 38).await);
    let client_meta = |n: u64| [("x-client-id", "37000".to_string()), ("x-resume-after", n.to_string())];
    let (mut c2, _) = client_with(&a_server, &client_meta(0)).await;
    c2.send(to_worker(37, RtcEvent::Offer, b"offer 37")).await;
    c2.send(to_worker(38, RtcEvent::Offer, b"offer 38")).await;
    assert_eq!(w37.recv().await.event(), RtcEvent::Offer);
    assert_eq!(w38.recv().await.event(), RtcEvent::Offer);
    w37.send(to_client(37_000, RtcEvent::Answer, b"answer 37")).await;
    assert_eq!(expect_numbered(&mut c2, RtcEvent::Answer, 1).await, b"answer 37");

    let drained = Instant::now();
    let exit = tokio::task::spawn_blocking(move || (a.terminate(), Instant::now()));
    let reconnect = w.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
    let mut w = open_worker(b.channel().await, &after(2), blank(36)).await.unwrap();
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "{ack:?}");
    let reconnect = c2.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
    let mut c2 = open_client(b.channel().await, &client_meta(2)).await.unwrap();
    let welcome = c2.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");

    let (status, exited) = exit.await.unwrap();
    assert!(status.success(), "{status:?}");
    let took = exited.duration_since(drained);
    assert!(took < Duration::from_secs(5), "nothing held there: stopped before its 6 s drain ({took:?})");
    // Every negotiation finishes on B and C, without A.
    c.send(to_worker(36, RtcEvent::AcceptAnswer, b"")).await;
    let accepted = w.recv().await;
    assert_eq!((accepted.event(), accepted.client_id, accepted.seq), (RtcEvent::AcceptAnswer, cid, 3));
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"candidate")).await;
    assert_eq!(c.recv().await.event(), RtcEvent::IceCandidate);
    c2.send(to_worker(37, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w37.recv().await.event(), RtcEvent::AcceptAnswer);
    w37.send(to_client(37_000, RtcEvent::LocalIceCandidate, b"from 37")).await;
    assert_eq!(expect_numbered(&mut c2, RtcEvent::IceCandidate, 3).await, b"from 37");
    w38.send(to_client(37_000, RtcEvent::Answer, b"answer 38")).await;
    assert_eq!(expect_numbered(&mut c2, RtcEvent::Answer, 4).await, b"answer 38");
    c2.send(to_worker(38, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w38.recv().await.event(), RtcEvent::AcceptAnswer);
    c.expect_quiet().await;
    c2.expect_quiet().await;
}

/// A client that holds sessions and resumes on another instance moves there with them, its
/// stream keeping its id: what its worker on a third instance sent while it was cut comes
/// first, numbered on; its workers on its old instance, on its new one and on the third reach
/// it and are reached; when its old instance dies, only the session of the worker that died
/// with it ends.
#[tokio::test]
async fn a_client_with_sessions_moves_with_them_and_outlives_its_old_instance() {
    let nats = NatsCluster::start().await;
    let (b, c3) = (nats.instance("m5").await, nats.instance("m5").await);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut a = nats.process("m5", &["--metrics-listen", &metrics]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3900).await;
    reach_each_other(&c3, &b, 3910).await;
    reach_each_other(&c3, &a_server, 3920).await;
    let meta = |n: u64| [("x-client-id", "39000".to_string()), ("x-resume-after", n.to_string())];
    let (mut c, _) = client_with(&a_server, &meta(0)).await;
    let (mut on_a, mut on_b, mut on_c) =
        (worker(&a_server, 391).await, worker(&b, 392).await, worker(&c3, 393).await);
    for (w, id) in [(&mut on_a, 391), (&mut on_b, 392), (&mut on_c, 393)] {
        c.send(to_worker(id, RtcEvent::Offer, b"offer")).await;
        assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    }
    on_a.send(to_client(39_000, RtcEvent::Answer, b"a")).await;
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 1).await, b"a");
    c.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    on_c.send(to_client(39_000, RtcEvent::Answer, b"held")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut c = open_client(b.channel().await, &meta(1)).await.unwrap();
    // Sent while the client moves: it reaches it, after what was held.
    on_b.send(to_client(39_000, RtcEvent::Answer, b"racing")).await;
    let welcome = c.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 2).await, b"held");
    assert_eq!(expect_numbered(&mut c, RtcEvent::Answer, 3).await, b"racing");
    let moved = metric(&metrics_text(&metrics), "distributor_peers_moved_total{role=\"client\"}");
    assert_eq!(moved, 1.0, "A counts the move");

    // Every session goes on from where it stood.
    for (w, id, seq) in [(&mut on_a, 391, 4), (&mut on_b, 392, 5), (&mut on_c, 393, 6)] {
        c.send(to_worker(id, RtcEvent::AcceptAnswer, b"")).await;
        let accepted = w.recv().await;
        assert_eq!((accepted.event(), accepted.client_id), (RtcEvent::AcceptAnswer, 39_000), "{accepted:?}");
        w.send(to_client(39_000, RtcEvent::LocalIceCandidate, b"cand")).await;
        assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, seq).await, b"cand", "from {id}");
    }
    c.send(to_worker(392, RtcEvent::AcceptAnswer, b"")).await;
    assert_client_error(&c.recv().await, ErrorCode::InvalidTransition, 392);

    // A dies with its worker: that session ends; the others go on.
    a.kill();
    let gone = tokio::time::timeout(Duration::from_secs(8), c.rx_message()).await.expect("in time");
    let gone = gone.expect("the stream goes on").expect("a message");
    assert_eq!((gone.event(), gone.worker_machine_id, gone.seq), (RtcEvent::PeerGone, 391, 8), "{gone:?}");
    for (w, id, seq) in [(&mut on_b, 392, 9), (&mut on_c, 393, 10)] {
        w.send(to_client(39_000, RtcEvent::LocalIceCandidate, b"after A")).await;
        assert_eq!(expect_numbered(&mut c, RtcEvent::IceCandidate, seq).await, b"after A", "from {id}");
        c.send(to_worker(id, RtcEvent::LocalIceCandidate, b"still here")).await;
        assert_eq!(w.recv().await.event(), RtcEvent::IceCandidate);
    }
    c.expect_quiet().await;
}

/// Out of any drain: an idle worker cut on one instance and back on another moves there (the
/// first counts it), so that the first may die without taking the worker with it.
#[tokio::test]
async fn an_idle_peer_cut_on_one_instance_moves_to_the_one_it_resumes_on() {
    let nats = NatsCluster::start().await;
    let b = nats.instance("m4").await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut a = nats.process("m4", &["--metrics-listen", &metrics]);
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

/// A worker whose old stream waits for room to answer a message it read (its queue full: the
/// worker does not read) when the worker resumes elsewhere: that stream stops reading at once,
/// without routing the message it waited with, so the worker moves (its queue along with it);
/// the acknowledgement says that message was not received, the worker sends it again, and
/// its client gets it once. Everything written or queued on the old stream is replayed.
#[tokio::test]
async fn a_worker_whose_old_stream_waits_for_room_moves_and_resends_what_was_not_received() {
    const PAYLOAD: usize = 1000;
    let nats = NatsCluster::start().await;
    let b = nats.instance("m5").await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut a = nats.process("m5", &["--metrics-listen", &metrics, "--peer-queue", "64"]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, 3800).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    // A small receive window: the distributor can write little ahead of what the worker reads,
    // so its queue, and then its reading, stall with what it kept for replay.
    let narrow = tonic::transport::Channel::from_shared(a_server.url())
        .unwrap()
        .initial_stream_window_size(Some(8 * 1024))
        .connect()
        .await
        .unwrap();
    let mut w = open_worker(narrow, &after(0), blank(39)).await.unwrap();
    assert_eq!(w.recv().await.event(), RtcEvent::Blank);
    let (mut c, cid) = client(&a_server).await;
    c.send(to_worker(39, RtcEvent::Offer, &[b'o'; PAYLOAD])).await;
    // The worker reads nothing: once what was written fills its window and its queue, the
    // client is refused (`PEER_OVERLOADED`); what was taken is a prefix of what was sent.
    let (mut sent, mut refused) = (1u32, 0);
    let refusals = async |c: &mut ClientStream, within: u64| {
        let mut n = 0;
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_millis(within), c.rx_message()).await
        {
            assert_client_error(&msg, ErrorCode::PeerOverloaded, 39);
            n += 1;
        }
        n
    };
    while refused == 0 && sent < 300 {
        let mut payload = vec![b'c'; PAYLOAD];
        payload[..4].copy_from_slice(&(sent - 1).to_be_bytes());
        c.send(to_worker(39, RtcEvent::LocalIceCandidate, &payload)).await;
        sent += 1;
        refused += refusals(&mut c, 20).await;
    }
    refused += refusals(&mut c, 300).await;
    assert!(refused > 0, "the worker's queue filled");
    let taken = sent - refused;
    // Its answer, numbered, waits for room on the old stream.
    let answer = WorkerRtcMessage { seq: 1, ..to_client(cid, RtcEvent::Answer, b"answer") };
    w.send(answer.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut resumed = open_worker(b.channel().await, &after(0), blank(39)).await.unwrap();
    let ack = resumed.recv().await;
    assert_eq!(
        (ack.event(), ack.resumed, ack.seq),
        (RtcEvent::Blank, true, 0),
        "the answer was not received: {ack:?}"
    );
    let offer = resumed.recv().await;
    assert_eq!((offer.event(), offer.client_id, offer.seq), (RtcEvent::Offer, cid, 1), "{offer:?}");
    for seq in 2..=taken {
        let candidate = resumed.recv().await;
        assert_eq!((candidate.event(), candidate.seq), (RtcEvent::IceCandidate, seq as u64), "{candidate:?}");
        assert_eq!(number(&candidate.message), seq - 2, "in order");
    }
    c.expect_quiet().await;
    resumed.send(answer).await;
    let answer = c.recv().await;
    assert_eq!((answer.event(), &answer.message[..]), (RtcEvent::Answer, &b"answer"[..]), "{answer:?}");
    let text = metrics_text(&metrics);
    assert_eq!(metric(&text, "distributor_peers_moved_total{role=\"worker\"}"), 1.0, "moved");
    assert_eq!(metric(&text, "distributor_tunnels"), 0.0, "no tunnel");
    c.send(to_worker(39, RtcEvent::LocalIceCandidate, b"live")).await;
    let live = resumed.recv().await;
    assert_eq!(
        (live.event(), live.seq, &live.message[..]),
        (RtcEvent::IceCandidate, taken as u64 + 1, &b"live"[..])
    );
    resumed.expect_quiet().await;
    c.expect_quiet().await;
    drop(w);
    a.kill();
}
