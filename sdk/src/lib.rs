//! Peers of the distributor (a WebRTC signaling relay): a client and a worker that get a WebRTC data
//! channel to each other through it.
//!
//! A [`Worker`] registers its id and accepts connections; a [`Client`] opens a connection to a
//! worker by id. Each holds one signaling stream to a distributor (gRPC), negotiates the peer
//! connection through it (the client offers, the worker answers, both trickle their ICE
//! candidates), and hands over a [`Connection`] with an open [`DataChannel`]. From then on the
//! data goes directly between the peers (UDP, DTLS, SCTP); the distributor only signals.
//!
//! ```no_run
//! use distributor_sdk::{Client, Worker};
//!
//! # async fn run() -> Result<(), distributor_sdk::Error> {
//! // A worker that echoes every message of every client.
//! let mut worker = Worker::builder("http://127.0.0.1:50051").id(7).connect().await?;
//! tokio::spawn(async move {
//!     while let Some(mut peer) = worker.accept().await {
//!         tokio::spawn(async move {
//!             while let Some(data) = peer.channel.recv().await {
//!                 let _ = peer.channel.send(data).await;
//!             }
//!         });
//!     }
//! });
//!
//! // A client that opens a data channel to worker 7.
//! let client = Client::builder("http://127.0.0.1:50051").connect().await?;
//! let mut peer = client.open(7).await?;
//! peer.channel.send("hello".into()).await?;
//! assert_eq!(peer.channel.recv().await.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! # What the SDK does for you
//! - **Resume**: the signaling stream is resumable. When it drops, or the distributor drains
//!   and says `RECONNECT`, the peer reconnects (with backoff and jitter, to the next
//!   [`endpoint`](ClientBuilder::endpoint) when one is given), its own messages numbered and
//!   sent again where the distributor did not get them, duplicates dropped. Its sessions go on;
//!   [`Client::events`] and [`Worker::events`] say what happened ([`Event`]).
//! - **Errors**: the distributor's refusals come back as [`Error::Refused`] with the contract's
//!   [`ErrorCode`] (`PEER_NOT_CONNECTED` when the worker is not there); causes from below keep
//!   their [`source`](std::error::Error::source).
//! - **ICE restarts**: the client restarts ICE when the path is lost for
//!   [`ICE_RESTART_AFTER`]; [`Connection::rebind`] moves a connection to a new socket after a
//!   network change.
//!
//! # Who owns what
//! Dropping a [`Client`] or [`Worker`] ends its signaling and every negotiation under way (the
//! other side hears `PEER_GONE`). A [`Connection`] and its [`DataChannel`]s live on apart from
//! it: the peer connection's task ends once its last handle is dropped. No task the SDK starts
//! outlives the handles that own it.
//!
//! Built on tokio (the calls must run inside a tokio runtime), tonic and
//! [str0m](https://docs.rs/str0m), a WebRTC stack in pure Rust.

// The layers, for those who work on it: `signaling` (one peer's resumable stream: numbering,
// resume, reconnection, the move on `RECONNECT`), `rtc` (one peer connection: a task owning
// str0m's `Rtc` and its UDP sockets, with its data channels), `connection` (one peer
// connection's negotiation, the same task on both sides), `client` and `worker` (the two
// roles: one signaling stream each, its messages handed to the connection they are about),
// `direct` (two peers signaling in-process), `sockets` and `stun` (the host and reflexive
// candidates).

#![deny(missing_docs)]

/// The builder methods a client and a worker share (their builders have `settings`, `bind` and
/// `stun` fields).
macro_rules! network_options {
    () => {
        /// Another distributor to move to when this one drains or cannot be reached (any
        /// number; tried in turn after the one given to `builder`).
        pub fn endpoint(mut self, url: impl Into<String>) -> Self {
            self.settings.endpoints.push(url.into());
            self
        }

        /// The one address the peer connections' UDP sockets bind, their host candidate
        /// (default: every interface address but loopback and link-local, each a host
        /// candidate; loopback on a machine with nothing else).
        pub fn bind(mut self, ip: std::net::IpAddr) -> Self {
            self.bind = Some(ip);
            self
        }

        /// A STUN server to learn the sockets' server-reflexive address from (what a NAT
        /// makes of them), trickled beside the host candidates.
        pub fn stun(mut self, server: std::net::SocketAddr) -> Self {
            self.stun = Some(server);
            self
        }
    };
}
use network_options;

