//! `psm`: the Private Smart Metering command-line tool.

mod audit;
mod ceremony;
mod client_args;
mod compute;
mod demo;
mod meter;
mod registry;
mod tariff;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use psm_net::pki::{DevPki, Validity};
use psm_net::Role;

/// Private Smart Metering: dev PKI, local demo, and operator tools.
#[derive(Parser)]
#[command(name = "psm", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Development PKI: a CA and SPIFFE certificates for services and clients.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Trusted-dealer key ceremony for the tfhe track: its key set, the squash secret split
    /// into one share file per keyshare, public bundle, self-check. (The linear track needs
    /// none: meters make their own keys and enroll them.)
    Ceremony(ceremony::CeremonyArgs),
    /// A keyshare's audit log: show it as a table or verify its hash chain.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Meters: simulate a town or import real readings; enroll each meter's own keys, then
    /// submit its encrypted readings to ingest.
    Meter {
        #[command(subcommand)]
        command: Box<meter::MeterCommand>,
    },
    /// A regulator's meter registry: meter ids, device keys, billing cycles, where encryption
    /// happens. Keyshares audit every change when they start.
    Registry {
        #[command(subcommand)]
        command: registry::RegistryCommand,
    },
    /// A keyshare's anchor key (the regulator's, separate from TLS and the utility's CA).
    Anchor {
        #[command(subcommand)]
        command: AnchorCommand,
    },
    /// Tariff files: validate one and print the hash keyshares allow it by.
    Tariff {
        #[command(subcommand)]
        command: tariff::TariffCommand,
    },
    /// Bill one meter over local dates in its tariff's time zone (a billing cycle).
    Bill(Box<compute::BillArgs>),
    /// Per-interval energy of a cohort of meters (import, export or net).
    Aggregate(Box<compute::AggregateArgs>),
    /// Histogram of a cohort's period totals (tfhe track; only counts are decrypted).
    Analytics(Box<compute::AnalyticsArgs>),
    /// Print a shell completion script: `psm completions bash > /etc/bash_completion.d/psm`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print which certificate roles may call which RPC.
    Roles,
    /// Probe a service's plaintext health port (for container and systemd health checks):
    /// exits 0 when it reports SERVING.
    Health {
        /// The service's `health_listen` address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// A gRPC service name ("psm.v1.Keyshare"); empty = the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// Start the whole system locally (dev PKI, 3 keyshares, ingest, compute) and keep it
    /// running until Ctrl-C.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum AnchorCommand {
    /// Create `<dir>/<party>.key` (Ed25519 secret, mode 0600) and `<dir>/<party>.pub` (what
    /// meters and the other keyshares are given), unless the key exists; set the keyshare's
    /// `[keyshare] anchor_key` to the `.key`.
    Init {
        /// The keyshare's party name (keyshare-1, ...).
        #[arg(long)]
        party: String,
        #[arg(long, default_value = "psm-data/anchors")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a CA and certificates for every service and one client of each role.
    Init {
        /// Directory to write the CA, certificates and keys into.
        #[arg(long, default_value = "psm-data/pki")]
        dir: PathBuf,
        /// SPIFFE trust domain: certificates carry spiffe://<trust-domain>/<role>/<name>.
        #[arg(long, default_value = "psm.local")]
        trust_domain: String,
        /// Replace an existing CA (every certificate must then be reissued).
        #[arg(long)]
        force: bool,
    },
    /// Issue one more certificate from an existing dev CA.
    Issue {
        /// Directory of the dev PKI (made by `psm pki init`).
        #[arg(long, default_value = "psm-data/pki")]
        dir: PathBuf,
        /// Role: meter, headend, ingest, compute, keyshare, operator or auditor.
        #[arg(long)]
        role: Role,
        /// Name within the role, e.g. a meter id; [A-Za-z0-9._-], at most 128 characters.
        #[arg(long)]
        name: String,
        /// Validity in days from now.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revoke a certificate of the dev CA: rewrites `<dir>/ca.crl` (signed by the CA), which
    /// services started with `--tls-crl` re-read within seconds.
    Revoke {
        /// Directory of the dev PKI (made by `psm pki init`).
        #[arg(long, default_value = "psm-data/pki")]
        dir: PathBuf,
        /// Role of the certificate to revoke.
        #[arg(long)]
        role: Role,
        /// Name within the role.
        #[arg(long)]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    psm_net::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Pki { command } => match command {
            PkiCommand::Init {
                dir,
                trust_domain,
                force,
            } => {
                let (_pki, issued) = DevPki::init(&dir, &trust_domain, force)
                    .with_context(|| format!("creating a dev PKI in {}", dir.display()))?;
                println!("dev CA: {}", dir.join("ca.crt").display());
                for i in issued {
                    println!("{:<44} {}", i.id.to_string(), i.cert.display());
                }
            }
            PkiCommand::Issue {
                dir,
                role,
                name,
                days,
            } => {
                anyhow::ensure!(days > 0, "--days must be positive");
                let pki = DevPki::open(&dir)
                    .with_context(|| format!("opening the dev PKI in {}", dir.display()))?;
                let issued = pki.issue(role, &name, Validity::days(days))?;
                println!(
                    "{} {} {}",
                    issued.id,
                    issued.cert.display(),
                    issued.key.display()
                );
            }
            PkiCommand::Revoke { dir, role, name } => {
                let pki = DevPki::open(&dir)
                    .with_context(|| format!("opening the dev PKI in {}", dir.display()))?;
                let crl = pki.revoke(role, &name)?;
                println!("revoked {role}/{name}; revocation list {}", crl.display());
            }
        },
        Command::Ceremony(args) => ceremony::run(args)?,
        Command::Audit { command } => audit::run(command)?,
        Command::Meter { command } => meter::run(*command)?,
        Command::Registry { command } => registry::run(command)?,
        Command::Anchor {
            command: AnchorCommand::Init { party, dir },
        } => {
            psm_net::identity::validate_label("party", &party).map_err(anyhow::Error::msg)?;
            let key = dir.join(format!("{party}.key"));
            let public = key.with_extension("pub");
            let (_, created) = psm_core::signing::AnchorFile::init(&party, &key, &public)?;
            println!(
                "{} {} and {}",
                if created { "created" } else { "kept" },
                key.display(),
                public.display()
            );
        }
        Command::Tariff { command } => tariff::run(command)?,
        Command::Bill(args) => compute::bill(*args)?,
        Command::Aggregate(args) => compute::aggregate(*args)?,
        Command::Analytics(args) => compute::analytics(*args)?,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "psm", &mut std::io::stdout());
        }
        Command::Roles => print!("{}", psm_net::roles::table_markdown()),
        Command::Health {
            addr,
            service,
            timeout_secs,
        } => health(addr, service, timeout_secs)?,
        Command::Demo(args) => demo::run(args)?,
    }
    Ok(())
}

fn health(addr: std::net::SocketAddr, service: String, timeout_secs: u64) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let timeout = std::time::Duration::from_secs(timeout_secs);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("connecting to the health port {addr}"))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .with_context(|| format!("health check of {service:?} at {addr}"))?;
        anyhow::Ok(resp.into_inner().status())
    })?;
    println!("{addr} {service:?}: {}", status.as_str_name());
    anyhow::ensure!(status == ServingStatus::Serving, "not serving");
    Ok(())
}
