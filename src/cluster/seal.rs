//! Authenticated cluster traffic: every NATS message an instance publishes is sealed with a
//! keyed BLAKE3 tag (a MAC, 32 bytes) under the deployment's cluster key, and every message it
//! receives is opened (checked) before anything reads its fields. A client of the same NATS
//! without the key can publish on our subjects, but nothing it says is believed. BLAKE3 rather
//! than HMAC-SHA256: link frames are batches of up to 256 KiB, and at that size keyed BLAKE3 is
//! several times faster on one core (BENCHMARKS.md has both).
//!
//! A sealed message is `body ‖ sent_at ‖ kind ‖ version ‖ tag`: `sent_at` is milliseconds since
//! the Unix epoch (u64, big-endian), `kind` what the message is, `version` [`VERSION`], and
//! `tag = BLAKE3-keyed(key, version ‖ kind ‖ subject length ‖ subject ‖ sent_at ‖ body)`. The
//! subject binds a message to where it was published: a frame for one instance cannot be
//! replayed into another's inbox, nor a locate's answer to another locate (each has its own
//! reply subject).
//!
//! Replays are refused outside [`FRESH_FOR`] of the receiver's clock (instance clocks should be
//! NTP-synchronised; a clock further off than that cannot talk to the others, and says so in
//! the rejection count). Within it, a replay is harmless by the receiver's own rules: a link
//! frame is a duplicate of its sequence number, or of an older epoch than the link's (refused);
//! a heartbeat is older than the last one of its instance (refused); a claim names a stream
//! that already claimed its id (older streams it would end are ended already); a locate only
//! asks.
//!
//! The key: HKDF-SHA256 of `--cluster-key`, or without one of `--auth-secret` (salt
//! [`DERIVE_SALT`], info: the NATS subject prefix), so that every instance of a deployment
//! derives the same key, and deployments sharing a secret but not a prefix do not.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ring::hkdf;

/// The version of the sealing scheme.
pub const VERSION: u8 = 2;
/// How far a message's `sent_at` may be from the receiver's clock.
pub const FRESH_FOR: Duration = Duration::from_secs(30);
/// The HKDF salt of a key derived from the auth secret.
pub const DERIVE_SALT: &[u8] = b"distributor cluster key v1";
const TAG: usize = 32;
/// The bytes a seal adds to a message.
pub const TRAILER: usize = 8 + 1 + 1 + TAG;

/// What a sealed message is; a message sealed as one kind does not open as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Frame = 1,
    Claim = 2,
    Heartbeat = 3,
    Locate = 4,
    Located = 5,
    ResumeAsk = 6,
    ResumeAnswer = 7,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Frame => "frame",
            Kind::Claim => "claim",
            Kind::Heartbeat => "heartbeat",
            Kind::Locate => "locate",
            Kind::Located => "located",
            Kind::ResumeAsk => "resume_ask",
            Kind::ResumeAnswer => "resume_answer",
        }
    }
}

/// Why a message was not believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("too short to be sealed")]
    Short,
    #[error("sealed with another scheme version or as another kind")]
    Header,
    #[error("the tag does not verify: not sealed with this deployment's key")]
    Tag,
    #[error("sent too long ago, or the sender's clock is off by more than {FRESH_FOR:?}")]
    Stale,
}

/// An opened message: its body, and when its sender says it sent it.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub body: Bytes,
    pub sent_at_ms: u64,
}

/// Seals and opens the messages of one deployment. Without a key (development only) messages
/// go out as they are and are believed as they come.
#[derive(Clone)]
pub struct Seal {
    key: Option<[u8; 32]>,
}

/// The length of the key HKDF makes.
struct KeyLength;

impl hkdf::KeyType for KeyLength {
    fn len(&self) -> usize {
        32
    }
}

impl Seal {
    /// No authentication: for a cluster on a trusted network (development).
    pub fn none() -> Self {
        Seal { key: None }
    }

    /// The key of the deployment of subject prefix `prefix`, derived from `secret` (the cluster
    /// key, or the auth secret).
    pub fn derived(secret: &[u8], prefix: &str) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DERIVE_SALT).extract(secret);
        let info = [prefix.as_bytes()];
        let okm = prk.expand(&info, KeyLength).expect("32 bytes is a valid HKDF length");
        let mut key = [0u8; 32];
        okm.fill(&mut key).expect("the length asked for");
        Seal { key: Some(key) }
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// `body`, sealed as `kind` for `subject` at `now_ms`.
    pub fn seal(&self, kind: Kind, subject: &str, body: &[u8], now_ms: u64) -> Bytes {
        let Some(key) = &self.key else { return Bytes::copy_from_slice(body) };
        let mut out = BytesMut::with_capacity(body.len() + TRAILER);
        out.put_slice(body);
        out.put_u64(now_ms);
        out.put_u8(kind as u8);
        out.put_u8(VERSION);
        let tag = sign(key, kind, subject, now_ms, body);
        out.put_slice(tag.as_bytes());
        out.freeze()
    }

    /// The body of `sealed`, a message received on `subject` that should be a `kind`, if it
    /// was sealed with this key for this subject within [`FRESH_FOR`] of `now_ms`.
    pub fn open(&self, kind: Kind, subject: &str, sealed: Bytes, now_ms: u64) -> Result<Opened, Rejected> {
        let Some(key) = &self.key else { return Ok(Opened { body: sealed, sent_at_ms: now_ms }) };
        if sealed.len() < TRAILER {
            return Err(Rejected::Short);
        }
        let body_len = sealed.len() - TRAILER;
        let trailer = &sealed[body_len..];
        let sent_at_ms = u64::from_be_bytes(trailer[..8].try_into().expect("8 bytes"));
        if trailer[8] != kind as u8 || trailer[9] != VERSION {
            return Err(Rejected::Header);
        }
        // Constant time: no early exit on the first differing byte.
        let tag = sign(key, kind, subject, sent_at_ms, &sealed[..body_len]);
        let got: [u8; TAG] = trailer[10..].try_into().expect("TAG bytes");
        // `blake3::Hash` compares in constant time.
        if tag != blake3::Hash::from(got) {
            return Err(Rejected::Tag);
        }
        if now_ms.abs_diff(sent_at_ms) > FRESH_FOR.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        Ok(Opened { body: sealed.slice(..body_len), sent_at_ms })
    }
}

