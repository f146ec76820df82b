//! Property tests over everything that decodes bytes from outside (`distributor::fuzzing`):
//! random bytes, and inputs shaped like the real thing so that the decoders' deeper paths run.
//! `scripts/test.sh` runs 256 cases each; `DISTRIBUTOR_PROPTEST_CASES` asks for more, and
//! `scripts/fuzz.sh` runs the same entry points coverage-guided.

use distributor::cluster::wire::{self, record::Kind};
use distributor::fuzzing;
use distributor::pb::{ClientRtcMessage, WorkerRtcMessage};
use proptest::prelude::*;
use prost::Message;

fn cases() -> u32 {
    std::env::var("DISTRIBUTOR_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Ids and events near the ones that exist, so that messages reach the router.
fn id() -> impl Strategy<Value = i64> {
    prop_oneof![Just(7i64), Just(100), Just(0), Just(-1), any::<i64>()]
}

fn event() -> impl Strategy<Value = i32> {
    prop_oneof![0..10i32, any::<i32>()]
}

/// A peer's stream as the fuzzing entry point reads it: well-formed messages, length-prefixed.
fn peer_stream() -> impl Strategy<Value = Vec<u8>> {
    let message = (any::<bool>(), id(), event(), bytes(80));
    prop::collection::vec(message, 0..24).prop_map(|messages| {
        let mut out = Vec::new();
        for (from_client, id, event, payload) in messages {
            let encoded = if from_client {
                ClientRtcMessage {
                    worker_machine_id: id,
                    event,
                    message: payload.into(),
                    ..Default::default()
                }
                .encode_to_vec()
            } else {
                WorkerRtcMessage { client_id: id, event, message: payload.into(), ..Default::default() }
                    .encode_to_vec()
            };
            let len = encoded.len().min(127);
            out.push((len as u8) << 1 | u8::from(!from_client));
            out.extend_from_slice(&encoded[..len]);
        }
        out
    })
}

fn conn() -> impl Strategy<Value = Option<wire::Conn>> {
    prop::option::of(
        (any::<u64>(), prop_oneof![Just(0xau64), any::<u64>()])
            .prop_map(|(at, instance)| wire::Conn { at, instance }),
    )
}

fn record() -> impl Strategy<Value = wire::Record> {
    let kind = prop_oneof![
        (id(), conn(), id(), event(), bytes(32), 0..3u32, instance()).prop_map(
            |(client, conn, worker, event, p, moves, after_left_of)| {
                let payload = p.into();
                Kind::ClientSignal(wire::ClientSignal {
                    client,
                    conn,
                    worker,
                    event,
                    payload,
                    moves,
                    after_left_of,
                })
            }
        ),
        (id(), conn(), id(), event(), bytes(32), event()).prop_map(
            |(client, conn, worker, event, p, error_code)| {
                Kind::ToClient(wire::ToClient { client, conn, worker, event, payload: p.into(), error_code })
            }
        ),
        (id(), id(), event(), bytes(32), event()).prop_map(|(worker, client, event, p, error_code)| {
            Kind::ToWorker(wire::ToWorker { worker, client, event, payload: p.into(), error_code })
        }),
        (id(), conn(), 0..3u32, instance()).prop_map(|(client, conn, moves, after_left_of)| {
            Kind::ClientGone(wire::ClientGone { client, conn, moves, after_left_of })
        }),
        (conn(), 0..3u32).prop_map(|(conn, moves)| Kind::ClientLeft(wire::ClientLeft { conn, moves })),
        (conn(), instance()).prop_map(|(conn, from)| Kind::Repointed(wire::Repointed { conn, from })),
    ];
    prop::option::of(kind).prop_map(|kind| wire::Record { kind })
}

/// Link frames that decode: from a few instances, early sequence numbers, any records.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let from = prop_oneof![Just(0xau64), Just(0xb), Just(0), any::<u64>()];
    (from, 0..3u64, 0..4u64, prop::collection::vec(record(), 0..6), 0..3u64, 0..4u64, any::<bool>()).prop_map(
        |(from, epoch, seq, records, ack_epoch, ack_next, nak)| {
            wire::Frame { from, epoch, seq, records, ack_epoch, ack_next, nak }.encode_to_vec()
        },
    )
}

/// An instance id: none, one of the test's own, or any.
fn instance() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(0xa), Just(0xb), any::<u64>()]
}

fn claim_or_beat() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<bool>(), id(), conn(), instance(), instance()).prop_map(
            |(worker, id, conn, moved_from, now_at)| {
                wire::Claim { worker, id, conn, moved_from, now_at }.encode_to_vec()
            }
        ),
        (prop_oneof![Just(0xau64), Just(0xb), any::<u64>()], any::<bool>())
            .prop_map(|(instance, leaving)| wire::Heartbeat { instance, leaving }.encode_to_vec()),
        bytes(64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn peer_messages_from_random_bytes(data in bytes(512)) {
        fuzzing::peer_messages(&data);
    }

    #[test]
    fn peer_messages_well_formed(data in peer_stream()) {
        fuzzing::peer_messages(&data);
    }

    #[test]
    fn link_frames_from_random_bytes(data in bytes(512)) {
        fuzzing::link_frame(&data);
    }

    #[test]
    fn link_frames_well_formed(data in frame()) {
        fuzzing::link_frame(&data);
    }

    #[test]
    fn claims_and_heartbeats(data in claim_or_beat()) {
        fuzzing::claim_and_heartbeat(&data);
    }

    #[test]
    fn sealed_messages(data in bytes(256)) {
        fuzzing::sealed(&data);
    }

    #[test]
    fn tokens(data in bytes(256)) {
        fuzzing::token(&data);
    }
}

/// Found by the property above (CI, 2026-12-02): a frame opening a session for the probe's
/// client on another instance's stream. The probe's OFFER, from the newest stream of that
/// client, still reaches the worker (it supersedes the other stream's session).
#[test]
fn link_frame_with_a_session_of_the_probes_client() {
    for at in [1, 2, u64::MAX - 1] {
        let offer = wire::ClientSignal {
            client: 100,
            conn: Some(wire::Conn { at, instance: 0xa }),
            worker: 7,
            event: distributor::pb::RtcEvent::Offer as i32,
            payload: bytes::Bytes::from_static(b"earlier"),
            ..Default::default()
        };
        let frame = wire::Frame {
            from: 0xa,
            epoch: 1,
            seq: 1,
            records: vec![wire::Record { kind: Some(Kind::ClientSignal(offer)) }],
            ..Default::default()
        };
        fuzzing::link_frame(&frame.encode_to_vec());
    }
}
