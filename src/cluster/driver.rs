//! The bridge's NATS task: a thin driver that feeds the sans-IO [`Bridge`] what arrives (its
//! queue, the inbox, claims, heartbeats, locate answers, a timer) and carries out what it asks
//! (publishes and locates). Every message is sealed on the way out and opened on the way in
//! ([`Seal`]): what does not open is counted and dropped unread.
//!
//! Over 500 lines: the loop, and each NATS exchange it carries out (locates and their answers,
//! resume asks, replies), which share its connection and its seal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, StreamExt};
use metrics::Counter;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::bridge::{Bridge, Output};
use super::directory::Lookup;
use super::seal::{Kind, Opened, Seal};
use super::tunnels::{self, Ask, Hold, Holder, Released, TunnelCommand};
use super::{Subjects, wire};
use crate::core::{ConnId, InstanceId, Outbound, PeerId, Role};
use crate::metrics as names;
use crate::peer::{ForClients, ToCluster};
use crate::warn_throttled;

/// Commands queued for the bridge before shards refuse cross-instance messages.
pub const QUEUE: usize = 65_536;
/// Commands or inbox messages handled per turn before frames are sent.
const BATCH: usize = 1024;
/// Timer for resends, heartbeats and the dead-instance check.
const TICK: Duration = Duration::from_millis(20);
/// A locate request with no responder is retried, first after [`LOCATE_RETRY`], then twice as
/// long each time up to [`LOCATE_RETRY_MAX`], until [`LOCATE_WITHIN`] has passed: a worker that
/// registered a moment ago may have a subscription still reaching the other NATS servers, which
/// under load took over 250 ms on a 2-core machine. The worker's claim, which every instance
/// receives, ends the wait at once (see `Directory::claimed`).
const LOCATE_RETRY: Duration = Duration::from_millis(50);
const LOCATE_RETRY_MAX: Duration = Duration::from_millis(400);
const LOCATE_WITHIN: Duration = Duration::from_secs(2);
const LOCATE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a resumable stream waits for the instances to say whether they hold its peer, at
/// most (it stops at the holder's answer, or once every instance known alive said no: known to
/// the asker, or to any instance that said no).
pub const ASK_WITHIN: Duration = Duration::from_millis(500);
/// How long an answered ask is remembered: longer than a sealed message stays fresh (30 s).
const ASKS_KEPT: Duration = Duration::from_secs(60);

/// What the driver's own helpers and the server tell it.
pub enum Control {
    /// A worker's location, looked up.
    Located { worker: PeerId, found: Result<InstanceId, Lookup> },
    /// Finish: tell the others this instance leaves, once what is in flight is acknowledged.
    Shutdown { done: oneshot::Sender<()> },
}

/// One thing that happened, for the bridge to handle.
enum Event {
    Command(Option<ToCluster>),
    ToClient(Option<(ConnId, Outbound)>),
    Frame(Option<async_nats::Message>),
    Control(Control),
    Claim(async_nats::Message),
    Heartbeat(async_nats::Message),
    Tunnel(TunnelCommand),
    ResumeAsk(async_nats::Message),
    Tick,
}

/// What the bridge listens to on NATS.
pub struct Subscriptions {
    inbox: async_nats::Subscriber,
    claims: async_nats::Subscriber,
    beats: async_nats::Subscriber,
    resumes: async_nats::Subscriber,
}

/// The queues the driver reads, besides NATS.
pub struct Inputs {
    pub queue: mpsc::Receiver<ToCluster>,
    pub for_clients: ForClients,
    pub control: mpsc::UnboundedReceiver<Control>,
    pub tunnels: mpsc::UnboundedReceiver<TunnelCommand>,
}

pub struct Driver {
    pub bridge: Bridge,
    pub me: InstanceId,
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub seal: Seal,
    pub replies: Replies,
    pub control: mpsc::UnboundedSender<Control>,
    /// For the halves of the tunnels this instance holds.
    pub tunnels: mpsc::UnboundedSender<TunnelCommand>,
    /// Where the bridge's count of live instances is published, for resume asks.
    /// The other instances the bridge knows alive, for the resume asks (updated each tick).
    pub alive: Arc<Mutex<Vec<InstanceId>>>,
    pub holder: Arc<OnceLock<Arc<dyn Holder>>>,
    /// The streams whose resume asks were answered lately: an ask is answered once (a replayed
    /// one, within the seal's 30 s, would take the peer over again).
    pub asked: HashMap<ConnId, Instant>,
}

