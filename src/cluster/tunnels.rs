//! Tunnels: resume on another instance, for a peer that cannot move there.
//!
//! A resumable peer's stream that comes back on another instance (the *front*) moves the peer
//! there. A peer that holds no session and has received everything it was written is let go
//! ([`Hold::Released`]), and the front's instance becomes its home, numbering on. A worker
//! with sessions moves with them ([`Hold::Moved`]): its shard hands its router entry over,
//! and what it had not received goes along. A client moves with its sessions too
//! ([`Hold::MovedClient`]): they live on its workers' shards, wherever those are, and know it
//! by its stream's id, which it keeps; only where its messages go changes.
//!
//! A peer that cannot move (more than [`MOVE_AT_MOST`](crate::peer::resume::MOVE_AT_MOST)
//! messages to take along, or an old stream that does not stop reading) is tunnelled: the
//! instance that holds it (its sessions in every router, its numbered queue, what it missed)
//! stays its home, and the front carries the new stream's messages both ways over the reliable
//! link, each way in order. So no session or route changes, and the state machine and the
//! numbering are the holder's, exactly as on one instance. The tunnel is named by the front's
//! stream ([`ConnId`]).
//!
//! Flow control: each side sends at most [`TUNNEL_WINDOW`] messages beyond what the other side
//! has taken (its credit, granted back every [`CREDIT_EVERY`] messages), so a slow peer holds
//! the messages for it in its holder's bounded queue, as on one instance, and a fast one is
//! slowed by its own HTTP/2 flow control, not buffered without bound.
//!
//! [`Tunnels`] is the bridge's room (sans-IO): which tunnels are open here and to which
//! instance. [`TunnelTx`] and [`TunnelRx`] are the two halves the stream's tasks hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tonic::Status;

use super::wire::{self, record::Kind};
use crate::core::{ConnId, InstanceId, PeerId, Role};
pub use crate::peer::resume::{MovedClient, MovedSession, MovedWorker, Released};

/// What a holder is asked: a stream of this peer came back on another instance.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub role: Role,
    pub id: PeerId,
    /// The new stream's `x-resume-after`.
    pub after: u64,
    /// When the new stream's token expires (auth on).
    pub expires: Option<SystemTime>,
    /// The new stream's instance.
    pub front: InstanceId,
}

/// Takes a peer held here over for a stream on another instance (implemented by the edge).
pub trait Holder: Send + Sync {
    /// If the peer of `ask` is held here, lets it go to the new stream's instance, or takes it
    /// over for the tunnel `tx`/`rx`; says which. Called on the cluster's task: must not wait.
    fn hold(&self, ask: Ask, tx: TunnelTx, rx: TunnelRx) -> Hold;
}

/// What the instance holding a peer did for its stream on another instance.
#[derive(Debug)]
pub enum Hold {
    /// The peer is not held here.
    NotHere,
    /// The peer stays here, served to the new stream through the tunnel.
    Tunnel,
    /// The peer holds no session and has everything it was written: it moves to the new
    /// stream's instance, which numbers on (see [`Released`]).
    Released(Released),
    /// A peer with sessions is on its way to the new stream's instance: the answer comes once
    /// its sessions are handed over (or it stays, through the tunnel, if its old stream could
    /// not be stopped in time).
    Moving(tokio::sync::oneshot::Receiver<Hold>),
    /// The worker moved, with its sessions.
    Moved(Box<MovedWorker>),
    /// The client moved, with its sessions.
    MovedClient(Box<MovedClient>),
}

/// What became of a resumable stream's ask, on its own instance.
pub enum Resumption {
    /// The holder serves the peer through this tunnel.
    Tunnel(TunnelTx, TunnelRx),
    /// The holder let the peer go: it lives here from now on, numbered on from there.
    Moved(Released),
    /// The holder moved the worker here with its sessions.
    MovedWith(Box<MovedWorker>),
    /// The holder moved the client here with its sessions.
    MovedClient(Box<MovedClient>),
}

/// Messages one side may send ahead of the other's credit.
pub const TUNNEL_WINDOW: u32 = 256;
/// A receiving side grants credit back after taking this many messages.
pub const CREDIT_EVERY: u32 = 64;

/// What reaches a tunnel's receiving half from the other instance.
#[derive(Debug)]
pub enum TunnelEvent {
    Message(Bytes),
    /// The other side ended the tunnel: without an error (`None`), or with this status.
    End(Option<Status>),
}

