//! One peer connection's negotiation, the same task on both sides: the client offers and accepts
//! the answer, the worker answers; both trickle their candidate and add the other's.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::rtc::{self, Command, DataChannel, Happened, Net, OpenTimes};
use crate::signaling::Signal;
use distributor_proto::PeerId;
use distributor_proto::RtcEvent;

/// A peer connection to one worker (a client's) or one client (a worker's), open, with its
/// first data channel.
#[derive(Debug)]
pub struct Connection {
    /// The other peer's id: the worker's for a client, the client's for a worker.
    pub peer: PeerId,
    /// The first data channel, labelled `data`, open.
    pub channel: DataChannel,
    /// How long opening took, step by step.
    pub times: OpenTimes,
    channels: mpsc::Receiver<DataChannel>,
    events: mpsc::UnboundedReceiver<PeerEvent>,
    /// Asks the connection's task for an ICE restart or a new socket.
    control: mpsc::Sender<Control>,
    client: bool,
}

/// What a [`Connection`] asks of its task.
#[derive(Debug)]
enum Control {
    RestartIce,
    Rebind,
}

impl Connection {
    /// Restarts ICE now (new credentials, a new `OFFER` through the distributor, the same data
    /// channels), as after a network change. The client does it by itself once ICE has been
    /// disconnected for [`ICE_RESTART_AFTER`]. A worker cannot: the client always offers.
    pub async fn restart_ice(&self) -> Result<(), Error> {
        if !self.client {
            return Err(Error::Invalid("only the client restarts ICE: it always offers"));
        }
        self.control.send(Control::RestartIce).await.map_err(|_| Error::Closed)
    }

    /// Moves the connection to a new UDP socket (after a network change: a new address, or a
    /// socket that stopped working). Its candidates are trickled through the distributor; the
    /// client also restarts ICE, the worker's new candidates reach the client, which restarts
    /// ICE once the old pair is lost. The data channels stay.
    pub async fn rebind(&self) -> Result<(), Error> {
        self.control.send(Control::Rebind).await.map_err(|_| Error::Closed)
    }

    /// The next data channel opened on this connection after the first (by either side).
    pub async fn next_channel(&mut self) -> Option<DataChannel> {
        self.channels.recv().await
    }

    /// The first channel, and the channels opened after it, to serve apart.
    pub fn split(self) -> (DataChannel, mpsc::Receiver<DataChannel>) {
        (self.channel, self.channels)
    }

    /// The next thing that happened to this connection; `None` once it is over.
    pub async fn event(&mut self) -> Option<PeerEvent> {
        self.events.recv().await
    }
}

/// What happens to an open connection.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// The other peer's signaling is gone (`PEER_GONE`): no renegotiation is possible. The data
    /// channels go on while the other peer's connection does.
    PeerGone,
    /// ICE lost its pair; it may come back (the client restarts ICE after
    /// [`ICE_RESTART_AFTER`]).
    Disconnected,
    /// ICE found a pair again.
    Reconnected,
    /// A renegotiation (an ICE restart) went through: the client applied the new answer, the
    /// worker sent it.
    Renegotiated,
    /// The distributor refused one of this side's messages on this session.
    Refused(Error),
    /// The connection is over.
    Closed(String),
}

/// How long ICE may stay disconnected before the client restarts it.
pub const ICE_RESTART_AFTER: Duration = Duration::from_secs(3);

/// What the role's dispatcher hands a connection's task.
#[derive(Debug)]
pub(crate) enum ToPeer {
    Signal(Signal),
    /// The signaling started afresh: the distributor forgot this session.
    Reset,
    /// A new connection with the same peer replaces this one: it closes.
    Close,
}

/// Which side a task negotiates for, and the session's address.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Client { worker: PeerId },
    Worker { worker: PeerId, client: PeerId },
}

impl Side {
    fn signal(self, event: RtcEvent, payload: impl Into<bytes::Bytes>) -> Signal {
        match self {
            Side::Client { worker } => Signal::new(event, worker, 0, payload),
            Side::Worker { worker, client } => Signal::new(event, worker, client, payload),
        }
    }

    fn peer(self) -> PeerId {
        match self {
            Side::Client { worker } => worker,
            Side::Worker { client, .. } => client,
        }
    }
}

