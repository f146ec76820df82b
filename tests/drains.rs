//! Drains across instances, as a peer written against the contract sees them: three instances
//! on a real 3-node NATS cluster, plain resumable peers (`x-resume-after`) that do not number
//! their own messages unless said, the drained instance a process of its own stopped with
//! SIGTERM. What reached the distributor before a peer's new stream took over is delivered, in
//! the order sent, or its sender is answered; no session of a peer that resumes within the
//! grace ends.
mod common;

use common::nats::NatsCluster;
use common::*;
use distributor::pb::RtcEvent;

/// A (a process, to be drained: its address as a server), B and C (in this process) on the
/// NATS cluster, each reaching the others.
async fn three_instances(
    nats: &NatsCluster,
    prefix: &str,
    probe: i64,
) -> (Binary, TestServer, TestServer, TestServer) {
    let (a, a_server, b, c) = three_instances_c_new_to_a(nats, prefix, probe).await;
    reach_each_other(&a_server, &c, probe + 20).await;
    (a, a_server, b, c)
}

/// The same, but C has dealt with B only: it may not know A yet, as a new instance does.
async fn three_instances_c_new_to_a(
    nats: &NatsCluster,
    prefix: &str,
    probe: i64,
) -> (Binary, TestServer, TestServer, TestServer) {
    let (b, c) = (nats.instance(prefix).await, nats.instance(prefix).await);
    let a = nats.process(prefix, &["--drain-timeout", "6s"]);
    let a_server = TestServer::external(&a.addr);
    reach_each_other(&a_server, &b, probe).await;
    reach_each_other(&c, &b, probe + 10).await;
    (a, a_server, b, c)
}

fn resumable_client(id: i64, after: u64) -> [(&'static str, String); 2] {
    [("x-client-id", id.to_string()), ("x-resume-after", after.to_string())]
}

/// A client on A sends its worker on B twenty candidates, unnumbered, on a healthy stream; then
/// A drains. The client resumes on C and goes on: the worker gets all twenty, then what the
/// client sent from C, in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnumbered_clients_messages_reach_its_worker_across_a_drain() {
    let nats = NatsCluster::start().await;
    let (a, a_server, b, c) = three_instances(&nats, "d1", 4100).await;
    unnumbered_client_across_a_drain(a, a_server, b, c).await;
}

/// The same, resumed on an instance that has not dealt with the drained one: it still finds
/// the client there (the instances that say "not here" name the ones they know alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_an_instance_new_to_the_holder_finds_it() {
    let nats = NatsCluster::start().await;
    let (a, a_server, b, c) = three_instances_c_new_to_a(&nats, "d4", 4400).await;
    unnumbered_client_across_a_drain(a, a_server, b, c).await;
}

