//! `psm ceremony`: the trusted-dealer key ceremony for the tfhe track (see
//! docs/operator-guide.md). The linear track has no dealt key: meters enroll their own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use psm_core::ceremony::{default_party_names, generate, self_check, write_bundle};
use psm_core::threshold::Scheme;

#[derive(clap::Args)]
pub struct CeremonyArgs {
    /// Number of keyshare parties n (2..=7).
    #[arg(long, default_value_t = 3)]
    parties: usize,
    /// Parties needed to decrypt t (2..=n).
    #[arg(long, default_value_t = 2)]
    threshold: usize,
    /// Output directory: public/ (bundle + manifest.toml) and shares/<party>.share (mode 0600).
    #[arg(long, default_value = "psm-data/keys")]
    out: PathBuf,
    /// Party names, comma-separated, matching the keyshares' certificate names
    /// (default keyshare-1..keyshare-n).
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// Replace an existing key set in --out.
    #[arg(long)]
    force: bool,
}

pub fn run(args: CeremonyArgs) -> anyhow::Result<()> {
    let scheme = Scheme::new(args.parties, args.threshold)?;
    let names = if args.names.is_empty() {
        default_party_names(args.parties)
    } else {
        args.names.clone()
    };
    if args.out.join("public/manifest.toml").exists() && !args.force {
        bail!(
            "{} already holds a key set; use --force to replace it (every keyshare must then load its new share)",
            args.out.display()
        );
    }
    let start = Instant::now();
    let mut progress = |step: &str| println!("[{:>5.1}s] {step}", start.elapsed().as_secs_f64());
    let material = generate(&mut progress)?;
    progress("splitting the secret and writing the share files and public bundle");
    let out = write_bundle(&material, scheme, &names, &args.out)
        .with_context(|| format!("writing the key set to {}", args.out.display()))?;
    drop(material); // zeroizes the secret
    self_check(&out, &mut progress)
        .context("the new key set failed its self-check; do not use it")?;
    println!(
        "Key set ready ({}-of-{}): tfhe key {}",
        scheme.threshold(),
        scheme.parties(),
        out.manifest.tfhe_key_id
    );
    println!(
        "  (the linear track needs no dealt key: each meter makes its own and enrolls it with the keyshares)"
    );
    println!("  public bundle: {}", out.public_dir.display());
    for f in &out.share_files {
        println!(
            "  share file:    {} (give to its keyshare only)",
            f.display()
        );
    }
    Ok(())
}
