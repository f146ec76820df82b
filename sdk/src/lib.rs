//! The peer side: a client and a worker that get a WebRTC data channel through the distributor.
//!
//! ```no_run
//! # async fn run() -> Result<(), distributor_sdk::Error> {
//! use distributor_sdk::{Client, Worker};
//! let mut worker = Worker::builder("http://127.0.0.1:50051").id(7).connect().await?;
//! tokio::spawn(async move {
//!     while let Some(mut peer) = worker.accept().await {
//!         tokio::spawn(async move {
//!             while let Some(data) = peer.channel.recv().await {
//!                 let _ = peer.channel.send(data).await; // an echo
//!             }
//!         });
//!     }
//! });
//! let client = Client::builder("http://127.0.0.1:50051").connect().await?;
//! let mut peer = client.open(7).await?;
//! peer.channel.send("hello".into()).await?;
//! assert_eq!(peer.channel.recv().await.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! Built with the cargo feature `sdk`, so that the server's build carries no WebRTC stack.
//!
//! The layers, each in its own module:
//! - [`signaling`]: one peer's signaling over the distributor: a resumable gRPC stream
//!   (`x-resume-after`), its own messages numbered and resent after a resume, duplicates
//!   dropped by `seq`, reconnection with backoff and jitter, and a move to a new stream on
//!   `RECONNECT` before the old one ends.
//! - [`rtc`]: one peer connection: a task owning str0m's `Rtc` and its UDP socket, with the
//!   data channels it carries. Once open, a data channel never depends on the signaling stream.
//! - `connection`: one peer connection's negotiation, the same task on both sides: the client
//!   offers, the worker answers, both trickle their candidates.
//! - [`client`] and [`worker`]: the two roles: one signaling stream each, its messages handed to
//!   the connection they are about.
//! - [`direct`]: two peers signaling in-process, the baseline of the open-time benchmark.
//! - `cli`: `distributor client` and `distributor worker`.

/// The builder methods a client and a worker share (their builders have `settings`, `bind` and
/// `stun` fields).
macro_rules! network_options {
    () => {
        /// Another distributor to move to when this one drains or cannot be reached.
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

use std::time::Duration;

pub use client::{Client, ClientBuilder};
pub use connection::{Connection, ICE_RESTART_AFTER, PeerEvent};
pub use direct::pair as pair_in_process;
pub use distributor_proto::{ErrorCode, PeerId};
pub use rtc::{ChannelSender, DataChannel, ICE_GIVE_UP, MAX_MESSAGE, OpenTimes};
pub use worker::{Worker, WorkerBuilder};

/// How long [`Client::open`] waits for a data channel by default: signaling, ICE, DTLS, SCTP.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, as precisely as the distributor or the network said it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The distributor refused a message: its `ERROR`, with the code and reason it gave.
    #[error("{}: {reason}", code.as_str_name())]
    Refused { code: ErrorCode, reason: String },
    /// The distributor ended the signaling stream for good (a bad token, a newer stream of the
    /// same id, a malformed registration...).
    #[error("the distributor ended the signaling stream: {0}")]
    Ended(String),
    /// No distributor answered at the address.
    #[error("cannot reach the distributor at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The other side's stream ended, or it was gone before the negotiation finished.
    #[error("the other peer is gone")]
    PeerGone,
    /// Waited longer than allowed for `what`.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    /// The WebRTC stack refused what it was given (a malformed SDP or candidate).
    #[error("WebRTC: {0}")]
    Rtc(String),
    /// The client or worker, or this peer connection, was closed.
    #[error("closed")]
    Closed,
    /// A local I/O error (binding the UDP socket).
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// The distributor's error code, when it refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// What happens to a client's or worker's signaling, for those who watch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The signaling stream dropped or the distributor asked to move (`RECONNECT`): connecting
    /// again.
    Reconnecting { reason: String },
    /// Connected again. `recovered`: the distributor resumed the peer (no session and no message
    /// lost); else the peer starts afresh, and negotiations that were under way failed (open
    /// data channels are not affected).
    Resumed { recovered: bool },
    /// The signaling ended for good.
    Closed { reason: String },
}
