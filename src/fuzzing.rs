//! Entry points for fuzzing what reaches the distributor from outside: a peer's messages, the
//! frames, claims and heartbeats of other instances, sealed cluster messages, and tokens. Each
//! takes arbitrary bytes, runs them through the real code, and panics if an invariant breaks,
//! so that the property tests (`tests/fuzz.rs`, a bounded number of cases in `scripts/test.sh`)
//! and the coverage-guided targets (`fuzz/`, `scripts/fuzz.sh`) share them.
//!
//! Built with the cargo feature `fuzzing` only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use prost::Message;
use tokio_stream::StreamExt;

use crate::auth::{Authenticator, Expect};
use crate::cluster::bridge::{Bridge, wire_conn};
use crate::cluster::seal::{Kind, Seal};
use crate::cluster::wire;
use crate::config::{Config, Limits};
use crate::core::{Command, ConnId, Outbound, PeerId, Role, Signal};
use crate::edge::{Admitted, Edge};
use crate::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use crate::peer::{Conn, OutboundStream, Peer, PeerReply, Sink};
use crate::shards::Shards;

const WORKER: PeerId = 7;
const CLIENT: PeerId = 100;

/// A peer's stream and what it is written.
struct Stream {
    sink: Sink,
    out: OutboundStream<Outbound>,
}

impl Stream {
    fn open(at: u64, queue: usize) -> Self {
        let (sink, out) = Conn::open(ConnId { at, instance: 1 }, queue, |m, _| m);
        Stream { sink, out }
    }

    /// What was written since the last call.
    fn written(&mut self) -> Vec<Outbound> {
        std::iter::from_fn(|| self.out.next().now_or_never().flatten().map(|m| m.expect("not ended")))
            .collect()
    }
}

/// Inline shards (routing on the caller) with worker 7 and client 100 registered.
fn one_instance(queue: usize) -> (Arc<Shards<Peer>>, Stream, Stream) {
    let shards = Arc::new(Shards::start(0, 64, 4, || None).expect("inline shards"));
    let (mut worker, mut client) = (Stream::open(1, queue), Stream::open(2, queue));
    let register = Command::RegisterWorker { worker: WORKER, sink: Peer::Local(worker.sink.clone()) };
    assert!(shards.try_send(shards.of_worker(WORKER), register).is_ok());
    let register = Command::RegisterClient { client: CLIENT, sink: Peer::Local(client.sink.clone()) };
    assert!(shards.try_send(shards.of_client(CLIENT), register).is_ok());
    assert_eq!(worker.written().len(), 1, "the registration's BLANK");
    assert_eq!(client.written().len(), 1, "the welcome");
    (shards, worker, client)
}

/// A peer's messages, as its stream's bytes: each chunk is one length-prefixed message (one
/// byte of length, the sender in its low bit) decoded as a client's or a worker's message, then
/// checked and routed as the edge does. Every message decoded is answered on its sender's
/// stream (`ERROR`, or the `PING` echo) or delivered to the other side, exactly once; nothing
/// ends a stream.
pub fn peer_messages(data: &[u8]) {
    let (shards, mut worker, mut client) = one_instance(4);
    let config = Config {
        limits: Limits::default(),
        max_message_bytes: 64,
        peer_queue: 4,
        resume_grace: Duration::ZERO,
        max_stream_age: Duration::ZERO,
        ..Config::default()
    };
    let edge = Edge::new(shards.clone(), 1, &config);
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head >> 1).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        let from_client = head & 1 == 0;
        let (sender, receiver) =
            if from_client { (&mut client, &mut worker) } else { (&mut worker, &mut client) };
        let Some(permit) = sender.sink.try_reserve() else {
            // A full queue: the edge waits for the peer to read (here, at once).
            sender.written();
            continue;
        };
        let command = if from_client {
            let Ok(msg) = ClientRtcMessage::decode(chunk) else { continue };
            let (worker_id, event, payload) = (msg.worker_machine_id, msg.event, msg.message);
            edge.triage(Admitted::Yes(permit), event, payload, worker_id, CLIENT).map(
                |(event, payload, permit)| {
                    let signal = Signal { event, payload, reply: PeerReply::Local(permit) };
                    let sink = Peer::Local(sender.sink.clone());
                    (
                        shards.of_worker(worker_id),
                        Command::FromClient { client: CLIENT, sink, worker: worker_id, signal },
                    )
                },
            )
        } else {
            let Ok(msg) = WorkerRtcMessage::decode(chunk) else { continue };
            let (client_id, event, payload) = (msg.client_id, msg.event, msg.message);
            edge.triage(Admitted::Yes(permit), event, payload, WORKER, client_id).map(
                |(event, payload, permit)| {
                    let signal = Signal { event, payload, reply: PeerReply::Local(permit) };
                    let conn = sender.sink.id();
                    (
                        shards.of_worker(WORKER),
                        Command::FromWorker { worker: WORKER, conn, client: client_id, signal },
                    )
                },
            )
        };
        if let Some((shard, command)) = command {
            assert!(shards.try_send(shard, command).is_ok(), "inline shards take every command");
        }
        let (answered, delivered) = (sender.written(), receiver.written());
        assert_eq!(answered.len() + delivered.len(), 1, "one outcome: {answered:?} {delivered:?}");
        if let [answer] = &answered[..] {
            assert!(matches!(answer.event, RtcEvent::Error | RtcEvent::Ping), "{answer:?}");
        }
        assert!(!worker.sink.is_ended() && !client.sink.is_ended(), "nothing a peer sends ends a stream");
    }
}

