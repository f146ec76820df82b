//! The local client streams that talk to workers on other instances: which sessions each holds
//! where, so that what arrives for them is delivered, and what ends is told.
//!
//! Sans-IO: a client enters with its first message across ([`LocalClients::open`]), each
//! worker it offers to is remembered with its instance, the session counted on the client's
//! stream ([`LocalClients::send`]), and it leaves with its stream ([`LocalClients::gone`]),
//! returning the instances to tell.
//!
//! A client that moved here with its sessions tells the instances it shared with its old home,
//! for a while, to take what it sends after its old home's `ClientLeft`
//! (see [`Stamp`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::core::{ConnId, DeliverError, InstanceId, Outbound, PeerId, session};
use crate::pb::RtcEvent;
use crate::peer::Sink;

struct LocalClient {
    client: PeerId,
    sink: Sink,
    /// Its workers elsewhere and their instances.
    workers: HashMap<PeerId, InstanceId>,
    /// How it came here, if it moved.
    moved: Option<Moved>,
}

/// A client stream that moved here with its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// How many times it moved, this move included.
    pub moves: u32,
    /// The instance it moved from, which sent `ClientLeft` to `told`.
    pub from: InstanceId,
    pub told: Vec<InstanceId>,
    pub at: Instant,
}

/// How long a client that moved here says, in what it sends across, that it comes after its
/// old home's `ClientLeft`: well past the time that record takes (a link gives up
/// after 3 s), and short enough that the instances it tells need not remember it for long
/// (see `client_order`).
pub const STAMP_FOR: Duration = Duration::from_secs(30);

/// What a client's message or departure across says of the client's moves: the receiver
/// takes it after the `ClientLeft` of move `moves - 1` from `after_left_of`, when set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub moves: u32,
    pub after_left_of: InstanceId,
}

impl Moved {
    fn stamp(&self, to: InstanceId, now: Instant) -> Stamp {
        let follows = now.saturating_duration_since(self.at) < STAMP_FOR && self.told.contains(&to);
        Stamp { moves: self.moves, after_left_of: if follows { self.from } else { 0 } }
    }
}

fn stamp(moved: &Option<Moved>, to: InstanceId, now: Instant) -> Stamp {
    moved.as_ref().map_or_else(Stamp::default, |m| m.stamp(to, now))
}

#[derive(Default)]
pub struct LocalClients {
    by_conn: HashMap<ConnId, LocalClient>,
}

/// An `OFFER` would open one session more than the client may hold.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManySessions;

impl LocalClients {
    /// A local client stream sends across; known from now until [`Self::gone`].
    pub fn open(&mut self, client: PeerId, sink: &Sink) {
        self.by_conn.entry(sink.id()).or_insert_with(|| LocalClient {
            client,
            sink: sink.clone(),
            workers: HashMap::new(),
            moved: None,
        });
    }

    #[cfg(test)]
    pub fn contains(&self, conn: ConnId) -> bool {
        self.by_conn.contains_key(&conn)
    }

    /// The stream `conn` sends `event` to `worker` on `instance`, at `now`. An `OFFER` to a
    /// worker it holds no session with opens one, counted on the stream against
    /// `max_sessions`: `Err(TooManySessions)` if it holds that many already. Returns what the
    /// message says of the client's moves.
    pub fn send(
        &mut self,
        conn: ConnId,
        worker: PeerId,
        instance: InstanceId,
        event: RtcEvent,
        max_sessions: usize,
        now: Instant,
    ) -> Result<Stamp, TooManySessions> {
        let Some(local) = self.by_conn.get_mut(&conn) else { return Ok(Stamp::default()) };
        match local.workers.get_mut(&worker) {
            Some(at) => *at = instance,
            None if event == RtcEvent::Offer => {
                if !local.sink.open_session(max_sessions) {
                    return Err(TooManySessions);
                }
                local.workers.insert(worker, instance);
            }
            // No session to count: the worker's instance refuses it.
            None => {}
        }
        Ok(stamp(&local.moved, instance, now))
    }

