//! `psm meter simulate`: a simulated town's meters, encrypted under the linear key fetched from
//! ingest, submitted as a head-end.

use std::io::Write;

use anyhow::{bail, Context};
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

/// What a simulation submitted.
pub struct Submitted {
    pub meters: Vec<SimMeter>,
    pub stored: u32,
    pub duplicates: u32,
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

/// Simulates, encrypts (all cores) and submits in requests of at most 100 meter-days.
pub async fn simulate_and_submit(ch: Channel, a: &SimulateArgs) -> anyhow::Result<Submitted> {
    let first_day = parse_day(&a.start)?;
    let manifest: Manifest = toml::from_str(std::str::from_utf8(
        &fetch_item(ch.clone(), "manifest").await?,
    )?)?;
    let lpk: psm_core::linear::LinearPublicKey =
        bincode_deserialize(&fetch_item(ch.clone(), "linear_public_key").await?)?;
    let meters = town(a.meters, a.businesses, a.seed);
    let jobs: Vec<(usize, i64)> = (0..meters.len())
        .flat_map(|m| (0..i64::from(a.days)).map(move |d| (m, first_day + d)))
        .collect();
    let mut client = IngestClient::new(ch);
    let (mut stored, mut duplicates) = (0, 0);
    progress(0, jobs.len());
    for (n, chunk) in jobs.chunks(100).enumerate() {
        let batches: Vec<ReadingBatch> = chunk
            .par_iter()
            .map(|(m, day)| {
                let values = meters[*m].day(*day, a.interval);
                let LweBatch::Compact { words, .. } = psm_core::linear::encrypt(&lpk, &values)
                else {
                    unreachable!("linear::encrypt makes compact lists")
                };
                let ciphertext = words_to_le_bytes(&words);
                ReadingBatch {
                    meter_id: meters[*m].id.clone(),
                    day: format_day(*day),
                    track: Track::Linear as i32,
                    key: Some(KeyRef {
                        key_id: manifest.linear_key_id.clone(),
                    }),
                    interval_seconds: a.interval,
                    count: values.len() as u32,
                    ciphertext_hash: blake3::hash(&ciphertext).as_bytes().to_vec(),
                    ciphertext,
                }
            })
            .collect();
        let r = client
            .submit_readings(SubmitReadingsRequest {
                idempotency_key: format!("sim-{}-{}-{n}", a.seed, a.start),
                batches,
            })
            .await
            .context("submitting readings")?
            .into_inner();
        stored += r.stored;
        duplicates += r.duplicates;
        progress((n * 100 + chunk.len()).min(jobs.len()), jobs.len());
    }
    eprintln!();
    Ok(Submitted {
        meters,
        stored,
        duplicates,
    })
}

fn bincode_deserialize<T: serde::de::DeserializeOwned>(b: &[u8]) -> anyhow::Result<T> {
    bincode::deserialize(b).context("decoding the linear public key")
}

pub fn run(cmd: MeterCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    match cmd {
        MeterCommand::Simulate(a) => {
            let ch = a.client.channel("headend/headend-1")?;
            let s = rt.block_on(simulate_and_submit(ch, &a))?;
            println!(
                "{} meters × {} days: {} meter-days stored, {} already there",
                s.meters.len(),
                a.days,
                s.stored,
                s.duplicates
            );
        }
    }
    Ok(())
}
