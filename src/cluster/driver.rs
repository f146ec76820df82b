//! The bridge's NATS task: a thin driver that feeds the sans-IO [`Bridge`] what arrives (its
//! queue, the inbox, claims, heartbeats, locate answers, a timer) and carries out what it asks
//! (publishes and locates).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::bridge::{Bridge, Output};
use super::directory::Lookup;
use super::{Subjects, wire};
use crate::core::{InstanceId, PeerId};
use crate::metrics as names;
use crate::peer::ToCluster;

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
    Frame(Option<async_nats::Message>),
    Control(Control),
    Claim(async_nats::Message),
    Heartbeat(async_nats::Message),
    Tick,
}

pub struct Driver {
    pub bridge: Bridge,
    pub me: InstanceId,
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub control: mpsc::UnboundedSender<Control>,
}

impl Driver {
    fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Runs until shutdown (or until the queues close).
    pub async fn run(
        mut self,
        mut queue: mpsc::Receiver<ToCluster>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), async_nats::SubscribeError> {
        let mut inbox = self.nats.subscribe(self.subjects.inbox(self.me)).await?;
        let mut claims = self.nats.subscribe(self.subjects.claim()).await?;
        let mut beats = self.nats.subscribe(self.subjects.heartbeat()).await?;
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
                msg = inbox.next(), if !backlogged => Event::Frame(msg),
                Some(control) = control.recv() => Event::Control(control),
                Some(msg) = claims.next() => Event::Claim(msg),
                Some(msg) = beats.next() => Event::Heartbeat(msg),
                _ = tick.tick() => Event::Tick,
            };
            // Read after the wait: what is handled now sees the connection as it is now.
            self.bridge.set_connected(self.connected());
            let now = Instant::now();
            match event {
                Event::Command(None) | Event::Frame(None) => break,
                Event::Command(Some(command)) => {
                    self.bridge.command(command);
                    for _ in 1..BATCH {
                        match queue.try_recv() {
                            Ok(command) => self.bridge.command(command),
                            Err(_) => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::Frame(Some(msg)) => {
                    self.bridge.frame(msg.payload, now);
                    for _ in 1..BATCH {
                        match inbox.next().now_or_never() {
                            Some(Some(msg)) => self.bridge.frame(msg.payload, now),
                            _ => break,
                        }
                    }
                    self.bridge.flush(now);
                }
                Event::Control(Control::Located { worker, found }) => {
                    self.bridge.located(worker, found);
                    self.bridge.flush(now);
                }
                Event::Control(Control::Shutdown { done: reply }) => {
                    self.bridge.leave(now);
                    done = Some(reply);
                }
                Event::Claim(msg) => {
                    self.bridge.claim(msg.payload);
                    self.bridge.flush(now);
                }
                Event::Heartbeat(msg) => self.bridge.heartbeat(msg.payload, now),
                Event::Tick => {
                    self.bridge.tick(now);
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
        Ok(())
    }

    /// Publishes and looks up what the bridge asked for.
    async fn carry_out(&mut self) {
        while let Some(output) = self.bridge.poll_output() {
            match output {
                Output::ToInstance(instance, frame) => {
                    if let Err(e) = self.nats.publish(self.subjects.inbox(instance), frame).await {
                        tracing::debug!("publish failed, the link will resend: {e}");
                    }
                }
                Output::Heartbeat(beat) => {
                    let _ = self.nats.publish(self.subjects.heartbeat(), beat).await;
                }
                Output::Locate(worker) => {
                    let (nats, subject, control) =
                        (self.nats.clone(), self.subjects.worker(worker), self.control.clone());
                    tokio::spawn(async move {
                        let found = locate(&nats, subject).await;
                        let _ = control.send(Control::Located { worker, found });
                    });
                }
            }
        }
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