/// Milliseconds since the Unix epoch: the clock of the seals.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Opens a message received as `kind`, or counts and drops it.
pub fn open(seal: &Seal, kind: Kind, msg: async_nats::Message) -> Option<Opened> {
    match seal.open(kind, msg.subject.as_str(), msg.payload, now_ms()) {
        Ok(opened) => Some(opened),
        Err(why) => {
            rejected(kind).increment(1);
            warn_throttled!(kind = kind.as_str(), subject = %msg.subject, "cluster message rejected: {why}");
            None
        }
    }
}

fn rejected(kind: Kind) -> Counter {
    metrics::counter!(names::CLUSTER_REJECTED, "kind" => kind.as_str())
}

impl Driver {
    fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Subscribes what the bridge listens to. Done before the instance serves, so that what
    /// other instances say about its first peers (their claims) reaches it.
    pub async fn subscribe(&self) -> Result<Subscriptions, async_nats::SubscribeError> {
        let subscriptions = Subscriptions {
            inbox: self.nats.subscribe(self.subjects.inbox(self.me)).await?,
            claims: self.nats.subscribe(self.subjects.claim()).await?,
            beats: self.nats.subscribe(self.subjects.heartbeat()).await?,
            resumes: self.nats.subscribe(self.subjects.resume()).await?,
        };
        if self.nats.connection_state() == async_nats::connection::State::Connected {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
        }
        Ok(subscriptions)
    }

