//! The peer SDK end to end: real distributors (one, or two over a real 3-node NATS cluster), real
//! gRPC on loopback, real WebRTC (str0m) over UDP on 127.0.0.1.
//!
//! Over 500 lines: one test per behaviour of the SDK end to end, each with its own distributor
//! and peers.
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use common::nats::NatsCluster;
use common::proxy::Proxy;
use common::*;
use distributor::cluster::NatsConfig;
use distributor::config::Config;
use distributor::pb::ErrorCode;
use distributor_sdk::{Client, Connection, Error, Event, PeerEvent, Worker};
use tokio::sync::broadcast;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(10);

async fn echo_worker(url: &str, id: i64) -> tokio::task::JoinHandle<()> {
    let mut worker =
        Worker::builder(url).id(id).bind(LOOPBACK).connect().await.expect("the worker registers");
    tokio::spawn(async move {
        while let Some(connection) = worker.accept().await {
            tokio::spawn(async move {
                let (mut channel, _) = connection.split();
                while let Some(data) = channel.recv().await {
                    if channel.send(data).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

fn client(url: &str) -> distributor_sdk::ClientBuilder {
    Client::builder(url).bind(LOOPBACK)
}

/// Message `i` of `n`, from 1 byte up to 64 KiB, each byte depending on its place.
fn message(i: usize, n: usize) -> Bytes {
    let size = 1 + i * ((64 << 10) - 1) / (n - 1).max(1);
    Bytes::from_iter((0..size).map(|j| (i * 7 + j) as u8))
}

async fn echo(connection: &mut Connection, n: usize) {
    for i in 0..n {
        let sent = message(i, n);
        connection.channel.send(sent.clone()).await.expect("the channel takes the message");
        let back = tokio::time::timeout(WAIT, connection.channel.recv()).await.expect("an echo in time");
        assert_eq!(back.as_ref(), Some(&sent), "message {i} of {} bytes came back intact", sent.len());
    }
}

#[tokio::test]
async fn a_client_and_a_worker_echo_a_thousand_messages_up_to_64_kib() {
    let server = TestServer::start().await;
    let _worker = echo_worker(&server.url(), 7).await;
    let client = client(&server.url()).connect().await.unwrap();
    let mut connection = client.open(7).await.expect("a data channel opens");
    assert_eq!(connection.peer, 7);
    let t = connection.times;
    assert!(t.signaling <= t.channel && t.dtls <= t.channel, "{t:?}");
    echo(&mut connection, 1000).await;
}

/// Dropping the handles ends every task the SDK started: the client's and the worker's
/// signaling, their dispatchers, the negotiations and the peer connections. The distributor is
/// a process of its own, so that the runtime counts the SDK's tasks alone.
#[tokio::test]
async fn dropping_the_handles_ends_every_task_the_sdk_started() {
    let server = Binary::start(&[], &[]);
    let url = format!("http://{}", server.addr);
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = tasks();
    let mut worker = Worker::builder(&url).id(31).bind(LOOPBACK).connect().await.expect("registered");
    let client = client(&url).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(31), worker.accept());
    let (at_client, mut at_worker) = (opened.expect("a data channel opens"), accepted.expect("accepted"));
    at_client.channel.send(Bytes::from_static(b"ping")).await.unwrap();
    let ping = tokio::time::timeout(WAIT, at_worker.channel.recv()).await.expect("in time");
    assert_eq!(ping.as_deref(), Some(&b"ping"[..]));
    assert!(tasks() > before, "the SDK runs tasks while its handles live");
    drop((at_client, at_worker, client, worker));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tasks() > before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks still alive 5 s after the drop",
            tasks() - before
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_missing_worker_is_the_distributors_error() {
    let server = TestServer::start().await;
    let client = client(&server.url()).connect().await.unwrap();
    let error = client.open(404).await.expect_err("nobody is there");
    assert_eq!(error.code(), Some(ErrorCode::PeerNotConnected), "{error}");
    // And the client can go on: the worker arrives, the open succeeds.
    let _worker = echo_worker(&server.url(), 404).await;
    let mut connection = client.open(404).await.expect("a data channel opens");
    echo(&mut connection, 3).await;
}

#[tokio::test]
async fn an_unreachable_distributor_is_a_clear_error() {
    let port = free_port();
    let error = client(&format!("http://127.0.0.1:{port}")).connect().await.err().expect("nothing listens");
    assert!(matches!(error, Error::Connect { .. }), "{error}");
}

#[tokio::test]
async fn one_client_with_three_workers_at_once() {
    let server = TestServer::start().await;
    let mut workers = Vec::new();
    for id in [1, 2, 3] {
        workers.push(echo_worker(&server.url(), id).await);
    }
    let client = client(&server.url()).connect().await.unwrap();
    let (a, b, c) = tokio::join!(client.open(1), client.open(2), client.open(3));
    for mut connection in [a.unwrap(), b.unwrap(), c.unwrap()] {
        echo(&mut connection, 20).await;
    }
}

#[tokio::test]
async fn a_second_channel_on_the_same_connection() {
    let server = TestServer::start().await;
    let mut worker = Worker::builder(server.url()).id(9).bind(LOOPBACK).connect().await.unwrap();
    let client = client(&server.url()).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(9), worker.accept());
    let (mut at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
    at_client.channel.open_another("second").await.unwrap();
    let (mine, theirs) = tokio::join!(at_client.next_channel(), at_worker.next_channel());
    let (mut mine, mut theirs) = (mine.unwrap(), theirs.unwrap());
    assert_eq!((mine.label(), theirs.label()), ("second", "second"));
    mine.send(Bytes::from_static(b"on the second")).await.unwrap();
    assert_eq!(theirs.recv().await.as_deref(), Some(&b"on the second"[..]));
    theirs.send(Bytes::from_static(b"back")).await.unwrap();
    assert_eq!(mine.recv().await.as_deref(), Some(&b"back"[..]));
}

#[tokio::test]
async fn a_worker_that_leaves_is_peer_gone_and_the_channel_goes_on() {
    let server = TestServer::start().await;
    let mut worker = Worker::builder(server.url()).id(5).bind(LOOPBACK).connect().await.unwrap();
    let client = client(&server.url()).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(5), worker.accept());
    let (mut at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
    // The worker's signaling ends (its stream half-closes): the client hears it at once.
    drop(worker);
    let event = tokio::time::timeout(WAIT, at_client.event()).await.expect("an event in time");
    assert!(matches!(event, Some(PeerEvent::PeerGone)), "{event:?}");
    // The data channel does not depend on signaling.
    at_client.channel.send(Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(at_worker.channel.recv().await.as_deref(), Some(&b"still here"[..]));
}

/// Waits for `want` among the signaling events.
/// The next event, whatever it is.
async fn next_event(events: &mut broadcast::Receiver<Event>) -> Event {
    tokio::time::timeout(WAIT, events.recv()).await.expect("an event in time").expect("events open")
}

async fn expect_event(events: &mut broadcast::Receiver<Event>, want: Event) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if event == want => return,
            Ok(Ok(_)) => continue,
            other => panic!("no {want:?} in time: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_cut_mid_negotiation_resumes_and_the_channel_opens() {
    let server = TestServer::start().await;
    let _worker = echo_worker(&server.url(), 11).await;
    // The client reaches the distributor through a proxy that cuts its connection once the
    // client has sent its offer's bytes: the offer and candidate are sent, the answer is on
    // its way.
    let proxy = Proxy::start(server.addr, 600).await;
    let client = client(&proxy.url()).connect().await.unwrap();
    let mut events = client.events();
    let opening = tokio::spawn(async move { (client.open(11).await, client) });
    expect_event(&mut events, Event::Resumed { recovered: true }).await;
    assert!(proxy.cuts() >= 1, "the proxy cut the stream");
    let (opened, _client) = opening.await.unwrap();
    let mut connection = opened.expect("the data channel opens after the resume");
    echo(&mut connection, 10).await;
}

fn nats_config(nats: &NatsCluster, first: usize) -> NatsConfig {
    NatsConfig {
        url: nats.url_from(first),
        prefix: "distributor.sdk".into(),
        user: Some(common::nats::USER.into()),
        password: Some(common::nats::PASSWORD.into()),
        ..NatsConfig::default()
    }
}

async fn instance(nats: &NatsCluster, first: usize) -> TestServer {
    TestServer::with(Config { shards: 2, nats: Some(nats_config(nats, first)), ..Config::default() }).await
}

#[tokio::test]
async fn across_two_instances_a_thousand_messages_up_to_64_kib() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0).await, instance(&nats, 1).await);
    let _worker = echo_worker(&b.url(), 21).await;
    let client = client(&a.url()).connect().await.unwrap();
    let mut connection = client.open(21).await.expect("a data channel opens across instances");
    echo(&mut connection, 1000).await;
}

#[tokio::test]
async fn a_drained_instance_moves_the_client_and_the_channel_keeps_echoing() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0).await, instance(&nats, 1).await);
    let _worker = echo_worker(&b.url(), 31).await;
    let client = client(&a.url()).endpoint(b.url()).connect().await.unwrap();
    let mut events = client.events();
    let mut connection = client.open(31).await.unwrap();
    echo(&mut connection, 5).await;
    // The client's instance drains: RECONNECT, the SDK moves to the other instance and is
    // resumed there, moving with its session; the draining instance then has nothing left to
    // serve and stops, which the client does not notice. The data channel is not affected: it
    // echoes throughout.
    let drained = tokio::spawn(a.shutdown());
    let want = Event::Reconnecting { reason: "the distributor asked".into() };
    assert_eq!(next_event(&mut events).await, want);
    assert_eq!(
        next_event(&mut events).await,
        Event::Resumed { recovered: true },
        "resumed on the other instance"
    );
    echo(&mut connection, 20).await;
    tokio::time::timeout(WAIT, drained).await.expect("the drain ends early").unwrap().expect("a clean drain");
    let after = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
    assert!(after.is_err(), "nothing more once the drained instance stopped: {after:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), connection.event()).await.is_err(),
        "no PEER_GONE: the session moved"
    );
    echo(&mut connection, 20).await;
    // The signaling works on the new instance: a second worker is reached from there.
    let _second = echo_worker(&b.url(), 32).await;
    let mut second = client.open(32).await.expect("a data channel through the new instance");
    echo(&mut second, 5).await;
}

/// An idle worker (no session) on a draining instance moves to the other one: resumed there
/// once, and never asked again when the drained instance stops; clients reach it there.
#[tokio::test]
async fn a_drained_instance_moves_an_idle_worker_for_good() {
    let nats = NatsCluster::start().await;
    let (a, b) = (instance(&nats, 0).await, instance(&nats, 1).await);
    let mut worker =
        Worker::builder(a.url()).endpoint(b.url()).id(41).bind(LOOPBACK).connect().await.unwrap();
    let mut events = worker.events();
    let accepting = tokio::spawn(async move {
        let connection = worker.accept().await.expect("a client's connection");
        let (mut channel, _) = connection.split();
        while let Some(data) = channel.recv().await {
            if channel.send(data).await.is_err() {
                break;
            }
        }
    });
    let drained = tokio::spawn(a.shutdown());
    let want = Event::Reconnecting { reason: "the distributor asked".into() };
    assert_eq!(next_event(&mut events).await, want);
    assert_eq!(next_event(&mut events).await, Event::Resumed { recovered: true }, "moved to B");
    let stopped = tokio::time::timeout(Duration::from_secs(3), drained).await;
    stopped.expect("nothing held there: A stops at once").unwrap().expect("a clean drain");
    let client = client(&b.url()).connect().await.unwrap();
    let mut connection = client.open(41).await.expect("the worker is reached on B");
    echo(&mut connection, 5).await;
    let again = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
    assert!(again.is_err(), "the worker stays where it moved: {again:?}");
    drop(connection);
    accepting.abort();
}

/// `distributor worker` as its own process, echoing.
fn worker_process(url: &str, id: i64) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_distributor"))
        .args(["worker", "--id", &id.to_string(), "--connect", url, "--bind", "127.0.0.1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start distributor worker")
}

/// Waits for the worker process to say it registered.
fn registered(child: &mut std::process::Child) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let line = lines.next().expect("a line").expect("readable");
    assert!(line.contains("registered"), "{line}");
    // Keep reading in the background so the worker never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
}

fn client_command(url: &str, worker: i64, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_distributor"))
        .args(["client", "--worker", &worker.to_string(), "--connect", url, "--bind", "127.0.0.1"])
        .args(extra)
        .output()
        .expect("run distributor client")
}

// The test blocks on the worker process's output: the server runs on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_command_checks_the_echo_of_the_worker_command() {
    let server = TestServer::start().await;
    let mut worker = worker_process(&server.url(), 77);
    registered(&mut worker);
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        client_command(&url, 77, &["--messages", "50", "--size", "1200", "--json"])
    })
    .await
    .unwrap();
    let _ = worker.kill();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!((report["worker"].as_i64(), report["messages"].as_u64()), (Some(77), Some(50)));
    let ms = |field: &str| report[field].as_f64().unwrap_or_else(|| panic!("{field} in {report}"));
    // The steps in the order they happen, all within the command's 10 s to open.
    let steps = [ms("ice_ms"), ms("dtls_ms"), ms("channel_ms"), ms("open_ms")];
    assert!(steps.is_sorted() && steps[0] >= 0.0 && steps[3] <= 10e3, "{steps:?} in {report}");
    assert!(0.0 < ms("rtt_p50_ms") && ms("rtt_p50_ms") <= ms("rtt_p99_ms"), "{report}");
    // 50 echoes of 1200 B: within a few seconds on loopback, not minutes.
    assert!(ms("throughput_mib_s") >= 0.01, "{report}");
}

