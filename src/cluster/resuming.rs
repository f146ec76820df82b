//! The cluster's part of resume: asking the other instances which one holds a resumable peer
//! whose stream came back here, and moving peers with their sessions (see [`super::tunnels`]
//! and [`super::bridge`]'s `moves` and `client_moves`).

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::oneshot;

use super::seal::Kind;
use super::tunnels::{self, Hold, MovedClient, MovedWorker, Resumption, TunnelCommand};
use super::{Cluster, REGISTER_WAIT, bridge, driver, publish_claim, wire};
use crate::core::{ConnId, InstanceId, PeerId, Role};
use crate::peer::ToCluster;

impl Cluster {
    /// A resumable stream `conn` of a peer not held here: asks the other instances which holds
    /// it. The holder lets the peer go to this instance, or takes it over for this stream and
    /// tunnels to it (the tunnel's halves are returned). `None`: no instance holds the peer (or
    /// none answered in time), it starts afresh here.
    pub async fn resume(
        &self,
        role: Role,
        id: PeerId,
        after: u64,
        conn: ConnId,
        expires: Option<SystemTime>,
    ) -> Option<Resumption> {
        if !self.is_connected() {
            return None;
        }
        let (events_tx, events, credit) = tunnels::channel();
        let (opened, open_now) = oneshot::channel();
        let open = TunnelCommand::Open {
            conn,
            instance: None,
            events: events_tx,
            credit: credit.clone(),
            opened: Some(opened),
        };
        self.tunnels.send(open).ok()?;
        open_now.await.ok()?;
        let expires_ms = expires
            .map(|at| at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
            .unwrap_or(0);
        let ask = wire::ResumeAsk {
            worker: role == Role::Worker,
            id,
            after,
            conn: Some(bridge::wire_conn(conn)),
            expires_ms,
        };
        let alive = self.alive.lock().expect("not poisoned").clone();
        let (nats, seal, replies) = (&self.nats, &self.seal, &self.replies);
        match driver::ask_holder(nats, seal, replies, self.subjects.resume(), &ask, self.instance, alive)
            .await
        {
            Some((instance, Hold::Tunnel)) => {
                let _ = self.tunnels.send(TunnelCommand::Bind { conn, instance });
                let (tx, rx) = tunnels::halves(conn, instance, self.tunnels.clone(), events, credit);
                Some(Resumption::Tunnel(tx, rx))
            }
            other => {
                let _ = self.tunnels.send(TunnelCommand::Forget { conn });
                match other? {
                    (_, Hold::Released(released)) => Some(Resumption::Moved(released)),
                    (_, Hold::Moved(moved)) => Some(Resumption::MovedWith(moved)),
                    (_, Hold::MovedClient(moved)) => Some(Resumption::MovedClient(moved)),
                    _ => None,
                }
            }
        }
    }

    /// A worker moved here with its sessions (`moved`): its shard takes them over, with what
    /// it had not received, before this returns (and before its claim tells the others).
    pub async fn import_worker(&self, worker: PeerId, sink: crate::peer::Sink, moved: Box<MovedWorker>) {
        let (done, imported) = oneshot::channel();
        if self.queue.send(ToCluster::ImportWorker { worker, sink, moved, done }).await.is_ok() {
            let _ = imported.await;
        }
    }

    /// The local client stream `conn` moves to `to` with its sessions: what comes for it is
    /// held until its claim there. Returns its sessions across, and the stand-in for it in the
    /// sessions of this instance's workers.
    pub async fn client_leaving(
        &self,
        client: PeerId,
        conn: ConnId,
        to: InstanceId,
    ) -> Option<crate::peer::remote::Leaving> {
        let (done, left) = oneshot::channel();
        self.queue.send(ToCluster::ClientLeaving { client, conn, to, done }).await.ok()?;
        left.await.ok()
    }

    /// A client moved here with its sessions (`moved`), its stream `sink` keeping its id: its
    /// sessions are its stream's before this returns; then its claim tells the others. The
    /// stream is read once the future returned resolves.
    pub async fn import_client(
        &self,
        client: PeerId,
        sink: crate::peer::Sink,
        moved: Box<MovedClient>,
    ) -> impl std::future::Future<Output = ()> + use<> {
        let (done, imported) = oneshot::channel();
        let (start, started) = oneshot::channel();
        let from = moved.from;
        let import = ToCluster::ImportClient { client, sink: sink.clone(), moved, done, start };
        if self.queue.send(import).await.is_ok() {
            let _ = imported.await;
        }
        let claim = wire::Claim {
            worker: false,
            id: client,
            conn: Some(bridge::wire_conn(sink.id())),
            moved_from: from,
            now_at: self.instance,
        };
        let sealed =
            self.seal.seal(Kind::Claim, &self.subjects.claim(), &claim.encode_to_vec(), driver::now_ms());
        let (nats, subject) = (self.nats.clone(), self.subjects.claim());
        let publish = tokio::spawn(async move { publish_claim(&nats, subject, sealed, client).await });
        if tokio::time::timeout(REGISTER_WAIT, publish).await.is_err() {
            crate::warn_throttled!(client, "NATS does not take the claim: it goes out once NATS is back");
        }
        async move {
            let _ = started.await;
        }
    }

    /// Resolves once the claim of a peer that moved from here is heard (or the bridge stopped).
    pub fn claimed(&self, role: Role, id: PeerId) -> impl std::future::Future<Output = ()> + use<> {
        let (claimed, heard) = oneshot::channel();
        let asked = self.queue.try_send(ToCluster::AwaitClaim { worker: role == Role::Worker, id, claimed });
        async move {
            if asked.is_ok() {
                let _ = heard.await;
            }
        }
    }

    /// A worker moved from here to `to` with its sessions: those of its clients that are on
    /// this instance now talk to it there.
    pub async fn moved_away(
        &self,
        worker: PeerId,
        to: InstanceId,
        clients: Vec<(PeerId, crate::peer::Sink)>,
    ) {
        let (done, noted) = oneshot::channel();
        if self.queue.send(ToCluster::MovedAway { worker, to, clients, done }).await.is_ok() {
            let _ = noted.await;
        }
    }
}
