use anyhow::Context;
use clap::Parser;
use distributor::config::{Cli, Command, LogFormat, ServeArgs, TokenArgs};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => token(args),
        Some(Command::Serve(args)) => serve(*args),
        None => serve(cli.serve),
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.id != 0, "--id must be non-zero");
    anyhow::ensure!(!args.secret.is_empty(), "the secret must not be empty");
    println!("{}", distributor::auth::mint(args.secret.as_bytes(), args.role, args.id, args.ttl)?);
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let format = args.log_format;
    let config = args.into_config()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        if let Some(addr) = config.metrics_listen {
            distributor::metrics::install(addr).context("starting the metrics listener")?;
            tracing::info!(%addr, "metrics on /metrics");
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        distributor::server::run(listener, config, distributor::shutdown::signal()).await
    })
}
