//! What a resumable peer was written, numbered and kept for replay.
//!
//! A busy resumable peer keeps its last `--peer-queue` messages (1,024) at all times, so every
//! message written to it is also written into memory last touched a ring ago: with thousands
//! of busy peers, hundreds of megabytes ago, long out of the caches. Such a write costs little
//! by itself, but the next atomic instruction (a lock's release, a queue's counter: there is
//! one per message) waits until it has reached the cache, a trip to memory. So each peer keeps
//! its messages back to back in one ring of bytes (head and payload, by reference for long
//! payloads), and after each write has the cache fetch the lines where the next ones go: by
//! then they are there, and nothing waits (BENCHMARKS.md, issue 11: `cargo bench --bench core
//! -- writer`, and `scripts/ab.sh` end to end).

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
pub const COPIED_BELOW: usize = distributor_proto::codec::INITIAL_BUFFER;

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
    /// Each message, as [`Head`] then its payload if short, back to back.
    records: ByteRing,
    /// The length of each record in `records`, in order, with [`LONG`] if its payload is the
    /// next of `long`.
    lens: VecDeque<u32>,
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
}

/// Marks a record whose payload is kept by reference.
const LONG: u32 = 1 << 31;

impl Head {
    const LEN: usize = 8 + 8 + 1 + 1;

    fn bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.worker.to_le_bytes());
        out[8..16].copy_from_slice(&self.client.to_le_bytes());
        out[16..].copy_from_slice(&[self.event, self.error]);
        out
    }

    fn read(head: &[u8]) -> Head {
        Head {
            worker: i64::from_le_bytes(head[..8].try_into().expect("8 bytes")),
            client: i64::from_le_bytes(head[8..16].try_into().expect("8 bytes")),
            event: head[16],
            error: head[17],
        }
    }
}

impl Kept {
    fn new(keep: usize) -> Self {
        Kept { records: ByteRing::default(), lens: VecDeque::new(), long: VecDeque::new(), keep }
    }

    fn len(&self) -> usize {
        self.lens.len()
    }

    fn clear(&mut self) {
        self.records.clear();
        self.lens.clear();
        self.long.clear();
    }

    fn push(&mut self, msg: &Outbound) {
        if self.lens.len() == self.keep
            && let Some(len) = self.lens.pop_front()
        {
            if len & LONG != 0 {
                self.long.pop_front();
            }
            self.records.pop((len & !LONG) as usize);
        }
        // Both codes fit a byte (checked above, when built).
        let (event, error) = (msg.event as i32 as u8, msg.error as i32 as u8);
        let head = Head { worker: msg.worker, client: msg.client, event, error };
        if msg.payload.len() >= COPIED_BELOW {
            self.long.push_back(msg.payload.clone());
            self.records.push(&head.bytes(), &[]);
            self.lens.push_back(Head::LEN as u32 | LONG);
        } else {
            self.records.push(&head.bytes(), &msg.payload);
            self.lens.push_back((Head::LEN + msg.payload.len()) as u32);
        }
    }

    /// The kept messages, from the `skip`th oldest on.
    fn from(&self, skip: usize) -> impl Iterator<Item = Outbound> + '_ {
        let before = self.lens.iter().take(skip);
        let mut at: usize = before.clone().map(|len| (len & !LONG) as usize).sum();
        let mut long = self.long.iter().skip(before.filter(|len| *len & LONG != 0).count());
        self.lens.iter().skip(skip).map(move |len| {
            let record = self.records.copy(at, (len & !LONG) as usize);
            at += (len & !LONG) as usize;
            let head = Head::read(&record);
            let payload = if len & LONG != 0 {
                long.next().expect("one kept payload per long record").clone()
            } else {
                record.slice(Head::LEN..)
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

/// Bytes pushed at the back and popped at the front, in one buffer used as a circle (a power
/// of two long, or empty), which doubles when what it holds does not fit.
#[derive(Default)]
struct ByteRing {
    buf: Box<[u8]>,
    /// Where the oldest byte is.
    head: usize,
    len: usize,
}

/// How far past its end a ring has the cache fetch ahead for its next record.
const FETCH_AHEAD: usize = 512;

impl ByteRing {
    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    fn mask(&self) -> usize {
        self.buf.len().wrapping_sub(1)
    }

    fn push(&mut self, head: &[u8], payload: &[u8]) {
        let n = head.len() + payload.len();
        if self.len + n > self.buf.len() {
            self.grow(self.len + n);
        }
        let tail = (self.head + self.len) & self.mask();
        self.write(tail, head);
        self.write((tail + head.len()) & self.mask(), payload);
        self.len += n;
        // The lines that came within reach of the next records (those before were fetched
        // after earlier records).
        self.fetch(tail + FETCH_AHEAD, tail + n + FETCH_AHEAD);
    }

    fn write(&mut self, at: usize, bytes: &[u8]) {
        let first = bytes.len().min(self.buf.len() - at);
        self.buf[at..at + first].copy_from_slice(&bytes[..first]);
        self.buf[..bytes.len() - first].copy_from_slice(&bytes[first..]);
    }

    /// Has the cache fetch, for writing, the lines of bytes `from..to` (past the end: taken
    /// around). The next records are written long after this one (after the other peers'),
    /// into memory last used a ring ago; fetched now, the writes find them in the cache
    /// instead of waiting for them.
    fn fetch(&self, from: usize, to: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
            for line in (from & !63..to).step_by(64) {
                let at = self.buf.as_ptr().wrapping_add(line & self.mask());
                // SAFETY: SSE is part of x86_64, and a prefetch is a hint: it reads nothing
                // (the address is within the ring anyway).
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(at.cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (from, to);
    }

    fn pop(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.head = if self.len == 0 { 0 } else { (self.head + n) & self.mask() };
    }

    /// A copy of `n` bytes from the `at`th held on.
    fn copy(&self, at: usize, n: usize) -> Bytes {
        let mut out = Vec::with_capacity(n);
        if n > 0 {
            let start = (self.head + at) & self.mask();
            let first = n.min(self.buf.len() - start);
            out.extend_from_slice(&self.buf[start..start + first]);
            out.extend_from_slice(&self.buf[..n - first]);
        }
        out.into()
    }

    fn grow(&mut self, at_least: usize) {
        let cap = at_least.max(2 * self.buf.len()).max(1024).next_power_of_two();
        let mut buf = vec![0u8; cap].into_boxed_slice();
        let first = self.len.min(self.buf.len() - self.head);
        buf[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        buf[first..self.len].copy_from_slice(&self.buf[..self.len - first]);
        self.buf = buf;
        self.head = 0;
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
