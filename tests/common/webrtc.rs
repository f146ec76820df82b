//! A real WebRTC stack (str0m, sans-IO) on a UDP socket on 127.0.0.1, signaling through the
//! distributor: what a client and a worker of ours actually do with the relay.
//!
//! The peers trickle: the offer and the answer carry no candidates; each side adds its host
//! candidate after the SDP exchange and sends it as `LOCAL_ICE_CANDIDATE`, so ICE can only
//! connect if the distributor relayed the candidates intact and to the right peer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use super::{ClientStream, WorkerStream, to_client, to_worker};
use distributor::pb::RtcEvent;

/// How long ICE, DTLS, SCTP and the first messages may take on loopback.
pub const CONNECT: Duration = Duration::from_secs(10);

/// One WebRTC peer: its `Rtc`, its socket, and what it has seen so far.
pub struct RtcPeer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
    seen: Seen,
}

/// What a peer saw while the test drove it.
#[derive(Debug, Default)]
pub struct Seen {
    pub connected: bool,
    pub opened: Option<(ChannelId, String)>,
    pub data: Vec<Vec<u8>>,
}

impl RtcPeer {
    pub async fn new() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind a UDP socket on loopback");
        let local = socket.local_addr().unwrap();
        RtcPeer { rtc: Rtc::new(Instant::now()), socket, local, buf: vec![0; 2000], seen: Seen::default() }
    }

    /// This peer's host candidate, added to its ICE agent, as the line to trickle.
    pub async fn local_candidate(&mut self) -> String {
        let candidate = Candidate::host(self.local, "udp").expect("a host candidate on loopback");
        let line = candidate.to_sdp_string();
        self.rtc.add_local_candidate(candidate).expect("candidate accepted");
        self.drain().await;
        line
    }

    pub async fn add_remote_candidate(&mut self, line: &[u8]) {
        let line = std::str::from_utf8(line).expect("a candidate is text");
        let candidate = Candidate::from_sdp_string(line).expect("the candidate arrived intact");
        self.rtc.add_remote_candidate(candidate);
        self.drain().await;
    }

    /// Client: an offer for one data channel (`label`).
    pub async fn offer(&mut self, label: &str) -> (String, SdpPendingOffer) {
        let mut change = self.rtc.sdp_api();
        change.add_channel(label.to_owned());
        let (offer, pending) = change.apply().expect("an offer with a data channel");
        self.drain().await;
        (offer.to_sdp_string(), pending)
    }

    /// Worker: the answer to `offer`.
    pub async fn answer(&mut self, offer: &[u8]) -> String {
        let offer = SdpOffer::from_sdp_string(std::str::from_utf8(offer).unwrap()).expect("the offer parses");
        let answer = self.rtc.sdp_api().accept_offer(offer).expect("the offer is acceptable");
        self.drain().await;
        answer.to_sdp_string()
    }

    /// Client: applies the worker's answer.
    pub async fn accept(&mut self, pending: SdpPendingOffer, answer: &[u8]) {
        let answer =
            SdpAnswer::from_sdp_string(std::str::from_utf8(answer).unwrap()).expect("the answer parses");
        self.rtc.sdp_api().accept_answer(pending, answer).expect("the answer matches the offer");
        self.drain().await;
    }

    /// Writes `data` on an open channel.
    pub async fn write(&mut self, channel: ChannelId, data: &[u8]) {
        let mut ch = self.rtc.channel(channel).expect("the channel is open");
        assert!(ch.write(true, data).expect("the channel takes data"), "the channel has room");
        self.drain().await;
    }

    /// Polls output until str0m wants time to pass: sends what it transmits, records events.
    async fn drain(&mut self) -> Instant {
        let seen = &mut self.seen;
        loop {
            match self.rtc.poll_output().expect("str0m polls") {
                Output::Timeout(at) => return at,
                Output::Transmit(t) => {
                    // UDP on loopback: a failed send is a lost datagram, which ICE, DTLS and
                    // SCTP retransmit.
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::Connected) => seen.connected = true,
                Output::Event(Event::ChannelOpen(id, label)) => seen.opened = Some((id, label)),
                Output::Event(Event::ChannelData(d)) => seen.data.push(d.data),
                Output::Event(_) => {}
            }
        }
    }

    fn receive(&mut self, n: usize, source: SocketAddr) {
        let contents = self.buf[..n].try_into().expect("a datagram str0m understands");
        let receive = Receive { proto: Protocol::Udp, source, destination: self.local, contents };
        self.rtc.handle_input(Input::Receive(Instant::now(), receive)).expect("str0m takes the datagram");
    }
}

