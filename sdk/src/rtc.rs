//! One peer connection: a task owning str0m's sans-IO `Rtc` and its UDP socket.
//!
//! The task is the only owner of the `Rtc`: the role that negotiates (client or worker) asks it
//! for an offer, an answer, its candidates, through `Command`s, and data channels write through
//! it too. It feeds the `Rtc` datagrams and time, sends what it transmits, and reports what
//! happens as `Happened`. Nothing here touches signaling: once open, a data channel lives as
//! long as its peer connection, whatever becomes of the signaling stream.
//!
//! Over 500 lines: one task owns the `Rtc`, and its commands, its events and the data channels'
//! writes all act on that one state.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::sockets::Sockets;

/// Bytes a data channel may have written and not yet acknowledged by the other peer before a
/// `send` waits (str0m buffers 128 KiB by default; 32 KiB measured ~5 times faster on loopback).
const SEND_BUFFER: usize = 32 * 1024;

/// The largest message a data channel sends: SCTP's buffer holds `SEND_BUFFER` and one more
/// message of at most this size.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// How long ICE may stay disconnected before the connection is given up.
pub const ICE_GIVE_UP: Duration = Duration::from_secs(30);

/// How long a closing connection sends what its close says.
const CLOSING: Duration = Duration::from_secs(1);

/// Messages received on a channel that wait for its reader before the connection stops reading
/// its socket (and the other peer's SCTP slows down).
const RECV_QUEUE: usize = 256;

/// Where a peer connection's sockets bind, and whom it asks for a server-reflexive candidate.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    /// The one address to bind (a host candidate on a fresh port); `None`: every interface
    /// address (see `sockets::host_addresses`).
    pub bind: Option<IpAddr>,
    /// A STUN server: its answer is a server-reflexive candidate (what a NAT makes of the
    /// socket), trickled beside the host one.
    pub stun: Option<SocketAddr>,
}

/// How long each step of opening took, from the first offer or answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpenTimes {
    /// Until the SDP exchange was done (the answer applied, or sent).
    pub signaling: Duration,
    /// Until ICE found a working pair.
    pub ice: Duration,
    /// Until DTLS was up.
    pub dtls: Duration,
    /// Until the data channel was open (SCTP and its channel handshake).
    pub channel: Duration,
}

/// What the role asks of its peer connection.
pub(crate) enum Command {
    Offer {
        label: String,
        reply: oneshot::Sender<Result<String, Error>>,
    },
    Answer {
        offer: Bytes,
        reply: oneshot::Sender<Result<String, Error>>,
    },
    Accept {
        answer: Bytes,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// This side's candidates (host, and server-reflexive with a STUN server), added to its
    /// ICE agent, as the lines to trickle.
    LocalCandidates {
        reply: oneshot::Sender<Result<Vec<String>, Error>>,
    },
    RemoteCandidate(Bytes),
    /// A new socket (the network changed): its candidates, to trickle. The old socket is closed.
    Rebind {
        reply: oneshot::Sender<Result<Vec<String>, Error>>,
    },
    /// An ICE restart (new credentials, the same candidates): the offer to send.
    Restart {
        reply: oneshot::Sender<Result<String, Error>>,
    },
    /// Another data channel on an open connection (no renegotiation needed).
    OpenChannel {
        label: String,
    },
    Write {
        channel: ChannelId,
        data: Bytes,
        done: oneshot::Sender<Result<(), Error>>,
    },
    /// Ends the connection (SCTP shutdown, DTLS close_notify): the other peer's channels end.
    Close,
}

/// What happened on a peer connection, for the role that owns it.
#[derive(Debug)]
pub(crate) enum Happened {
    Open(DataChannel, OpenTimes),
    /// ICE lost every pair (it may come back, or after an ICE restart).
    Disconnected,
    /// ICE found a pair again.
    Reconnected,
    /// The connection is over (closed by the other peer, or its DTLS/SCTP failed).
    Closed(String),
}

/// One data channel of a peer connection.
#[derive(Debug)]
pub struct DataChannel {
    id: ChannelId,
    label: String,
    commands: mpsc::Sender<Command>,
    incoming: mpsc::Receiver<Bytes>,
}

impl DataChannel {
    /// The label it was opened with (`data` for a connection's first channel).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends `data` (one message), waiting while the channel has `SEND_BUFFER` bytes or more
    /// unacknowledged: memory stays bounded however fast the caller sends.
    pub async fn send(&self, data: Bytes) -> Result<(), Error> {
        send(&self.commands, self.id, data).await
    }

