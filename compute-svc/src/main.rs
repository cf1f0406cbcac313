//! compute-svc binary: flags and config in, [`compute_svc::run`] out.

use clap::Parser;

/// Compute service: bills and analytics on encrypted readings, decrypted only through a keyshare quorum.
#[derive(Parser)]
#[command(name = "compute-svc", version)]
struct Cli {
    #[command(flatten)]
    server: psm_net::config::ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    let (_file, settings) = psm_net::config::load_service::<compute_svc::ComputeSection>(
        &cli.server,
        "compute",
        compute_svc::DEFAULT_LISTEN.parse()?,
        "compute-data",
    )?;
    compute_svc::run(settings).await?;
    Ok(())
}