mod client;
mod connection;
mod direct;
mod rtc;
mod signaling;
mod sockets;
mod stun;
mod worker;

use std::sync::Arc;
use std::time::Duration;

pub use client::{Client, ClientBuilder};
pub use connection::{Connection, ICE_RESTART_AFTER, PeerEvent};
pub use direct::pair as pair_in_process;
pub use distributor_proto::{ErrorCode, PeerId};
pub use rtc::{ChannelSender, DataChannel, ICE_GIVE_UP, MAX_MESSAGE, OpenTimes};
pub use worker::{Worker, WorkerBuilder};

/// How long [`Client::open`] waits for a data channel by default: signaling, ICE, DTLS, SCTP.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A cause kept for [`std::error::Error::source`], shared so that one failure can be reported
/// to every waiter (an [`Error`] is `Clone`).
type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// What went wrong, as precisely as the distributor or the network said it. Causes from below
/// (the transport, the WebRTC stack, the operating system) are kept as its
/// [`source`](std::error::Error::source).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The distributor refused a message: its `ERROR`, with the code and reason it gave.
    #[error("{}: {reason}", code.as_str_name())]
    Refused {
        /// The contract's error code (`PEER_NOT_CONNECTED`, `RATE_LIMITED`...).
        code: ErrorCode,
        /// The distributor's words.
        reason: String,
    },
    /// The distributor ended the signaling stream for good (a bad token, a newer stream of the
    /// same id, a malformed registration...): the reason it gave.
    #[error("the distributor ended the signaling stream: {0}")]
    Ended(String),
    /// No distributor answered at the address.
    #[error("cannot reach the distributor at {url}")]
    Connect {
        /// The address tried last.
        url: String,
        /// Why: the transport's error, or the stream's status.
        #[source]
        cause: Cause,
    },
    /// The other side's stream ended, or it was gone before the negotiation finished.
    #[error("the other peer is gone")]
    PeerGone,
    /// Waited longer than allowed for `what`.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What did not come.
        what: &'static str,
        /// How long it was waited for.
        after: Duration,
    },
    /// The WebRTC stack refused what it was given (a malformed SDP or candidate), or the peer
    /// connection failed.
    #[error("WebRTC: {what}")]
    Rtc {
        /// What failed.
        what: String,
        /// The WebRTC stack's own error, where it gave one.
        #[source]
        cause: Option<Cause>,
    },
    /// A call or a setting that cannot work (a worker without an id, a token that is not ASCII,
    /// an ICE restart asked of a worker).
    #[error("{0}")]
    Invalid(&'static str),
    /// The client or worker, or this peer connection, was closed.
    #[error("closed")]
    Closed,
    /// A local I/O error (binding the UDP socket).
    #[error("I/O")]
    Io(#[source] Arc<std::io::Error>),
}

impl Error {
    /// The distributor's error code, when it refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A WebRTC failure with no error of the stack's own beneath it.
    pub(crate) fn rtc(what: impl Into<String>) -> Self {
        Error::Rtc { what: what.into(), cause: None }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

/// What happens to a client's or worker's signaling, for those who watch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The signaling stream dropped or the distributor asked to move (`RECONNECT`): connecting
    /// again.
    Reconnecting {
        /// Why: the stream's error, or the distributor's `RECONNECT`.
        reason: String,
    },
    /// Connected again. `recovered`: the distributor resumed the peer (no session and no message
    /// lost); else the peer starts afresh, and negotiations that were under way failed (open
    /// data channels are not affected).
    Resumed {
        /// Whether the distributor still knew the peer.
        recovered: bool,
    },
    /// The signaling ended for good.
    Closed {
        /// The last error, or why it was ended.
        reason: String,
    },
}