/// What a tunnel's halves ask the bridge to do.
#[derive(Debug)]
pub enum TunnelCommand {
    /// Opens this side's end: a front's before it asks who holds the peer (what the holder
    /// sends may arrive before its answer), so with the other side's instance unknown yet.
    Open {
        conn: ConnId,
        instance: Option<InstanceId>,
        events: mpsc::UnboundedSender<TunnelEvent>,
        credit: Arc<Semaphore>,
        /// Told once the end is open: a front asks only then, or a record of the holder's
        /// could be read before the end is open, and be answered with the tunnel's end.
        opened: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// The front learnt which instance holds the peer.
    Bind {
        conn: ConnId,
        instance: InstanceId,
    },
    /// Nobody holds the peer: the front's end is forgotten.
    Forget {
        conn: ConnId,
    },
    Send {
        conn: ConnId,
        instance: InstanceId,
        message: Bytes,
    },
    Credit {
        conn: ConnId,
        instance: InstanceId,
        taken: u32,
    },
    /// This side ends the tunnel (and forgets it).
    End {
        conn: ConnId,
        instance: InstanceId,
        status: Option<Status>,
    },
}

struct Entry {
    /// The other side's instance; unknown on a front until the holder answered.
    instance: Option<InstanceId>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    credit: Arc<Semaphore>,
    /// Each way may end cleanly on its own (a half-close, then the holder's last messages);
    /// the tunnel is forgotten once both have, or at once when either ends with an error.
    sent_end: bool,
    received_end: bool,
}

/// The tunnels open on this instance, by the front's stream.
#[derive(Default)]
pub struct Tunnels {
    open: HashMap<ConnId, Entry>,
}

impl Tunnels {
    pub fn open(
        &mut self,
        conn: ConnId,
        instance: Option<InstanceId>,
        events: mpsc::UnboundedSender<TunnelEvent>,
        credit: Arc<Semaphore>,
    ) {
        self.open.insert(conn, Entry { instance, events, credit, sent_end: false, received_end: false });
    }

    /// Carries out a half's command: returns the record to send, and to which instance.
    pub fn command(&mut self, command: TunnelCommand) -> Option<(InstanceId, Kind)> {
        let (instance, record) = match command {
            TunnelCommand::Open { conn, instance, events, credit, opened } => {
                self.open(conn, instance, events, credit);
                if let Some(opened) = opened {
                    let _ = opened.send(());
                }
                return None;
            }
            TunnelCommand::Bind { conn, instance } => {
                if let Some(entry) = self.open.get_mut(&conn) {
                    entry.instance = Some(instance);
                }
                return None;
            }
            TunnelCommand::Forget { conn } => {
                self.forget(conn);
                return None;
            }
            TunnelCommand::Send { conn, instance, message } => {
                (instance, wire::Tunnel { message: Some(message), ..tunnel(conn) })
            }
            TunnelCommand::Credit { conn, instance, taken } => {
                (instance, wire::Tunnel { credit: taken, ..tunnel(conn) })
            }
            TunnelCommand::End { conn, instance, status } => {
                let entry = self.open.get_mut(&conn);
                match entry {
                    Some(entry) if status.is_none() && !entry.received_end => entry.sent_end = true,
                    _ => self.forget(conn),
                }
                (instance, wire::Tunnel { end: Some(end_of(status.as_ref())), ..tunnel(conn) })
            }
        };
        Some((instance, Kind::Tunnel(record)))
    }

    /// A tunnel record from `from`. Returns the record to answer with: a tunnel not (or no
    /// longer) open here is ended, so that the other side stops.
    pub fn receive(&mut self, from: InstanceId, record: wire::Tunnel) -> Option<Kind> {
        let conn = record.conn.map(super::bridge::conn_id)?;
        let Some(entry) = self.open.get_mut(&conn) else {
            if record.end.is_some() {
                return None;
            }
            let gone = Status::unavailable("this instance no longer carries the stream");
            return Some(Kind::Tunnel(wire::Tunnel { end: Some(end_of(Some(&gone))), ..tunnel(conn) }));
        };
        if entry.instance.is_some_and(|i| i != from) {
            metrics::counter!(crate::metrics::CLUSTER_REJECTED, "kind" => "tunnel").increment(1);
            crate::warn_throttled!(
                instance = format!("{from:x}"),
                "tunnel record from an instance not at its other end"
            );
            return None;
        }
        if record.credit > 0 {
            entry.credit.add_permits(record.credit.min(TUNNEL_WINDOW) as usize);
        }
        if let Some(message) = record.message
            && entry.events.send(TunnelEvent::Message(message)).is_err()
        {
            // Its receiving half is gone without a word: the tunnel ends, and the other side hears.
            self.forget(conn);
            let gone = Status::unavailable("the stream at this end of the tunnel is gone");
            return Some(Kind::Tunnel(wire::Tunnel { end: Some(end_of(Some(&gone))), ..tunnel(conn) }));
        }
        if let Some(end) = record.end {
            let status = status_of(&end);
            let both = status.is_some() || entry.sent_end;
            entry.received_end = true;
            let _ = entry.events.send(TunnelEvent::End(status));
            if both {
                self.forget(conn);
            }
        }
        None
    }

