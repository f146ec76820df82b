//! A client moving between instances with its sessions, the bridge's part.
//!
//! The client's stream keeps its id (a [`ConnId`] naming the instance it moved from): every
//! session, on its workers' shards wherever they are, knows the client by it, so nothing there
//! changes but where its messages go. The new home's claim says where it is now; then:
//! - every instance with a session of the client sends what is for it there
//!   ([`RemoteClient::moved_to`](crate::peer::remote::RemoteClient::moved_to)), and says so to the old home with a [`wire::Repointed`]
//!   after what it sent there before;
//! - the old home holds what comes for the client until the claim (the new home registers the
//!   client first), then passes it on, each instance's marker after that instance's messages;
//! - the new home holds what an instance sends the client directly until that instance's
//!   marker came through the old home, so that the client gets each worker's messages in order.
//!
//! The other way, what the client sends its workers, is ordered by the old home's
//! [`wire::ClientLeft`] (see [`super::client_order`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Bridge, Origin, to_client_record, wire_conn};
use crate::cluster::clients::Moved;
use crate::cluster::tunnels::MovedClient;
use crate::cluster::wire::{self, record::Kind};
use crate::core::{Command, ConnId, InstanceId, Outbound, PeerId};
use crate::pb::RtcEvent;
use crate::peer::{Peer, Sink};

/// A client that moved away from here, until its claim is heard.
pub(super) struct Leaving {
    to: InstanceId,
    /// What came for it meanwhile, in order, to pass on.
    held: Vec<(Kind, Origin)>,
}

/// A client that moved here, while instances of its sessions have not said they heard.
pub(super) struct Arriving {
    /// The instance it moved from.
    home: InstanceId,
    /// Instances whose marker has not come through `home` yet, and what they sent meanwhile.
    waiting: HashMap<InstanceId, Vec<Outbound>>,
}

/// Where a message for a client that moved goes.
pub(super) enum Onward {
    /// To the instance it is on now.
    To(InstanceId),
    /// It moved away from here and its claim was not heard yet: held.
    Held,
}

#[derive(Default)]
pub(super) struct ClientMoves {
    /// Clients that moved, by their kept stream id: the instance each is on now. Here: what is
    /// sent to them goes there.
    moved: HashMap<ConnId, InstanceId>,
    leaving: HashMap<ConnId, Leaving>,
    arriving: HashMap<ConnId, Arriving>,
    /// Clients that moved here (their stream ids name another instance).
    here: HashSet<ConnId>,
}

impl ClientMoves {
    /// Whether no client has moved from or to here: nothing to look up.
    pub fn is_idle(&self) -> bool {
        self.moved.is_empty() && self.here.is_empty()
    }

    /// Whether `conn` is a client stream that moved here.
    pub fn is_here(&self, conn: ConnId) -> bool {
        self.here.contains(&conn)
    }

    /// Where what is for `conn`, a client that moved, goes; `None`: it did not move.
    pub fn onward(&self, conn: ConnId) -> Option<Onward> {
        if self.leaving.contains_key(&conn) {
            return Some(Onward::Held);
        }
        self.moved.get(&conn).map(|at| Onward::To(*at))
    }

    /// Holds a record for a client leaving here until its claim.
    pub fn hold(&mut self, conn: ConnId, record: Kind, origin: Origin) {
        if let Some(leaving) = self.leaving.get_mut(&conn) {
            leaving.held.push((record, origin));
        }
    }

    /// The client `conn` moves from here to `to`.
    pub fn leave(&mut self, conn: ConnId, to: InstanceId) {
        self.moved.insert(conn, to);
        self.leaving.insert(conn, Leaving { to, held: Vec::new() });
    }

    /// The client `conn` moved here from `home`; `instances` hold sessions of it and will say
    /// when they send here.
    pub fn arrive(
        &mut self,
        conn: ConnId,
        home: InstanceId,
        instances: impl IntoIterator<Item = InstanceId>,
    ) {
        self.moved.remove(&conn);
        self.here.insert(conn);
        let waiting: HashMap<_, _> =
            instances.into_iter().filter(|i| *i != home).map(|i| (i, Vec::new())).collect();
        if !waiting.is_empty() {
            self.arriving.insert(conn, Arriving { home, waiting });
        }
    }

    /// The claim of `conn`, now at `at`, if it left from here: what was held for it, to pass
    /// on there in order.
    pub fn claimed(&mut self, conn: ConnId, at: InstanceId) -> Option<Vec<(Kind, Origin)>> {
        let leaving = self.leaving.remove(&conn)?;
        self.moved.insert(conn, at);
        Some(leaving.held)
    }

