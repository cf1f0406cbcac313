//! keyshare-svc binary: flags and config in, [`keyshare_svc::run`] out.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// One party's keyshare service: answers partial-decryption requests from compute nodes over
/// mutual TLS and keeps a hash-chained audit log.
#[derive(Parser)]
#[command(name = "keyshare-svc", version)]
struct Cli {
    #[command(flatten)]
    server: psm_net::config::ServerArgs,
    /// This party's share file from `psm ceremony` (overrides [keyshare] share_file).
    #[arg(long, env = "PSM_SHARE_FILE", value_name = "FILE")]
    share_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    let (file, settings) = psm_net::config::load_service::<keyshare_svc::KeyshareSection>(
        &cli.server,
        "keyshare",
        keyshare_svc::DEFAULT_LISTEN.parse()?,
        "keyshare-data",
    )?;
    let share_file = cli
        .share_file
        .or(file.service.share_file.clone())
        .context("missing --share-file (or [keyshare] share_file, or PSM_SHARE_FILE)")?;
    keyshare_svc::run(settings, &file.service, &share_file).await?;
    Ok(())
}
