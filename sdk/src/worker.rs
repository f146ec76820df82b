//! The worker: registers its id and accepts the peer connections clients open to it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::connection::{self, Connection, Side, ToPeer};
use crate::rtc::Net;
use crate::signaling::{Incoming, Settings, Signal, Signaling, Stop};
use crate::{Error, Event, OPEN_TIMEOUT};
use distributor_proto::PeerId;
use distributor_proto::{RtcEvent, WorkerRtcMessage};

/// How a [`Worker`] connects.
pub struct WorkerBuilder {
    settings: Settings,
    bind: Option<IpAddr>,
    stun: Option<SocketAddr>,
}

impl WorkerBuilder {
    /// The worker's id (required): what clients open connections to.
    pub fn id(mut self, id: PeerId) -> Self {
        self.settings.worker_id = Some(id);
        self
    }

    /// A bearer token for the distributor (its `sub` must be the worker's id).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(token.into());
        self
    }

    crate::network_options!();

    /// Registers the worker: once this returns, clients anywhere in the cluster reach it.
    pub async fn connect(self) -> Result<Worker, Error> {
        let Some(worker) = self.settings.worker_id.filter(|id| *id != 0) else {
            return Err(Error::Invalid("a worker needs a non-zero id (WorkerBuilder::id)"));
        };
        let signaling = Signaling::connect::<WorkerRtcMessage>(self.settings).await?;
        let (accepted_tx, accepted) = mpsc::channel(64);
        let net = Net { bind: self.bind, stun: self.stun };
        let dispatcher = Dispatcher {
            worker,
            net,
            out: signaling.out,
            accepted: accepted_tx,
            peers: HashMap::new(),
            opening: JoinSet::new(),
        };
        let dispatching = AbortOnDropHandle::new(tokio::spawn(dispatcher.run(signaling.incoming)));
        Ok(Worker {
            id: worker,
            accepted,
            events: signaling.events,
            _dispatching: dispatching,
            _stop: signaling.stop,
        })
    }
}

/// A worker: one signaling stream, serving any number of clients.
///
/// Dropping it ends its work: the signaling stream half-closes (the distributor tells each
/// client `PEER_GONE` at once) and its task ends as soon as the distributor closed the stream,
/// 2 s at the most; connections not yet accepted are closed. Accepted [`Connection`]s and their
/// data channels go on: each lives while its handles do.
pub struct Worker {
    id: PeerId,
    accepted: mpsc::Receiver<Connection>,
    events: broadcast::Sender<Event>,
    _dispatching: AbortOnDropHandle<()>,
    _stop: Stop,
}

impl Worker {
    /// A worker of the distributor at `url` (`http://host:port`); set its id with
    /// [`WorkerBuilder::id`], then [`WorkerBuilder::connect`] registers it.
    pub fn builder(url: impl Into<String>) -> WorkerBuilder {
        let settings = Settings::new(url);
        WorkerBuilder { settings, bind: None, stun: None }
    }

    /// The worker's id, which clients open connections to.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The next client's connection, once its first data channel is open; `None` once the
    /// signaling ended for good.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.accepted.recv().await
    }

    /// What happens to the signaling (reconnections, resumes).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Hands each client's messages to its connection, starting one on a new client's `OFFER`.
struct Dispatcher {
    worker: PeerId,
    net: Net,
    out: mpsc::Sender<Signal>,
    accepted: mpsc::Sender<Connection>,
    peers: HashMap<PeerId, Peer>,
    /// Each new connection, until it opens (or gives up): ended with the dispatcher.
    opening: JoinSet<()>,
}

/// A client's current connection: its task, and the SDP session it negotiated.
struct Peer {
    to: mpsc::UnboundedSender<ToPeer>,
    session: Option<Vec<u8>>,
}

impl Dispatcher {
    async fn run(mut self, mut incoming: mpsc::Receiver<Incoming>) {
        while let Some(incoming) = incoming.recv().await {
            match incoming {
                Incoming::Signal(signal) => self.signal(signal),
                Incoming::Fresh => self.peers.retain(|_, peer| peer.to.send(ToPeer::Reset).is_ok()),
            }
            if self.accepted.is_closed() {
                return;
            }
        }
    }

    fn signal(&mut self, signal: Signal) {
        let client = signal.client;
        if signal.event != RtcEvent::Offer {
            let delivered = self.peers.get(&client).map(|peer| peer.to.send(ToPeer::Signal(signal)));
            if !matches!(delivered, Some(Ok(()))) {
                tracing::debug!(client, "a message for no connection");
                self.peers.remove(&client);
            }
            return;
        }
        // An OFFER in the session of the client's current connection renegotiates it (an ICE
        // restart); any other is a new peer connection, and one the same client opened earlier
        // closes.
        let session = connection::session_id(&signal.payload).map(<[u8]>::to_vec);
        if let Some(peer) = self.peers.get(&client)
            && session.is_some()
            && peer.session == session
            && !peer.to.is_closed()
        {
            let _ = peer.to.send(ToPeer::Signal(signal));
            return;
        }
        self.peers.retain(|_, peer| !peer.to.is_closed());
        let (to_peer, signals) = mpsc::unbounded_channel();
        let _ = to_peer.send(ToPeer::Signal(signal));
        if let Some(earlier) = self.peers.insert(client, Peer { to: to_peer, session }) {
            let _ = earlier.to.send(ToPeer::Close);
        }
        let (opened, connection) = oneshot::channel();
        let side = Side::Worker { worker: self.worker, client };
        tokio::spawn(connection::run(side, self.net, self.out.clone(), signals, opened));
        let accepted = self.accepted.clone();
        while self.opening.try_join_next().is_some() {}
        self.opening.spawn(async move {
            // A client that never finishes is given up (dropping `connection` ends its task).
            match tokio::time::timeout(OPEN_TIMEOUT, connection).await {
                Ok(Ok(Ok(connection))) => {
                    let _ = accepted.send(connection).await;
                }
                Ok(Ok(Err(e))) => tracing::debug!(client, "a client's connection did not open: {e}"),
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::debug!(client, "a client's connection did not open within {OPEN_TIMEOUT:?}")
                }
            }
        });
    }
}