    /// Runs until shutdown (or until the queues close).
    pub async fn run(mut self, subscriptions: Subscriptions, inputs: Inputs) {
        let Subscriptions { mut inbox, mut claims, mut beats, mut resumes } = subscriptions;
        let Inputs { mut queue, mut for_clients, mut control, mut tunnels } = inputs;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut done = None;
        tracing::info!(instance = format!("{:x}", self.me), "cluster bridge running");
        loop {
            let backlogged = self.bridge.is_backlogged();
            // Not biased: under load, neither the commands nor the inbox may starve the other
            // (acknowledgements arrive in the inbox).
            let event = tokio::select! {
                command = queue.recv() => Event::Command(command),
                msg = for_clients.recv() => Event::ToClient(msg),
                msg = inbox.next(), if !backlogged => Event::Frame(msg),
                Some(control) = control.recv() => Event::Control(control),
                Some(msg) = claims.next() => Event::Claim(msg),
                Some(msg) = beats.next() => Event::Heartbeat(msg),
                Some(command) = tunnels.recv() => Event::Tunnel(command),
                Some(msg) = resumes.next() => Event::ResumeAsk(msg),
                _ = tick.tick() => Event::Tick,
            };
            // Read after the wait: what is handled now sees the connection as it is now.
            self.bridge.set_connected(self.connected());
            let now = Instant::now();
            match event {
                Event::Command(None) | Event::ToClient(None) | Event::Frame(None) => break,
                Event::Command(Some(command)) => {
                    self.bridge.command(command, now);
                    for _ in 1..BATCH {
                        match queue.try_recv() {
                            Ok(command) => self.bridge.command(command, now),
                            Err(_) => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::ToClient(Some((conn, msg))) => {
                    self.bridge.to_client(conn, msg);
                    for _ in 1..BATCH {
                        match for_clients.try_recv() {
                            Some((conn, msg)) => self.bridge.to_client(conn, msg),
                            None => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::Frame(Some(msg)) => {
                    self.frame(msg, now);
                    for _ in 1..BATCH {
                        match inbox.next().now_or_never() {
                            Some(Some(msg)) => self.frame(msg, now),
                            _ => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::Control(Control::Located { worker, found }) => {
                    self.bridge.located(worker, found, now);
                    self.bridge.flush(now);
                }
                Event::Control(Control::Shutdown { done: reply }) => {
                    self.bridge.leave(now);
                    done = Some(reply);
                }
                Event::Claim(msg) => {
                    if let Some(claim) = open(&self.seal, Kind::Claim, msg) {
                        self.bridge.claim(claim.body, Instant::now());
                        self.bridge.flush(now);
                    }
                }
                Event::Heartbeat(msg) => {
                    if let Some(beat) = open(&self.seal, Kind::Heartbeat, msg) {
                        self.bridge.heartbeat(beat.body, beat.sent_at_ms, now);
                    }
                }
                Event::Tunnel(command) => {
                    self.bridge.tunnel(command);
                    for _ in 1..BATCH {
                        match tunnels.try_recv() {
                            Ok(command) => self.bridge.tunnel(command),
                            Err(_) => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::ResumeAsk(msg) => {
                    self.resume_asked(msg).await;
                    self.bridge.flush(now);
                }
                Event::Tick => {
                    self.bridge.tick(now);
                    *self.alive.lock().expect("not poisoned") = self.bridge.alive();
                    metrics::gauge!(names::TUNNELS).set(self.bridge.tunnel_count() as f64);
                    if self.bridge.ready_to_leave(now) {
                        break;
                    }
                }
            }
            self.carry_out().await;
        }
        self.bridge.farewell();
        self.carry_out().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.nats.flush()).await;
        if let Some(done) = done {
            let _ = done.send(());
        }
        tracing::info!("cluster bridge stopped");
    }

    /// Another instance asks whether the peer of a resumable stream is held here: if so, the
    /// tunnel to that stream is opened and the peer handed to it before the answer goes.
    async fn resume_asked(&mut self, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else { return };
        let Some(opened) = open(&self.seal, Kind::ResumeAsk, msg) else { return };
        let Ok(ask) = wire::ResumeAsk::decode(opened.body) else {
            return rejected(Kind::ResumeAsk).increment(1);
        };
        let Some(conn) = ask.conn.map(super::bridge::conn_id) else { return };
        if conn.instance == self.me || conn.instance == 0 {
            return;
        }
        let now = Instant::now();
        self.asked.retain(|_, at| now.duration_since(*at) < ASKS_KEPT);
        if self.asked.insert(conn, now).is_some() {
            rejected(Kind::ResumeAsk).increment(1);
            return warn_throttled!(stream = %conn, "a resume ask answered already (a replay): ignored");
        }
        let alive = self.bridge.alive();
        match self.hold(conn, &ask) {
            // A worker moving with its sessions: answered once its shard handed them over.
            Hold::Moving(moving) => {
                let (nats, seal, me, tunnels) =
                    (self.nats.clone(), self.seal.clone(), self.me, self.tunnels.clone());
                tokio::spawn(async move {
                    let held = moving.await.unwrap_or(Hold::NotHere);
                    if !matches!(held, Hold::Tunnel) {
                        let _ = tunnels.send(TunnelCommand::Forget { conn });
                    }
                    answer(&nats, &seal, reply, me, held, alive).await;
                });
            }
            held => answer(&self.nats, &self.seal, reply, self.me, held, alive).await,
        }
    }

    fn hold(&mut self, conn: ConnId, ask: &wire::ResumeAsk) -> Hold {
        let Some(holder) = self.holder.get().cloned() else { return Hold::NotHere };
        let (events_tx, events, credit) = tunnels::channel();
        let open = TunnelCommand::Open {
            conn,
            instance: Some(conn.instance),
            events: events_tx,
            credit: credit.clone(),
            opened: None,
        };
        self.bridge.tunnel(open);
        let (tx, rx) = tunnels::halves(conn, conn.instance, self.tunnels.clone(), events, credit);
        let role = if ask.worker { Role::Worker } else { Role::Client };
        let expires = (ask.expires_ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ask.expires_ms));
        let held =
            holder.hold(Ask { role, id: ask.id, after: ask.after, expires, front: conn.instance }, tx, rx);
        if !matches!(held, Hold::Tunnel | Hold::Moving(_)) {
            self.bridge.tunnel(TunnelCommand::Forget { conn });
        }
        held
    }

    /// One message from the inbox, opened.
    fn frame(&mut self, msg: async_nats::Message, now: Instant) {
        if let Some(frame) = open(&self.seal, Kind::Frame, msg) {
            self.bridge.frame(frame.body, now);
        }
    }

    /// Publishes and looks up what the bridge asked for.
    async fn carry_out(&mut self) {
        while let Some(output) = self.bridge.poll_output() {
            match output {
                Output::ToInstance(instance, frame) => {
                    let subject = self.subjects.inbox(instance);
                    let sealed = self.seal.seal(Kind::Frame, &subject, &frame, now_ms());
                    match self.nats.publish(subject, sealed).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                            self.bridge.publish_refused(instance, Instant::now())
                        }
                        // Not sent now (a connection being re-established): the link resends.
                        Err(e) => tracing::debug!("publish failed, the link will resend: {e}"),
                    }
                }
                Output::Heartbeat(beat) => {
                    let subject = self.subjects.heartbeat();
                    let sealed = self.seal.seal(Kind::Heartbeat, &subject, &beat, now_ms());
                    let _ = self.nats.publish(subject, sealed).await;
                }
                Output::Locate(worker) => {
                    let (nats, seal, control) = (self.nats.clone(), self.seal.clone(), self.control.clone());
                    let (subject, me, replies) =
                        (self.subjects.worker(worker), self.me, self.replies.clone());
                    tokio::spawn(async move {
                        let found = locate(&nats, &seal, &replies, subject, me).await;
                        let _ = control.send(Control::Located { worker, found });
                    });
                }
            }
        }
    }
}

/// Finds the instance a worker is registered on: asks on the worker's subject and believes the
/// first answer that opens, not merely the first answer.
async fn locate(
    nats: &async_nats::Client,
    seal: &Seal,
    replies: &Replies,
    subject: String,
    me: InstanceId,
) -> Result<InstanceId, Lookup> {
    let give_up = Instant::now() + LOCATE_WITHIN;
    let mut retry = LOCATE_RETRY;
    loop {
        let mut waiting = replies.wait();
        let request = seal.seal(Kind::Locate, &subject, &[], now_ms());
        nats.publish_with_reply(subject.clone(), waiting.subject.clone(), request)
            .await
            .map_err(|_| Lookup::Unavailable)?;
        let answered_by = tokio::time::Instant::now() + LOCATE_TIMEOUT;
        // Until the NATS server says nobody listens on the subject, or a believable answer.
        loop {
            let Ok(Some(reply)) = tokio::time::timeout_at(answered_by, waiting.replies.recv()).await else {
                return Err(Lookup::Unavailable);
            };
            if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                break;
            }
            let Some(located) = open(seal, Kind::Located, reply) else { continue };
            match wire::Located::decode(located.body) {
                Ok(l) if l.instance != 0 && l.instance != me => return Ok(l.instance),
                _ => {
                    rejected(Kind::Located).increment(1);
                    warn_throttled!("a locate answer names no other instance");
                }
            }
        }
        if Instant::now() + retry > give_up {
            return Err(Lookup::NotFound);
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LOCATE_RETRY_MAX);
    }
}

/// Answers a resume ask with what this instance did; a "no" names the instances it knows
/// alive (`alive`).
async fn answer(
    nats: &async_nats::Client,
    seal: &Seal,
    reply: async_nats::Subject,
    me: InstanceId,
    held: Hold,
    alive: Vec<InstanceId>,
) {
    let mut answer = wire::ResumeAnswer { instance: me, ..Default::default() };
    match held {
        Hold::NotHere | Hold::Moving(_) => answer.alive = alive,
        Hold::Tunnel => answer.held = true,
        Hold::Released(r) => {
            answer.released = Some(wire::Released { next_seq: r.next_seq, last_received: r.last_received })
        }
        Hold::Moved(moved) => answer.moved = Some(super::moves::to_wire(&moved)),
        Hold::MovedClient(moved) => answer.moved_client = Some(super::moves::client_to_wire(&moved)),
    }
    let sealed = seal.seal(Kind::ResumeAnswer, reply.as_str(), &answer.encode_to_vec(), now_ms());
    let _ = nats.publish(reply, sealed).await;
}

/// Asks every instance whether it holds the peer of `ask`: the holder's instance and what it
/// did (`Tunnel`, `Released`, `Moved`), or `None` once every instance known alive said no
/// (those in `alive`, and those that the instances saying no know alive: one this instance has
/// not heard yet is still waited for), nobody listens, or [`ASK_WITHIN`] passed.
pub async fn ask_holder(
    nats: &async_nats::Client,
    seal: &Seal,
    replies: &Replies,
    subject: String,
    ask: &wire::ResumeAsk,
    me: InstanceId,
    alive: Vec<InstanceId>,
) -> Option<(InstanceId, Hold)> {
    let mut waiting = replies.wait();
    let request = seal.seal(Kind::ResumeAsk, &subject, &ask.encode_to_vec(), now_ms());
    nats.publish_with_reply(subject, waiting.subject.clone(), request).await.ok()?;
    let deadline = tokio::time::Instant::now() + ASK_WITHIN;
    let mut said_no = std::collections::HashSet::new();
    let mut expected: std::collections::HashSet<InstanceId> = alive.into_iter().collect();
    loop {
        let reply = tokio::time::timeout_at(deadline, waiting.replies.recv()).await.ok()??;
        if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return None;
        }
        let Some(opened) = open(seal, Kind::ResumeAnswer, reply) else { continue };
        match wire::ResumeAnswer::decode(opened.body) {
            Ok(answer) if answer.held && answer.instance != 0 => {
                return Some((answer.instance, Hold::Tunnel));
            }
            Ok(wire::ResumeAnswer { instance, released: Some(r), .. }) if instance != 0 => {
                let released = Released { next_seq: r.next_seq, last_received: r.last_received };
                return Some((instance, Hold::Released(released)));
            }
            Ok(wire::ResumeAnswer { instance, moved: Some(m), .. }) if instance != 0 => {
                // One this instance cannot take over as it is starts afresh here.
                let moved = super::moves::from_wire(instance, m)?;
                return Some((instance, Hold::Moved(Box::new(moved))));
            }
            Ok(wire::ResumeAnswer { instance, moved_client: Some(m), .. }) if instance != 0 => {
                let moved = super::moves::client_from_wire(instance, m)?;
                return Some((instance, Hold::MovedClient(Box::new(moved))));
            }
            Ok(answer) => {
                said_no.insert(answer.instance);
                expected.extend(answer.alive.iter().copied().filter(|instance| *instance != me));
                if !expected.is_empty() && expected.is_subset(&said_no) {
                    return None;
                }
            }
            Err(_) => rejected(Kind::ResumeAnswer).increment(1),
        }
    }
}

/// The replies to this instance's locates: all on one wildcard subscription, as async-nats' own
/// requests do (one subscription per request would cost NATS a subscribe and an unsubscribe,
/// propagated to every server, per lookup), each locate waiting on a token of its own.
#[derive(Clone)]
pub struct Replies {
    /// `<inbox>.`: a locate's reply subject is this and its token.
    prefix: Arc<str>,
    waiting: Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>>,
    next: Arc<AtomicU64>,
}

/// One locate's wait for its replies; stops waiting when dropped.
struct Waiting {
    subject: String,
    token: u64,
    replies: mpsc::UnboundedReceiver<async_nats::Message>,
    all: Replies,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.all.waiting.lock().expect("not poisoned").remove(&self.token);
    }
}

impl Replies {
    /// Subscribes the wildcard and hands each reply to the locate waiting on its token, from a
    /// task that ends when the subscription does (the connection drains at shutdown).
    pub async fn start(nats: &async_nats::Client) -> Result<Self, async_nats::SubscribeError> {
        let prefix: Arc<str> = format!("{}.", nats.new_inbox()).into();
        let mut subscription = nats.subscribe(format!("{prefix}*")).await?;
        let replies =
            Replies { prefix: prefix.clone(), waiting: Default::default(), next: Default::default() };
        let waiting = replies.waiting.clone();
        tokio::spawn(async move {
            while let Some(reply) = subscription.next().await {
                let token = reply.subject.strip_prefix(&*prefix).and_then(|t| t.parse::<u64>().ok());
                let waiter = token.and_then(|t| waiting.lock().expect("not poisoned").get(&t).cloned());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
        });
        Ok(replies)
    }

    fn wait(&self) -> Waiting {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.waiting.lock().expect("not poisoned").insert(token, tx);
        Waiting { subject: format!("{}{token}", self.prefix), token, replies: rx, all: self.clone() }
    }
}

/// Answers requests locating a worker registered here, until aborted.
pub async fn answer_locates(
    mut subscriber: async_nats::Subscriber,
    nats: async_nats::Client,
    seal: Seal,
    me: InstanceId,
) {
    let located = wire::Located { instance: me }.encode_to_vec();
    while let Some(request) = subscriber.next().await {
        let Some(reply) = request.reply.clone() else { continue };
        if open(&seal, Kind::Locate, request).is_none() {
            continue;
        }
        let sealed = seal.seal(Kind::Located, reply.as_str(), &located, now_ms());
        let _ = nats.publish(reply, sealed).await;
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