#[tokio::test]
async fn the_client_command_fails_with_the_distributors_error() {
    let server = TestServer::start().await;
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || client_command(&url, 404, &[])).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PEER_NOT_CONNECTED"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

// The test blocks on the worker process's output: the server runs on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_is_peer_gone_once_its_grace_ends() {
    let grace = Duration::from_secs(1);
    let server = TestServer::with(Config { shards: 2, resume_grace: grace, ..Config::default() }).await;
    let mut worker = worker_process(&server.url(), 78);
    registered(&mut worker);
    let client = client(&server.url()).connect().await.unwrap();
    let mut connection = client.open(78).await.unwrap();
    echo(&mut connection, 3).await;
    worker.kill().expect("SIGKILL the worker");
    let _ = worker.wait();
    let killed = std::time::Instant::now();
    let event = tokio::time::timeout(WAIT, connection.event()).await.expect("an event in time");
    // The worker's stream was resumable: it is detached for the grace, then gone.
    assert!(matches!(event, Some(PeerEvent::PeerGone)), "{event:?}");
    assert!(killed.elapsed() >= grace.mul_f64(0.5), "PEER_GONE only after the grace: {:?}", killed.elapsed());
}

#[tokio::test]
async fn a_dropped_connection_closes_the_other_side_and_a_new_one_opens() {
    let server = TestServer::start().await;
    let mut worker = Worker::builder(server.url()).id(12).bind(LOOPBACK).connect().await.unwrap();
    let client = client(&server.url()).connect().await.unwrap();
    for round in 0..3 {
        let (opened, accepted) = tokio::join!(client.open(12), worker.accept());
        let (at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
        at_client.channel.send(Bytes::from(format!("round {round}"))).await.unwrap();
        assert_eq!(at_worker.channel.recv().await, Some(Bytes::from(format!("round {round}"))));
        // The client lets go: SCTP and DTLS close, the worker's channel ends.
        drop(at_client);
        let ended =
            tokio::time::timeout(WAIT, at_worker.channel.recv()).await.expect("the channel ends in time");
        assert_eq!(ended, None);
    }
}

/// A STUN server on loopback behind a pretend NAT: answers every Binding request with the
/// address it came from, one port up (a server-reflexive address equal to the host one would
/// be redundant, and dropped); counts the requests.
async fn stun_responder() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use bytecodec::{DecodeExt, EncodeExt};
    use stun_codec::rfc5389::{Attribute, attributes::XorMappedAddress, methods::BINDING};
    use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(Ok(request)) = MessageDecoder::<Attribute>::new().decode_from_bytes(&buf[..n]) else {
                continue;
            };
            if request.class() != MessageClass::Request || request.method() != BINDING {
                continue;
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reply =
                Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, request.transaction_id());
            let mapped = std::net::SocketAddr::new(from.ip(), from.port().wrapping_add(1));
            reply.add_attribute(XorMappedAddress::new(mapped));
            let _ = socket.send_to(&MessageEncoder::new().encode_into_bytes(reply).unwrap(), from).await;
        }
    });
    (addr, asked)
}

