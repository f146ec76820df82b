//! The client: opens data channels to workers by id.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

use crate::connection::{self, Connection, Side, ToPeer};
use crate::rtc::Net;
use crate::signaling::{Incoming, Settings, Signal, Signaling, Stop};
use crate::{Error, Event, OPEN_TIMEOUT};
use distributor_proto::ClientRtcMessage;
use distributor_proto::PeerId;

/// How a [`Client`] connects.
pub struct ClientBuilder {
    settings: Settings,
    bind: Option<IpAddr>,
    stun: Option<SocketAddr>,
    open_timeout: Duration,
}

impl ClientBuilder {
    /// A bearer token for the distributor (its `sub` is the client's id).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(token.into());
        self
    }

    /// The client's id on a distributor without auth (`x-client-id`; random if not given).
    pub fn id(mut self, id: PeerId) -> Self {
        self.settings.client_id = Some(id);
        self
    }

    crate::network_options!();

    /// How long [`Client::open`] waits ([`OPEN_TIMEOUT`] by default).
    pub fn open_timeout(mut self, within: Duration) -> Self {
        self.open_timeout = within;
        self
    }

    /// Opens the signaling stream.
    pub async fn connect(self) -> Result<Client, Error> {
        let mut settings = self.settings;
        if settings.token.is_none() && settings.client_id.is_none() {
            // Resuming needs a stable identity: one the distributor would not pick itself.
            settings.client_id = Some(rand::random_range(1..i64::MAX));
        }
        let signaling = Signaling::connect::<ClientRtcMessage>(settings).await?;
        let peers: Peers = Arc::default();
        let dispatching = AbortOnDropHandle::new(tokio::spawn(dispatch(signaling.incoming, peers.clone())));
        Ok(Client {
            out: signaling.out,
            events: signaling.events,
            peers,
            net: Net { bind: self.bind, stun: self.stun },
            open_timeout: self.open_timeout,
            _dispatching: dispatching,
            _stop: signaling.stop,
        })
    }
}

type Peers = Arc<Mutex<HashMap<PeerId, mpsc::UnboundedSender<ToPeer>>>>;

/// A client: one signaling stream, any number of peer connections to workers.
///
/// Dropping it ends its work: the signaling stream half-closes (the distributor tells each
/// worker `PEER_GONE` at once) and its task ends as soon as the distributor closed the stream,
/// 2 s at the most; negotiations under way fail. Open [`Connection`]s and their data channels
/// go on: each lives while its handles do.
pub struct Client {
    out: mpsc::Sender<Signal>,
    events: broadcast::Sender<Event>,
    peers: Peers,
    net: Net,
    open_timeout: Duration,
    _dispatching: AbortOnDropHandle<()>,
    _stop: Stop,
}

impl Client {
    /// A client of the distributor at `url` (`http://host:port`); [`ClientBuilder::connect`]
    /// opens its signaling stream.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        let settings = Settings::new(url);
        ClientBuilder { settings, bind: None, stun: None, open_timeout: OPEN_TIMEOUT }
    }

    /// What happens to the signaling (reconnections, resumes).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Opens a peer connection to `worker` with one data channel: the offer, the answer, the
    /// candidates through the distributor, then ICE, DTLS and SCTP directly. Fails with the
    /// distributor's refusal (`PEER_NOT_CONNECTED` when the worker is not there), or a timeout.
    /// A connection to the same worker opened earlier is closed (one session per pair: more
    /// channels on one connection come from [`DataChannel::open_another`]).
    ///
    /// [`DataChannel::open_another`]: super::DataChannel::open_another
    pub async fn open(&self, worker: PeerId) -> Result<Connection, Error> {
        let (to_peer, signals) = mpsc::unbounded_channel();
        {
            let mut peers = self.peers.lock().expect("not poisoned");
            peers.retain(|_, peer| !peer.is_closed());
            if let Some(earlier) = peers.insert(worker, to_peer) {
                let _ = earlier.send(ToPeer::Close);
            }
        }
        let (opened, connection) = oneshot::channel();
        let side = Side::Client { worker };
        tokio::spawn(connection::run(side, self.net, self.out.clone(), signals, opened));
        let result = match tokio::time::timeout(self.open_timeout, connection).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout { what: "the data channel to open", after: self.open_timeout }),
        };
        if result.is_err() {
            let mut peers = self.peers.lock().expect("not poisoned");
            peers.retain(|_, peer| !peer.is_closed());
        }
        result
    }
}

/// Hands each message from the distributor to the connection it is about.
async fn dispatch(mut incoming: mpsc::Receiver<Incoming>, peers: Peers) {
    while let Some(incoming) = incoming.recv().await {
        let mut peers = peers.lock().expect("not poisoned");
        match incoming {
            Incoming::Signal(signal) => {
                let worker = signal.worker;
                let Some(peer) = peers.get(&worker) else {
                    tracing::debug!(worker, event = ?signal.event, "a message for no connection");
                    continue;
                };
                if peer.send(ToPeer::Signal(signal)).is_err() {
                    peers.remove(&worker);
                }
            }
            Incoming::Fresh => peers.retain(|_, peer| peer.send(ToPeer::Reset).is_ok()),
        }
    }
}
