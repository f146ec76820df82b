//! Resume on another instance, the edge's part (see [`crate::cluster::tunnels`]).
//!
//! - The **front**: a resumable stream here whose peer another instance holds. It forwards
//!   what the peer sends, as read, and writes what the holder sends, as numbered there; it
//!   neither registers nor claims the peer, and nothing of the peer's sessions is here.
//! - The **holder**: the peer's home. A peer with nothing to keep there (no session, nothing
//!   unreceived) is let go instead, and lives on the front's instance from then on; one with
//!   sessions moves there with them ([`move_worker`], [`move_client`]). Only a peer whose old
//!   stream does not stop reading in time, or that has too much to take along, stays: it
//!   serves the tunnel as one more stream of the peer (`client::serve` / `worker::serve`
//!   reading a [`TunnelRx`]), so the takeover, the replay, the rate limit, the token's expiry
//!   and the detach when the front's stream is cut are the ones of a stream on this instance;
//!   a [`pump`] carries the peer's response stream to the front.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use futures::StreamExt;
use tonic::Status;

use super::{Edge, Inbound, Opening, client, worker};
use crate::auth::Granted;
use crate::cluster::tunnels::{
    Ask, Hold, Holder, MovedClient, MovedSession, MovedWorker, Resumption, TunnelRx, TunnelTx,
};
use crate::core::{Command, HandedSession, PeerId, PeerSink, Role};
use crate::peer::Peer;
use crate::peer::conn::shutting_down;
use crate::peer::resume::{Attachment, Moving, Resumables, Resumed};

impl Edge {
    /// A resumable stream of `id` whose peer is not held here, on a gRPC stream: in a cluster,
    /// the instance that holds the peer lets it go to this one, or takes it over for this
    /// stream, through a tunnel whose halves are returned; `None`: the peer is opened here
    /// (afresh, or taken over locally).
    pub(super) async fn held_elsewhere<M, I: Inbound<M>>(
        &self,
        peers: &Resumables<M>,
        role: Role,
        id: PeerId,
        after: u64,
        granted: Option<&Granted>,
        // Its type says whether the stream is itself a tunnel (which never fronts for a third).
        _inbound: &I,
    ) -> Option<Resumption> {
        let cluster = self.cluster.as_ref()?;
        if I::TUNNEL || peers.holds(id) {
            return None;
        }
        let conn = self.conn_clock.next(self.instance);
        cluster.resume(role, id, after, conn, granted.map(|g| g.expires)).await
    }
}

/// The edge as the holder of its resumable peers, for the cluster.
pub struct Holding(pub Weak<Edge>);

impl Holder for Holding {
    fn hold(&self, ask: Ask, tx: TunnelTx, rx: TunnelRx) -> Hold {
        let Some(edge) = self.0.upgrade() else { return Hold::NotHere };
        let granted = ask.expires.map(|expires| Granted { id: ask.id, expires });
        let released = match ask.role {
            Role::Client => edge.clients.release(ask.id, ask.after),
            Role::Worker => edge.workers.release(ask.id, ask.after),
        };
        if let Some(released) = released {
            metrics::counter!(crate::metrics::PEERS_MOVED, "role" => ask.role.as_str()).increment(1);
            tracing::debug!(
                id = ask.id,
                role = ask.role.as_str(),
                "resumable peer let go to another instance"
            );
            return Hold::Released(released);
        }
        match ask.role {
            Role::Client => {
                if !edge.clients.holds(ask.id) {
                    return Hold::NotHere;
                }
                if edge.cluster.is_some()
                    && let Some(moving) = edge.clients.begin_move(ask.id, ask.after)
                {
                    let (answer, answered) = oneshot::channel();
                    edge.tasks.spawn(move_peer(edge.clone(), ask, granted, moving, (tx, rx), answer));
                    return Hold::Moving(answered);
                }
                let opening = tunnelled(&edge, &ask, tx);
                edge.tasks.spawn(client::serve(edge.clone(), opening, ask.id, granted, rx));
            }
            Role::Worker => {
                if !edge.workers.holds(ask.id) {
                    return Hold::NotHere;
                }
                if let Some(moving) = edge.workers.begin_move(ask.id, ask.after) {
                    let (answer, answered) = oneshot::channel();
                    edge.tasks.spawn(move_peer(edge.clone(), ask, granted, moving, (tx, rx), answer));
                    return Hold::Moving(answered);
                }
                let opening = tunnelled(&edge, &ask, tx);
                edge.tasks.spawn(worker::serve(edge.clone(), opening, granted, rx));
            }
        }
        tracing::debug!(
            id = ask.id,
            role = ask.role.as_str(),
            "resumable peer held here, served through a tunnel"
        );
        Hold::Tunnel
    }
}

