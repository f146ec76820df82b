//! Command-line flags and their environment fallbacks, checked before anything binds.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
    pub const NATS_PREFIX: &str = "distributor";
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on [default: 0.0.0.0:$PORT if PORT is set, else 0.0.0.0:50051].
    #[arg(long, env = "DISTRIBUTOR_LISTEN")]
    pub listen: Option<SocketAddr>,
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
    /// Time allowed for streams to end after SIGTERM/SIGINT before the process exits anyway.
    #[arg(long, env = "DISTRIBUTOR_DRAIN_TIMEOUT", default_value_t = defaults::DRAIN_TIMEOUT.into())]
    pub drain_timeout: humantime::Duration,
    /// HS256 secret; when set every stream needs `authorization: Bearer <jwt>`.
    #[arg(long, env = "DISTRIBUTOR_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Serve Prometheus metrics on this address (path /metrics).
    #[arg(long, env = "DISTRIBUTOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "DISTRIBUTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    /// Refuse a NATS connection without TLS.
    #[arg(long, env = "DISTRIBUTOR_NATS_REQUIRE_TLS")]
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
    pub drain_timeout: Duration,
    pub auth_secret: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode when set.
    pub nats: Option<NatsConfig>,
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
            drain_timeout: defaults::DRAIN_TIMEOUT,
            auth_secret: None,
            metrics_listen: None,
            nats: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-message-bytes must be between 1 and {MAX_FRAME_BYTES} (the gRPC frame limit), got {0}")]
    MaxMessageBytes(usize),
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("PORT must be a port number, got {0:?}")]
    Port(String),
    #[error("--auth-secret must not be empty")]
    EmptySecret,
    #[error("--nats-prefix must be dot-separated tokens of letters, digits, '-' and '_', got {0:?}")]
    NatsPrefix(String),
    #[error("{0} and {1} go together")]
    Pair(&'static str, &'static str),
}

impl ServeArgs {
    /// Resolves the listen address (`PORT`) and checks the flags.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen = match (self.listen, std::env::var("PORT")) {
            (Some(listen), _) => listen,
            (None, Ok(port)) => {
                let port: u16 = port.parse().map_err(|_| ConfigError::Port(port))?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
            (None, Err(_)) => SocketAddr::from(([0, 0, 0, 0], defaults::PORT)),
        };
        let config = Config {
            listen,
            shards: self.shards,
            max_message_bytes: self.max_message_bytes,
            peer_queue: self.peer_queue,
            shard_queue: self.shard_queue,
            keepalive: self.keepalive.into(),
            drain_timeout: self.drain_timeout.into(),
            auth_secret: self.auth_secret,
            metrics_listen: self.metrics_listen,
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
        for (name, value) in [("peer-queue", self.peer_queue), ("shard-queue", self.shard_queue)] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.auth_secret.as_deref() == Some("") {
            return Err(ConfigError::EmptySecret);
        }
        Ok(())
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
    fn bad_limits_are_refused() {
        let base = Config::default();
        assert!(Config { max_message_bytes: MAX_FRAME_BYTES + 1, ..base.clone() }.check().is_err());
        assert!(Config { peer_queue: 0, ..base.clone() }.check().is_err());
        assert!(Config { auth_secret: Some(String::new()), ..base.clone() }.check().is_err());
        assert!(base.check().is_ok());
    }
}
