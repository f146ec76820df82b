//! What a resumable peer was written, numbered and kept for replay.
//!
//! A busy resumable peer keeps its last `--peer-queue` messages (1,024) at all times, so every
//! message written to it is also written into memory that was last touched a million messages
//! ago, across all peers. How that memory is laid out is most of what resume costs: a message
//! kept as its own allocation (a payload, a ring entry) costs a cold allocation, a cold free,
//! and a buffer reused cold for each message. So the kept messages are laid out as the writer
//! reaches them: their addresses in one ring of small fixed entries, their short payloads back
//! to back in one ring of bytes, each written and let go in order, which the caches and
//! prefetchers follow (`cargo bench --bench core -- writer`: BENCHMARKS.md).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::core::{Outbound, PeerId};
use crate::pb::{ErrorCode, RtcEvent};

/// A resumable peer's numbering: every message written after the welcome takes the next
/// number, 1, 2, 3..., and the last `keep` of them stay here to be replayed to a stream that
/// resumes the peer.
pub struct Numbers {
    next: u64,
    kept: Kept,
}

/// Payloads shorter than this are copied into the ring of bytes; longer ones (an SDP offer,
/// which the decoder gave a buffer of its own) are kept by reference. A short payload is a slice
/// of the buffer its sender's stream was decoded into, shared with its neighbours: a reference
/// would keep that whole buffer for as long as the message is kept.
pub const COPIED_BELOW: usize = crate::codec::INITIAL_BUFFER;

/// A stream resumed after a number older than what is kept: what it missed cannot be replayed.
#[derive(Debug, PartialEq, Eq)]
pub struct TooOld;

impl Numbers {
    pub(super) fn new(keep: usize) -> Self {
        Numbers { next: 1, kept: Kept::new(keep.max(1)) }
    }

    /// The number the next message written will take.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Numbers on from `next`, for a peer numbered up to `next - 1` elsewhere (nothing kept).
    pub(super) fn start_at(&mut self, next: u64) {
        self.kept.clear();
        self.next = next.max(1);
    }

    pub(super) fn number(&mut self, msg: &Outbound) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.kept.push(msg);
        seq
    }

    /// The number of the oldest message kept (`next` when none is).
    fn oldest(&self) -> u64 {
        self.next - self.kept.len() as u64
    }

    /// Whether what a peer that received up to `after` missed is all kept.
    pub fn covers(&self, after: u64) -> bool {
        after < self.next && after + 1 >= self.oldest()
    }

    /// What a peer that received up to `after` missed, in order with its numbers; `TooOld` if
    /// some of it is no longer kept, or `after` was never sent.
    pub fn after(&self, after: u64) -> Result<Vec<(u64, Outbound)>, TooOld> {
        if !self.covers(after) {
            return Err(TooOld);
        }
        let skip = (after + 1 - self.oldest()) as usize;
        Ok(self.kept.from(skip).zip(after + 1..).map(|(msg, seq)| (seq, msg)).collect())
    }
}

/// The last `keep` messages written, oldest first.
struct Kept {
    /// Each message, as [`Head`] then its payload if short, in an allocation of its own.
    entries: VecDeque<Box<[u8]>>,
    /// The long payloads, by reference, in order.
    long: VecDeque<Bytes>,
    keep: usize,
}

const _: () = assert!((RtcEvent::Reconnect as i32) < 256 && (ErrorCode::TooManySessions as i32) < 256);

/// What is kept of a message before its payload.
struct Head {
    worker: PeerId,
    client: PeerId,
    event: u8,
    error: u8,
    /// Its payload is the next of [`Kept::long`].
    long: bool,
}

impl Head {
    const LEN: usize = 8 + 8 + 1 + 1 + 1;

    fn write(&self, payload: &[u8]) -> Box<[u8]> {
        let mut out = Vec::with_capacity(Self::LEN + payload.len());
        out.extend_from_slice(&self.worker.to_le_bytes());
        out.extend_from_slice(&self.client.to_le_bytes());
        out.extend_from_slice(&[self.event, self.error, u8::from(self.long)]);
        out.extend_from_slice(payload);
        out.into_boxed_slice()
    }

    fn read(kept: &[u8]) -> (Head, &[u8]) {
        let (head, payload) = kept.split_at(Self::LEN);
        let field = |at: usize, n: usize| &head[at..at + n];
        let head = Head {
            worker: i64::from_le_bytes(field(0, 8).try_into().expect("8 bytes")),
            client: i64::from_le_bytes(field(8, 8).try_into().expect("8 bytes")),
            event: head[16],
            error: head[17],
            long: head[18] != 0,
        };
        (head, payload)
    }
}

impl Kept {
    fn new(keep: usize) -> Self {
        Kept { entries: VecDeque::new(), long: VecDeque::new(), keep }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.long.clear();
    }