/// How long a moving peer's old stream has to stop reading (it stops at once, even while it
/// waits for room in its queue, unless it waits for room in a shard's channel): past it, the
/// peer stays, served through the tunnel.
const STOP_READING_WITHIN: Duration = Duration::from_millis(150);

/// Waits for a moving peer's old stream to stop reading. If it does not in time (a shard it
/// routes to is saturated), the peer stays, served through the tunnel, and the answer says so
/// (`None`).
async fn stops_reading(
    edge: &Arc<Edge>,
    ask: &Ask,
    granted: Option<Granted>,
    moving: &Moving,
    (tx, rx): (TunnelTx, TunnelRx),
    answer: oneshot::Sender<Hold>,
) -> Option<oneshot::Sender<Hold>> {
    if tokio::time::timeout(STOP_READING_WITHIN, moving.stream.wait()).await.is_ok() {
        return Some(answer);
    }
    match ask.role {
        Role::Client => {
            let opening = tunnelled(edge, ask, tx);
            edge.tasks.spawn(client::serve(edge.clone(), opening, ask.id, granted, rx));
        }
        Role::Worker => {
            let opening = tunnelled(edge, ask, tx);
            edge.tasks.spawn(worker::serve(edge.clone(), opening, granted, rx));
        }
    }
    let _ = answer.send(Hold::Tunnel);
    None
}

/// Moves a peer with its sessions to the instance of its new stream, once its old stream has
/// stopped reading; held here meanwhile, for a drain.
async fn move_peer(
    edge: Arc<Edge>,
    ask: Ask,
    granted: Option<Granted>,
    moving: Moving,
    tunnel: (TunnelTx, TunnelRx),
    answer: oneshot::Sender<Hold>,
) {
    let _held = Held::new(&edge);
    let Some(answer) = stops_reading(&edge, &ask, granted, &moving, tunnel, answer).await else { return };
    match ask.role {
        Role::Worker => move_worker(&edge, &ask, moving, answer).await,
        Role::Client => move_client(&edge, &ask, moving, answer).await,
    }
}

