//! Command-line flags and their environment fallbacks, checked before anything binds.
//!
//! Over 500 lines: every setting is here, each with its doc line, default and
//! environment variable, beside the checks that refuse a bad combination: one place to find
//! what a flag does.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::{Expect, MIN_SECRET_BYTES};
use crate::cluster::NatsConfig;
use crate::core::{PeerId, Role};

/// The largest gRPC frame a peer may send; a bigger one ends its stream with `RESOURCE_EXHAUSTED`.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The defaults of `distributor serve`, written once: the flags and [`Config::default`] use them.
pub mod defaults {
    use std::time::Duration;

    /// The gRPC port when neither `--listen` nor `PORT` is given.
    pub const PORT: u16 = 50051;
    /// Inline routing: measured faster than shard threads on the 2-core machines we run on,
    /// where a thread wake-up per message costs more than the routing (BENCHMARKS.md).
    pub const SHARDS: usize = 0;
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
    pub const PEER_QUEUE: usize = 1024;
    pub const SHARD_QUEUE: usize = 65_536;
    pub const KEEPALIVE: Duration = Duration::from_secs(20);
    /// Inside Cloud Run's 10 s between SIGTERM and the end.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);
    pub const RESUME_GRACE: Duration = Duration::from_secs(15);
    pub const NATS_PREFIX: &str = "distributor";
    /// A front-end proxy (Cloud Run's) multiplexes many peers on one connection: far above
    /// hyper's 200, far below unbounded.
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 1000;
    pub const MAX_CONNECTIONS: usize = 100_000;
    pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Messages per second per stream. Real signaling is a few per second per session; a
    /// worker answering a storm of clients sends more, so the default is far above both.
    pub const PEER_RATE: u32 = 2000;
    pub const PEER_BURST: u32 = 4000;
    pub const MAX_SESSIONS_PER_CLIENT: usize = 64;
}

