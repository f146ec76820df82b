//! `distributor-load`: drives a running deployment the way real peers do, and measures it.
//!
//! ```sh
//! distributor-load relay --pairs 1000 --window 32 --clients-at http://127.0.0.1:50051
//! distributor-load handshake --pairs 100 --clients-at http://A --workers-at http://B
//! distributor-load echo-server --listen 127.0.0.1:50060      # the tonic ceiling
//! distributor-load relay --echo --clients-at http://127.0.0.1:50060
//! distributor-load storm --pairs 5000 --clients-at http://127.0.0.1:50051        # 10,000 peers at once
//! distributor-load resume --pairs 100 --resumes 1000 --clients-at http://127.0.0.1:50051
//! distributor-load datachannel --opens 200 --concurrent 1000 --throughput-mib 64
//! distributor-load chaos --pairs 60 --targets http://A,http://B,http://C   # scripts/chaos.sh
//! distributor-load nats-ceiling --nats-url nats://127.0.0.1:4222 --nats-url-b nats://127.0.0.1:4223
//! ```
//! Every run is bounded by `--duration` and `--max-messages`.

mod chaos;
mod datachannel;
mod echo;
mod idle;
mod nats;
mod peers;
mod report;
mod resume;
mod storm;
mod websocket;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "distributor-load", version, about = "Load generator for the distributor")]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Steady state: each pair keeps --window candidates in flight, worker-bound and back.
    Relay(Load),
    /// Full negotiations: offer, answer, accept, K candidates each way, close; again.
    Handshake(Load),
    /// A bare tonic bidi echo server on the same proto: the ceiling for `relay --echo`.
    EchoServer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50060")]
        listen: std::net::SocketAddr,
        /// `tonic`: a tonic service, as the distributor is served. `h2`: the h2 crate alone
        /// (no hyper, no tonic) answering every stream and echoing its bytes, to tell what
        /// each layer of the stack costs per connection.
        #[arg(long, value_enum, default_value_t = echo::Stack::Tonic)]
        stack: echo::Stack,
    },
    /// Raw NATS publish to subscribe through a cluster, in the same pattern as `relay`.
    NatsCeiling(nats::NatsLoad),
    /// Pairs relaying across a cluster's instances while it is hurt (scripts/chaos.sh): an
    /// exact tally of every message (delivered, refused, ended by PEER_GONE, cut, lost).
    Chaos(chaos::ChaosLoad),
    /// Resumable clients whose streams are cut and resumed under load: the time from a cut to
    /// the first replayed message, and no gap or repeat in what they receive.
    Resume(resume::ResumeLoad),
    /// --pairs workers and as many clients connecting at once, each on its own connection:
    /// peers connected per second, and the time from each connect to its welcome.
    Storm(Load),
    /// Real WebRTC data channels with the SDK: time to open against direct signaling,
    /// opens/s with many clients at once, one channel's throughput against bare str0m.
    Datachannel(datachannel::DataChannelLoad),
    /// Connects --pairs idle pairs (2 × pairs peers), then reports the server's memory per peer
    /// and its CPU time while they idle for --duration.
    Idle(Load),
}

/// How peers reach the distributor; see `--transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Ws,
}

/// The streams an echo run opens; see `--echo-shape`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EchoShape {
    Relay,
    Pairs,
}

/// What a run drives and how long.
#[derive(Args, Clone, Debug)]
pub struct Load {
    /// Client/worker pairs (workers register first).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    #[command(flatten)]
    pub at: Instances,
    #[command(flatten)]
    pub auth: Auth,
    /// Messages in flight per pair (relay).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Payload bytes per message (at least 16: a timestamp and a sequence number).
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// ICE candidates each way per handshake.
    #[arg(long, default_value_t = 4)]
    pub candidates: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long the load runs before measuring starts (not counted): new streams, the
    /// allocator and HTTP/2 windows settle first.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Relayed messages (relay, window 1) or handshakes (handshake) per second to hold, over
    /// all pairs; 0: as fast as they go.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Stop after this many messages (relay) or handshakes.
    #[arg(long, default_value_t = u64::MAX)]
    pub max_messages: u64,
    /// TCP connections per side, shared round-robin by the peers; 0: one per peer, as peers
    /// that are separate processes or devices connect (no multiplexing front end).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Drive an echo server (`distributor-load echo-server`) at --clients-at instead.
    #[arg(long)]
    pub echo: bool,
    /// With --echo: which streams the echo server sees. `pairs`: one stream per pair, each with
    /// the whole window. `relay`: what the distributor sees in `relay`: 2 x --pairs streams over
    /// 2 x --connections, each pair's --window split between its two streams.
    #[arg(long, value_enum, default_value_t = EchoShape::Pairs)]
    pub echo_shape: EchoShape,
    /// The server's PID, to report its CPU time and peak memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// First worker id; workers are numbered from it.
    #[arg(long, default_value_t = 1_000_000)]
    pub first_worker: i64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Open every stream resumable (`x-resume-after: 0`): numbered messages, kept for replay.
    #[arg(long)]
    pub resumable: bool,
    /// How peers reach the distributor: gRPC streams, or WebSockets (one connection each, the
    /// protobuf subprotocol; the `idle` scenario).
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    pub transport: Transport,
}

/// Where the peers connect.
#[derive(Args, Clone, Debug)]
pub struct Instances {
    /// The distributor clients connect to (or the echo server with `relay --echo`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub clients_at: String,
    /// The distributor workers connect to [default: --clients-at].
    #[arg(long)]
    pub workers_at: Option<String>,
}

impl Instances {
    /// Where workers connect.
    pub fn workers(&self) -> &str {
        self.workers_at.as_deref().unwrap_or(&self.clients_at)
    }
}

/// How the peers authenticate.
#[derive(Args, Clone, Debug)]
pub struct Auth {
    /// Auth secret: mint a token for every peer.
    #[arg(long, env = "DISTRIBUTOR_AUTH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

impl Auth {
    /// A bearer token for peer `id` in `role`, valid for an hour; `None` without a secret.
    pub fn token(&self, role: distributor::core::Role, id: i64) -> anyhow::Result<Option<String>> {
        let Some(secret) = &self.secret else { return Ok(None) };
        Ok(Some(distributor::auth::mint(secret.as_bytes(), role, id, Duration::from_secs(3600))?))
    }
}

impl Load {
    /// TCP connections each side opens (see `--connections`).
    pub fn per_side(&self) -> usize {
        match self.connections {
            0 => self.pairs.max(1),
            n => n.min(self.pairs).max(1),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One socket per peer with its own connection.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Scenario::EchoServer { listen, stack } => echo::serve(listen, stack).await,
            Scenario::Relay(load) => report::print(&peers::relay(load.clone()).await?, load.json),
            Scenario::Handshake(load) => report::print(&peers::handshake(load.clone()).await?, load.json),
            Scenario::Idle(load) => peers::idle(load).await,
            Scenario::Chaos(load) => chaos::run(load).await,
            Scenario::Resume(load) => resume::run(load).await,
            Scenario::Storm(load) => storm::run(load).await,
            Scenario::Datachannel(load) => datachannel::run(load).await,
            Scenario::NatsCeiling(load) => {
                let json = load.load.json;
                report::print(&nats::ceiling(load).await?, json)
            }
        }
    })
}