/// Moves a worker with its sessions to the instance of its new stream: once its old stream's
/// reading task has handed everything it read to the shard, the shard hands the worker's
/// sessions over, and what it had not received goes along (see [`MovedWorker`]).
async fn move_worker(edge: &Arc<Edge>, ask: &Ask, moving: Moving, answer: oneshot::Sender<Hold>) {
    let (handed, sessions) = oneshot::channel();
    let then = Box::new(move |sessions| {
        let _ = handed.send(sessions);
    });
    let export = Command::ExportWorker { worker: ask.id, conn: moving.sink.id(), to: ask.front, then };
    let shard = edge.shards.of_worker(ask.id);
    let sessions = match edge.shards.send(shard, export).await {
        Ok(()) => sessions.await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let taken = edge.workers.finish_move(ask.id, ask.after, &moving);
    let (mut local, mut handed) = (Vec::new(), Vec::with_capacity(sessions.len()));
    for HandedSession { client, sink, state } in sessions {
        handed.push(MovedSession { client, conn: sink.conn(), at: sink.instance(edge.instance), state });
        if let Peer::Local(sink) = sink {
            local.push((client, sink));
        }
    }
    if let Some(cluster) = &edge.cluster {
        cluster.moved_away(ask.id, ask.front, local).await;
    }
    metrics::counter!(crate::metrics::PEERS_MOVED, "role" => "worker").increment(1);
    tracing::debug!(
        worker = ask.id,
        sessions = handed.len(),
        "worker moved to another instance with its sessions"
    );
    let moved = MovedWorker {
        from: edge.instance,
        first_seq: ask.after + 1,
        last_received: taken.last_received,
        messages: taken.messages,
        sessions: handed,
    };
    let claimed = edge.cluster.as_ref().map(|cluster| cluster.claimed(Role::Worker, ask.id));
    let _ = answer.send(Hold::Moved(Box::new(moved)));
    // Then it departs from here as any ended worker: its shard has nothing of it any more, and
    // its registration, which answered locates, ends.
    edge.forget(moving.sink.id());
    worker::depart(edge.clone(), ask.id, moving.sink.clone()).await;
    await_claim(claimed).await;
}

/// How long a peer that moved from here is still held here, at most, for a drain: until its new
/// home's claim is heard, so that this instance does not leave (ending, on other instances, the
/// sessions they still know here) before the new home has them.
const CLAIM_WITHIN: Duration = Duration::from_secs(2);

async fn await_claim(claimed: Option<impl std::future::Future<Output = ()>>) {
    if let Some(claimed) = claimed {
        let _ = tokio::time::timeout(CLAIM_WITHIN, claimed).await;
    }
}

/// Moves a client with its sessions to the instance of its new stream, which takes its
/// stream's id over: once its old stream's reading task has handed everything it read to the
/// shards, the bridge holds what comes for it (until its claim there), this instance's workers'
/// sessions are rebound to a stand-in for it there, and what it had not received goes along
/// (see [`MovedClient`]).
async fn move_client(edge: &Arc<Edge>, ask: &Ask, moving: Moving, answer: oneshot::Sender<Hold>) {
    let Some(cluster) = edge.cluster.clone() else { return };
    let conn = moving.sink.id();
    // Shard threads may still hold what the old stream read: it goes across (to the bridge)
    // before the client leaves there, and so before its `ClientLeft`.
    if !edge.shards.is_inline() {
        let (all_done, done) = oneshot::channel();
        let all_done: Arc<dyn Send + Sync> = Arc::new(OnDrop(Some(all_done)));
        let flushed = edge.shards.send_all(|| Command::Flush { done: all_done.clone() }).await;
        drop(all_done);
        if flushed.is_err() || done.await.is_err() {
            return;
        }
    }
    let Some(leaving) = cluster.client_leaving(ask.id, conn, ask.front).await else { return };
    let (mut sessions, stand_in, moves) = (leaving.sessions, leaving.stand_in, leaving.moves);
    let rebound = Arc::new(Mutex::new(Vec::new()));
    let (all_done, done) = oneshot::channel();
    let all_done: Arc<dyn Send + Sync> = Arc::new(OnDrop(Some(all_done)));
    let rebind = || Command::RebindClient {
        client: ask.id,
        conn,
        sink: Peer::Remote(stand_in.clone()),
        register: false,
        sessions: true,
        rebound: rebound.clone(),
        done: all_done.clone(),
    };
    let rebinding = edge.shards.send_all(rebind).await;
    drop(all_done);
    if rebinding.is_err() || done.await.is_err() {
        return;
    }
    sessions.extend(rebound.lock().expect("not poisoned").iter().map(|worker| (*worker, edge.instance)));
    // A client that moved here before counts this instance's sessions among its own already.
    sessions.sort_unstable();
    sessions.dedup();
    let taken = edge.clients.finish_move(ask.id, ask.after, &moving);
    edge.forget(conn);
    metrics::counter!(crate::metrics::PEERS_MOVED, "role" => "client").increment(1);
    tracing::debug!(
        client = ask.id,
        sessions = sessions.len(),
        "client moved to another instance with its sessions"
    );
    let moved = MovedClient {
        from: edge.instance,
        conn,
        first_seq: ask.after + 1,
        last_received: taken.last_received,
        messages: taken.messages,
        sessions,
        moves,
    };
    let claimed = cluster.claimed(Role::Client, ask.id);
    let _ = answer.send(Hold::MovedClient(Box::new(moved)));
    await_claim(Some(claimed)).await;
}

/// Sends once dropped: when the last of the shards let go of it.
struct OnDrop(Option<oneshot::Sender<()>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            let _ = done.send(());
        }
    }
}