/// Protection against abusive peers. See SECURITY.md.
#[derive(Debug, Clone)]
pub struct Limits {
    /// HTTP/2 streams one connection may hold open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// TCP connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a worker stream may take to send its registration `BLANK`.
    pub register_timeout: Duration,
    /// Messages per second each stream may send, on average (0: no limit).
    pub peer_rate: u32,
    /// Messages a stream may send at once above the rate.
    pub peer_burst: u32,
    /// Sessions one client stream may hold at once (0: no limit).
    pub max_sessions_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            max_connections: defaults::MAX_CONNECTIONS,
            register_timeout: defaults::REGISTER_TIMEOUT,
            peer_rate: defaults::PEER_RATE,
            peer_burst: defaults::PEER_BURST,
            max_sessions_per_client: defaults::MAX_SESSIONS_PER_CLIENT,
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "distributor", version, about = "WebRTC signaling relay over gRPC")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, the default command.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the signaling relay (the default).
    Serve(Box<ServeArgs>),
    /// Print a bearer token for a peer, signed with the auth secret.
    Token(TokenArgs),
    /// Ask a running distributor's health service; exit 0 if it is SERVING (for container
    /// health checks and scripts).
    Health(HealthArgs),
    /// Run an echo worker: every message on every data channel a client opens comes back.
    #[cfg(feature = "peers")]
    Worker(crate::peers::WorkerArgs),
    /// Open a data channel to a worker, check its echo byte for byte, and report the time to
    /// open, round trips and throughput.
    #[cfg(feature = "peers")]
    Client(crate::peers::ClientArgs),
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The distributor to ask [default: http://127.0.0.1:$PORT, else port 50051].
    #[arg(long)]
    pub addr: Option<String>,
    /// The health service name ("": the whole server; `distributor.cluster`: the NATS link).
    #[arg(long, default_value = "")]
    pub service: String,
    /// How long to wait for an answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on [default: with --auth-secret, 0.0.0.0:$PORT if PORT is set,
    /// else 0.0.0.0:50051; without, 127.0.0.1:50051].
    #[arg(long, env = "DISTRIBUTOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve without --auth-secret on an address other than loopback (any peer may then claim
    /// any id), or join a NATS cluster off loopback without a cluster key. The variable takes
    /// 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "DISTRIBUTOR_ALLOW_OPEN", value_parser = BoolishValueParser::new())]
    pub allow_open: bool,
    /// Routing shard threads; 0 routes inline on the gRPC tasks instead.
    #[arg(long, env = "DISTRIBUTOR_SHARDS", default_value_t = defaults::SHARDS)]
    pub shards: usize,
    /// Largest `message` payload relayed; larger ones get ERROR{PAYLOAD_TOO_LARGE}.
    #[arg(long, env = "DISTRIBUTOR_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Messages queued per peer before deliveries to it are refused with PEER_OVERLOADED.
    #[arg(long, env = "DISTRIBUTOR_PEER_QUEUE", default_value_t = defaults::PEER_QUEUE)]
    pub peer_queue: usize,
    /// Commands queued per shard before senders wait.
    #[arg(long, env = "DISTRIBUTOR_SHARD_QUEUE", default_value_t = defaults::SHARD_QUEUE)]
    pub shard_queue: usize,
    /// HTTP/2 keepalive ping interval; a peer that does not answer within the same time again
    /// is considered gone.
    #[arg(long, env = "DISTRIBUTOR_KEEPALIVE", default_value_t = defaults::KEEPALIVE.into())]
    pub keepalive: humantime::Duration,
    /// The `Origin`s a browser page may open a WebSocket from (comma-separated, e.g.
    /// `https://app.example.com`); others are refused with 403. Empty: any origin.
    #[arg(long, env = "DISTRIBUTOR_WS_ORIGINS", value_delimiter = ',')]
    pub ws_origins: Vec<String>,
    /// Time allowed for streams to end after SIGTERM/SIGINT before the process exits anyway.
    #[arg(long, env = "DISTRIBUTOR_DRAIN_TIMEOUT", default_value_t = defaults::DRAIN_TIMEOUT.into())]
    pub drain_timeout: humantime::Duration,
    /// HS256 secret (at least 32 bytes); when set every stream needs `authorization: Bearer <jwt>`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Tokens must carry this `iss`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// Tokens must carry this `aud`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// Key (at least 32 bytes) that authenticates what instances say to each other over NATS
    /// [default: derived from --auth-secret and --nats-prefix].
    #[arg(long, env = "DISTRIBUTOR_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<String>,
    /// HTTP/2 streams one connection may hold open at once.
    #[arg(long, env = "DISTRIBUTOR_MAX_STREAMS_PER_CONNECTION", default_value_t = defaults::MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,
    /// TCP connections served at once; more wait to be accepted.
    #[arg(long, env = "DISTRIBUTOR_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Time a worker stream has to send its registration BLANK.
    #[arg(long, env = "DISTRIBUTOR_REGISTER_TIMEOUT", default_value_t = defaults::REGISTER_TIMEOUT.into())]
    pub register_timeout: humantime::Duration,
    /// Messages per second a stream may send on average; the excess gets ERROR{RATE_LIMITED}
    /// (0: no limit).
    #[arg(long, env = "DISTRIBUTOR_PEER_RATE", default_value_t = defaults::PEER_RATE)]
    pub peer_rate: u32,
    /// Messages a stream may send at once above --peer-rate.
    #[arg(long, env = "DISTRIBUTOR_PEER_BURST", default_value_t = defaults::PEER_BURST)]
    pub peer_burst: u32,
    /// Sessions a client stream may hold at once; the OFFER that would open one more gets
    /// ERROR{TOO_MANY_SESSIONS} (0: no limit).
    #[arg(long, env = "DISTRIBUTOR_MAX_SESSIONS_PER_CLIENT", default_value_t = defaults::MAX_SESSIONS_PER_CLIENT)]
    pub max_sessions_per_client: usize,
    /// Serve Prometheus metrics on this address (path /metrics).
    #[arg(long, env = "DISTRIBUTOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "DISTRIBUTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How long a resumable peer (`x-resume-after`) whose stream was cut stays detached, its
    /// sessions kept and its messages held, for a new stream to take it over (0: resume off).
    #[arg(long, env = "DISTRIBUTOR_RESUME_GRACE", default_value_t = defaults::RESUME_GRACE.into())]
    pub resume_grace: humantime::Duration,
    /// Tell a resumable stream `RECONNECT` once it is this old (less up to a tenth, at random),
    /// before a platform's request timeout ends it (Cloud Run: at most 60 minutes) [default: never].
    #[arg(long, env = "DISTRIBUTOR_MAX_STREAM_AGE")]
    pub max_stream_age: Option<humantime::Duration>,
    /// For tests only: shifts this instance's clock by this many milliseconds.
    #[arg(
        long,
        hide = true,
        env = "DISTRIBUTOR_TEST_CLOCK_SKEW_MS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub test_clock_skew_ms: i64,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// Cluster mode: instances reach each other's peers over NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS servers, comma-separated (e.g. nats://a:4222,nats://b:4222); turns cluster mode on.
    #[arg(long, env = "DISTRIBUTOR_NATS_URL")]
    pub nats_url: Option<String>,
    /// Subject prefix, so that several deployments can share one NATS cluster.
    #[arg(long, env = "DISTRIBUTOR_NATS_PREFIX", default_value = defaults::NATS_PREFIX)]
    pub nats_prefix: String,
    /// NATS user (with --nats-password).
    #[arg(long, env = "DISTRIBUTOR_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "DISTRIBUTOR_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "DISTRIBUTOR_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS NKey seed.
    #[arg(long, env = "DISTRIBUTOR_NATS_NKEY", hide_env_values = true)]
    pub nats_nkey: Option<String>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "DISTRIBUTOR_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to verify the NATS servers with.
    #[arg(long, env = "DISTRIBUTOR_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS (with --nats-tls-key).
    #[arg(long, env = "DISTRIBUTOR_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for NATS mutual TLS.
    #[arg(long, env = "DISTRIBUTOR_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// Refuse a NATS connection without TLS (the variable: 1/0, true/false, yes/no, on/off).
    #[arg(long, env = "DISTRIBUTOR_NATS_REQUIRE_TLS", value_parser = BoolishValueParser::new())]
    pub nats_require_tls: bool,
}