    /// The local stream `conn`, if it sends across.
    pub fn sink(&self, conn: ConnId) -> Option<Sink> {
        self.by_conn.get(&conn).map(|local| local.sink.clone())
    }

    /// A worker moved here with a session of the local stream `conn`: the session is no longer
    /// across, and the worker's shard takes the stream over with its count of the session.
    pub fn take_session(&mut self, conn: ConnId, worker: PeerId) -> Option<Sink> {
        let local = self.by_conn.get_mut(&conn)?;
        local.workers.remove(&worker)?;
        Some(local.sink.clone())
    }

    /// A worker moved from here to `instance` with a session of this local stream, which the
    /// stream counts already: the session is across from now on.
    pub fn adopt(&mut self, client: PeerId, sink: &Sink, worker: PeerId, instance: InstanceId) {
        self.open(client, sink);
        if let Some(local) = self.by_conn.get_mut(&sink.id()) {
            local.workers.insert(worker, instance);
        }
    }

    /// `worker` moved from instance `from` to `to` with its sessions: they are there now.
    pub fn repoint(&mut self, worker: PeerId, from: InstanceId, to: InstanceId) {
        for local in self.by_conn.values_mut() {
            if let Some(at) = local.workers.get_mut(&worker)
                && *at == from
            {
                *at = to;
            }
        }
    }

    /// The local stream `conn` moves to another instance with its sessions: forgotten here;
    /// returns its sessions across (each worker and its instance), and how many times it moved
    /// before.
    pub fn remove(&mut self, conn: ConnId) -> (Vec<(PeerId, InstanceId)>, u32) {
        let Some(local) = self.by_conn.remove(&conn) else { return (Vec::new(), 0) };
        (local.workers.into_iter().collect(), local.moved.map_or(0, |m| m.moves))
    }

    /// A client stream moved here with these sessions across, which it counts from now on.
    pub fn import(&mut self, client: PeerId, sink: &Sink, across: Vec<(PeerId, InstanceId)>, moved: Moved) {
        self.open(client, sink);
        if let Some(local) = self.by_conn.get_mut(&sink.id()) {
            local.moved = Some(moved);
            for (worker, instance) in across {
                if local.workers.insert(worker, instance).is_none() {
                    sink.open_session(0);
                }
            }
        }
    }

    /// The stream `conn` ended at `now`: forgotten. Returns the instances its sessions are on,
    /// to tell them (none if it never sent across), each with what to say of its moves.
    pub fn gone(&mut self, conn: ConnId, now: Instant) -> Vec<(InstanceId, Stamp)> {
        let Some(local) = self.by_conn.remove(&conn) else { return Vec::new() };
        let mut instances: Vec<InstanceId> = local.workers.into_values().collect();
        instances.sort_unstable();
        instances.dedup();
        instances.into_iter().map(|i| (i, stamp(&local.moved, i, now))).collect()
    }

    /// Delivers `msg`, which came from instance `from`, to the local stream `conn`. A message
    /// saying the worker left ends what this stream knows of the session.
    pub fn deliver(&mut self, conn: ConnId, from: InstanceId, msg: Outbound) -> Result<(), DeliverError> {
        let Some(local) = self.by_conn.get_mut(&conn) else { return Err(DeliverError::Closed) };
        if msg.says_worker_left() && local.workers.get(&msg.worker) == Some(&from) {
            local.workers.remove(&msg.worker);
            local.sink.close_session();
        }
        if !session::is_relay(msg.event) {
            // Owed, whatever the client's queue holds: a `PEER_GONE`, or the answer to one of
            // the client's messages, whose reserved slot is given back right after.
            local.sink.deliver_owed(msg);
            return Ok(());
        }
        local.sink.try_deliver(msg)
    }

