//! `psm meter simulate`: a simulated town's meters, encrypted under the linear key fetched from
//! ingest, submitted as a head-end.

use std::io::Write;

use anyhow::{bail, Context};
use psm_core::import::{
    is_green_button_csv, parse_green_button, parse_green_button_csv, parse_plain_csv, to_days,
    MeterDay,
};
use psm_core::keys::Manifest;
use psm_core::lwe::{words_to_le_bytes, LweBatch};
use psm_core::readings::{format_day, parse_day};
use psm_core::simulate::{town, SimMeter};
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{GetPublicParamsRequest, KeyRef, ReadingBatch, SubmitReadingsRequest, Track};
use rayon::prelude::*;
use tonic::transport::Channel;

use crate::client_args::ClientArgs;

#[derive(clap::Subcommand)]
pub enum MeterCommand {
    /// Import real readings — Green Button ESPI XML (one meter per usage point), a utility's
    /// Green Button CSV export, or a plain CSV of meter_id,timestamp,wh — and submit every
    /// complete UTC day as a head-end.
    Import(ImportArgs),
    /// Simulate a town's meters and submit their readings to ingest as a head-end. Encryption
    /// is randomized: submitting the same meter-days twice is refused (ALREADY_EXISTS), so use
    /// another --start or fresh meters for more data.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Households (meter-0001, ...); about a third have rooftop solar.
    #[arg(long, default_value_t = 50)]
    pub meters: usize,
    /// Small businesses (shop-01, ...).
    #[arg(long, default_value_t = 2)]
    pub businesses: usize,
    /// Days to simulate.
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// First UTC day, YYYY-MM-DD.
    #[arg(long, default_value = "2026-01-05")]
    pub start: String,
    /// Random seed: the same seed gives the same town and readings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Interval length in seconds: 900, 1800 or 3600.
    #[arg(long, default_value_t = 900)]
    pub interval: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: std::path::PathBuf,
    /// File format: greenbutton (ESPI XML), gbcsv (a utility's Green Button CSV export), csv
    /// (meter_id,timestamp,wh) or auto (.xml is ESPI; a CSV with DATE/START TIME/USAGE columns
    /// is gbcsv; otherwise plain csv).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Meter id for a Green Button CSV (the export names none).
    #[arg(long)]
    pub meter: Option<String>,
    /// IANA time zone of a Green Button CSV's local dates and times.
    #[arg(long, default_value = "UTC")]
    pub time_zone: String,
    /// Prefix of meter ids made from Green Button usage points (<prefix>-<customer>-<point>).
    #[arg(long, default_value = "gb")]
    pub prefix: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Fetches one public item from ingest and checks its hash.
pub async fn fetch_item(ch: Channel, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut s = IngestClient::new(ch)
        .get_public_params(GetPublicParamsRequest {
            name: name.into(),
            hash: vec![],
        })
        .await
        .with_context(|| format!("fetching {name} from ingest"))?
        .into_inner();
    let mut data = Vec::new();
    let mut hash = Vec::new();
    while let Some(c) = s.message().await? {
        data.extend_from_slice(&c.data);
        hash = c.item_hash;
    }
    if blake3::hash(&data).as_bytes().as_slice() != hash.as_slice() {
        bail!("{name} from ingest does not match its hash");
    }
    Ok(data)
}

/// The key manifest from ingest (hash-checked like every public item).
async fn fetch_manifest(ch: Channel) -> anyhow::Result<Manifest> {
    Ok(toml::from_str(std::str::from_utf8(
        &fetch_item(ch, "manifest").await?,
    )?)?)
}

/// What a submission did with its meter-days.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Newly stored.
    pub stored: u32,
    /// Already stored with the same bytes (a retry).
    pub duplicates: u32,
    /// Already stored with other bytes — an earlier run encrypted the same meter-day
    /// (encryption is randomized) — and kept as stored.
    pub kept: u32,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.kept += o.kept;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} meter-days stored, {} were already there",
            self.stored, self.duplicates
        )?;
        if self.kept > 0 {
            write!(
                f,
                ", {} kept as stored by an earlier run (encrypted then)",
                self.kept
            )?;
        }
        Ok(())
    }
}