impl NatsArgs {
    fn into_config(self) -> Result<Option<NatsConfig>, ConfigError> {
        let Some(url) = self.nats_url.filter(|u| !u.trim().is_empty()) else { return Ok(None) };
        let prefix_ok = !self.nats_prefix.is_empty()
            && self.nats_prefix.split('.').all(|t| {
                !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !prefix_ok {
            return Err(ConfigError::NatsPrefix(self.nats_prefix));
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return Err(ConfigError::Pair("--nats-user", "--nats-password"));
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err(ConfigError::Pair("--nats-tls-cert", "--nats-tls-key"));
        }
        Ok(Some(NatsConfig {
            url,
            prefix: self.nats_prefix,
            user: self.nats_user,
            password: self.nats_password,
            token: self.nats_token,
            nkey: self.nats_nkey,
            creds: self.nats_creds,
            tls_ca: self.nats_tls_ca,
            tls_cert: self.nats_tls_cert,
            tls_key: self.nats_tls_key,
            require_tls: self.nats_require_tls,
        }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The role the token grants.
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// The peer id the token grants (non-zero).
    #[arg(long, allow_negative_numbers = true)]
    pub id: PeerId,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The HS256 secret.
    #[arg(long, env = "DISTRIBUTOR_AUTH_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The token's `iss`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_ISSUER")]
    pub issuer: Option<String>,
    /// The token's `aud`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_AUDIENCE")]
    pub audience: Option<String>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "client" => Ok(Role::Client),
        "worker" => Ok(Role::Worker),
        _ => Err(format!("expected `client` or `worker`, not {s:?}")),
    }
}

/// A checked server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub shards: usize,
    pub max_message_bytes: usize,
    pub peer_queue: usize,
    pub shard_queue: usize,
    pub keepalive: Duration,
    /// The `Origin`s browsers may open a WebSocket from; empty: any.
    pub ws_origins: Vec<String>,
    pub drain_timeout: Duration,
    pub auth_secret: Option<String>,
    /// The claims tokens must carry besides the signature.
    pub auth_expect: Expect,
    /// Open mode (no auth secret) off loopback, or a cluster off loopback without a key.
    pub allow_open: bool,
    /// Authenticates cluster traffic; derived from the auth secret when `None`.
    pub cluster_key: Option<String>,
    pub limits: Limits,
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode when set.
    pub nats: Option<NatsConfig>,
    /// For tests only: this instance's clock runs this many milliseconds ahead (behind if
    /// negative), to show that a skewed clock cannot make an older stream win.
    pub test_clock_skew_ms: i64,
    /// How long a resumable peer whose stream was cut stays detached (zero: resume is off).
    pub resume_grace: Duration,
    /// A resumable stream is told `RECONNECT` at this age (zero: never).
    pub max_stream_age: Duration,
}

impl Default for Config {
    /// The defaults of `distributor serve`, listening on an ephemeral loopback port.
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: defaults::SHARDS,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            peer_queue: defaults::PEER_QUEUE,
            shard_queue: defaults::SHARD_QUEUE,
            keepalive: defaults::KEEPALIVE,
            ws_origins: Vec::new(),
            drain_timeout: defaults::DRAIN_TIMEOUT,
            auth_secret: None,
            auth_expect: Expect::default(),
            allow_open: false,
            cluster_key: None,
            limits: Limits::default(),
            metrics_listen: None,
            nats: None,
            test_clock_skew_ms: 0,
            resume_grace: defaults::RESUME_GRACE,
            max_stream_age: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-message-bytes must be between 1 and {MAX_FRAME_BYTES} (the gRPC frame limit), got {0}")]
    MaxMessageBytes(usize),
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "--max-message-bytes {max_message_bytes} cannot cross NATS, whose max_payload is {max_payload}: \
         at most {most} fits a cross-instance frame"
    )]
    OverNatsPayload { max_message_bytes: usize, max_payload: usize, most: usize },
    #[error("PORT must be a port number, got {0:?}")]
    Port(String),
    #[error("--auth-secret is {0} bytes; at least {MIN_SECRET_BYTES} are required")]
    ShortSecret(usize),
    #[error("--cluster-key is {0} bytes; at least {MIN_SECRET_BYTES} are required")]
    ShortClusterKey(usize),
    #[error(
        "refusing to serve on {0} without --auth-secret: anyone who reaches it could take over any peer id; \
         set --auth-secret, listen on loopback, or pass --allow-open"
    )]
    OpenOffLoopback(SocketAddr),
    #[error(
        "refusing to join NATS at {0} without a cluster key: anyone on that NATS could steer this instance; \
         set --auth-secret or --cluster-key, or pass --allow-open"
    )]
    ClusterWithoutKey(String),
    #[error("--nats-prefix must be dot-separated tokens of letters, digits, '-' and '_', got {0:?}")]
    NatsPrefix(String),
    #[error("{0} and {1} go together")]
    Pair(&'static str, &'static str),
}

