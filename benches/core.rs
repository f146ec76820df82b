//! The hot path without I/O: the wire codec, the state machine, the router, the shard threads,
//! a peer's response writer, and the cross-instance frame. End-to-end numbers come from
//! `distributor-load`.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use distributor::cluster::wire;
use distributor::core::session::{State, step};
use distributor::core::{
    CloseReason, Command, ConnId, DeliverError, Outbound, PeerId, PeerSink, Reply, Role, Router, Signal,
};
use distributor::edge::PeerStream;
use distributor::pb::{ClientRtcMessage, RtcEvent, WorkerRtcMessage};
use distributor::peer::resume::{Attachment, Resumables, Resumed};
use distributor::peer::{Conn, Sink};
use distributor::shards::Shards;
use futures::Stream;
use prost::Message;

/// A peer whose deliveries only count.
#[derive(Clone)]
struct CountingSink {
    conn: ConnId,
    delivered: Arc<AtomicU64>,
}

struct NoReply;

impl Reply for NoReply {
    fn send(self, msg: Outbound) {
        black_box(msg);
    }
}

impl PeerSink for CountingSink {
    type Reply = NoReply;
    type Departure = ();
    fn conn(&self) -> ConnId {
        self.conn
    }
    fn try_deliver(&self, msg: Outbound) -> Result<(), DeliverError> {
        black_box(msg);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn deliver_owed(&self, msg: Outbound) {
        let _ = self.try_deliver(msg);
    }
    fn close(&self, _: CloseReason) {}
}

fn sink(n: u64, delivered: &Arc<AtomicU64>) -> CountingSink {
    CountingSink { conn: ConnId { at: n, instance: 1 }, delivered: delivered.clone() }
}

fn candidate(worker: PeerId, size: usize) -> ClientRtcMessage {
    ClientRtcMessage {
        worker_machine_id: worker,
        event: RtcEvent::LocalIceCandidate as i32,
        message: Bytes::from(vec![b'a'; size]),
        client_id: 0,
        error_code: 0,
        seq: 0,
        resumed: false,
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    for size in [200, 2048] {
        let msg = candidate(42, size);
        let encoded = Bytes::from(msg.encode_to_vec());
        group.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, msg| {
            let mut buf = Vec::with_capacity(size + 32);
            b.iter(|| {
                buf.clear();
                msg.encode(&mut buf).unwrap();
                black_box(&buf);
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| black_box(ClientRtcMessage::decode(encoded.clone()).unwrap()))
        });
    }
    group.finish();
}

fn state_machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("candidate_in_accepted", |b| {
        b.iter(|| {
            step(black_box(Some(State::Accepted)), Role::Client, black_box(RtcEvent::LocalIceCandidate))
        })
    });
    group.bench_function("refused_event", |b| {
        b.iter(|| step(black_box(None), Role::Worker, black_box(RtcEvent::Offer)))
    });
    group.finish();
}

/// Registers `pairs` workers and clients with a session each, in one router.
fn router_with_sessions(pairs: i64, delivered: &Arc<AtomicU64>) -> (Router<CountingSink>, Vec<CountingSink>) {
    let mut router = Router::new(None);
    let now = Instant::now();
    let mut clients = Vec::new();
    for i in 0..pairs {
        let worker = sink(2 * i as u64 + 1, delivered);
        router.handle(Command::RegisterWorker { worker: i + 1, sink: worker }, || now);
        let client = sink(2 * i as u64 + 2, delivered);
        router.handle(from_client(&client, i, RtcEvent::Offer, &Bytes::new()), || now);
        clients.push(client);
    }
    (router, clients)
}

fn router(c: &mut Criterion) {
    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(1));
    let delivered = Arc::new(AtomicU64::new(0));
    let (mut router, clients) = router_with_sessions(1000, &delivered);
    let payload = Bytes::from(vec![b'a'; 200]);
    let now = Instant::now();
    let mut i = 0usize;
    group.bench_function("relay_candidate_1000_sessions", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            router.handle(from_client(&clients[i], i as i64, RtcEvent::LocalIceCandidate, &payload), || now);
        })
    });
    group.finish();
}

const PAIRS: i64 = 1024;
/// Messages per iteration of the shard benches.
const BATCH: u64 = 16_384;