    fn push(&mut self, msg: &Outbound) {
        if self.entries.len() == self.keep
            && let Some(oldest) = self.entries.pop_front()
            && Head::read(&oldest).0.long
        {
            self.long.pop_front();
        }
        let long = msg.payload.len() >= COPIED_BELOW;
        // Both codes fit a byte (checked below, when built).
        let (event, error) = (msg.event as i32 as u8, msg.error as i32 as u8);
        let head = Head { worker: msg.worker, client: msg.client, event, error, long };
        if long {
            self.long.push_back(msg.payload.clone());
            self.entries.push_back(head.write(&[]));
        } else {
            self.entries.push_back(head.write(&msg.payload));
        }
    }

    /// The kept messages, from the `skip`th oldest on.
    fn from(&self, skip: usize) -> impl Iterator<Item = Outbound> + '_ {
        let long_before = self.entries.iter().take(skip).filter(|e| Head::read(e).0.long).count();
        let mut long = self.long.iter().skip(long_before);
        self.entries.iter().skip(skip).map(move |kept| {
            let (head, payload) = Head::read(kept);
            let payload = if head.long {
                long.next().expect("one kept payload per long entry").clone()
            } else {
                Bytes::copy_from_slice(payload)
            };
            Outbound {
                event: RtcEvent::try_from(i32::from(head.event)).unwrap_or_default(),
                worker: head.worker,
                client: head.client,
                payload,
                error: ErrorCode::try_from(i32::from(head.error)).unwrap_or_default(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(event: RtcEvent, client: PeerId, payload: Bytes) -> Outbound {
        Outbound::relay(event, 1, client, payload)
    }

    #[test]
    fn short_payloads_are_kept_as_copies_and_long_ones_by_reference() {
        let mut numbers = Numbers::new(4);
        let decoded = Bytes::from(vec![7u8; 2 * COPIED_BELOW]);
        let short = relay(RtcEvent::IceCandidate, 2, decoded.slice(..200));
        let long = relay(RtcEvent::Offer, 2, decoded.slice(..COPIED_BELOW));
        numbers.number(&short);
        numbers.number(&long);
        let kept = numbers.after(0).unwrap();
        assert_eq!((kept[0].1.clone(), kept[1].1.clone()), (short.clone(), long.clone()));
        assert_ne!(
            kept[0].1.payload.as_ptr(),
            short.payload.as_ptr(),
            "a copy: the decode buffer is not kept"
        );
        assert_eq!(kept[1].1.payload.as_ptr(), long.payload.as_ptr(), "a reference to the same bytes");
    }

    /// Messages of every kind and size, around the ring many times: what is replayed is what was
    /// written, numbered, from any point kept.
    #[test]
    fn replays_exactly_what_was_written_after_any_kept_number() {
        let keep = 7;
        let mut numbers = Numbers::new(keep);
        let mut written = Vec::new();
        for i in 0..200u64 {
            let len =
                [0, 1, 200, 333, COPIED_BELOW - 1, COPIED_BELOW, 3000][i as usize % 7] + (i as usize % 3);
            let payload = Bytes::from((0..len).map(|b| (b as u64 + i) as u8).collect::<Vec<_>>());
            let msg = if i % 11 == 0 {
                Outbound::error(ErrorCode::PeerOverloaded, 3, i as i64, payload)
            } else {
                relay(
                    [RtcEvent::IceCandidate, RtcEvent::Offer, RtcEvent::PeerGone][i as usize % 3],
                    i as i64,
                    payload,
                )
            };
            let seq = numbers.number(&msg);
            written.push((seq, msg));
            let last = seq;
            let oldest = last.saturating_sub(keep as u64 - 1).max(1);
            for after in oldest - 1..=last {
                assert_eq!(
                    numbers.after(after),
                    Ok(written[after as usize..].to_vec()),
                    "after {after} at {last}"
                );
            }
            if oldest > 1 {
                assert_eq!(numbers.after(oldest - 2), Err(TooOld), "one too old");
            }
            assert_eq!(numbers.after(last + 1), Err(TooOld), "never sent");
        }
        assert_eq!(numbers.kept.len(), keep, "what is kept, not all that was written");
    }

    #[test]
    fn numbers_on_from_elsewhere_with_nothing_kept() {
        let mut numbers = Numbers::new(4);
        numbers.number(&relay(RtcEvent::Answer, 2, Bytes::from_static(b"sdp")));
        numbers.start_at(40);
        assert_eq!(numbers.after(39), Ok(vec![]));
        assert_eq!(numbers.after(38), Err(TooOld));
        let msg = relay(RtcEvent::IceCandidate, 2, Bytes::from_static(b"candidate"));
        assert_eq!(numbers.number(&msg), 40);
        assert_eq!(numbers.after(39), Ok(vec![(40, msg)]));
    }
}