impl ServeArgs {
    /// Resolves the listen address (`PORT`) and checks the flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        // Without a secret, the default address is loopback: open mode is for development.
        let any = if self.auth_secret.is_some() { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
        let listen = match (self.listen, std::env::var("PORT")) {
            (Some(listen), _) => listen,
            (None, Ok(port)) => {
                let port: u16 = port.parse().map_err(|_| ConfigError::Port(port))?;
                // A platform that sets PORT routes to it from outside: every interface.
                SocketAddr::from(([0, 0, 0, 0], port))
            }
            (None, Err(_)) => SocketAddr::from((any, defaults::PORT)),
        };
        let config = Config {
            listen,
            shards: self.shards,
            max_message_bytes: self.max_message_bytes,
            peer_queue: self.peer_queue,
            shard_queue: self.shard_queue,
            keepalive: self.keepalive.into(),
            ws_origins: self
                .ws_origins
                .into_iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            drain_timeout: self.drain_timeout.into(),
            auth_secret: self.auth_secret,
            auth_expect: Expect { issuer: self.auth_issuer, audience: self.auth_audience },
            allow_open: self.allow_open,
            cluster_key: self.cluster_key,
            limits: Limits {
                max_streams_per_connection: self.max_streams_per_connection,
                max_connections: self.max_connections,
                register_timeout: self.register_timeout.into(),
                peer_rate: self.peer_rate,
                peer_burst: self.peer_burst,
                max_sessions_per_client: self.max_sessions_per_client,
            },
            metrics_listen: self.metrics_listen,
            test_clock_skew_ms: self.test_clock_skew_ms,
            resume_grace: self.resume_grace.into(),
            max_stream_age: self.max_stream_age.map_or(Duration::ZERO, Into::into),
            nats: self.nats.into_config()?,
        };
        config.check()?;
        Ok(config)
    }
}

impl Config {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes == 0 || self.max_message_bytes > MAX_FRAME_BYTES {
            return Err(ConfigError::MaxMessageBytes(self.max_message_bytes));
        }
        let counts = [
            ("peer-queue", self.peer_queue),
            ("shard-queue", self.shard_queue),
            ("max-streams-per-connection", self.limits.max_streams_per_connection as usize),
            ("max-connections", self.limits.max_connections),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.limits.peer_rate > 0 && self.limits.peer_burst == 0 {
            return Err(ConfigError::Zero("peer-burst"));
        }
        if let Some(secret) = self.auth_secret.as_deref().filter(|s| s.len() < MIN_SECRET_BYTES) {
            return Err(ConfigError::ShortSecret(secret.len()));
        }
        if let Some(key) = self.cluster_key.as_deref().filter(|k| k.len() < MIN_SECRET_BYTES) {
            return Err(ConfigError::ShortClusterKey(key.len()));
        }
        if self.auth_secret.is_none() && !self.allow_open && !self.listen.ip().is_loopback() {
            return Err(ConfigError::OpenOffLoopback(self.listen));
        }
        if let Some(nats) = &self.nats
            && !self.has_cluster_key()
            && !self.allow_open
            && !nats.is_loopback()
        {
            return Err(ConfigError::ClusterWithoutKey(nats.url.clone()));
        }
        Ok(())
    }

