//! The bridge task: this instance's side of every link, the worker directory cache, and the
//! bookkeeping that turns a dead instance into `PEER_GONE` and `ERROR`s.
//!
//! It never waits for a shard: a command a full shard queue refuses is parked and retried, and
//! the inbox is not read while too much is parked (the senders' links then resend later). So
//! the shards may block on the bridge's queue for the one message they must not drop
//! (`ClientGone`) without a deadlock.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use metrics::{Counter, Histogram};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::link::{Arrival, InLink, OutLink};
use super::wire::{self, record::Kind};
use super::{Lookup, RemoteClient, Subjects, ToBridge, refuse};
use crate::core::{CloseReason, Command, ConnId, DeliverError, InstanceId, Outbound, PeerId, Role, Signal};
use crate::edge::conn::{Peer, PeerReply, Sink};
use crate::metrics as names;
use crate::pb::{ErrorCode, RtcEvent};
use crate::shards::Shards;

/// Commands queued for the bridge before shards refuse cross-instance messages.
pub const QUEUE: usize = 65_536;
/// Commands or inbox messages handled per turn before frames are sent.
const BATCH: usize = 1024;
/// Records are packed into frames of at most about this many bytes (NATS' default max payload
/// is 1 MiB).
const FRAME_BYTES: usize = 256 * 1024;
/// Timer for resends, heartbeats and the dead-instance check.
const TICK: Duration = Duration::from_millis(20);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// An instance not heard from for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// A locate request with no responder is retried, first after [`LOCATE_RETRY`], then twice as
/// long each time up to [`LOCATE_RETRY_MAX`], until [`LOCATE_WITHIN`] has passed: a worker that
/// registered a moment ago may have a subscription still reaching the other NATS servers, which
/// under load took over 250 ms on a 2-core machine. The worker's claim, which every instance
/// receives, ends the wait at once (see `Bridge::claim`).
const LOCATE_RETRY: Duration = Duration::from_millis(50);
const LOCATE_RETRY_MAX: Duration = Duration::from_millis(400);
const LOCATE_WITHIN: Duration = Duration::from_secs(2);
const LOCATE_TIMEOUT: Duration = Duration::from_secs(1);
/// Commands parked for full shard queues before the inbox is no longer read.
const PARKED_LIMIT: usize = 65_536;
/// How long shutdown waits for frames in flight to be acknowledged.
const LEAVE_WITHIN: Duration = Duration::from_secs(2);

/// What a record in flight owes its sender if the link dies.
enum Origin {
    None,
    Client { reply: PeerReply, worker: PeerId, client: PeerId },
    Worker { worker: PeerId, client: PeerId },
}

/// A client message waiting for its worker to be located.
struct Pending {
    client: PeerId,
    conn: ConnId,
    signal: Signal<PeerReply>,
}

/// A local client stream that sent to workers on other instances.
struct LocalClient {
    client: PeerId,
    sink: Sink,
    /// Its workers elsewhere and their instances.
    workers: HashMap<PeerId, InstanceId>,
    /// Shards yet to report the stream's end.
    shards_left: usize,
}

#[derive(Default)]
struct Outgoing {
    records: Vec<wire::Record>,
    origins: Vec<Origin>,
}

pub struct Bridge {
    me: InstanceId,
    nats: async_nats::Client,
    subjects: Subjects,
    shards: Arc<Shards<Peer>>,
    tx: mpsc::Sender<ToBridge>,
    out: HashMap<InstanceId, OutLink<Origin>>,
    building: HashMap<InstanceId, Outgoing>,
    inbound: HashMap<InstanceId, InLink>,
    ack_due: HashSet<InstanceId>,
    nak_due: HashSet<InstanceId>,
    locations: HashMap<PeerId, InstanceId>,
    pending: HashMap<PeerId, VecDeque<Pending>>,
    clients: HashMap<ConnId, LocalClient>,
    remote_clients: HashMap<ConnId, Arc<RemoteClient>>,
    last_seen: HashMap<InstanceId, Instant>,
    parked: Vec<VecDeque<Command<Peer>>>,
    leaving: Option<(oneshot::Sender<()>, Instant)>,
    metrics: BridgeMetrics,
}

