use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use distributor::config::{Cli, Command, HealthArgs, LogFormat, ServeArgs, TokenArgs};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Health(args)) => health(args),
        Some(Command::Serve(args)) => serve(*args),
        #[cfg(feature = "peers")]
        Some(Command::Worker(args)) => peer(distributor::peers::worker(args)),
        #[cfg(feature = "peers")]
        Some(Command::Client(args)) => peer(distributor::peers::client(args)),
        None => serve(cli.serve),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        // One line, whatever RUST_BACKTRACE says: the error says what to change.
        Err(e) => {
            eprintln!("distributor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The multi-threaded runtime, without the LIFO slot where tokio offers the option (built with
/// `--cfg tokio_unstable`, see `.cargo/config.toml`). The slot runs a task woken by the running
/// one next, on the same thread; with one signal in flight per stream each message wakes a
/// stream on another connection, and turning the slot off raised window-1 throughput by
/// 11-39 % with less CPU per message (BENCHMARKS.md).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.enable_all().build()
}

/// Pending connections the kernel queues before the distributor accepts them (capped by
/// `net.core.somaxconn`, 4,096 on most hosts): peers reconnecting all at once after a drain or a
/// network blip are queued, not reset (tokio's default is 1,024).
const LISTEN_BACKLOG: u32 = 65_535;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the open-file limit to the hard limit: each peer with its own connection holds a
/// socket, and the default soft limit (often 1,024) would cap an instance at about that many.
fn raise_open_files() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(
            open_files = limit,
            "open-file limit: about {} peers with a connection each",
            limit.saturating_sub(64)
        ),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let addr = args.addr.unwrap_or_else(|| {
        let port = std::env::var("PORT").ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(50051);
        format!("http://127.0.0.1:{port}")
    });
    let status = runtime()?
        .block_on(async {
            let check = async {
                let channel = tonic::transport::Endpoint::from_shared(addr.clone())?.connect().await?;
                let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest { service: args.service.clone() };
                anyhow::Ok(client.check(request).await?.into_inner().status())
            };
            tokio::time::timeout(args.timeout, check)
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {:?}", args.timeout))?
        })
        .with_context(|| format!("asking {addr}"))?;
    anyhow::ensure!(status == ServingStatus::Serving, "{addr}: {}", status.as_str_name());
    println!("{}", status.as_str_name());
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.id > 0, "--id must be a positive id");
    let secret = args.secret.as_bytes();
    anyhow::ensure!(
        secret.len() >= distributor::auth::MIN_SECRET_BYTES,
        "the secret is {} bytes; at least {} are required",
        secret.len(),
        distributor::auth::MIN_SECRET_BYTES
    );
    let extra = distributor::auth::Mint { issuer: args.issuer, audience: args.audience, not_before: None };
    let exp = std::time::SystemTime::now() + args.ttl;
    println!("{}", distributor::auth::mint_with(secret, args.role, args.id, exp, &extra)?);
    Ok(())
}

/// Runs a peer command (`worker`, `client`) on its own runtime.
#[cfg(feature = "peers")]
fn peer(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    runtime()?.block_on(command)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let format = args.log_format;
    let config = args.into_config()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    raise_open_files();
    let runtime = runtime()?;
    runtime.block_on(async {
        if let Some(addr) = config.metrics_listen {
            distributor::metrics::install(addr).context("starting the metrics listener")?;
            tracing::info!(%addr, "metrics on /metrics");
        }
        let listener = listen(config.listen).with_context(|| format!("binding {}", config.listen))?;
        distributor::server::run(listener, config, distributor::shutdown::signal()).await?;
        Ok(())
    })
}