/// Submits one request. When ingest refuses it because a meter-day in it is already stored
/// with other bytes (resuming an interrupted import, or rerunning a simulation: encryption is
/// randomized), submits the batches one by one and keeps what is stored.
async fn submit_chunk(
    client: &mut IngestClient<Channel>,
    key: &str,
    batches: Vec<ReadingBatch>,
) -> anyhow::Result<Counts> {
    let request = |k: String, batches: Vec<ReadingBatch>| SubmitReadingsRequest {
        idempotency_key: k,
        batches,
    };
    match client
        .submit_readings(request(key.to_owned(), batches.clone()))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            Ok(Counts {
                stored: r.stored,
                duplicates: r.duplicates,
                kept: 0,
            })
        }
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            let mut c = Counts::default();
            for (i, b) in batches.into_iter().enumerate() {
                match client
                    .submit_readings(request(format!("{key}-{i}"), vec![b]))
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        c.stored += r.stored;
                        c.duplicates += r.duplicates;
                    }
                    Err(s) if s.code() == tonic::Code::AlreadyExists => c.kept += 1,
                    Err(s) => return Err(anyhow::anyhow!("submitting readings: {}", s.message())),
                }
            }
            Ok(c)
        }
        Err(s) => Err(anyhow::anyhow!("submitting readings: {}", s.message())),
    }
}

/// What a simulation submitted.
pub struct Submitted {
    pub meters: Vec<SimMeter>,
    pub counts: Counts,
}

