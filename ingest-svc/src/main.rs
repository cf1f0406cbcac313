//! ingest-svc binary: flags and config in, [`ingest_svc::run`] out.

use clap::Parser;

/// Ingest service: accepts encrypted meter readings over mutual TLS and stores them durably.
#[derive(Parser)]
#[command(name = "ingest-svc", version)]
struct Cli {
    #[command(flatten)]
    server: psm_net::config::ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    let (_file, settings) = psm_net::config::load_service::<ingest_svc::IngestSection>(
        &cli.server,
        "ingest",
        ingest_svc::DEFAULT_LISTEN.parse()?,
        "ingest-data",
    )?;
    ingest_svc::run(settings).await?;
    Ok(())
}