impl Bridge {
    pub fn new(
        me: InstanceId,
        nats: async_nats::Client,
        subjects: Subjects,
        shards: Arc<Shards<Peer>>,
        tx: mpsc::Sender<ToBridge>,
    ) -> Self {
        let parked = (0..shards.len()).map(|_| VecDeque::new()).collect();
        Bridge {
            me,
            nats,
            subjects,
            shards,
            tx,
            out: HashMap::new(),
            building: HashMap::new(),
            inbound: HashMap::new(),
            ack_due: HashSet::new(),
            nak_due: HashSet::new(),
            locations: HashMap::new(),
            pending: HashMap::new(),
            clients: HashMap::new(),
            remote_clients: HashMap::new(),
            last_seen: HashMap::new(),
            parked,
            leaving: None,
            metrics: BridgeMetrics::new(),
        }
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<ToBridge>) -> anyhow::Result<()> {
        let mut inbox = self.nats.subscribe(self.subjects.inbox(self.me)).await?;
        let mut claims = self.nats.subscribe(self.subjects.claim()).await?;
        let mut beats = self.nats.subscribe(self.subjects.heartbeat()).await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_beat = Instant::now();
        tracing::info!(instance = format!("{:x}", self.me), "cluster bridge running");
        loop {
            let parked: usize = self.parked.iter().map(VecDeque::len).sum();
            // Not biased: under load, neither the commands nor the inbox may starve the other
            // (acknowledgements arrive in the inbox).
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    self.command(command);
                    for _ in 1..BATCH {
                        match commands.try_recv() {
                            Ok(command) => self.command(command),
                            Err(_) => break,
                        }
                    }
                    self.flush().await;
                }
                msg = inbox.next(), if parked < PARKED_LIMIT => {
                    let Some(msg) = msg else { break };
                    let now = Instant::now();
                    self.frame(msg.payload, now);
                    for _ in 1..BATCH {
                        match inbox.next().now_or_never() {
                            Some(Some(msg)) => self.frame(msg.payload, now),
                            _ => break,
                        }
                    }
                    self.flush().await;
                }
                Some(msg) = claims.next() => self.claim(msg.payload),
                Some(msg) = beats.next() => self.heartbeat(msg.payload),
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.unpark();
                    self.resend_and_reap(now).await;
                    if now >= next_beat {
                        next_beat = now + HEARTBEAT_EVERY;
                        self.beat(false).await;
                    }
                    if self.ready_to_leave(now) {
                        break;
                    }
                }
            }
        }
        self.beat(true).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.nats.flush()).await;
        if let Some((done, _)) = self.leaving.take() {
            let _ = done.send(());
        }
        tracing::info!("cluster bridge stopped");
        Ok(())
    }

    fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    fn command(&mut self, command: ToBridge) {
        match command {
            ToBridge::ClientSignal { client, sink, worker, signal } => {
                self.client_signal(client, sink, worker, signal)
            }
            ToBridge::ClientGone { client, conn } => self.client_gone(client, conn),
            ToBridge::ToClient { conn, msg } => self.for_remote_client(conn, msg),
            ToBridge::Located { worker, found } => self.located(worker, found),
            ToBridge::Shutdown { done } => self.leaving = Some((done, Instant::now() + LEAVE_WITHIN)),
        }
    }

    fn client_signal(&mut self, client: PeerId, sink: Sink, worker: PeerId, signal: Signal<PeerReply>) {
        let conn = sink.id();
        let shards = self.shards.len();
        self.clients.entry(conn).or_insert_with(|| LocalClient {
            client,
            sink,
            workers: HashMap::new(),
            shards_left: shards,
        });
        if let Some(queue) = self.pending.get_mut(&worker) {
            return queue.push_back(Pending { client, conn, signal });
        }
        if !self.connected() {
            return refuse(
                signal.reply,
                ErrorCode::ClusterUnavailable,
                worker,
                client,
                "NATS is unreachable: other instances cannot be reached",
            );
        }
        match self.locations.get(&worker) {
            Some(&instance) => self.forward(instance, client, conn, worker, signal),
            None => {
                self.pending.insert(worker, VecDeque::from([Pending { client, conn, signal }]));
                let (nats, subject, tx) = (self.nats.clone(), self.subjects.worker(worker), self.tx.clone());
                tokio::spawn(async move {
                    let found = locate(&nats, subject).await;
                    let _ = tx.send(ToBridge::Located { worker, found }).await;
                });
            }
        }
    }

    fn located(&mut self, worker: PeerId, found: Result<InstanceId, Lookup>) {
        let Some(queue) = self.pending.remove(&worker) else { return };
        if let Ok(instance) = found {
            self.locations.insert(worker, instance);
            self.last_seen.entry(instance).or_insert_with(Instant::now);
        }
        for Pending { client, conn, signal } in queue {
            if !self.clients.contains_key(&conn) {
                continue; // the stream ended meanwhile; nobody is left to answer
            }
            match found {
                Ok(instance) => self.forward(instance, client, conn, worker, signal),
                Err(Lookup::NotFound) => {
                    let reason = format!("worker {worker} is not connected");
                    refuse(signal.reply, ErrorCode::PeerNotConnected, worker, client, reason)
                }
                Err(Lookup::Unavailable) => {
                    let reason = "the worker's instance did not answer";
                    refuse(signal.reply, ErrorCode::ClusterUnavailable, worker, client, reason)
                }
            }
        }
    }

    fn forward(
        &mut self,
        instance: InstanceId,
        client: PeerId,
        conn: ConnId,
        worker: PeerId,
        signal: Signal<PeerReply>,
    ) {
        if self.out.get(&instance).is_some_and(OutLink::is_full) {
            return refuse(
                signal.reply,
                ErrorCode::ClusterUnavailable,
                worker,
                client,
                "the link to the worker's instance is saturated",
            );
        }
        if let Some(local) = self.clients.get_mut(&conn) {
            local.workers.insert(worker, instance);
        }
        let record = Kind::ClientSignal(wire::ClientSignal {
            client,
            conn: Some(wire_conn(conn)),
            worker,
            event: signal.event as i32,
            payload: signal.payload,
        });
        self.push(instance, record, Origin::Client { reply: signal.reply, worker, client });
    }

    fn client_gone(&mut self, client: PeerId, conn: ConnId) {
        let Entry::Occupied(mut local) = self.clients.entry(conn) else { return };
        local.get_mut().shards_left -= 1;
        if local.get().shards_left > 0 {
            return;
        }
        let local = local.remove();
        let instances: HashSet<InstanceId> = local.workers.values().copied().collect();
        for instance in instances {
            let record = Kind::ClientGone(wire::ClientGone { client, conn: Some(wire_conn(conn)) });
            self.push(instance, record, Origin::None);
        }
        for queue in self.pending.values_mut() {
            queue.retain(|p| p.conn != conn);
        }
    }

    /// A message from a local worker's shard for a client on another instance.
    fn for_remote_client(&mut self, conn: ConnId, msg: Outbound) {
        let relayed = matches!(msg.event, RtcEvent::Answer | RtcEvent::IceCandidate);
        let origin =
            if relayed { Origin::Worker { worker: msg.worker, client: msg.client } } else { Origin::None };
        if !self.connected() || self.out.get(&conn.instance).is_some_and(OutLink::is_full) {
            return self.fail(origin);
        }
        let record = Kind::ToClient(wire::ToClient {
            client: msg.client,
            conn: Some(wire_conn(conn)),
            worker: msg.worker,
            event: msg.event as i32,
            payload: msg.payload,
            error_code: msg.error as i32,
        });
        self.push(conn.instance, record, origin);
    }

    fn push(&mut self, instance: InstanceId, kind: Kind, origin: Origin) {
        let outgoing = self.building.entry(instance).or_default();
        outgoing.records.push(wire::Record { kind: Some(kind) });
        outgoing.origins.push(origin);
    }

    /// Sends what the last turn built, cut into frames, then the acknowledgements still owed.
    async fn flush(&mut self) {
        let now = Instant::now();
        if !self.connected() {
            for (_, outgoing) in std::mem::take(&mut self.building) {
                outgoing.origins.into_iter().for_each(|o| self.fail(o));
            }
            return;
        }
        for (instance, outgoing) in std::mem::take(&mut self.building) {
            self.last_seen.entry(instance).or_insert(now);
            let mut records = outgoing.records.into_iter().zip(outgoing.origins).peekable();
            while records.peek().is_some() {
                let (mut chunk, mut origins, mut bytes) = (Vec::new(), Vec::new(), 0);
                while let Some((record, origin)) = records.next_if(|_| bytes < FRAME_BYTES) {
                    bytes += record.encoded_len();
                    chunk.push(record);
                    origins.push(origin);
                }
                self.metrics.records_out.increment(chunk.len() as u64);
                let (ack_epoch, ack_next, nak) = self.take_ack(instance).unwrap_or_default();
                let link =
                    self.out.entry(instance).or_insert_with(|| OutLink::new(rand::random::<u64>() | 1, now));
                let frame = wire::Frame {
                    from: self.me,
                    epoch: link.epoch,
                    seq: link.next_seq(),
                    records: chunk,
                    ack_epoch,
                    ack_next,
                    nak,
                };
                let bytes = Bytes::from(frame.encode_to_vec());
                link.sent(bytes.clone(), origins, now);
                self.metrics.frames_data.increment(1);
                if let Err(e) = self.nats.publish(self.subjects.inbox(instance), bytes).await {
                    tracing::debug!("publish failed, the link will resend: {e}");
                }
            }
        }
        let owed: HashSet<InstanceId> = self.ack_due.union(&self.nak_due).copied().collect();
        for instance in owed {
            let Some((ack_epoch, ack_next, nak)) = self.take_ack(instance) else { continue };
            let frame = wire::Frame { from: self.me, ack_epoch, ack_next, nak, ..Default::default() };
            self.metrics.frames_ack.increment(1);
            let _ = self.nats.publish(self.subjects.inbox(instance), frame.encode_to_vec().into()).await;
        }
    }

    /// The acknowledgement owed to `instance`, as it goes out: (epoch, next expected, gap seen).
    fn take_ack(&mut self, instance: InstanceId) -> Option<(u64, u64, bool)> {
        self.ack_due.remove(&instance);
        let nak = self.nak_due.remove(&instance);
        self.inbound.get(&instance).map(|inl| (inl.epoch, inl.next, nak))
    }

    /// One frame from the inbox.
    fn frame(&mut self, payload: Bytes, now: Instant) {
        let frame = match wire::Frame::decode(payload) {
            Ok(frame) => frame,
            Err(e) => return tracing::warn!("undecodable frame on the inbox: {e}"),
        };
        let from = frame.from;
        if from == self.me || from == 0 {
            return;
        }
        self.last_seen.insert(from, now);
        if frame.ack_epoch != 0
            && let Some(link) = self.out.get_mut(&from)
        {
            for done in link.acknowledged(frame.ack_epoch, frame.ack_next, frame.nak, now) {
                self.metrics.ack_seconds.record(now.saturating_duration_since(done.sent_at).as_secs_f64());
            }
        }
        if frame.seq == 0 {
            return;
        }
        let link = self.inbound.entry(from).or_insert_with(|| InLink::new(frame.epoch));
        match link.arrive(frame.epoch, frame.seq) {
            Arrival::Next => {
                self.ack_due.insert(from);
                self.metrics.records_in.increment(frame.records.len() as u64);
                for record in frame.records {
                    if let Some(kind) = record.kind {
                        self.record(from, kind);
                    }
                }
            }
            Arrival::Duplicate => {
                self.ack_due.insert(from);
            }
            Arrival::Gap => {
                self.nak_due.insert(from);
            }
        }
    }

    fn record(&mut self, from: InstanceId, kind: Kind) {
        match kind {
            Kind::ClientSignal(s) => {
                let (Some(conn), Ok(event)) = (s.conn.map(conn_id), RtcEvent::try_from(s.event)) else {
                    return tracing::warn!("malformed client signal from instance {from:x}");
                };
                let remote = self
                    .remote_clients
                    .entry(conn)
                    .or_insert_with(|| Arc::new(RemoteClient::new(conn, self.tx.clone())))
                    .clone();
                let signal = Signal { event, payload: s.payload, reply: PeerReply::Remote(remote.clone()) };
                let command = Command::FromClient {
                    client: s.client,
                    sink: Peer::Remote(remote),
                    worker: s.worker,
                    signal,
                };
                self.dispatch(self.shards.of_worker(s.worker), command);
            }
            Kind::ToClient(m) => {
                let (Some(conn), Ok(event)) = (m.conn.map(conn_id), RtcEvent::try_from(m.event)) else {
                    return tracing::warn!("malformed client message from instance {from:x}");
                };
                let error = ErrorCode::try_from(m.error_code).unwrap_or(ErrorCode::Unspecified);
                let msg = Outbound { event, worker: m.worker, client: m.client, payload: m.payload, error };
                self.for_local_client(from, conn, msg);
            }
            Kind::ToWorker(m) => {
                let Ok(event) = RtcEvent::try_from(m.event) else { return };
                let error = ErrorCode::try_from(m.error_code).unwrap_or(ErrorCode::Unspecified);
                let msg = Outbound { event, worker: m.worker, client: m.client, payload: m.payload, error };
                self.dispatch(self.shards.of_worker(m.worker), Command::ToWorker { worker: m.worker, msg });
            }
            Kind::ClientGone(g) => {
                let Some(conn) = g.conn.map(conn_id) else { return };
                self.remote_clients.remove(&conn);
                for shard in 0..self.shards.len() {
                    self.dispatch(shard, Command::ClientGone { client: g.client, conn });
                }
            }
        }
    }

    /// A message from another instance for a local client stream.
    fn for_local_client(&mut self, from: InstanceId, conn: ConnId, msg: Outbound) {
        let (worker, client, event) = (msg.worker, msg.client, msg.event);
        let ended = event == RtcEvent::PeerGone
            || (event == RtcEvent::Error && msg.error == ErrorCode::PeerNotConnected);
        let delivered = match self.clients.get_mut(&conn) {
            Some(local) => {
                if ended && local.workers.get(&worker) == Some(&from) {
                    local.workers.remove(&worker);
                }
                local.sink.try_deliver(msg)
            }
            None => Err(DeliverError::Closed),
        };
        if ended && self.locations.get(&worker) == Some(&from) {
            self.locations.remove(&worker);
        }
        match delivered {
            Ok(()) => {}
            Err(e) if matches!(event, RtcEvent::Answer | RtcEvent::IceCandidate) => {
                let reason = match e {
                    DeliverError::Full => {
                        format!("client {client} is not reading; the message was not delivered")
                    }
                    _ => format!("client {client} is not connected; the message was not delivered"),
                };
                let record = Kind::ToWorker(wire::ToWorker {
                    worker,
                    client,
                    event: RtcEvent::Error as i32,
                    payload: reason.into(),
                    error_code: e.code() as i32,
                });
                self.push(from, record, Origin::None);
            }
            Err(DeliverError::Full) => {
                metrics::counter!(names::QUEUE_DROPS).increment(1);
                if let Some(local) = self.clients.get(&conn) {
                    local.sink.close(CloseReason::NotReading);
                }
            }
            Err(_) => {}
        }
    }

    /// Refuses what a lost record owed its sender.
    fn fail(&mut self, origin: Origin) {
        match origin {
            Origin::None => {}
            Origin::Client { reply, worker, client } => refuse(
                reply,
                ErrorCode::ClusterUnavailable,
                worker,
                client,
                "the worker's instance cannot be reached",
            ),
            Origin::Worker { worker, client } => {
                metrics::counter!(names::ERRORS, "code" => ErrorCode::ClusterUnavailable.as_str_name())
                    .increment(1);
                let reason = format!("client {client} is on an instance that cannot be reached");
                let msg = Outbound::error(ErrorCode::ClusterUnavailable, worker, client, reason);
                self.dispatch(self.shards.of_worker(worker), Command::ToWorker { worker, msg });
            }
        }
    }

    /// Hands a command to a shard without waiting: what a full queue refuses waits here.
    fn dispatch(&mut self, shard: usize, command: Command<Peer>) {
        if !self.parked[shard].is_empty() {
            return self.parked[shard].push_back(command);
        }
        if let Err(command) = self.shards.try_send(shard, command) {
            self.parked[shard].push_back(command);
        }
    }

    fn unpark(&mut self) {
        for shard in 0..self.parked.len() {
            while let Some(command) = self.parked[shard].pop_front() {
                if let Err(command) = self.shards.try_send(shard, command) {
                    self.parked[shard].push_front(command);
                    break;
                }
            }
        }
    }

    async fn resend_and_reap(&mut self, now: Instant) {
        let mut dead: Vec<InstanceId> = self
            .out
            .iter()
            .filter(|(_, link)| link.is_dead(now))
            .map(|(instance, _)| *instance)
            .chain(
                self.last_seen
                    .iter()
                    .filter(|(_, seen)| now.saturating_duration_since(**seen) >= DEAD_AFTER)
                    .map(|(instance, _)| *instance),
            )
            .collect();
        dead.sort_unstable();
        dead.dedup();
        for instance in dead {
            tracing::warn!(instance = format!("{instance:x}"), "instance unreachable: ending its sessions");
            self.instance_gone(instance);
        }
        if !self.connected() {
            return;
        }
        let mut resends = Vec::new();
        for (instance, link) in &mut self.out {
            for frame in link.to_resend(now) {
                resends.push((*instance, frame));
            }
        }
        for (instance, frame) in resends {
            self.metrics.frames_resent.increment(1);
            let _ = self.nats.publish(self.subjects.inbox(instance), frame).await;
        }
    }

    /// Forgets an instance that left or died: what was in flight to it is refused, sessions
    /// across it end.
    fn instance_gone(&mut self, instance: InstanceId) {
        if let Some(mut link) = self.out.remove(&instance) {
            let lost: Vec<Origin> = link.drain().flat_map(|f| f.origins).collect();
            lost.into_iter().for_each(|o| self.fail(o));
        }
        if let Some(outgoing) = self.building.remove(&instance) {
            outgoing.origins.into_iter().for_each(|o| self.fail(o));
        }
        self.inbound.remove(&instance);
        self.last_seen.remove(&instance);
        self.locations.retain(|_, i| *i != instance);
        for local in self.clients.values_mut() {
            local.workers.retain(|worker, i| {
                if *i != instance {
                    return true;
                }
                let gone = Outbound::peer_gone(*worker, local.client);
                if local.sink.try_deliver(gone) == Err(DeliverError::Full) {
                    local.sink.close(CloseReason::NotReading);
                }
                false
            });
        }
        self.remote_clients.retain(|conn, _| conn.instance != instance);
        for shard in 0..self.shards.len() {
            self.dispatch(shard, Command::InstanceGone { instance });
        }
    }

    fn claim(&mut self, payload: Bytes) {
        let Ok(claim) = wire::Claim::decode(payload) else { return };
        let Some(conn) = claim.conn.map(conn_id) else { return };
        if conn.instance == self.me {
            return;
        }
        let (role, shard) = if claim.worker {
            if let Some(location) = self.locations.get_mut(&claim.id) {
                *location = conn.instance;
            }
            // A locate still waiting for this worker's subscription to propagate has its answer.
            if self.pending.contains_key(&claim.id) {
                self.located(claim.id, Ok(conn.instance));
            }
            (Role::Worker, self.shards.of_worker(claim.id))
        } else {
            (Role::Client, self.shards.of_client(claim.id))
        };
        self.dispatch(shard, Command::Evict { role, id: claim.id, newer: conn });
    }

    fn heartbeat(&mut self, payload: Bytes) {
        let Ok(beat) = wire::Heartbeat::decode(payload) else { return };
        if beat.instance == self.me || beat.instance == 0 {
            return;
        }
        if beat.leaving {
            tracing::info!(instance = format!("{:x}", beat.instance), "instance left");
            self.instance_gone(beat.instance);
        } else {
            self.last_seen.insert(beat.instance, Instant::now());
        }
    }

    async fn beat(&self, leaving: bool) {
        if !self.connected() {
            return;
        }
        let beat = wire::Heartbeat { instance: self.me, leaving };
        let _ = self.nats.publish(self.subjects.heartbeat(), beat.encode_to_vec().into()).await;
    }

    fn ready_to_leave(&self, now: Instant) -> bool {
        let Some((_, deadline)) = &self.leaving else { return false };
        let quiet = self.building.is_empty() && self.out.values().all(|l| l.in_flight() == 0);
        quiet || now >= *deadline || !self.connected()
    }
}