    /// The client `conn`, which holds a session here, is at `at` now.
    pub fn moved(&mut self, conn: ConnId, at: InstanceId) {
        self.moved.insert(conn, at);
    }

    /// A message from `from` for `conn`, which moved here: held if `from`'s marker has not come
    /// yet (returned otherwise).
    pub fn arriving(&mut self, conn: ConnId, from: InstanceId, msg: Outbound) -> Option<Outbound> {
        match self.arriving.get_mut(&conn).and_then(|a| a.waiting.get_mut(&from)) {
            Some(held) => {
                held.push(msg);
                None
            }
            None => Some(msg),
        }
    }

    /// `from`'s marker for `conn` came: what it sent meanwhile, to deliver in order.
    pub fn repointed(&mut self, conn: ConnId, from: InstanceId) -> Vec<Outbound> {
        let Some(arriving) = self.arriving.get_mut(&conn) else { return Vec::new() };
        let held = arriving.waiting.remove(&from).unwrap_or_default();
        if arriving.waiting.is_empty() {
            self.arriving.remove(&conn);
        }
        held
    }

    /// `instance` is gone: what waited for it, or for markers through it, is delivered (by
    /// client stream), and what was held to go there is returned with its origins.
    pub fn instance_gone(&mut self, instance: InstanceId) -> (Vec<(ConnId, Outbound)>, Vec<Origin>) {
        let mut deliver = Vec::new();
        self.arriving.retain(|conn, arriving| {
            if arriving.home == instance {
                for (_, held) in arriving.waiting.drain() {
                    deliver.extend(held.into_iter().map(|m| (*conn, m)));
                }
                return false;
            }
            if let Some(held) = arriving.waiting.remove(&instance) {
                deliver.extend(held.into_iter().map(|m| (*conn, m)));
            }
            !arriving.waiting.is_empty()
        });
        let mut lost = Vec::new();
        self.leaving.retain(|_, leaving| {
            if leaving.to != instance {
                return true;
            }
            lost.extend(leaving.held.drain(..).map(|(_, origin)| origin));
            false
        });
        self.moved.retain(|_, at| *at != instance);
        (deliver, lost)
    }

    /// The client stream `conn` ended for good: forgotten.
    pub fn forget(&mut self, conn: ConnId) {
        self.moved.remove(&conn);
        self.leaving.remove(&conn);
        self.arriving.remove(&conn);
        self.here.remove(&conn);
    }
}

/// The instances of a moving client's `sessions` its old home sends `ClientLeft` (each once):
/// all but `except`, the old home itself, whose own workers' sessions are listed as on it.
fn told(sessions: &[(PeerId, InstanceId)], except: InstanceId) -> Vec<InstanceId> {
    let mut told: Vec<InstanceId> = sessions.iter().map(|(_, at)| *at).filter(|at| *at != except).collect();
    told.sort_unstable();
    told.dedup();
    told
}

impl Bridge {
    /// The local client `conn` moves to `to` with its sessions: its sessions across leave
    /// with it (returned), their instances hear it left after what it sent them from here,
    /// what comes for it is held until its claim, and the stand-in returned takes its place in
    /// the sessions of this instance's workers.
    pub(super) fn client_leaving(
        &mut self,
        client: PeerId,
        conn: ConnId,
        to: InstanceId,
    ) -> crate::peer::remote::Leaving {
        let (sessions, moves) = self.clients.remove(conn);
        for instance in told(&sessions, self.me) {
            let left = wire::ClientLeft { conn: Some(wire_conn(conn)), moves };
            self.links.push(instance, Kind::ClientLeft(left), Origin::Owed);
        }
        self.moves.leave(conn, to);
        let stand_in = self.remote(conn);
        stand_in.moved_to(to);
        tracing::debug!(client, conn = %conn, "client moving to another instance with its sessions");
        crate::peer::remote::Leaving { sessions, stand_in, moves: moves + 1 }
    }