    /// Forgets a tunnel: its sending half stops waiting for credit.
    pub fn forget(&mut self, conn: ConnId) {
        if let Some(entry) = self.open.remove(&conn) {
            entry.credit.close();
        }
    }

    /// `instance` left or died: the tunnels to it end.
    pub fn instance_gone(&mut self, instance: InstanceId) {
        let gone: Vec<ConnId> =
            self.open.iter().filter(|(_, e)| e.instance == Some(instance)).map(|(c, _)| *c).collect();
        for conn in gone {
            if let Some(entry) = self.open.get(&conn) {
                let status = Status::unavailable("the instance at the other end of this stream is gone");
                let _ = entry.events.send(TunnelEvent::End(Some(status)));
            }
            self.forget(conn);
        }
    }

    /// How many tunnels are open here.
    pub fn count(&self) -> usize {
        self.open.len()
    }
}

fn tunnel(conn: ConnId) -> wire::Tunnel {
    wire::Tunnel { conn: Some(super::bridge::wire_conn(conn)), ..Default::default() }
}

fn end_of(status: Option<&Status>) -> wire::TunnelEnd {
    match status {
        None => wire::TunnelEnd { ok: true, ..Default::default() },
        Some(s) => wire::TunnelEnd { ok: false, code: s.code() as i32, message: s.message().to_owned() },
    }
}

fn status_of(end: &wire::TunnelEnd) -> Option<Status> {
    (!end.ok).then(|| Status::new(tonic::Code::from_i32(end.code), end.message.clone()))
}

/// The sending half of a tunnel: the peer's messages (front) or the holder's (holder).
#[derive(Clone)]
pub struct TunnelTx {
    conn: ConnId,
    instance: InstanceId,
    credit: Arc<Semaphore>,
    commands: mpsc::UnboundedSender<TunnelCommand>,
}

impl TunnelTx {
    /// Sends one message once the other side has room for it; `false` if the tunnel ended.
    pub async fn send(&self, message: &impl Message) -> bool {
        match self.credit.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        let message = Bytes::from(message.encode_to_vec());
        let (conn, instance) = (self.conn, self.instance);
        self.commands.send(TunnelCommand::Send { conn, instance, message }).is_ok()
    }

    /// Ends the tunnel: without an error (`None`), or with `status`.
    pub fn end(&self, status: Option<Status>) {
        let (conn, instance) = (self.conn, self.instance);
        let _ = self.commands.send(TunnelCommand::End { conn, instance, status });
    }
}

/// The receiving half of a tunnel.
pub struct TunnelRx {
    conn: ConnId,
    instance: InstanceId,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    commands: mpsc::UnboundedSender<TunnelCommand>,
    /// Taken since credit was last granted.
    taken: u32,
}

impl TunnelRx {
    /// The next message from the other side; `Ok(None)` when it ended the tunnel cleanly.
    pub async fn recv<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        match self.events.recv().await {
            Some(TunnelEvent::Message(bytes)) => {
                self.taken += 1;
                if self.taken >= CREDIT_EVERY {
                    let (conn, instance, taken) = (self.conn, self.instance, std::mem::take(&mut self.taken));
                    let _ = self.commands.send(TunnelCommand::Credit { conn, instance, taken });
                }
                M::decode(bytes)
                    .map(Some)
                    .map_err(|e| Status::internal(format!("undecodable message from the tunnel: {e}")))
            }
            Some(TunnelEvent::End(None)) => Ok(None),
            Some(TunnelEvent::End(Some(status))) => Err(status),
            None => Err(Status::unavailable("the cluster connection stopped")),
        }
    }

    /// What the other side sends, as a stream that ends with the tunnel.
    pub fn into_stream<M: Message + Default + 'static>(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<M, Status>> + Send {
        futures::stream::unfold(Some(self), |rx| async move {
            let mut rx = rx?;
            match rx.recv::<M>().await {
                Ok(Some(m)) => Some((Ok(m), Some(rx))),
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        })
    }
}

/// A tunnel's receiving channel and its sending half's credit, made before the other side is
/// known: the bridge delivers into `events` from the moment the tunnel is open there.
pub fn channel() -> (mpsc::UnboundedSender<TunnelEvent>, mpsc::UnboundedReceiver<TunnelEvent>, Arc<Semaphore>)
{
    let (events_tx, events) = mpsc::unbounded_channel();
    (events_tx, events, Arc::new(Semaphore::new(TUNNEL_WINDOW as usize)))
}

