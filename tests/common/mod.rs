//! Test harness: a real distributor on a free loopback port, and real tonic peers.
//!
//! Over 500 lines: the harness every integration test shares (servers, peers, waits, processes);
//! the NATS cluster, the TCP proxy and the WebRTC peer are in their own files.
#![allow(dead_code)]

pub mod nats;
pub mod proxy;
pub mod raw;
pub mod webrtc;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use std::time::Instant;

use distributor::config::Config;
use distributor::pb::client_service_client::ClientServiceClient;
use distributor::pb::worker_service_client::WorkerServiceClient;
use distributor::pb::{ClientRtcMessage, ErrorCode, RtcEvent, WorkerRtcMessage};
use distributor::server::ServerError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test watches for a message that must not come.
pub const QUIET: Duration = Duration::from_millis(300);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(Config { shards: 2, ..Config::default() }).await
    }

    pub async fn with(config: Config) -> Self {
        // RUST_LOG=distributor=debug shows the servers' logs beside a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(distributor::server::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestServer { addr, stop: Some(stop), task: Some(task) }
    }

    /// A server started elsewhere (another process), at `addr`.
    pub fn external(addr: &str) -> Self {
        TestServer { addr: addr.parse().expect("a socket address"), stop: None, task: None }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect to the distributor")
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .expect("run() returns after shutdown")
            .expect("run() did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One peer's bidirectional stream.
pub struct Stream<M> {
    tx: Option<mpsc::Sender<M>>,
    rx: Streaming<M>,
}

impl<M: std::fmt::Debug + Send + 'static> Stream<M> {
    pub async fn send(&self, msg: M) {
        self.tx.as_ref().expect("stream still open").send(msg).await.expect("request stream open");
    }

    /// The next message; fails the test if none comes within [`WAIT`] or the stream ends.
    pub async fn recv(&mut self) -> M {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) => panic!("stream ended while waiting for a message"),
            Ok(Err(status)) => panic!("stream failed while waiting for a message: {status:?}"),
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        if let Ok(next) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no message, got {next:?}");
        }
    }

    /// Waits for the stream to end and returns its status (`Code::Ok` for a clean end),
    /// skipping messages still queued before the end.
    pub async fn ended(&mut self) -> Status {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Status::ok(""),
                Ok(Err(status)) => return status,
                Err(_) => panic!("stream did not end within {WAIT:?}"),
            }
        }
    }

    /// The next message or end, without a timeout of its own.
    pub async fn rx_message(&mut self) -> Result<Option<M>, Status> {
        self.rx.message().await
    }

    /// Whether the stream still answers: sends nothing, so only checks it has not ended.
    pub async fn is_open(&mut self) -> bool {
        !matches!(tokio::time::timeout(QUIET, self.rx.message()).await, Ok(Ok(None)) | Ok(Err(_)))
    }

    /// A handle to send on this stream from another task.
    pub fn sender(&self) -> mpsc::Sender<M> {
        self.tx.clone().expect("stream still open")
    }

    /// Takes the receiving side, to read it from another task.
    pub fn take_receiver(self) -> Streaming<M> {
        self.rx
    }

    /// Closes the sending side (a clean end of the peer's stream).
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Cuts the stream without a half-close, as a lost connection does: the response side is
    /// dropped (the RPC is reset); the sending side a moment later (dropped at once, its end of
    /// stream could reach the server before the reset and read as a half-close).
    pub fn cut(self) {
        let Stream { tx, rx } = self;
        drop(rx);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(tx);
        });
    }
}

pub type ClientStream = Stream<ClientRtcMessage>;
pub type WorkerStream = Stream<WorkerRtcMessage>;