#[tokio::test]
async fn with_a_stun_server_a_server_reflexive_candidate_is_trickled() {
    let server = TestServer::start().await;
    let (stun, asked) = stun_responder().await;
    // A worker of the test's own, to read what the client trickles.
    let mut w = worker(&server, 90).await;
    let client = client(&server.url()).stun(stun).connect().await.unwrap();
    let opening = tokio::spawn(async move { client.open(90).await });
    let offer = w.recv().await;
    assert_eq!(offer.event(), distributor::pb::RtcEvent::Offer);
    let mut lines = Vec::new();
    for _ in 0..2 {
        let candidate = w.recv().await;
        assert_eq!(candidate.event(), distributor::pb::RtcEvent::IceCandidate);
        lines.push(String::from_utf8(candidate.message.to_vec()).unwrap());
    }
    // "candidate:... 1 udp PRIORITY IP PORT typ KIND ...": the reflexive one is what the
    // STUN server answered, the host port one up.
    let field = |line: &str, i: usize| line.split_whitespace().nth(i).unwrap_or_default().to_owned();
    assert_eq!((field(&lines[0], 7), field(&lines[1], 7)), ("host".into(), "srflx".into()), "{lines:?}");
    let host_port: u16 = field(&lines[0], 5).parse().unwrap();
    assert_eq!((field(&lines[1], 4), field(&lines[1], 5)), ("127.0.0.1".into(), (host_port + 1).to_string()));
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    opening.abort();
}