/// This instance, B, in a cluster: a bridge over inline shards with worker 7 registered.
fn one_bridge() -> (Bridge, Arc<Shards<Peer>>, Stream) {
    let queue = crate::cluster::Queue::new();
    let shards = Arc::new(Shards::start(0, 64, 4, || Some(queue.elsewhere())).expect("inline shards"));
    let (to_clients, _) = crate::peer::to_clients();
    let bridge = Bridge::new(0xb, shards.clone(), to_clients, 4, crate::cluster::links::FRAME_BYTES);
    let mut worker = Stream::open(1, 64);
    let register = Command::RegisterWorker { worker: WORKER, sink: Peer::Local(worker.sink.clone()) };
    assert!(shards.try_send(shards.of_worker(WORKER), register).is_ok());
    worker.written();
    (bridge, shards, worker)
}

/// An instance never named by the fuzzer's frames (those are skipped).
const PROBE: u64 = 0x000d_d50f_f1ce;

/// The probe's stream: the newest of its client, so that a session the fuzzed frame opened for
/// the same client on a newer stream cannot refuse it (as it rightly refuses an older stream's
/// OFFER). Frames whose client signals come from a stream as new are skipped.
const PROBE_CONN: ConnId = ConnId { at: u64::MAX, instance: PROBE };

/// Whether a decoded frame is one the probe cannot follow: sent by the probe's instance, or
/// opening a session on a stream at least as new as the probe's.
fn names_the_probe(frame: &wire::Frame) -> bool {
    frame.from == PROBE
        || frame.records.iter().any(|r| match &r.kind {
            Some(wire::record::Kind::ClientSignal(s)) => s.conn.as_ref().is_some_and(|c| c.at == u64::MAX),
            _ => false,
        })
}

/// Bytes arriving on this instance's inbox as a link frame, then a well-formed frame from
/// another instance: whatever came first, the bridge does not panic and still delivers.
pub fn link_frame(data: &[u8]) {
    if wire::Frame::decode(data).is_ok_and(|f| names_the_probe(&f)) {
        return;
    }
    let (mut bridge, _shards, mut worker) = one_bridge();
    let now = Instant::now();
    bridge.frame(Bytes::copy_from_slice(data), now);
    bridge.flush(now);
    bridge.tick(now + Duration::from_millis(300));
    while bridge.poll_output().is_some() {}
    // Whatever the worker was sent by the fuzzed frame, an OFFER from a fresh instance reaches it.
    worker.written();
    let offer = wire::ClientSignal {
        client: CLIENT,
        conn: Some(wire_conn(PROBE_CONN)),
        worker: WORKER,
        event: RtcEvent::Offer as i32,
        payload: Bytes::from_static(b"probe"),
        ..Default::default()
    };
    let frame = wire::Frame {
        from: PROBE,
        epoch: 1,
        seq: 1,
        records: vec![wire::Record { kind: Some(wire::record::Kind::ClientSignal(offer)) }],
        ..Default::default()
    };
    bridge.frame(frame.encode_to_vec().into(), now);
    let written = worker.written();
    if !worker.sink.is_ended() {
        assert!(
            written.iter().any(|m| m.event == RtcEvent::Offer && &m.payload[..] == b"probe"),
            "the probe OFFER was not delivered: {written:?}"
        );
    }
}

