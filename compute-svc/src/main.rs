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
    let (file, settings) = psm_net::config::load_service::<compute_svc::ComputeSection>(
        &cli.server,
        "compute",
        compute_svc::DEFAULT_LISTEN.parse()?,
        "compute-data",
    )?;
    let engine = compute_svc::Engine::from_config(&settings, &file.service)
        .map_err(|e| anyhow::anyhow!("[compute] configuration: {e}"))?;
    if engine.is_none() {
        tracing::warn!("no [compute] public_dir, ingest_url and keyshares configured: Aggregate and Bill will be refused");
    }
    let queue = compute_svc::job_queue::JobQueue::open(&file.service.jobs)
        .await
        .map_err(|e| anyhow::anyhow!("[compute.jobs]: {e}"))?;
    let svc = compute_svc::ComputeService::with_queue(engine, queue);
    svc.spawn_orphan_worker();
    compute_svc::run(settings, svc).await?;
    Ok(())
}
