//! keyshare-svc binary: flags and config in, [`keyshare_svc::run`] out.

use clap::Parser;

/// One party's keyshare service: answers partial-decryption requests from compute nodes over
/// mutual TLS and keeps a hash-chained audit log.
#[derive(Parser)]
#[command(name = "keyshare-svc", version)]
struct Cli {
    #[command(flatten)]
    server: psm_net::config::ServerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    let (_file, settings) = psm_net::config::load_service::<keyshare_svc::KeyshareSection>(
        &cli.server,
        "keyshare",
        keyshare_svc::DEFAULT_LISTEN.parse()?,
        "keyshare-data",
    )?;
    keyshare_svc::run(settings).await?;
    Ok(())
}