    /// A handle that sends on this channel, for a task apart from the one reading it.
    pub fn sender(&self) -> ChannelSender {
        ChannelSender { id: self.id, commands: self.commands.clone() }
    }

    /// The next message, or `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.incoming.recv().await
    }

    /// Opens another data channel on the same connection: both sides get it from
    /// [`Connection::next_channel`](crate::Connection::next_channel).
    pub async fn open_another(&self, label: &str) -> Result<(), Error> {
        let open = Command::OpenChannel { label: label.to_owned() };
        self.commands.send(open).await.map_err(|_| Error::Closed)
    }
}

/// Sends on a [`DataChannel`] (see [`DataChannel::send`]).
#[derive(Clone, Debug)]
pub struct ChannelSender {
    id: ChannelId,
    commands: mpsc::Sender<Command>,
}

impl ChannelSender {
    /// Sends `data` (one message) on the channel: see [`DataChannel::send`].
    pub async fn send(&self, data: Bytes) -> Result<(), Error> {
        send(&self.commands, self.id, data).await
    }
}

async fn send(commands: &mpsc::Sender<Command>, channel: ChannelId, data: Bytes) -> Result<(), Error> {
    let (done, written) = oneshot::channel();
    commands.send(Command::Write { channel, data, done }).await.map_err(|_| Error::Closed)?;
    written.await.map_err(|_| Error::Closed)?
}

/// A channel's state inside the task.
struct Open {
    incoming: mpsc::Sender<Bytes>,
    /// Writes waiting for room in the send buffer, in order.
    waiting: VecDeque<(Bytes, oneshot::Sender<Result<(), Error>>)>,
}

/// Fresh sockets for a peer connection, and what the STUN server saw of the primary one.
async fn bind(net: Net) -> Result<(Sockets, Option<(SocketAddr, SocketAddr)>), Error> {
    let sockets = Sockets::bind(&crate::sockets::host_addresses(net.bind)).await?;
    let reflexive = match net.stun {
        Some(server) => {
            let (socket, local) = sockets.primary();
            let mapped = crate::stun::reflexive(socket, server).await;
            if mapped.is_none() {
                tracing::warn!(%server, "the STUN server did not answer: host candidates only");
            }
            mapped.map(|mapped| (mapped, local))
        }
        None => None,
    };
    Ok((sockets, reflexive))
}

/// Starts a peer connection's task; returns its command queue and what it reports.
pub(crate) async fn start(net: Net) -> Result<(mpsc::Sender<Command>, mpsc::Receiver<Happened>), Error> {
    let (sockets, reflexive) = bind(net).await?;
    let rtc = Rtc::builder().set_sctp_max_buffered_amount(SEND_BUFFER + MAX_MESSAGE).build(Instant::now());
    let (commands, commands_rx) = mpsc::channel(64);
    let (happened_tx, happened) = mpsc::channel(16);
    let task = Task {
        rtc,
        net,
        sockets,
        reflexive,
        candidates: Vec::new(),
        buf: vec![0; 2048],
        commands: commands_rx,
        me: commands.downgrade(),
        happened: happened_tx,
        channels: HashMap::new(),
        pending: None,
        started: None,
        times: OpenTimes::default(),
        lost_since: None,
        closed_by_peer: false,
    };
    tokio::spawn(task.run());
    Ok((commands, happened))
}