fn progress(done: usize, total: usize) {
    let width = 30;
    let filled = done * width / total.max(1);
    eprint!(
        "\r  [{}{}] {done}/{total} meter-days",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

/// Simulates a town and submits it.
pub async fn simulate_and_submit(ch: Channel, a: &SimulateArgs) -> anyhow::Result<Submitted> {
    let first_day = parse_day(&a.start)?;
    let meters = town(a.meters, a.businesses, a.seed);
    let days: Vec<MeterDay> = meters
        .iter()
        .flat_map(|m| {
            (0..i64::from(a.days)).map(move |d| MeterDay {
                meter_id: m.id.clone(),
                day: first_day + d,
                interval_seconds: a.interval,
                values: m.day(first_day + d, a.interval),
            })
        })
        .collect();
    let mut counts = submit_days(ch.clone(), &days, &format!("sim-{}-{}", a.seed, a.start)).await?;
    // Businesses also send their registers (peak demand, daily total) on the tfhe track, for
    // demand charges and tiered tariffs.
    let business_days: Vec<MeterDay> = days
        .into_iter()
        .filter(|d| {
            meters
                .iter()
                .any(|m| m.id == d.meter_id && m.site == psm_core::simulate::Site::Business)
        })
        .collect();
    if !business_days.is_empty() {
        counts += submit_registers(
            ch,
            &business_days,
            &format!("sim-registers-{}-{}", a.seed, a.start),
        )
        .await?;
    }
    Ok(Submitted { meters, counts })
}

/// Encrypts meter-days under the linear key fetched from ingest (all cores) and submits them
/// in requests of at most 100, with a progress bar.
pub async fn submit_days(
    ch: Channel,
    days: &[MeterDay],
    key_prefix: &str,
) -> anyhow::Result<Counts> {
    let manifest = fetch_manifest(ch.clone()).await?;
    let lpk: psm_core::linear::LinearPublicKey =
        bincode_deserialize(&fetch_item(ch.clone(), "linear_public_key").await?)?;
    let mut client = IngestClient::new(ch);
    let mut counts = Counts::default();
    progress(0, days.len());
    for (n, chunk) in days.chunks(100).enumerate() {
        let batches: Vec<ReadingBatch> = chunk
            .par_iter()
            .map(|d| {
                let LweBatch::Compact { words, .. } = psm_core::linear::encrypt(&lpk, &d.values)
                else {
                    unreachable!("linear::encrypt makes compact lists")
                };
                let ciphertext = words_to_le_bytes(&words);
                ReadingBatch {
                    meter_id: d.meter_id.clone(),
                    day: format_day(d.day),
                    track: Track::Linear as i32,
                    key: Some(KeyRef {
                        key_id: manifest.linear_key_id.clone(),
                    }),
                    interval_seconds: d.interval_seconds,
                    count: d.values.len() as u32,
                    ciphertext_hash: blake3::hash(&ciphertext).as_bytes().to_vec(),
                    ciphertext,
                }
            })
            .collect();
        counts += submit_chunk(&mut client, &format!("{key_prefix}-{n}"), batches).await?;
        progress((n * 100 + chunk.len()).min(days.len()), days.len());
    }
    eprintln!();
    Ok(counts)
}

/// Derives each meter-day's registers from its readings, encrypts them with a zero-knowledge
/// proof bound to the meter-day (about 1.6 s of a core each, all cores used) and submits them on
/// the tfhe track in requests of at most 50, with a progress bar.
pub async fn submit_registers(
    ch: Channel,
    days: &[MeterDay],
    key_prefix: &str,
) -> anyhow::Result<Counts> {
    let manifest = fetch_manifest(ch.clone()).await?;
    let limit = psm_core::ceremony::MAX_PUBLIC_ITEM_BYTES;
    let cpk: tfhe::CompactPublicKey = tfhe::safe_serialization::safe_deserialize(
        fetch_item(ch.clone(), "tfhe_public_key").await?.as_slice(),
        limit,
    )
    .map_err(|e| anyhow::anyhow!("decoding the tfhe public key: {e}"))?;
    let crs: tfhe::zk::CompactPkeCrs = tfhe::safe_serialization::safe_deserialize(
        fetch_item(ch.clone(), "crs").await?.as_slice(),
        limit,
    )
    .map_err(|e| anyhow::anyhow!("decoding the CRS: {e}"))?;
    let mut client = IngestClient::new(ch);
    let mut counts = Counts::default();
    eprintln!("  registers (peak demand, daily total) with zero-knowledge proofs:");
    progress(0, days.len());
    for (n, chunk) in days.chunks(50).enumerate() {
        let batches = tokio::task::block_in_place(|| {
            chunk
                .par_iter()
                .map(|d| {
                    let day = format_day(d.day);
                    let r = psm_core::registers::Registers::from_intervals(
                        &d.values,
                        d.interval_seconds,
                    );
                    let list = psm_core::registers::prove(
                        &cpk,
                        &crs,
                        &manifest.tfhe_key_id,
                        &d.meter_id,
                        &day,
                        r,
                    )?;
                    Ok(ReadingBatch {
                        meter_id: d.meter_id.clone(),
                        day,
                        track: Track::Tfhe as i32,
                        key: Some(KeyRef {
                            key_id: manifest.tfhe_key_id.clone(),
                        }),
                        interval_seconds: 0,
                        count: psm_core::registers::REGISTER_COUNT,
                        ciphertext_hash: blake3::hash(&list).as_bytes().to_vec(),
                        ciphertext: list,
                    })
                })
                .collect::<Result<Vec<_>, psm_core::registers::RegisterError>>()
        })?;
        counts += submit_chunk(&mut client, &format!("{key_prefix}-{n}"), batches).await?;
        progress((n * 50 + chunk.len()).min(days.len()), days.len());
    }
    eprintln!();
    Ok(counts)
}

fn bincode_deserialize<T: serde::de::DeserializeOwned>(b: &[u8]) -> anyhow::Result<T> {
    bincode::deserialize(b).context("decoding the linear public key")
}

pub fn run(cmd: MeterCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    match cmd {
        MeterCommand::Import(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            let format = match a.format.as_str() {
                "auto"
                    if a.file
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("xml")) =>
                {
                    "greenbutton"
                }
                "auto" if is_green_button_csv(&text) => "gbcsv",
                "auto" => "csv",
                f @ ("greenbutton" | "gbcsv" | "csv") => f,
                other => bail!("--format {other:?}: expected greenbutton, gbcsv, csv or auto"),
            };
            let series = match format {
                "greenbutton" => parse_green_button(&text, &a.prefix)?,
                "gbcsv" => {
                    let meter = a
                        .meter
                        .as_deref()
                        .context("a Green Button CSV names no meter: pass --meter ID")?;
                    vec![parse_green_button_csv(&text, meter, &a.time_zone)?]
                }
                _ => parse_plain_csv(&text)?,
            };
            let (days, partial) = to_days(&series)?;
            for (m, d, n) in &partial {
                eprintln!(
                    "  skipping {m} {}: {n} readings, not a complete UTC day",
                    format_day(*d)
                );
            }
            if days.is_empty() {
                bail!("{} holds no complete UTC day", a.file.display());
            }
            let ch = a.client.channel("headend/headend-1")?;
            let key = format!("import-{}", blake3::hash(text.as_bytes()).to_hex());
            let counts = rt.block_on(submit_days(ch, &days, &key[..40]))?;
            println!(
                "{} meters, {} complete meter-days: {counts}; {} incomplete days skipped",
                series.len(),
                days.len(),
                partial.len()
            );
        }
        MeterCommand::Simulate(a) => {
            let ch = a.client.channel("headend/headend-1")?;
            let s = rt.block_on(simulate_and_submit(ch, &a))?;
            println!("{} meters × {} days: {}", s.meters.len(), a.days, s.counts);
        }
    }
    Ok(())
}