fn request<M>(rx: mpsc::Receiver<M>, metadata: &[(&'static str, String)]) -> Request<ReceiverStream<M>> {
    let mut request = Request::new(ReceiverStream::new(rx));
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    request
}

/// Opens a client stream with extra metadata, without reading anything.
pub async fn open_client(
    channel: Channel,
    metadata: &[(&'static str, String)],
) -> Result<ClientStream, Status> {
    let (tx, rx) = mpsc::channel(1024);
    let response = ClientServiceClient::new(channel).negotiate_peer_connection(request(rx, metadata)).await?;
    Ok(Stream { tx: Some(tx), rx: response.into_inner() })
}

/// A client that got its welcome; returns its stream and id.
pub async fn client(server: &TestServer) -> (ClientStream, i64) {
    client_with(server, &[]).await
}

pub async fn client_with(server: &TestServer, metadata: &[(&'static str, String)]) -> (ClientStream, i64) {
    let mut stream = open_client(server.channel().await, metadata).await.expect("client stream opens");
    let welcome = stream.recv().await;
    assert_eq!(welcome.event(), RtcEvent::Blank, "a client's first message is its welcome");
    assert_ne!(welcome.client_id, 0);
    let id = welcome.client_id;
    (stream, id)
}

/// Opens a worker stream and sends its first message, without reading anything.
pub async fn open_worker(
    channel: Channel,
    metadata: &[(&'static str, String)],
    first: WorkerRtcMessage,
) -> Result<WorkerStream, Status> {
    let (tx, rx) = mpsc::channel(1024);
    tx.send(first).await.unwrap();
    let response = WorkerServiceClient::new(channel).negotiate_peer_connection(request(rx, metadata)).await?;
    Ok(Stream { tx: Some(tx), rx: response.into_inner() })
}

pub fn blank(worker: i64) -> WorkerRtcMessage {
    WorkerRtcMessage::register(worker)
}

/// A registered worker (its `BLANK` acknowledged).
pub async fn worker(server: &TestServer, id: i64) -> WorkerStream {
    worker_with(server, id, &[]).await
}

pub async fn worker_with(server: &TestServer, id: i64, metadata: &[(&'static str, String)]) -> WorkerStream {
    let mut stream =
        open_worker(server.channel().await, metadata, blank(id)).await.expect("worker stream opens");
    let ack = stream.recv().await;
    assert_eq!((ack.event(), ack.worker_machine_id), (RtcEvent::Blank, id), "registration acknowledged");
    stream
}

pub fn to_worker(worker: i64, event: RtcEvent, payload: &[u8]) -> ClientRtcMessage {
    ClientRtcMessage::to_worker(worker, event, payload.to_vec())
}

pub fn to_client(client: i64, event: RtcEvent, payload: &[u8]) -> WorkerRtcMessage {
    WorkerRtcMessage::to_client(client, event, payload.to_vec())
}

/// Words (lower case) one of which every reason for `code` contains, so that a test checks
/// that the reason names the refusal.
fn reason_words(code: ErrorCode) -> &'static [&'static str] {
    match code {
        ErrorCode::PeerNotConnected => &["not connected", "disconnecting"],
        ErrorCode::PeerOverloaded => &["not reading"],
        ErrorCode::PayloadTooLarge => &["limit"],
        ErrorCode::RateLimited => &["faster than"],
        ErrorCode::TooManySessions => &["sessions"],
        ErrorCode::ClusterUnavailable => &["reach", "saturated", "did not answer", "queue is full"],
        ErrorCode::InvalidTransition => &[
            "offer",
            "answer",
            "accept",
            "blank",
            "ping",
            "error",
            "candidate",
            "session",
            "event",
            "registered",
            "superseded",
        ],
        _ => &[],
    }
}

/// Asserts `reason` is UTF-8 text naming the refusal `code`.
fn assert_reason(reason: &[u8], code: ErrorCode) {
    let text = std::str::from_utf8(reason).expect("a reason is text").to_lowercase();
    assert!(
        reason_words(code).iter().any(|w| text.contains(w)),
        "the reason {text:?} does not name the refusal {code:?}"
    );
}

/// Asserts `msg` is an `ERROR` with `code`, naming the refused message's worker and the refusal.
/// The next message, which must be `event` numbered `seq`; returns its payload.
pub async fn expect_numbered(c: &mut ClientStream, event: RtcEvent, seq: u64) -> Vec<u8> {
    let msg = c.recv().await;
    assert_eq!((msg.event(), msg.seq), (event, seq), "{msg:?}");
    msg.message.to_vec()
}

pub fn assert_client_error(msg: &ClientRtcMessage, code: ErrorCode, worker: i64) {
    assert_eq!(msg.event(), RtcEvent::Error, "{msg:?}");
    assert_eq!(msg.error_code(), code, "{msg:?}");
    assert_eq!(msg.worker_machine_id, worker, "{msg:?}");
    assert_reason(&msg.message, code);
}

/// Asserts `msg` is an `ERROR` with `code`, naming the refused message's client and the refusal.
pub fn assert_worker_error(msg: &WorkerRtcMessage, code: ErrorCode, client: i64) {
    assert_eq!(msg.event(), RtcEvent::Error, "{msg:?}");
    assert_eq!(msg.error_code(), code, "{msg:?}");
    assert_eq!(msg.client_id, client, "{msg:?}");
    assert_reason(&msg.message, code);
}

/// The number a test wrote in the first 4 bytes of a candidate.
pub fn number(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("a numbered payload"))
}

/// `sent` numbered candidates went from `client` to worker `w`: reads both streams until each
/// is accounted for, delivered to the worker or refused to the client with `refusal`, and
/// returns the numbers delivered, in arrival order, and the count refused. Fails after
/// `within`; then checks that nothing more comes (nothing was delivered twice).
pub async fn account_for(
    client: &mut ClientStream,
    worker: &mut WorkerStream,
    w: i64,
    sent: usize,
    refusal: ErrorCode,
    within: Duration,
) -> (Vec<u32>, usize) {
    let (mut delivered, mut refused) = (Vec::new(), 0);
    let deadline = tokio::time::Instant::now() + within;
    while delivered.len() + refused < sent {
        tokio::select! {
            msg = client.rx.message() => {
                let msg = msg.expect("client stream open").expect("client stream open");
                assert_client_error(&msg, refusal, w);
                refused += 1;
            }
            msg = worker.rx.message() => {
                let msg = msg.expect("worker stream open").expect("worker stream open");
                assert_eq!(msg.event(), RtcEvent::IceCandidate, "{msg:?}");
                delivered.push(number(&msg.message));
            }
            _ = tokio::time::sleep_until(deadline) => {
                panic!("after {within:?}, {} delivered + {refused} refused of {sent}", delivered.len())
            }
        }
    }
    client.expect_quiet().await;
    worker.expect_quiet().await;
    (delivered, refused)
}

/// Runs offer/answer/accept between `client` (id `c`) and `worker` (id `w`).
pub async fn negotiate(client: &mut ClientStream, c: i64, worker: &mut WorkerStream, w: i64) {
    client.send(to_worker(w, RtcEvent::Offer, b"offer-sdp")).await;
    let offer = match tokio::time::timeout(WAIT, worker.rx.message()).await {
        Ok(Ok(Some(msg))) => msg,
        other => {
            // What the client got instead names the reason (a refusal says why).
            let instead = tokio::time::timeout(Duration::from_millis(100), client.rx.message()).await;
            panic!("worker {w} got no OFFER ({other:?}); the client got {instead:?}");
        }
    };
    assert_eq!((offer.event(), offer.client_id, offer.worker_machine_id), (RtcEvent::Offer, c, w));
    assert_eq!(&offer.message[..], b"offer-sdp");
    worker.send(to_client(c, RtcEvent::Answer, b"answer-sdp")).await;
    let answer = client.recv().await;
    assert_eq!((answer.event(), answer.worker_machine_id, answer.client_id), (RtcEvent::Answer, w, c));
    assert_eq!(&answer.message[..], b"answer-sdp");
    client.send(to_worker(w, RtcEvent::AcceptAnswer, b"")).await;
    let accept = worker.recv().await;
    assert_eq!((accept.event(), accept.client_id), (RtcEvent::AcceptAnswer, c));
}

/// Waits until each of `a` and `b` reaches the other through NATS: a negotiation each way. NATS
/// spreads a new subscription to the other servers of its cluster asynchronously, in the order
/// they were made; once a worker's subject on one instance is reachable from the other, so is
/// everything the instance subscribed before it (its claims, its inbox).
pub async fn reach_each_other(a: &TestServer, b: &TestServer, probe: i64) {
    for (here, there, id) in [(a, b, probe), (b, a, probe + 1)] {
        let mut w = worker(there, id).await;
        let (mut c, cid) = client(here).await;
        negotiate(&mut c, cid, &mut w, id).await;
    }
}

/// A free TCP port on 127.0.0.1 for a server a test starts (free until someone binds it).
///
/// Picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), not by binding
/// port 0: a port the kernel hands out can be handed out again at once as the source port of
/// one of the many connections the tests open, and a nats-server started on it a moment later
/// cannot bind it.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    for _ in 0..1000 {
        let port = from + (rand::random::<u16>() % (to - from));
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Prometheus text a `--metrics-listen` address serves.
pub fn metrics_text(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// The value of the metric line that starts with `series` (name and labels), 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// A child process, stopped by its PID (SIGKILL) when dropped, passing or failing.
pub struct Process(pub Child);

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real binary, stopped by PID when dropped.
pub struct Binary {
    process: Process,
    pub addr: String,
}

impl Binary {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_distributor"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .envs(envs.iter().copied())
            .env_remove("PORT")
            .env_remove("DISTRIBUTOR_AUTH_SECRET")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the distributor binary");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let process = Process(child);
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep reading stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("listening line");
            if line.contains("distributor listening") {
                let start = line.find("\"local\":\"").expect("local address field") + 9;
                let end = start + line[start..].find('"').unwrap();
                break line[start..end].to_string();
            }
        };
        Binary { process, addr }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.terminate()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// Reports that the calling test could not run here, and why: a line `test skipped: NAME:
/// REASON` written past the test harness's capture, which `scripts/test.sh` counts in its
/// closing line as skipped, not passed. The test returns right after.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    // A line of its own, even where the harness has begun "test NAME ... " on the terminal's line.
    let _ = writeln!(std::io::stderr(), "\ntest skipped: {name}: {reason}");
}