/// Bytes arriving as a claim and as a heartbeat: no panic, and a claim naming this instance
/// changes nothing here.
pub fn claim_and_heartbeat(data: &[u8]) {
    let (mut bridge, _shards, worker) = one_bridge();
    let now = Instant::now();
    let sent_at = data.iter().take(8).fold(0u64, |acc, b| acc << 8 | u64::from(*b));
    bridge.claim(Bytes::copy_from_slice(data), now);
    bridge.heartbeat(Bytes::copy_from_slice(data), sent_at, now);
    bridge.tick(now);
    while bridge.poll_output().is_some() {}
    let own = wire::Claim {
        worker: true,
        id: WORKER,
        conn: Some(wire::Conn { at: u64::MAX, instance: 0xb }),
        moved_from: 0,
        now_at: 0,
    };
    bridge.claim(own.encode_to_vec().into(), now);
    if wire::Claim::decode(data).is_err() {
        assert!(!worker.sink.is_ended(), "only a claim can end a stream");
    }
}

/// Sealed cluster messages: arbitrary bytes never open; a sealed message opens to its body,
/// and with any one byte changed it does not.
pub fn sealed(data: &[u8]) {
    let seal = Seal::derived(b"a cluster key of at least 32 bytes!", "distributor");
    let now_ms = 1_800_000_000_000;
    assert!(seal.open(Kind::Frame, "distributor.i.1", Bytes::copy_from_slice(data), now_ms).is_err());
    let sealed = seal.seal(Kind::Frame, "distributor.i.1", data, now_ms);
    let opened = seal.open(Kind::Frame, "distributor.i.1", sealed.clone(), now_ms).expect("opens");
    assert_eq!(&opened.body[..], data);
    assert!(seal.open(Kind::Claim, "distributor.i.1", sealed.clone(), now_ms).is_err(), "another kind");
    assert!(seal.open(Kind::Frame, "distributor.i.2", sealed.clone(), now_ms).is_err(), "another subject");
    let at = data.iter().map(|b| usize::from(*b)).sum::<usize>() % sealed.len();
    let mut changed = sealed.to_vec();
    changed[at] ^= data.first().copied().unwrap_or(1).max(1);
    assert!(seal.open(Kind::Frame, "distributor.i.1", changed.into(), now_ms).is_err(), "byte {at} changed");
}

/// Tokens: arbitrary bytes are never a valid token; a valid token with one character changed
/// grants nothing else than the original.
pub fn token(data: &[u8]) {
    let secret = b"an auth secret of at least 32 bytes";
    let auth = Authenticator::new(secret, &Expect::default()).expect("long enough");
    let text = String::from_utf8_lossy(data);
    assert!(auth.verify(Some(&text), Role::Client).is_err());
    assert!(auth.verify(Some(&format!("Bearer {text}")), Role::Worker).is_err());
    let valid = crate::auth::mint(secret, Role::Client, 42, Duration::from_secs(60)).expect("mints");
    let mut changed = valid.into_bytes();
    let at = data.iter().map(|b| usize::from(*b)).sum::<usize>() % changed.len();
    changed[at] = data.first().copied().unwrap_or(b'A');
    let changed = String::from_utf8_lossy(&changed).into_owned();
    if let Ok(granted) = auth.verify(Some(&format!("Bearer {changed}")), Role::Client) {
        assert_eq!(granted.id, 42, "a changed token granted another id");
    }
    assert!(auth.verify(Some(&format!("Bearer {changed}")), Role::Worker).is_err(), "another role");
}