    /// A client moved here with its sessions, its stream keeping its id: it is welcomed and
    /// written what it had not received, and its sessions are its stream's. Those with this
    /// instance's workers stay bound to the stand-in for it, which writes here from now on,
    /// through the bridge: what those workers sent it through its old home comes first (their
    /// marker comes back through it after that), then what they send now, in order. `start`
    /// (its stream is read from then on) once what it sent this instance's workers from its
    /// old home has come.
    pub(super) fn import_client(
        &mut self,
        client: PeerId,
        sink: Sink,
        moved: MovedClient,
        start: tokio::sync::oneshot::Sender<()>,
        now: Instant,
    ) {
        let conn = sink.id();
        sink.deliver_owed(Outbound::relay(RtcEvent::Blank, 0, client, Bytes::new()));
        moved.messages.into_iter().for_each(|m| sink.deliver_owed(m));
        let (here, across): (Vec<_>, Vec<_>) = moved.sessions.into_iter().partition(|(_, at)| *at == self.me);
        let mut instances: Vec<InstanceId> = across.iter().map(|(_, at)| *at).collect();
        // The instances its old home sent its messages to (not its old home's own workers):
        // they hear that it left, after those messages.
        let told = told(&across, moved.from);
        let record = Moved { moves: moved.moves, from: moved.from, told, at: now };
        if moved.moves > 0 && !here.is_empty() {
            self.order.start_after_left(conn, moved.moves, moved.from, start, now);
        } else {
            let _ = start.send(());
        }
        if let Some(stand_in) = self.remote.remove(&conn) {
            stand_in.moved_to(self.me);
        }
        if !here.is_empty() {
            instances.push(self.me);
            let marker = wire::Repointed { conn: Some(wire_conn(conn)), from: 0 };
            self.links.push(moved.from, Kind::Repointed(marker), Origin::Owed);
        }
        self.clients.import(client, &sink, across.into_iter().chain(here).collect(), record);
        self.moves.arrive(conn, moved.from, instances);
        // Registered here; its sessions keep their stand-in.
        let register = Command::RebindClient {
            client,
            conn,
            sink: Peer::Local(sink.clone()),
            register: true,
            sessions: false,
            rebound: Arc::default(),
            done: Arc::new(()),
        };
        self.dispatch(self.shards.of_client(client), register);
    }

    /// A claim: the client `conn` (its stream's id kept) moved from `from` to `at`. The old
    /// home passes on what it held for it; an instance with sessions of it sends there from
    /// now on, and says so to the old home after what it sent there.
    pub(super) fn client_moved(&mut self, conn: ConnId, at: InstanceId, from: InstanceId) {
        if at == self.me || at == 0 {
            return;
        }
        self.clock.observe(conn.at);
        if let Some(held) = self.moves.claimed(conn, at) {
            for (record, origin) in held {
                self.links.push(at, record, origin);
            }
            return;
        }
        if let Some(remote) = self.remote.get(&conn) {
            remote.moved_to(at);
            self.moves.moved(conn, at);
            let marker = wire::Repointed { conn: Some(wire_conn(conn)), from: 0 };
            self.links.push(from, Kind::Repointed(marker), Origin::Owed);
        }
    }

    /// A marker for the client `conn`: from an instance to this one, the old home (`from`
    /// 0), to pass on after what it passed on before; or passed on by the old home, for this
    /// one, the new home: what `from` sent meanwhile is delivered now.
    pub(super) fn repointed(&mut self, sender: InstanceId, conn: ConnId, from: InstanceId) {
        if from == 0 {
            let marker = Kind::Repointed(wire::Repointed { conn: Some(wire_conn(conn)), from: sender });
            match self.moves.onward(conn) {
                Some(Onward::Held) => self.moves.hold(conn, marker, Origin::Owed),
                Some(Onward::To(at)) => self.links.push(at, marker, Origin::Owed),
                None => {}
            }
            return;
        }
        for msg in self.moves.repointed(conn, from) {
            self.for_local_client(from, conn, msg);
        }
    }

    /// A message from `from` for the client stream `conn`, if the client moved: passed on
    /// (`None`) if it moved away, held (`None`) if it moved here and `from`'s marker has not
    /// come yet; else returned, to deliver.
    pub(super) fn moved_client_message(
        &mut self,
        from: InstanceId,
        conn: ConnId,
        msg: Outbound,
    ) -> Option<Outbound> {
        match self.moves.onward(conn) {
            Some(onward) => {
                let record = to_client_record(conn, msg);
                match onward {
                    Onward::Held => self.moves.hold(conn, record, Origin::Owed),
                    Onward::To(at) => self.links.push(at, record, Origin::Owed),
                }
                None
            }
            None if self.moves.is_here(conn) => self.moves.arriving(conn, from, msg),
            None => Some(msg),
        }
    }
}