/// The session id of an SDP (the `o=` line's second field): the same across the renegotiations
/// of one peer connection, another for a new one.
pub(crate) fn session_id(sdp: &[u8]) -> Option<&[u8]> {
    let line = sdp.split(|b| *b == b'\n').find(|line| line.starts_with(b"o="))?;
    line.split(|b| *b == b' ').nth(1)
}

/// Sends this side's candidates, one `LOCAL_ICE_CANDIDATE` each.
async fn trickle(out: &mpsc::Sender<Signal>, side: Side, lines: Vec<String>) -> Result<(), Error> {
    for line in lines {
        out.send(side.signal(RtcEvent::LocalIceCandidate, line)).await.map_err(|_| Error::Closed)?;
    }
    Ok(())
}

/// Asks the `Rtc` task something and waits for its answer.
async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    command: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
) -> Result<T, Error> {
    let (reply, answer) = oneshot::channel();
    commands.send(command(reply)).await.map_err(|_| Error::Closed)?;
    answer.await.map_err(|_| Error::Closed)?
}

/// Negotiates and then serves one peer connection until it ends or every handle is dropped.
/// `opened` gets the connection once its first data channel is open, or why it could not.
pub(crate) async fn run(
    side: Side,
    net: Net,
    out: mpsc::Sender<Signal>,
    mut signals: mpsc::UnboundedReceiver<ToPeer>,
    opened: oneshot::Sender<Result<Connection, Error>>,
) {
    let mut opened = Some(opened);
    let fail = |opened: &mut Option<oneshot::Sender<_>>, e: Error| {
        if let Some(opened) = opened.take() {
            let _ = opened.send(Err(e));
        }
    };
    let (commands, mut happened) = match rtc::start(net).await {
        Ok(started) => started,
        Err(e) => return fail(&mut opened, e),
    };
    let send = |event, payload: bytes::Bytes| out.send(side.signal(event, payload));
    if let Side::Client { .. } = side {
        let offered = async {
            let offer = ask(&commands, |reply| Command::Offer { label: "data".into(), reply }).await?;
            send(RtcEvent::Offer, offer.into()).await.map_err(|_| Error::Closed)?;
            trickle(&out, side, ask(&commands, |reply| Command::LocalCandidates { reply }).await?).await?;
            Ok(())
        };
        if let Err(e) = offered.await {
            return fail(&mut opened, e);
        }
    }
    let (channels_tx, channels) = mpsc::channel(16);
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut open = Some((channels, events));
    let (control, mut controls) = mpsc::channel(4);
    // The client's next ICE restart, while ICE is disconnected.
    let mut restart_at: Option<tokio::time::Instant> = None;
    let client = matches!(side, Side::Client { .. });
    let mut remote_candidates = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = async { opened.as_mut().expect("guarded").closed().await }, if opened.is_some() => {
                // Nobody waits for this connection any more (the open timed out).
                let _ = commands.send(Command::Close).await;
                return;
            }
            _ = async { tokio::join!(channels_tx.closed(), events_tx.closed()) }, if open.is_none() => {
                // The connection's handle is gone: the `Rtc` lives on while a channel does.
                return;
            }
            asked = controls.recv(), if opened.is_none() => match asked {
                Some(Control::RestartIce) => restart_at = Some(tokio::time::Instant::now()),
                Some(Control::Rebind) => {
                    let rebound = async {
                        trickle(&out, side, ask(&commands, |reply| Command::Rebind { reply }).await?).await?;
                        Ok::<_, Error>(())
                    };
                    match rebound.await {
                        // The client tells the worker at once, with an ICE restart.
                        Ok(()) if client => restart_at = Some(tokio::time::Instant::now()),
                        Ok(()) => {}
                        Err(e) => {
                            let _ = events_tx.send(PeerEvent::Refused(e));
                        }
                    }
                }
                None => {}
            },
            _ = async { tokio::time::sleep_until(restart_at.expect("guarded")).await }, if restart_at.is_some() => {
                // Again later if ICE stays disconnected (until the connection gives up).
                restart_at = Some(tokio::time::Instant::now() + 2 * ICE_RESTART_AFTER);
                let restarted = async {
                    let offer = ask(&commands, |reply| Command::Restart { reply }).await?;
                    send(RtcEvent::Offer, offer.into()).await.map_err(|_| Error::Closed)?;
                    trickle(&out, side, ask(&commands, |reply| Command::LocalCandidates { reply }).await?).await?;
                    Ok::<_, Error>(())
                };
                if let Err(e) = restarted.await {
                    let _ = events_tx.send(PeerEvent::Refused(e));
                }
            }
            signal = signals.recv() => {
                let signal = match signal {
                    None => return,
                    Some(ToPeer::Reset) if opened.is_some() => {
                        let reset = "the signaling started afresh: the distributor forgot the negotiation";
                        return fail(&mut opened, Error::Ended(reset.into()));
                    }
                    Some(ToPeer::Reset) => continue,
                    Some(ToPeer::Close) => {
                        let _ = commands.send(Command::Close).await;
                        return fail(&mut opened, Error::Closed);
                    }
                    Some(ToPeer::Signal(signal)) => signal,
                };
                let signal_event = signal.event;
                let done = match signal.event {
                    RtcEvent::Offer => async {
                        let offer = signal.payload.clone();
                        let answer = ask(&commands, |reply| Command::Answer { offer, reply }).await?;
                        send(RtcEvent::Answer, answer.into()).await.map_err(|_| Error::Closed)?;
                        // Again after a renegotiation: an ICE restart forgets the remote candidates.
                        trickle(&out, side, ask(&commands, |reply| Command::LocalCandidates { reply }).await?).await?;
                        Ok(())
                    }.await,
                    RtcEvent::Answer => async {
                        let answer = signal.payload.clone();
                        ask(&commands, |reply| Command::Accept { answer, reply }).await?;
                        send(RtcEvent::AcceptAnswer, bytes::Bytes::new()).await.map_err(|_| Error::Closed)
                    }.await,
                    RtcEvent::IceCandidate => {
                        // A candidate never seen, once open: the worker moved to a new socket
                        // (`rebind`); the client restarts ICE rather than wait for the old pair
                        // to be declared lost.
                        let new = remote_candidates.insert(signal.payload.clone());
                        if new && client && opened.is_none() && restart_at.is_none() {
                            restart_at = Some(tokio::time::Instant::now());
                        }
                        commands.send(Command::RemoteCandidate(signal.payload)).await.map_err(|_| Error::Closed)
                    }
                    RtcEvent::PeerGone => Err(Error::PeerGone),
                    RtcEvent::Error => Err(Error::Refused {
                        code: signal.error,
                        reason: String::from_utf8_lossy(&signal.payload).into_owned(),
                    }),
                    _ => Ok(()),
                };
                let renegotiation = matches!(signal_event, RtcEvent::Offer | RtcEvent::Answer) && opened.is_none();
                if done.is_ok() && renegotiation {
                    let _ = events_tx.send(PeerEvent::Renegotiated);
                }
                if let Err(e) = done {
                    if opened.is_some() {
                        return fail(&mut opened, e);
                    }
                    let event = if matches!(e, Error::PeerGone) { PeerEvent::PeerGone } else { PeerEvent::Refused(e) };
                    let _ = events_tx.send(event);
                }
            }
            what = happened.recv() => match what {
                Some(Happened::Open(channel, times)) => match (opened.take(), open.take()) {
                    (Some(opened), Some((channels, events))) => {
                        let control = control.clone();
                        let connection = Connection { peer: side.peer(), channel, times, channels, events, control, client };
                        if opened.send(Ok(connection)).is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = channels_tx.send(channel).await;
                    }
                },
                Some(Happened::Disconnected) => {
                    if client {
                        restart_at.get_or_insert_with(|| tokio::time::Instant::now() + ICE_RESTART_AFTER);
                    }
                    let _ = events_tx.send(PeerEvent::Disconnected);
                }
                Some(Happened::Reconnected) => {
                    restart_at = None;
                    let _ = events_tx.send(PeerEvent::Reconnected);
                }
                Some(Happened::Closed(reason)) => {
                    fail(&mut opened, Error::rtc(reason.clone()));
                    let _ = events_tx.send(PeerEvent::Closed(reason));
                    return;
                }
                None => return,
            }
        }
    }
}
