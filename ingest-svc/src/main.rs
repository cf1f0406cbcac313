//! ingest-svc binary: flags and config in, [`ingest_svc::run`] out.

use clap::Parser;

/// Ingest service: accepts encrypted meter readings and linear-track key enrollments over mutual
/// TLS and stores them durably.
#[derive(Parser)]
#[command(name = "ingest-svc", version)]
struct Cli {
    #[command(flatten)]
    server: psm_net::config::ServerArgs,
    /// Public bundle directory from `psm ceremony` (<out>/public), served by GetPublicParams
    /// (overrides [ingest] public_dir).
    #[arg(long, env = "PSM_PUBLIC_DIR", value_name = "DIR")]
    public_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    let (file, settings) = psm_net::config::load_service::<ingest_svc::IngestSection>(
        &cli.server,
        "ingest",
        ingest_svc::DEFAULT_LISTEN.parse()?,
        "ingest-data",
    )?;
    let public_dir = cli.public_dir.or(file.service.public_dir);
    let store = file.service.store.open(&settings.data_dir).await?;
    let mut svc = ingest_svc::IngestService::new(
        public_dir.as_deref(),
        store,
        file.service.headends,
        &file.service.quota,
    )?;
    match &file.service.registry {
        Some(path) => {
            svc = svc.with_registry(psm_core::registry::Registry::load(Some(path))?);
        }
        None => tracing::warn!(
            "no [ingest] registry: device signatures of batches and enrollments are not checked here (keyshares still check enrollments and re-executed inputs)"
        ),
    }
    ingest_svc::run(settings, svc).await?;
    Ok(())
}