/// Registers `PAIRS` workers with a session each (offer relayed); returns the clients' sinks.
/// Every sink counts into `delivered[counter(pair)]`, so that threads count apart.
fn sessions(
    shards: &Shards<CountingSink>,
    delivered: &[Arc<AtomicU64>],
    counter: impl Fn(i64) -> usize,
) -> Vec<CountingSink> {
    let clients: Vec<CountingSink> =
        (0..PAIRS).map(|i| sink(2 * i as u64 + 2, &delivered[counter(i)])).collect();
    for i in 0..PAIRS {
        let w = sink(2 * i as u64 + 1, &delivered[counter(i)]);
        push(shards, shards.of_worker(i + 1), Command::RegisterWorker { worker: i + 1, sink: w });
        let offer = from_client(&clients[i as usize], i, RtcEvent::Offer, &Bytes::new());
        push(shards, shards.of_worker(i + 1), offer);
    }
    wait_for(delivered, 2 * PAIRS as u64);
    clients
}

/// Client `1000 + i`'s `event` to worker `i + 1`, the pairing every bench uses.
fn from_client(client: &CountingSink, i: i64, event: RtcEvent, payload: &Bytes) -> Command<CountingSink> {
    let signal = Signal { event, payload: payload.clone(), reply: NoReply };
    Command::FromClient { client: 1000 + i, sink: client.clone(), worker: i + 1, signal }
}

fn relay_candidate(clients: &[CountingSink], i: i64, payload: &Bytes) -> Command<CountingSink> {
    from_client(&clients[i as usize], i, RtcEvent::LocalIceCandidate, payload)
}

/// Moves candidates between local peers through the shards, for 1, 2 and 4 of them:
/// - `inline/N` (`--shards 0`, the default): N threads route at once through the inline
///   shards (the runtime's worker threads do this), each owning a share of the shards and so
///   of the sessions; this is the mode whose throughput should grow with threads up to the
///   core count.
/// - `threads/N` (`--shards N`): one producer feeds N shard threads, as one busy gRPC task
///   would; it measures the hand-off, and cannot scale past the producer.
fn shards(c: &mut Criterion) {
    let mut group = c.benchmark_group("shards");
    group.throughput(Throughput::Elements(BATCH));
    group.measurement_time(Duration::from_secs(4));
    let payload = Bytes::from(vec![b'a'; 200]);
    for threads in [1usize, 2, 4] {
        let shards = Shards::<CountingSink>::start(0, 0, 0, || None).unwrap();
        // Thread t owns the shards s with s % threads == t, and so their workers' sessions.
        let owner = |i: i64| shards.of_worker(i + 1) % threads;
        let delivered: Vec<_> = (0..threads).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let clients = sessions(&shards, &delivered, owner);
        let owned: Vec<Vec<i64>> =
            (0..threads).map(|t| (0..PAIRS).filter(|&i| owner(i) == t).collect()).collect();
        group.bench_with_input(BenchmarkId::new("inline", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                let before = total(&delivered);
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for mine in &owned {
                        let (shards, clients) = (&shards, &clients);
                        scope.spawn(move || {
                            // Its own payload: a shared one would bounce its refcount between cores.
                            let payload = Bytes::from(vec![b'a'; 200]);
                            for n in 0..iters * (BATCH / threads as u64) {
                                let i = mine[n as usize % mine.len()];
                                push(shards, shards.of_worker(i + 1), relay_candidate(clients, i, &payload));
                            }
                        });
                    }
                });
                let took = started.elapsed();
                // Inline routing delivers on the caller: every candidate is in by now.
                let pushed = iters * (BATCH / threads as u64) * threads as u64;
                assert_eq!(total(&delivered) - before, pushed, "the inline shards delivered the candidates");
                took
            })
        });
    }
    for count in [1usize, 2, 4] {
        let shards = Shards::<CountingSink>::start(count, 65_536, 0, || None).unwrap();
        // Each shard thread counts into its own counter: what it delivers is its workers'.
        let delivered: Vec<_> = (0..count).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let clients = sessions(&shards, &delivered, |i| shards.of_worker(i + 1));
        group.bench_with_input(BenchmarkId::new("threads", count), &count, |b, _| {
            b.iter(|| {
                let target = total(&delivered) + BATCH;
                for n in 0..BATCH {
                    let i = (n % PAIRS as u64) as i64;
                    push(&shards, shards.of_worker(i + 1), relay_candidate(&clients, i, &payload));
                }
                wait_for(&delivered, target);
            })
        });
    }
    group.finish();
}

fn push(shards: &Shards<CountingSink>, shard: usize, mut command: Command<CountingSink>) {
    loop {
        match shards.try_send(shard, command) {
            Ok(()) => return,
            Err(back) => {
                command = back;
                std::thread::yield_now();
            }
        }
    }
}