    /// `instance` is gone: every session with a worker there ends with `PEER_GONE`.
    pub fn instance_gone(&mut self, instance: InstanceId) {
        for local in self.by_conn.values_mut() {
            local.workers.retain(|worker, i| {
                if *i != instance {
                    return true;
                }
                local.sink.close_session();
                local.sink.deliver_owed(Outbound::peer_gone(*worker, local.client));
                false
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::pb::{ErrorCode, RtcEvent};
    use crate::peer::{Conn, OutboundStream};

    fn stream(at: u64, queue: usize) -> (Sink, OutboundStream<Outbound>) {
        Conn::open(ConnId { at, instance: 1 }, queue, |m, _| m)
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn instances(told: Vec<(InstanceId, Stamp)>) -> Vec<InstanceId> {
        told.into_iter().map(|(instance, _)| instance).collect()
    }

    fn next(out: &mut OutboundStream<Outbound>) -> Option<Outbound> {
        out.next().now_or_never().flatten().map(|m| m.expect("no end"))
    }

    #[test]
    fn a_departure_names_each_instance_once() {
        let mut clients = LocalClients::default();
        let (sink, _out) = stream(1, 8);
        assert!(instances(clients.gone(sink.id(), now())).is_empty(), "never sent across: nothing to tell");
        clients.open(5, &sink);
        clients.send(sink.id(), 70, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        clients.send(sink.id(), 71, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        clients.send(sink.id(), 72, 0xc, RtcEvent::Offer, 0, now()).unwrap();
        assert_eq!(instances(clients.gone(sink.id(), now())), [0xb, 0xc]);
        assert!(!clients.contains(sink.id()));
    }

    #[test]
    fn offers_open_sessions_up_to_the_cap_and_ended_sessions_free_their_place() {
        let mut clients = LocalClients::default();
        let (sink, _out) = stream(1, 8);
        clients.open(5, &sink);
        let conn = sink.id();
        assert_eq!(clients.send(conn, 70, 0xb, RtcEvent::LocalIceCandidate, 2, now()), Ok(Stamp::default()));
        assert_eq!(sink.sessions(), 0, "only an OFFER opens a session");
        assert_eq!(clients.send(conn, 70, 0xb, RtcEvent::Offer, 2, now()), Ok(Stamp::default()));
        assert_eq!(
            clients.send(conn, 70, 0xb, RtcEvent::Offer, 2, now()),
            Ok(Stamp::default()),
            "renegotiation"
        );
        assert_eq!(clients.send(conn, 71, 0xc, RtcEvent::Offer, 2, now()), Ok(Stamp::default()));
        assert_eq!(clients.send(conn, 72, 0xc, RtcEvent::Offer, 2, now()), Err(TooManySessions));
        assert_eq!(sink.sessions(), 2);
        clients.deliver(conn, 0xb, Outbound::peer_gone(70, 5)).unwrap();
        assert_eq!(sink.sessions(), 1);
        assert_eq!(clients.send(conn, 72, 0xc, RtcEvent::Offer, 2, now()), Ok(Stamp::default()));
        clients.instance_gone(0xc);
        assert_eq!(sink.sessions(), 0);
    }

    #[test]
    fn a_gone_instance_ends_its_sessions_with_peer_gone() {
        let mut clients = LocalClients::default();
        let (sink, mut out) = stream(1, 8);
        clients.open(5, &sink);
        clients.send(sink.id(), 70, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        clients.send(sink.id(), 72, 0xc, RtcEvent::Offer, 0, now()).unwrap();
        clients.instance_gone(0xb);
        let gone = next(&mut out).expect("PEER_GONE");
        assert_eq!((gone.event, gone.worker, gone.client), (RtcEvent::PeerGone, 70, 5));
        assert!(next(&mut out).is_none(), "only the sessions on that instance");
        assert_eq!(instances(clients.gone(sink.id(), now())), [0xc]);
    }

    #[test]
    fn a_worker_that_left_is_forgotten_and_peer_gone_is_owed_whatever_the_queue_holds() {
        let mut clients = LocalClients::default();
        let (sink, mut out) = stream(1, 1);
        clients.open(5, &sink);
        clients.send(sink.id(), 70, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        clients.send(sink.id(), 71, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        let refused = Outbound::error(ErrorCode::PeerNotConnected, 70, 5, "worker 70 is not connected");
        assert_eq!(clients.deliver(sink.id(), 0xb, refused), Ok(()));
        assert_eq!(next(&mut out).unwrap().error, ErrorCode::PeerNotConnected);
        clients.deliver(sink.id(), 0xb, Outbound::peer_gone(99, 5)).unwrap();
        // The queue (one slot) is now full; an answer to the client's own message, and the
        // PEER_GONE for 71, are queued all the same, and the stream goes on.
        let answer = Outbound::error(ErrorCode::InvalidTransition, 71, 5, "not now");
        assert_eq!(clients.deliver(sink.id(), 0xb, answer), Ok(()));
        clients.instance_gone(0xb);
        assert_eq!(next(&mut out).unwrap().worker, 99);
        assert_eq!(next(&mut out).unwrap().error, ErrorCode::InvalidTransition);
        assert_eq!((next(&mut out).unwrap().event, sink.is_ended()), (RtcEvent::PeerGone, false));
        assert_eq!(instances(clients.gone(sink.id(), now())), Vec::<InstanceId>::new());
        assert_eq!(clients.deliver(sink.id(), 0xb, Outbound::peer_gone(71, 5)), Err(DeliverError::Closed));
    }

    #[test]
    fn a_moved_worker_s_sessions_follow_it_and_keep_their_count() {
        let mut clients = LocalClients::default();
        let (sink, mut out) = stream(1, 8);
        clients.open(5, &sink);
        clients.send(sink.id(), 70, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        clients.send(sink.id(), 71, 0xb, RtcEvent::Offer, 0, now()).unwrap();
        // Worker 70 moved from 0xb to 0xc: its session is there now, and 0xb's end spares it.
        clients.repoint(70, 0xb, 0xc);
        clients.repoint(71, 0xd, 0xc);
        clients.instance_gone(0xb);
        let gone = next(&mut out).expect("PEER_GONE");
        assert_eq!((gone.event, gone.worker), (RtcEvent::PeerGone, 71));
        assert!(next(&mut out).is_none());
        assert_eq!(sink.sessions(), 1);
        // It moves here: the session is no longer across; the stream keeps its count.
        assert!(clients.take_session(sink.id(), 70).is_some());
        assert!(clients.take_session(sink.id(), 70).is_none(), "taken once");
        assert_eq!((instances(clients.gone(sink.id(), now())), sink.sessions()), (vec![], 1));
        // A worker moving away from here with a session of a local stream: across from now on.
        let (other, _out) = stream(2, 8);
        assert!(other.open_session(0));
        clients.adopt(6, &other, 72, 0xe);
        assert_eq!((instances(clients.gone(other.id(), now())), other.sessions()), (vec![0xe], 1));
    }

    #[test]
    fn a_moved_client_says_for_a_while_that_it_follows_its_old_home_s_departure_where_told() {
        let mut clients = LocalClients::default();
        let (sink, _out) = stream(1, 8);
        let t0 = now();
        let moved = Moved { moves: 2, from: 0xa, told: vec![0xb], at: t0 };
        clients.import(5, &sink, vec![(70, 0xb), (71, 0xa)], moved);
        let follows = Stamp { moves: 2, after_left_of: 0xa };
        let only_moves = Stamp { moves: 2, after_left_of: 0 };
        assert_eq!(clients.send(sink.id(), 70, 0xb, RtcEvent::LocalIceCandidate, 0, t0), Ok(follows));
        assert_eq!(
            clients.send(sink.id(), 72, 0xc, RtcEvent::Offer, 0, t0),
            Ok(only_moves),
            "0xc was not told"
        );
        let later = t0 + STAMP_FOR;
        assert_eq!(clients.send(sink.id(), 70, 0xb, RtcEvent::LocalIceCandidate, 0, later), Ok(only_moves));
        assert_eq!(clients.gone(sink.id(), t0), [(0xa, only_moves), (0xb, follows), (0xc, only_moves)]);
        let (plain, _out) = stream(2, 8);
        clients.open(6, &plain);
        assert_eq!(clients.send(plain.id(), 70, 0xb, RtcEvent::Offer, 0, t0), Ok(Stamp::default()));
        assert_eq!(clients.remove(plain.id()), (vec![(70, 0xb)], 0), "never moved");
    }
}