struct Task {
    rtc: Rtc,
    net: Net,
    sockets: Sockets,
    /// What the STUN server saw of the primary socket, and that socket's address.
    reflexive: Option<(SocketAddr, SocketAddr)>,
    /// This side's candidates, as trickled.
    candidates: Vec<String>,
    buf: Vec<u8>,
    commands: mpsc::Receiver<Command>,
    /// For the channels it hands out (weak, so that the task ends once nobody holds one).
    me: mpsc::WeakSender<Command>,
    happened: mpsc::Sender<Happened>,
    channels: HashMap<ChannelId, Open>,
    /// The client's offer, until the answer comes.
    pending: Option<SdpPendingOffer>,
    started: Option<Instant>,
    times: OpenTimes,
    /// Since when ICE has been disconnected.
    lost_since: Option<Instant>,
    closed_by_peer: bool,
}

/// The WebRTC stack's error `e`, while doing `what`.
fn rtc_error<E: std::error::Error + Send + Sync + 'static>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Rtc { what: what.into(), cause: Some(Arc::new(e)) }
}

/// A payload that must be text (an SDP, a candidate line), as `what`.
fn text<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes).map_err(rtc_error(what))
}

impl Task {
    async fn run(mut self) {
        loop {
            let wake = match self.drain().await {
                Ok(wake) => wake,
                Err(reason) => {
                    let _ = self.happened.send(Happened::Closed(reason)).await;
                    return;
                }
            };
            if self.closed_by_peer {
                return self.close("the other peer closed the connection").await;
            }
            let timeout = tokio::time::sleep_until(wake.into());
            tokio::select! {
                received = self.sockets.recv(&mut self.buf) => {
                    if let Ok((n, source, destination)) = received {
                        self.receive(n, source, destination);
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Close) => return self.close("closed here").await,
                    Some(Command::Rebind { reply }) => {
                        let _ = reply.send(self.rebind().await);
                    }
                    Some(command) => self.command(command),
                    // Every handle is gone: the connection closes.
                    None => return self.close("every handle was dropped").await,
                },
                _ = timeout => {
                    let now = Instant::now();
                    if self.lost_since.is_some_and(|since| now - since >= ICE_GIVE_UP) {
                        let reason = format!("ICE lost the other peer for {ICE_GIVE_UP:?}");
                        return self.close(&reason).await;
                    }
                    let _ = self.rtc.handle_input(Input::Timeout(now));
                }
            }
        }
    }

    fn command(&mut self, command: Command) {
        let started = *self.started.get_or_insert_with(Instant::now);
        match command {
            Command::Offer { label, reply } => {
                let _ = reply.send(self.offer(|change| {
                    change.add_channel(label);
                }));
            }
            Command::Answer { offer, reply } => {
                let answer = text(&offer, "an offer that is not UTF-8 text")
                    .and_then(|sdp| SdpOffer::from_sdp_string(sdp).map_err(rtc_error("an offer's SDP")))
                    .and_then(|offer| {
                        self.rtc.sdp_api().accept_offer(offer).map_err(rtc_error("accepting the offer"))
                    })
                    .map(|answer| answer.to_sdp_string());
                if answer.is_ok() {
                    self.times.signaling = started.elapsed();
                }
                let _ = reply.send(answer);
            }
            Command::Accept { answer, reply } => {
                let accepted = match self.pending.take() {
                    None => Err(Error::rtc("an answer without an offer")),
                    Some(pending) => text(&answer, "an answer that is not UTF-8 text")
                        .and_then(|sdp| SdpAnswer::from_sdp_string(sdp).map_err(rtc_error("an answer's SDP")))
                        .and_then(|answer| {
                            self.rtc
                                .sdp_api()
                                .accept_answer(pending, answer)
                                .map_err(rtc_error("accepting the answer"))
                        }),
                };
                if accepted.is_ok() {
                    self.times.signaling = started.elapsed();
                }
                let _ = reply.send(accepted);
            }
            Command::LocalCandidates { reply } => {
                let _ = reply.send(self.local_candidates());
            }
            Command::RemoteCandidate(line) => {
                let candidate = text(&line, "a candidate that is not UTF-8 text")
                    .and_then(|l| Candidate::from_sdp_string(l).map_err(rtc_error("a candidate line")));
                match candidate {
                    Ok(candidate) => self.rtc.add_remote_candidate(candidate),
                    Err(e) => tracing::debug!(
                        error = &e as &dyn std::error::Error,
                        "a remote candidate was not understood"
                    ),
                }
            }
            Command::Restart { reply } => {
                let _ = reply.send(self.offer(|change| {
                    change.ice_restart(true);
                }));
            }
            Command::OpenChannel { label } => {
                let mut change = self.rtc.sdp_api();
                change.add_channel(label);
                // On an open connection a channel needs no renegotiation.
                if let Some((_, pending)) = change.apply() {
                    self.pending = Some(pending);
                }
            }
            // Handled by the loop (they end the task, or wait for a socket).
            Command::Close | Command::Rebind { .. } => {}
            Command::Write { data, done, .. } if data.len() > MAX_MESSAGE => {
                let too_large = format!("a message of {} bytes; the most is {MAX_MESSAGE}", data.len());
                let _ = done.send(Err(Error::rtc(too_large)));
            }
            Command::Write { channel, data, done } => match self.channels.get_mut(&channel) {
                None => {
                    let _ = done.send(Err(Error::Closed));
                }
                Some(open) => {
                    open.waiting.push_back((data, done));
                    self.write_waiting(channel);
                }
            },
        }
    }