    /// Whether cluster traffic is authenticated: a key was given, or one is derived from the
    /// auth secret.
    pub fn has_cluster_key(&self) -> bool {
        self.cluster_key.is_some() || self.auth_secret.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_is_the_default_command() {
        let cli = Cli::try_parse_from(["distributor", "--shards", "3"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.shards, 3);
        let cli = Cli::try_parse_from(["distributor", "serve", "--shards", "2"]).unwrap();
        let Some(Command::Serve(args)) = cli.command else { panic!("not serve") };
        assert_eq!(args.shards, 2);
    }

    #[test]
    fn token_command_parses() {
        let cli = Cli::try_parse_from([
            "distributor",
            "token",
            "--role",
            "worker",
            "--id",
            "42",
            "--ttl",
            "1h",
            "--secret",
            "s",
        ])
        .unwrap();
        let Some(Command::Token(t)) = cli.command else { panic!("not a token command") };
        assert_eq!((t.role, t.id, t.ttl), (Role::Worker, 42, Duration::from_secs(3600)));
        assert!(
            Cli::try_parse_from(["distributor", "token", "--role", "admin", "--id", "1", "--secret", "s"])
                .is_err()
        );
    }

    #[test]
    fn the_flags_defaults_are_config_defaults() {
        let args = Cli::try_parse_from(["distributor"]).unwrap().serve;
        // Environment fallbacks would change what parsing gives; this test's process sets none.
        if std::env::vars().any(|(k, _)| k.starts_with("DISTRIBUTOR_") || k == "PORT") {
            return;
        }
        let parsed = args.into_config().unwrap();
        let default = Config::default();
        assert_eq!(
            (parsed.shards, parsed.max_message_bytes, parsed.peer_queue, parsed.shard_queue),
            (default.shards, default.max_message_bytes, default.peer_queue, default.shard_queue)
        );
        assert_eq!((parsed.keepalive, parsed.drain_timeout), (default.keepalive, default.drain_timeout));
        assert_eq!(parsed.listen.port(), defaults::PORT);
    }

    #[test]
    fn open_mode_stays_on_loopback_unless_allowed() {
        let secret = Some("s".repeat(MIN_SECRET_BYTES));
        let anywhere = SocketAddr::from(([0, 0, 0, 0], 50051));
        let open = Config { listen: anywhere, ..Config::default() };
        let refused = open.check().unwrap_err().to_string();
        assert!(refused.contains("--allow-open") && refused.contains("0.0.0.0:50051"), "{refused}");
        assert!(Config { allow_open: true, ..open.clone() }.check().is_ok());
        assert!(Config { auth_secret: secret.clone(), ..open.clone() }.check().is_ok());
        assert!(Config { listen: "[::1]:1".parse().unwrap(), ..open.clone() }.check().is_ok());

        let nats =
            |url: &str| Some(NatsConfig { url: url.into(), prefix: "p".into(), ..NatsConfig::default() });
        assert!(
            Config { nats: nats("nats://127.0.0.1:4222,nats://localhost:4223"), ..Config::default() }
                .check()
                .is_ok()
        );
        let far = Config { nats: nats("nats://10.0.0.1:4222"), ..Config::default() };
        assert!(far.check().unwrap_err().to_string().contains("cluster key"));
        assert!(Config { cluster_key: secret.clone(), ..far.clone() }.check().is_ok());
        assert!(Config { allow_open: true, ..far }.check().is_ok());
    }

    #[test]
    fn bad_limits_are_refused() {
        let base = Config::default();
        assert!(Config { max_message_bytes: MAX_FRAME_BYTES + 1, ..base.clone() }.check().is_err());
        assert!(Config { peer_queue: 0, ..base.clone() }.check().is_err());
        assert!(Config { auth_secret: Some("too short".into()), ..base.clone() }.check().is_err());
        assert!(Config { cluster_key: Some("too short".into()), ..base.clone() }.check().is_err());
        assert!(base.check().is_ok());
    }
}