/// A tunnel's two halves, towards the instance at `instance` on the other end.
pub fn halves(
    conn: ConnId,
    instance: InstanceId,
    commands: mpsc::UnboundedSender<TunnelCommand>,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    credit: Arc<Semaphore>,
) -> (TunnelTx, TunnelRx) {
    let tx = TunnelTx { conn, instance, credit, commands: commands.clone() };
    let rx = TunnelRx { conn, instance, events, commands, taken: 0 };
    (tx, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnId {
        ConnId { at: 5, instance: 2 }
    }

    #[tokio::test]
    async fn records_reach_the_receiving_half_in_order_and_credit_flows_back() {
        let (commands, mut issued) = mpsc::unbounded_channel();
        let (events, rx, credit) = channel();
        let (tx, mut rx) = halves(conn(), 1, commands, rx, credit.clone());
        let mut tunnels = Tunnels::default();
        tunnels.open(conn(), Some(1), events, credit.clone());
        for i in 0..CREDIT_EVERY {
            let record = wire::Tunnel {
                message: Some(wire::Located { instance: i as u64 }.encode_to_vec().into()),
                ..tunnel(conn())
            };
            assert!(tunnels.receive(1, record).is_none());
        }
        for i in 0..CREDIT_EVERY {
            let got: wire::Located = rx.recv().await.unwrap().unwrap();
            assert_eq!(got.instance, i as u64);
        }
        // Taking CREDIT_EVERY grants them back.
        let Some(TunnelCommand::Credit { taken, instance: 1, .. }) = issued.recv().await else { panic!() };
        assert_eq!(taken, CREDIT_EVERY);
        // The sending half stops at the window until credit comes back.
        for _ in 0..TUNNEL_WINDOW {
            assert!(tx.send(&wire::Located { instance: 9 }).await);
        }
        let one = wire::Located::default();
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(50), tx.send(&one));
        assert!(blocked.await.is_err(), "a send past the window waits");
        tunnels.receive(1, wire::Tunnel { credit: 1, ..tunnel(conn()) });
        assert!(tx.send(&wire::Located::default()).await);
    }

    #[tokio::test]
    async fn an_end_or_a_dead_instance_ends_the_tunnel_and_an_unknown_one_is_answered_with_an_end() {
        let (commands, _issued) = mpsc::unbounded_channel();
        let (events, rx, credit) = channel();
        let (tx, mut rx) = halves(conn(), 1, commands, rx, credit.clone());
        let mut tunnels = Tunnels::default();
        tunnels.open(conn(), Some(1), events, credit);
        let record = wire::Tunnel { end: Some(end_of(None)), ..tunnel(conn()) };
        tunnels.receive(1, record);
        assert!(rx.recv::<wire::Located>().await.unwrap().is_none(), "ended cleanly");
        // One way ended cleanly (a half-close): the other still carries what is owed.
        assert_eq!(tunnels.count(), 1);
        assert!(tx.send(&wire::Located::default()).await);
        let end = tunnels.command(TunnelCommand::End { conn: conn(), instance: 1, status: None });
        assert!(matches!(
            end,
            Some((1, Kind::Tunnel(wire::Tunnel { end: Some(wire::TunnelEnd { ok: true, .. }), .. })))
        ));
        assert_eq!(tunnels.count(), 0, "both ways ended: forgotten");
        assert!(!tx.send(&wire::Located::default()).await, "no credit will come: the send fails");
        // A record for a tunnel not open here is answered with its end; an end is not.
        let answer = tunnels.receive(3, wire::Tunnel { credit: 1, ..tunnel(conn()) });
        assert!(matches!(
            answer,
            Some(Kind::Tunnel(wire::Tunnel { end: Some(wire::TunnelEnd { ok: false, .. }), .. }))
        ));
        assert!(tunnels.receive(3, wire::Tunnel { end: Some(end_of(None)), ..tunnel(conn()) }).is_none());

        // A receiving half dropped without an end: the next record is answered with the end.
        let (commands, _issued) = mpsc::unbounded_channel();
        let (events, rx, credit) = channel();
        let (_tx, rx) = halves(conn(), 5, commands, rx, credit.clone());
        tunnels.open(conn(), Some(5), events, credit);
        drop(rx);
        let record = wire::Tunnel { message: Some(Bytes::from_static(b"m")), ..tunnel(conn()) };
        assert!(matches!(tunnels.receive(5, record), Some(Kind::Tunnel(wire::Tunnel { end: Some(_), .. }))));
        assert_eq!(tunnels.count(), 0);

        let (commands, _issued) = mpsc::unbounded_channel();
        let (events, rx, credit) = channel();
        let (_tx, mut rx) = halves(conn(), 4, commands, rx, credit.clone());
        tunnels.open(conn(), Some(4), events, credit);
        tunnels.instance_gone(4);
        let status = rx.recv::<wire::Located>().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