fn total(counters: &[Arc<AtomicU64>]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

fn wait_for(counters: &[Arc<AtomicU64>], target: u64) {
    while total(counters) < target {
        std::hint::spin_loop();
    }
}

/// Streams a server writes to in turn (the end-to-end runs' 1000 pairs).
const WRITER_STREAMS: u64 = 2_000;

/// A peer's response writer, from its queue to the encoded message: plain streams, numbered
/// ones (each message kept for replay, the last 1,024 per peer), and resumable ones (the same,
/// through the shared stream, its lock and the wrapper a resumable stream writes from). The
/// streams are written in turn and each payload is a slice of a shared 512 B buffer, as tonic
/// decodes them, so that what the numbered streams keep leaves the cache as it does in a server.
fn writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("writer");
    group.throughput(Throughput::Elements(1));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let encode = distributor::edge::encode::for_worker;
    // The queue's bound is also what a numbered stream keeps: 1,024 by default (2 million
    // messages over 2,000 streams, far more than the caches hold), 16 for comparison.
    for (name, numbered, queue, resumable) in [
        ("plain", false, 1024, false),
        ("numbered", true, 1024, false),
        ("numbered, 16 kept", true, 16, false),
        ("resumable", true, 1024, true),
    ] {
        let peers = Resumables::default();
        let mut streams: Vec<(Sink, PeerStream<WorkerRtcMessage>)> = (1..=WRITER_STREAMS)
            .map(|at| {
                let id = ConnId { at, instance: 1 };
                if !numbered {
                    let (sink, out) = Conn::open(id, queue, encode);
                    return (sink, PeerStream::Plain(out));
                }
                let (sink, out) = Conn::open_numbered(id, queue, encode);
                if !resumable {
                    return (sink, PeerStream::Plain(out));
                }
                let attachment = Attachment::new();
                peers.insert(at as PeerId, sink.clone(), out, &attachment);
                (sink, PeerStream::Resumable(Resumed::new(attachment)))
            })
            .collect();
        let mut buffer = BytesMut::new();
        let mut next = 0;
        group.bench_function(BenchmarkId::new(name, "2000 streams, 200 B"), |b| {
            b.iter(|| {
                if buffer.len() < 200 {
                    buffer = BytesMut::from(&[7u8; 512][..]);
                }
                let payload = buffer.split_to(200).freeze();
                let count = streams.len();
                let (sink, out) = &mut streams[next];
                next = (next + 1) % count;
                let msg = Outbound::relay(RtcEvent::IceCandidate, 7, next as i64, payload);
                sink.try_deliver(msg).expect("room");
                match std::pin::Pin::new(out).poll_next(&mut cx) {
                    std::task::Poll::Ready(Some(Ok(written))) => black_box(written),
                    other => panic!("not written: {other:?}"),
                };
            })
        });
    }
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    const RECORDS: usize = 64;
    group.throughput(Throughput::Elements(RECORDS as u64));
    let conn = Some(wire::Conn { at: 1, instance: 2 });
    let records: Vec<wire::Record> = (0..RECORDS)
        .map(|i| wire::Record {
            kind: Some(wire::record::Kind::ClientSignal(wire::ClientSignal {
                client: 1000 + i as i64,
                conn,
                worker: i as i64,
                event: RtcEvent::LocalIceCandidate as i32,
                payload: Bytes::from(vec![b'a'; 200]),
                ..Default::default()
            })),
        })
        .collect();
    let frame = wire::Frame { from: 1, epoch: 3, seq: 7, records, ack_epoch: 5, ack_next: 9, nak: false };
    let encoded = Bytes::from(frame.encode_to_vec());
    group.bench_function(BenchmarkId::new("encode", "64x200B"), |b| {
        b.iter(|| black_box(frame.encode_to_vec()))
    });
    group.bench_function(BenchmarkId::new("decode", "64x200B"), |b| {
        b.iter(|| black_box(wire::Frame::decode(encoded.clone()).unwrap()))
    });
    group.finish();
}

/// Sealing and opening a cluster frame (the MAC every NATS message carries), by frame size: a
/// single record at window 1, a full batch at window 32.
fn seal(c: &mut Criterion) {
    use distributor::cluster::seal::{Kind, Seal};
    let mut group = c.benchmark_group("seal");
    let seal = Seal::derived(b"a benchmark cluster key of 32 bytes or more", "distributor");
    for size in [256usize, 16 * 1024, 256 * 1024] {
        let body = vec![7u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal+open", size), &body, |b, body| {
            b.iter(|| {
                let sealed = seal.seal(Kind::Frame, "distributor.i.42", body, 1_800_000_000_000);
                black_box(seal.open(Kind::Frame, "distributor.i.42", sealed, 1_800_000_000_000).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec, state_machine, router, shards, writer, envelope, seal);
criterion_main!(benches);