/// A resumable opening whose response stream is pumped to the front through `tx`.
fn tunnelled<M: prost::Message + Send + 'static>(edge: &Arc<Edge>, ask: &Ask, tx: TunnelTx) -> Opening<M> {
    let attachment = Attachment::new();
    edge.tasks.spawn(pump(Resumed::new(attachment.clone()), tx, Held::new(edge)));
    Opening::Resumable { after: ask.after, attachment }
}

/// Counts a peer held here for a stream elsewhere while its tunnel lasts.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(edge: &Edge) -> Self {
        edge.held_for_others.fetch_add(1, Ordering::AcqRel);
        Held(edge.held_for_others.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Carries a peer's response stream to its front: each message once the front has room for
/// it; then how the stream ended.
async fn pump<M: prost::Message>(mut stream: Resumed<M>, tx: TunnelTx, _held: Held) {
    while let Some(next) = stream.next().await {
        match next {
            Ok(msg) => {
                if !tx.send(&msg).await {
                    // The front is gone: dropping the stream ends this attachment (a detach).
                    return;
                }
            }
            Err(status) => return tx.end(Some(status)),
        }
    }
    tx.end(None);
}

/// Fronts a resumable stream whose peer is held elsewhere: what the peer sends (after `first`,
/// a worker's registration, already read) goes to the holder; what the holder sends is written.
pub async fn front<M>(
    edge: Arc<Edge>,
    (tx, rx): (TunnelTx, TunnelRx),
    attachment: Arc<Attachment<M>>,
    first: Option<M>,
    mut inbound: impl Inbound<M>,
) where
    M: prost::Message + Default + Send + 'static,
{
    attachment.bind_elsewhere(Box::pin(rx.into_stream::<M>()));
    if let Some(first) = first
        && !tx.send(&first).await
    {
        return attachment.end(Some(Status::unavailable("the instance holding this peer is gone")));
    }
    tracing::debug!("resumable stream fronting for a peer held on another instance");
    let mut left = false;
    loop {
        let next = tokio::select! {
            _ = attachment.ended() => break,
            _ = edge.draining.cancelled() => {
                attachment.end(Some(shutting_down()));
                break;
            }
            next = inbound.message(), if !left => next,
        };
        match next {
            Ok(Some(msg)) => {
                // Waiting for credit, the peer's connection may go away: the holder must hear so.
                let sent = tokio::select! {
                    sent = tx.send(&msg) => sent,
                    _ = attachment.ended() => break,
                };
                if !sent {
                    attachment.end(Some(Status::unavailable("the instance holding this peer is gone")));
                    return;
                }
            }
            // The peer leaves: the holder ends its sessions and then this stream.
            Ok(None) => {
                tx.end(None);
                left = true;
            }
            // The connection went away (or the peer sent what cannot be read): the holder
            // decides, as for a stream of its own.
            Err(status) => {
                tx.end(Some(status));
                return attachment.end(None);
            }
        }
    }
    if !left {
        tx.end(Some(Status::cancelled("the peer's stream on the other instance ended")));
    }
}