/// Runs both peers' networks until `done` holds or [`CONNECT`] passes.
async fn run(c: &mut RtcPeer, w: &mut RtcPeer, done: impl Fn(&Seen, &Seen) -> bool) {
    enum Next {
        Client(std::io::Result<(usize, SocketAddr)>),
        Worker(std::io::Result<(usize, SocketAddr)>),
        Time,
    }
    let deadline = Instant::now() + CONNECT;
    loop {
        let wake = c.drain().await.min(w.drain().await);
        if done(&c.seen, &w.seen) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not there within {CONNECT:?}: client {:?}, worker {:?}",
            c.seen,
            w.seen
        );
        let next = tokio::select! {
            r = c.socket.recv_from(&mut c.buf) => Next::Client(r),
            r = w.socket.recv_from(&mut w.buf) => Next::Worker(r),
            _ = tokio::time::sleep_until(wake.min(deadline).into()) => Next::Time,
        };
        // One input per `Rtc`, then the drain at the top of the loop.
        match next {
            Next::Client(received) => {
                let (n, from) = received.expect("UDP receive on loopback");
                c.receive(n, from);
            }
            Next::Worker(received) => {
                let (n, from) = received.expect("UDP receive on loopback");
                w.receive(n, from);
            }
            Next::Time => {
                let now = Instant::now();
                c.rtc.handle_input(Input::Timeout(now)).expect("str0m takes the time");
                w.rtc.handle_input(Input::Timeout(now)).expect("str0m takes the time");
            }
        }
    }
}

/// Negotiates a real data channel between a client and a worker whose streams go through the
/// distributor(s), then sends a message each way over it, peer to peer. Returns what the worker
/// received and what the client received back.
pub async fn connect_and_talk(
    client: &mut ClientStream,
    client_id: i64,
    worker: &mut WorkerStream,
    worker_id: i64,
) -> (Vec<u8>, Vec<u8>) {
    let mut c = RtcPeer::new().await;
    let mut w = RtcPeer::new().await;

    // Offer, answer, accept: the SDP goes through the relay byte for byte.
    let (offer, pending) = c.offer("signal").await;
    client.send(to_worker(worker_id, RtcEvent::Offer, offer.as_bytes())).await;
    let got = worker.recv().await;
    assert_eq!((got.event(), got.client_id), (RtcEvent::Offer, client_id));
    let answer = w.answer(&got.message).await;
    worker.send(to_client(client_id, RtcEvent::Answer, answer.as_bytes())).await;
    let got = client.recv().await;
    assert_eq!((got.event(), got.worker_machine_id), (RtcEvent::Answer, worker_id));
    c.accept(pending, &got.message).await;
    client.send(to_worker(worker_id, RtcEvent::AcceptAnswer, b"")).await;
    assert_eq!(worker.recv().await.event(), RtcEvent::AcceptAnswer);

    // Trickle: each side's only candidate reaches the other through the relay.
    let line = c.local_candidate().await;
    client.send(to_worker(worker_id, RtcEvent::LocalIceCandidate, line.as_bytes())).await;
    let line = w.local_candidate().await;
    worker.send(to_client(client_id, RtcEvent::LocalIceCandidate, line.as_bytes())).await;
    let got = worker.recv().await;
    assert_eq!((got.event(), got.client_id), (RtcEvent::IceCandidate, client_id));
    w.add_remote_candidate(&got.message).await;
    let got = client.recv().await;
    assert_eq!((got.event(), got.worker_machine_id), (RtcEvent::IceCandidate, worker_id));
    c.add_remote_candidate(&got.message).await;

    // From here the peers talk directly; the distributor is out of the path.
    let open = |s: &Seen| s.connected && s.opened.is_some();
    run(&mut c, &mut w, |c, w| open(c) && open(w)).await;
    let (c_channel, label) = c.seen.opened.clone().expect("the client's channel opened");
    let (w_channel, w_label) = w.seen.opened.clone().expect("the worker's channel opened");
    assert_eq!((label.as_str(), w_label.as_str()), ("signal", "signal"));

    c.write(c_channel, b"hello from the client").await;
    run(&mut c, &mut w, |_, w| !w.data.is_empty()).await;
    w.write(w_channel, b"hello from the worker").await;
    run(&mut c, &mut w, |c, _| !c.data.is_empty()).await;
    (w.seen.data.remove(0), c.seen.data.remove(0))
}