async fn unnumbered_client_across_a_drain(mut a: Binary, a_server: TestServer, b: TestServer, c: TestServer) {
    let mut w = worker(&b, 41).await;
    let (mut client, cid) = client_with(&a_server, &resumable_client(41_041, 0)).await;
    client.send(to_worker(41, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::Offer);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(expect_numbered(&mut client, RtcEvent::Answer, 1).await, b"answer");
    for i in 1..=20u8 {
        client.send(to_worker(41, RtcEvent::LocalIceCandidate, &[i])).await;
    }
    let exit = tokio::task::spawn_blocking(move || a.terminate());
    let reconnect = client.recv().await;
    assert_eq!((reconnect.event(), reconnect.seq), (RtcEvent::Reconnect, 2), "{reconnect:?}");
    let mut client = open_client(c.channel().await, &resumable_client(cid, 2)).await.expect("opens on C");
    let welcome = client.recv().await;
    assert_eq!((welcome.event(), welcome.resumed), (RtcEvent::Blank, true), "{welcome:?}");
    client.send(to_worker(41, RtcEvent::LocalIceCandidate, b"from C")).await;
    for i in 1..=20u8 {
        let got = w.recv().await;
        assert_eq!((got.event(), got.message.as_ref()), (RtcEvent::IceCandidate, &[i][..]), "candidate {i}");
    }
    let last = w.recv().await;
    assert_eq!((last.event(), last.message.as_ref()), (RtcEvent::IceCandidate, &b"from C"[..]));
    assert!(exit.await.unwrap().success(), "the drained instance exits cleanly");
    w.expect_quiet().await;
}

/// A worker on A with a session from a client on B; A drains; the worker resumes on C. What
/// the client sends around the move reaches the worker once each, in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_workers_messages_arrive_in_order() {
    let nats = NatsCluster::start().await;
    let (mut a, a_server, b, c) = three_instances(&nats, "d2", 4200).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 42, &after(0)).await;
    let (mut client, cid) = client(&b).await;
    client.send(to_worker(42, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(client.recv().await.event(), RtcEvent::Answer);
    let exit = tokio::task::spawn_blocking(move || a.terminate());
    // The client trickles all along the move.
    let sender = client.sender();
    let trickle = tokio::spawn(async move {
        for i in 1..=30u8 {
            let _ = sender.send(to_worker(42, RtcEvent::LocalIceCandidate, &[i])).await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let mut seen = Vec::new();
    let mut last_seq = 1;
    let reconnect = loop {
        let msg = w.recv().await;
        if msg.event() == RtcEvent::Reconnect {
            break msg;
        }
        seen.push(msg.message[0]);
        last_seq = msg.seq;
    };
    let mut w = open_worker(c.channel().await, &after(reconnect.seq), blank(42)).await.expect("opens on C");
    let ack = w.recv().await;
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "{ack:?}");
    assert!(last_seq < reconnect.seq);
    trickle.await.unwrap();
    while seen.len() < 30 {
        let msg = w.recv().await;
        assert_eq!(msg.event(), RtcEvent::IceCandidate, "{msg:?}");
        seen.push(msg.message[0]);
    }
    assert_eq!(seen, (1..=30).collect::<Vec<u8>>(), "once each, in the order sent");
    assert!(exit.await.unwrap().success());
    w.expect_quiet().await;
}

/// Both peers of a session on A; A drains; the client resumes on B and the worker on C at the
/// same moment: both are resumed, and the session goes on between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_peers_of_a_session_move_at_once_and_keep_it() {
    let nats = NatsCluster::start().await;
    let (mut a, a_server, b, c) = three_instances(&nats, "d3", 4300).await;
    let after = |n: u64| [("x-resume-after", n.to_string())];
    let mut w = worker_with(&a_server, 43, &after(0)).await;
    let (mut client, cid) = client_with(&a_server, &resumable_client(43_043, 0)).await;
    client.send(to_worker(43, RtcEvent::Offer, b"offer")).await;
    assert_eq!(w.recv().await.seq, 1);
    w.send(to_client(cid, RtcEvent::Answer, b"answer")).await;
    assert_eq!(expect_numbered(&mut client, RtcEvent::Answer, 1).await, b"answer");
    let exit = tokio::task::spawn_blocking(move || a.terminate());
    let (w_reconnect, c_reconnect) = tokio::join!(w.recv(), client.recv());
    assert_eq!((w_reconnect.event(), c_reconnect.event()), (RtcEvent::Reconnect, RtcEvent::Reconnect));
    let (w_meta, c_meta) = (after(w_reconnect.seq), resumable_client(cid, c_reconnect.seq));
    let (w_channel, c_channel) = (c.channel().await, b.channel().await);
    let (w_new, c_new) =
        tokio::join!(open_worker(w_channel, &w_meta, blank(43)), open_client(c_channel, &c_meta));
    let (mut w, mut client) = (w_new.expect("opens on C"), c_new.expect("opens on B"));
    let (ack, welcome) = tokio::join!(w.recv(), client.recv());
    assert_eq!((ack.event(), ack.resumed), (RtcEvent::Blank, true), "the worker resumed: {ack:?}");
    assert_eq!(
        (welcome.event(), welcome.resumed),
        (RtcEvent::Blank, true),
        "the client resumed: {welcome:?}"
    );
    client.send(to_worker(43, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(w.recv().await.event(), RtcEvent::AcceptAnswer, "the session went on");
    w.send(to_client(cid, RtcEvent::LocalIceCandidate, b"w1")).await;
    let got = client.recv().await;
    assert_eq!((got.event(), got.message.as_ref()), (RtcEvent::IceCandidate, &b"w1"[..]));
    assert!(exit.await.unwrap().success());
}