#[tokio::test]
async fn with_a_stun_server_on_both_sides_the_channel_opens() {
    let server = TestServer::start().await;
    let (stun, asked) = stun_responder().await;
    let mut worker = Worker::builder(server.url()).id(91).bind(LOOPBACK).stun(stun).connect().await.unwrap();
    let client = client(&server.url()).stun(stun).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(91), worker.accept());
    let (at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
    at_client.channel.send(Bytes::from_static(b"through srflx and host")).await.unwrap();
    assert_eq!(at_worker.channel.recv().await.as_deref(), Some(&b"through srflx and host"[..]));
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2, "each side asked once");
    drop(at_client);
}

#[tokio::test]
async fn a_stun_server_that_does_not_answer_leaves_the_host_candidate() {
    let server = TestServer::start().await;
    // A port nothing answers on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let stun = silent.local_addr().unwrap();
    let _worker = echo_worker(&server.url(), 92).await;
    let client = client(&server.url()).stun(stun).connect().await.unwrap();
    let started = std::time::Instant::now();
    let mut connection = client.open(92).await.expect("opens on the host candidate");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    echo(&mut connection, 3).await;
}

#[tokio::test]
async fn an_ice_restart_renegotiates_through_the_distributor_and_the_channel_goes_on() {
    let server = TestServer::start().await;
    let mut worker = Worker::builder(server.url()).id(93).bind(LOOPBACK).connect().await.unwrap();
    let client = client(&server.url()).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(93), worker.accept());
    let (mut at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
    for round in 0..2 {
        at_client.restart_ice().await.unwrap();
        // A new OFFER and ANSWER went through the distributor: both sides renegotiated.
        for side in [&mut at_worker, &mut at_client] {
            let event = tokio::time::timeout(WAIT, side.event()).await.expect("an event in time");
            assert!(matches!(event, Some(PeerEvent::Renegotiated)), "{event:?}");
        }
        // The worker renegotiated the same connection: no new one to accept.
        assert!(tokio::time::timeout(Duration::from_millis(500), worker.accept()).await.is_err());
        let msg = Bytes::from(format!("after restart {round}"));
        at_client.channel.send(msg.clone()).await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, at_worker.channel.recv()).await.unwrap(), Some(msg.clone()));
        at_worker.channel.send(msg.clone()).await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, at_client.channel.recv()).await.unwrap(), Some(msg));
    }
    let error = at_worker.restart_ice().await.expect_err("the worker does not offer");
    assert!(matches!(error, Error::Invalid(_)), "{error}");
}