/// Finds the instance a worker is registered on.
async fn locate(nats: &async_nats::Client, subject: String) -> Result<InstanceId, Lookup> {
    let give_up = Instant::now() + LOCATE_WITHIN;
    let mut retry = LOCATE_RETRY;
    loop {
        match tokio::time::timeout(LOCATE_TIMEOUT, nats.request(subject.clone(), Bytes::new())).await {
            Ok(Ok(reply)) => {
                return wire::Located::decode(reply.payload)
                    .map(|l| l.instance)
                    .map_err(|_| Lookup::Unavailable);
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                if Instant::now() + retry > give_up {
                    return Err(Lookup::NotFound);
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LOCATE_RETRY_MAX);
            }
            _ => return Err(Lookup::Unavailable),
        }
    }
}

/// Answers requests locating a worker registered here, until aborted.
pub async fn answer_locates(
    mut subscriber: async_nats::Subscriber,
    nats: async_nats::Client,
    located: Bytes,
) {
    while let Some(request) = subscriber.next().await {
        if let Some(reply) = request.reply {
            let _ = nats.publish(reply, located.clone()).await;
        }
    }
}

/// Keeps health and metrics in step with the NATS connection.
pub async fn on_event(event: async_nats::Event, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let connected = metrics::gauge!(names::NATS_CONNECTED);
    match event {
        async_nats::Event::Connected => {
            tracing::info!("NATS connected");
            connected.set(1.0);
            health.set_service_status(super::HEALTH_SERVICE, ServingStatus::Serving).await;
        }
        async_nats::Event::Disconnected => {
            tracing::warn!("NATS disconnected: cross-instance messages are refused until it is back");
            connected.set(0.0);
            health.set_service_status(super::HEALTH_SERVICE, ServingStatus::NotServing).await;
        }
        other => tracing::info!("NATS: {other}"),
    }
}

pub fn wire_conn(conn: ConnId) -> wire::Conn {
    wire::Conn { at: conn.at, instance: conn.instance }
}

fn conn_id(conn: wire::Conn) -> ConnId {
    ConnId { at: conn.at, instance: conn.instance }
}

struct BridgeMetrics {
    frames_data: Counter,
    frames_ack: Counter,
    frames_resent: Counter,
    records_out: Counter,
    records_in: Counter,
    ack_seconds: Histogram,
}

impl BridgeMetrics {
    fn new() -> Self {
        BridgeMetrics {
            frames_data: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "data"),
            frames_ack: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "ack"),
            frames_resent: metrics::counter!(names::CLUSTER_FRAMES, "kind" => "resent"),
            records_out: metrics::counter!(names::CLUSTER_RECORDS, "direction" => "out"),
            records_in: metrics::counter!(names::CLUSTER_RECORDS, "direction" => "in"),
            ack_seconds: metrics::histogram!(names::CLUSTER_ACK),
        }
    }
}