    /// Moves to new sockets on the addresses the network now gives: their candidates replace
    /// the old ones, which stop answering.
    async fn rebind(&mut self) -> Result<Vec<String>, Error> {
        (self.sockets, self.reflexive) = bind(self.net).await?;
        self.candidates.clear();
        self.local_candidates()
    }

    /// Adds this side's candidates to its ICE agent (once); returns them as lines to trickle
    /// (again after each renegotiation: an ICE restart forgets the remote candidates).
    fn local_candidates(&mut self) -> Result<Vec<String>, Error> {
        if !self.candidates.is_empty() {
            return Ok(self.candidates.clone());
        }
        let mut candidates = self
            .sockets
            .locals()
            .map(|local| Candidate::host(local, "udp"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(rtc_error("a host candidate"))?;
        if let Some((mapped, base)) = self.reflexive {
            candidates.push(
                Candidate::server_reflexive(mapped, base, "udp")
                    .map_err(rtc_error("a reflexive candidate"))?,
            );
        }
        let mut lines = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let line = candidate.to_sdp_string();
            // str0m drops a candidate it already has (a reflexive one equal to the host).
            if self.rtc.add_local_candidate(candidate).is_some() {
                lines.push(line);
            }
        }
        if lines.is_empty() {
            return Err(Error::rtc("no local candidate was accepted"));
        }
        self.candidates = lines.clone();
        Ok(lines)
    }

    /// An offer for the changes `make` asks for; the answer is awaited as `pending`.
    fn offer(&mut self, make: impl FnOnce(&mut str0m::change::SdpApi)) -> Result<String, Error> {
        let mut change = self.rtc.sdp_api();
        make(&mut change);
        let (offer, pending) = change.apply().ok_or_else(|| Error::rtc("nothing to offer"))?;
        self.pending = Some(pending);
        Ok(offer.to_sdp_string())
    }

    /// Writes what waits on `channel` while its send buffer has room.
    fn write_waiting(&mut self, id: ChannelId) {
        let Some(open) = self.channels.get_mut(&id) else { return };
        while let Some((data, _)) = open.waiting.front() {
            let Some(mut channel) = self.rtc.channel(id) else {
                for (_, done) in open.waiting.drain(..) {
                    let _ = done.send(Err(Error::Closed));
                }
                return;
            };
            if channel.buffered_amount() >= SEND_BUFFER {
                return;
            }
            match channel.write(true, data) {
                Ok(true) => {
                    let (_, done) = open.waiting.pop_front().expect("looked at");
                    let _ = done.send(Ok(()));
                }
                // No room: waits for the buffered amount to drop.
                Ok(false) => return,
                Err(e) => {
                    let (_, done) = open.waiting.pop_front().expect("looked at");
                    let _ = done.send(Err(rtc_error("writing to the data channel")(e)));
                }
            }
        }
    }

    /// Closes the connection: sends what the close says for [`CLOSING`] at most, then reports.
    async fn close(mut self, reason: &str) {
        let _ = self.rtc.close();
        let until = Instant::now() + CLOSING;
        while let Ok(wake) = self.drain().await {
            if Instant::now() >= until {
                break;
            }
            tokio::select! {
                received = self.sockets.recv(&mut self.buf) => {
                    if let Ok((n, source, destination)) = received {
                        self.receive(n, source, destination);
                    }
                }
                _ = tokio::time::sleep_until(wake.min(until).into()) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
        let _ = self.happened.send(Happened::Closed(reason.to_owned())).await;
    }

    /// Hands a datagram to the `Rtc`. A failed receive on UDP (an ICMP error for an earlier
    /// datagram) or a datagram str0m does not understand loses nothing the protocols above do
    /// not retransmit.
    fn receive(&mut self, n: usize, source: SocketAddr, destination: SocketAddr) {
        if let Ok(contents) = self.buf[..n].try_into() {
            let receive = Receive { proto: Protocol::Udp, source, destination, contents };
            let _ = self.rtc.handle_input(Input::Receive(Instant::now(), receive));
        }
    }

    /// Polls the `Rtc` until it wants time to pass; `Err` once the connection is over.
    async fn drain(&mut self) -> Result<Instant, String> {
        loop {
            if !self.rtc.is_alive() {
                return Err("the peer connection closed".into());
            }
            let output = self.rtc.poll_output().map_err(|e| e.to_string())?;
            match output {
                Output::Timeout(at) => return Ok(at),
                Output::Transmit(t) => self.sockets.send(t.source, t.destination, &t.contents).await,
                Output::Event(event) => self.event(event).await,
            }
        }
    }

    async fn event(&mut self, event: Event) {
        let since = || self.started.map(|s| s.elapsed()).unwrap_or_default();
        match event {
            Event::IceConnectionStateChange(
                IceConnectionState::Connected | IceConnectionState::Completed,
            ) if self.times.ice.is_zero() => {
                self.times.ice = since();
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.lost_since.get_or_insert_with(Instant::now);
                let _ = self.happened.send(Happened::Disconnected).await;
            }
            Event::IceConnectionStateChange(
                IceConnectionState::Connected | IceConnectionState::Completed,
            ) if self.lost_since.is_some() => {
                self.lost_since = None;
                let _ = self.happened.send(Happened::Reconnected).await;
            }
            Event::Connected => self.times.dtls = since(),
            Event::ChannelOpen(id, label) => {
                if let Some(mut channel) = self.rtc.channel(id) {
                    channel.set_buffered_amount_low_threshold(SEND_BUFFER / 2);
                }
                if self.times.channel.is_zero() {
                    self.times.channel = since();
                }
                let Some(commands) = self.me.upgrade() else { return };
                let (incoming_tx, incoming) = mpsc::channel(RECV_QUEUE);
                self.channels.insert(id, Open { incoming: incoming_tx, waiting: VecDeque::new() });
                let channel = DataChannel { id, label, commands, incoming };
                let _ = self.happened.send(Happened::Open(channel, self.times)).await;
            }
            Event::ChannelData(data) => {
                if let Some(open) = self.channels.get(&data.id) {
                    // A slow reader holds the connection's reading back (SCTP then slows the
                    // sender) rather than growing a queue.
                    let _ = open.incoming.send(Bytes::from(data.data)).await;
                }
            }
            Event::ChannelBufferedAmountLow(id) => self.write_waiting(id),
            Event::ChannelClose(id) => {
                if let Some(open) = self.channels.remove(&id) {
                    for (_, done) in open.waiting {
                        let _ = done.send(Err(Error::Closed));
                    }
                }
            }
            // The other peer closed (DTLS close_notify or SCTP shutdown).
            Event::Closed => self.closed_by_peer = true,
            _ => {}
        }
    }
}