#[tokio::test]
async fn a_worker_that_moves_to_a_new_socket_is_reached_again() {
    let server = TestServer::start().await;
    let mut worker = Worker::builder(server.url()).id(94).bind(LOOPBACK).connect().await.unwrap();
    let client = client(&server.url()).connect().await.unwrap();
    let (opened, accepted) = tokio::join!(client.open(94), worker.accept());
    let (mut at_client, mut at_worker) = (opened.unwrap(), accepted.unwrap());
    at_client.channel.send(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(at_worker.channel.recv().await.as_deref(), Some(&b"before"[..]));
    // The worker's socket changes (its old one is closed): its new candidate goes through the
    // distributor, the client restarts ICE on it, and SCTP's retransmissions get through on the
    // new path.
    at_worker.rebind().await.unwrap();
    at_client.channel.send(Bytes::from_static(b"after")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), at_worker.channel.recv()).await;
    assert_eq!(got.expect("through the new socket in time").as_deref(), Some(&b"after"[..]));
    let event = tokio::time::timeout(WAIT, at_client.event()).await.expect("an event in time");
    assert!(matches!(event, Some(PeerEvent::Renegotiated)), "the client restarted ICE: {event:?}");
    at_worker.channel.send(Bytes::from_static(b"back")).await.unwrap();
    let got = tokio::time::timeout(WAIT, at_client.channel.recv()).await;
    assert_eq!(got.expect("back in time").as_deref(), Some(&b"back"[..]));
}
