//! `psm registry`: a regulator's meter registry file (`psm_core::registry`) — create it, add,
//! change and remove meters, list it. Each keyshare audits every change of its registry when it
//! starts (docs/trust-anchors.md), so edits are never silent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use psm_core::registry::{Encryption, Entry, Registry};

#[derive(clap::Subcommand)]
pub enum RegistryCommand {
    /// Create an empty registry file (refuses to overwrite one).
    Init {
        /// The registry file.
        #[arg(long)]
        file: PathBuf,
        /// Development only: unlisted meters count as registered, meter-encrypted and unsigned.
        #[arg(long)]
        development_allow_all: bool,
    },
    /// Add meters, or change listed ones with --replace.
    Add(AddArgs),
    /// Remove meters.
    Remove {
        #[arg(long)]
        file: PathBuf,
        /// Meter ids to remove (repeatable).
        #[arg(long = "meter", required = true)]
        meters: Vec<String>,
    },
    /// Show the registry as a table, or as JSON with --json.
    List {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// The registry file (created when missing).
    #[arg(long)]
    file: PathBuf,
    /// Meter ids (repeatable).
    #[arg(long = "meter", required = true)]
    meters: Vec<String>,
    /// Where the meter's readings are encrypted: meter, or headend (plaintext to the utility).
    #[arg(long, default_value = "meter")]
    encryption: String,
    /// Day of the month (1..=28) on which the meter's billing periods start.
    #[arg(long, default_value_t = 1)]
    billing_day: u8,
    /// IANA time zone the meter's billing cycles are counted in (local midnight of the
    /// billing day); without it, each bill's tariff zone.
    #[arg(long)]
    time_zone: Option<String>,
    /// The device's Ed25519 public key, hex (from the manufacturer or the meter PKI); only with
    /// one --meter.
    #[arg(long, conflicts_with = "meter_keys")]
    device_key: Option<String>,
    /// A directory of device keys (`<meter>.device`, as `psm meter` keeps them): the public half
    /// of each meter's key, which is made there first when missing (provisioning a simulated
    /// meter).
    #[arg(long)]
    meter_keys: Option<PathBuf>,
    /// Change meters that are listed already instead of refusing (every field as given here).
    #[arg(long)]
    replace: bool,
}

fn load(file: &Path) -> anyhow::Result<Registry> {
    Ok(Registry::load(Some(file))?)
}

fn encryption(s: &str) -> anyhow::Result<Encryption> {
    match s {
        "meter" => Ok(Encryption::Meter),
        "headend" => Ok(Encryption::Headend),
        other => bail!("--encryption {other:?}: expected meter or headend"),
    }
}

/// Adds (or with `replace`, changes) meters; returns the change lines.
fn add(a: &AddArgs) -> anyhow::Result<Vec<String>> {
    let mut r = if a.file.exists() {
        load(&a.file)?
    } else {
        Registry::default()
    };
    let before = r.clone();
    let enc = encryption(&a.encryption)?;
    if a.device_key.is_some() && a.meters.len() != 1 {
        bail!("--device-key names one meter's key; use --meter-keys DIR for several meters");
    }
    for m in &a.meters {
        let device_key = match (&a.device_key, &a.meter_keys) {
            (Some(k), _) => k.trim().to_owned(),
            (None, Some(dir)) => {
                crate::meter::create_key_dir(dir)?;
                hex::encode(crate::meter::load_or_create_device(dir, m)?.public())
            }
            (None, None) => bail!("give --device-key HEX or --meter-keys DIR"),
        };
        let e = Entry {
            id: m.clone(),
            encryption: enc,
            device_key,
            billing_day: a.billing_day,
            time_zone: a.time_zone.clone(),
        };
        if a.replace {
            r.upsert(e)?;
        } else {
            r.insert(e)
                .with_context(|| format!("meter {m}: pass --replace to change a listed meter"))?;
        }
    }
    r.write(&a.file)?;
    Ok(r.changes_from(&before))
}

pub fn run(cmd: RegistryCommand) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Init {
            file,
            development_allow_all,
        } => {
            if file.exists() {
                bail!(
                    "{} exists; edit it with psm registry add/remove",
                    file.display()
                );
            }
            let mut r = Registry::default();
            r.set_allow_all(development_allow_all);
            r.write(&file)?;
            println!("created {}", file.display());
        }
        RegistryCommand::Add(a) => {
            for c in add(&a)? {
                println!("{c}");
            }
        }
        RegistryCommand::Remove { file, meters } => {
            let mut r = load(&file)?;
            let before = r.clone();
            for m in &meters {
                if r.remove(m).is_none() {
                    bail!(
                        "meter {m} is not in {}; nothing was changed",
                        file.display()
                    );
                }
            }
            r.write(&file)?;
            for c in r.changes_from(&before) {
                println!("{c}");
            }
        }
        RegistryCommand::List { file, json } => {
            let r = load(&file)?;
            if json {
                let rows: Vec<_> = r
                    .entries()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id,
                            "encryption": e.encryption.name(),
                            "device_key": e.device_key,
                            "billing_day": e.billing_day,
                            "time_zone": e.time_zone,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "development_allow_all": r.allows_all(),
                        "meters": rows,
                    })
                );
            } else {
                println!(
                    "{:<24} {:<10} {:<12} device key",
                    "meter", "encryption", "billing day"
                );
                for e in r.entries() {
                    println!(
                        "{:<24} {:<10} {:<12} {}",
                        e.id,
                        e.encryption.name(),
                        e.billing_day,
                        e.device_key
                    );
                }
                println!(
                    "{} meter(s){}",
                    r.len(),
                    if r.allows_all() {
                        "; development_allow_all: unlisted meters count as registered, unsigned"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}