/// The tag of `body` sealed as `kind` for `subject` at `sent_at_ms`.
fn sign(key: &[u8; 32], kind: Kind, subject: &str, sent_at_ms: u64, body: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&[VERSION, kind as u8]);
    hasher.update(&(subject.len() as u16).to_be_bytes());
    hasher.update(subject.as_bytes());
    hasher.update(&sent_at_ms.to_be_bytes());
    hasher.update(body);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key() -> Seal {
        Seal::derived(b"an auth secret of at least 32 bytes..", "distributor")
    }

    #[test]
    fn a_sealed_message_opens_where_and_as_what_it_was_sealed() {
        let seal = key();
        let sealed = seal.seal(Kind::Frame, "p.i.7", b"body", NOW);
        let opened = seal.open(Kind::Frame, "p.i.7", sealed.clone(), NOW + 1000).unwrap();
        assert_eq!(opened, Opened { body: Bytes::from_static(b"body"), sent_at_ms: NOW });
        assert_eq!(seal.open(Kind::Frame, "p.i.8", sealed.clone(), NOW), Err(Rejected::Tag), "another inbox");
        assert_eq!(seal.open(Kind::Claim, "p.i.7", sealed, NOW), Err(Rejected::Header), "another kind");
    }

    #[test]
    fn forged_tampered_and_stale_messages_are_rejected() {
        let seal = key();
        // Without the key: anything an outsider can build.
        assert_eq!(seal.open(Kind::Claim, "p.claim", Bytes::from_static(b"x"), NOW), Err(Rejected::Short));
        let other = Seal::derived(b"another secret of at least 32 bytes", "distributor");
        let forged = other.seal(Kind::Claim, "p.claim", b"claim", NOW);
        assert_eq!(seal.open(Kind::Claim, "p.claim", forged, NOW), Err(Rejected::Tag));
        let mut tampered = BytesMut::from(&seal.seal(Kind::Claim, "p.claim", b"claim", NOW)[..]);
        tampered[0] ^= 1;
        assert_eq!(seal.open(Kind::Claim, "p.claim", tampered.freeze(), NOW), Err(Rejected::Tag));
        let mut later = BytesMut::from(&seal.seal(Kind::Claim, "p.claim", b"claim", NOW)[..]);
        let at = later.len() - TRAILER;
        later[at..at + 8].copy_from_slice(&(NOW + 1).to_be_bytes());
        assert_eq!(
            seal.open(Kind::Claim, "p.claim", later.freeze(), NOW),
            Err(Rejected::Tag),
            "sent_at is signed"
        );
        let old = seal.seal(Kind::Heartbeat, "p.hb", b"beat", NOW);
        let fresh_for = FRESH_FOR.as_millis() as u64;
        assert!(seal.open(Kind::Heartbeat, "p.hb", old.clone(), NOW + fresh_for).is_ok());
        assert_eq!(
            seal.open(Kind::Heartbeat, "p.hb", old.clone(), NOW + fresh_for + 1),
            Err(Rejected::Stale)
        );
        assert_eq!(
            seal.open(Kind::Heartbeat, "p.hb", old, NOW - fresh_for - 1),
            Err(Rejected::Stale),
            "from the future"
        );
    }

    #[test]
    fn derived_keys_differ_by_secret_and_prefix() {
        let sealed = key().seal(Kind::Frame, "s", b"b", NOW);
        assert!(
            Seal::derived(b"an auth secret of at least 32 bytes..", "other")
                .open(Kind::Frame, "s", sealed.clone(), NOW)
                .is_err()
        );
        assert!(
            Seal::derived(b"another secret of at least 32 bytes!!", "distributor")
                .open(Kind::Frame, "s", sealed.clone(), NOW)
                .is_err()
        );
        assert!(key().open(Kind::Frame, "s", sealed, NOW).is_ok());
    }

    #[test]
    fn without_a_key_messages_pass_as_they_are() {
        let none = Seal::none();
        let sealed = none.seal(Kind::Frame, "s", b"body", NOW);
        assert_eq!(&sealed[..], b"body");
        assert_eq!(none.open(Kind::Frame, "s", sealed, 5).unwrap().body, Bytes::from_static(b"body"));
    }
}
