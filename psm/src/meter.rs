//! `psm meter simulate` / `psm meter import`: meters' readings encrypted on the linear track
//! under each meter's own key, submitted as a head-end.
//!
//! Per meter the tool keeps, in `--meter-keys`, the meter's device signing key (`<meter>.device`,
//! secret, mode 0600; its public half goes into the regulators' registries) and per key epoch its
//! seeds (`<meter>.e<epoch>.seeds`, secret, mode 0600; made once, before anything is sent). It
//! enrolls the seeds through ingest — sealed to the keyshares' enrollment keys, which must be
//! signed by the regulators' anchors, and signed with the device key — waits until every keyshare
//! has returned a receipt signed by its anchor, then sends one signed body per interval and
//! channel: import = max(v, 0), export = max(−v, 0).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use prost::Message;
use psm_core::keys::Manifest;
use psm_core::linear::encrypt::IntervalMasks;
use psm_core::linear::envelope::{self, PublishedKey};
use psm_core::linear::key::{MeterKey, MeterSeeds};
use psm_core::linear::{Channel as LinearChannel, INTERVALS, SLOTS_PER_DAY, SLOT_SECONDS};
use psm_core::readings::{format_day, parse_day};
use psm_core::signing::{Anchors, SecretKey};
use psm_core::threshold::Scheme;
use psm_meterdata::import::{
    is_green_button_csv, is_nem12, parse_green_button, parse_green_button_csv, parse_nem12,
    parse_plain_csv, to_days, DayStatus, Flow, MeterDay,
};
use psm_meterdata::simulate::{town, SimMeter};
use psm_net::tls::TlsPaths;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    EnrollRequest, Enrollment, GetPublicParamsRequest, KeyRef, ReadingBatch, SubmitReadingsRequest,
    Track,
};
use rayon::prelude::*;
use tonic::transport::Channel;

use crate::client_args::ClientArgs;

/// Largest number of batches in one SubmitReadings request (ingest's limit is 1,000).
const BATCHES_PER_REQUEST: usize = 1_000;
/// Largest number of enrollments in one Enroll request (ingest's limit).
const ENROLLMENTS_PER_REQUEST: usize = 1_000;
/// Meters whose keys are held in memory at once (two 64 KiB keys each); the day's interval masks
/// are derived once per such group.
const METERS_PER_PASS: usize = 1_024;

#[derive(clap::Subcommand)]
pub enum MeterCommand {
    /// Import real readings — Green Button ESPI XML (one meter per usage point, flowDirection 1
    /// and 19 as import and export), a utility's Green Button CSV export, a plain CSV of
    /// meter_id,timestamp,wh[,channel], or AEMO NEM12 — and submit them as a head-end: complete
    /// UTC days, and the runs of consecutive intervals of incomplete ones. Readings that cannot
    /// be stored (wrong length, conflicting duplicates, out of range) are left out and reported
    /// per meter and day; the rest of the file is imported.
    Import(ImportArgs),
    /// Simulate a town's meters and submit their readings to ingest as a head-end. A slot is
    /// encrypted once per key epoch: meter-days already stored are kept as they are, so use
    /// another --start, fresh meters or a new --epoch for more data.
    Simulate(SimulateArgs),
}

/// Where meters' keys come from and go to.
#[derive(clap::Args, Clone)]
pub struct MeterKeyArgs {
    /// The meters' key epoch (>= 1). Every slot is encrypted once per epoch; a new epoch is a
    /// key rotation (new seeds, enrolled again).
    #[arg(long, default_value_t = 1)]
    pub epoch: u32,
    /// A keyshare's published enrollment key (the `enrollment.pub` in its data directory); give
    /// one per keyshare. Each must be signed by that keyshare's --anchor.
    #[arg(long = "enrollment-key", value_name = "FILE")]
    pub enrollment_keys: Vec<PathBuf>,
    /// A keyshare's anchor public key (`anchor.pub`), as the regulator provisions it — never
    /// taken from the utility; one per keyshare. Enrollment keys and receipts must be signed by
    /// them.
    #[arg(long = "anchor", value_name = "FILE")]
    pub anchors: Vec<PathBuf>,
    /// A keyshare to fetch enrollment receipts from, as NAME=URL; one per keyshare. Readings are
    /// encrypted under an epoch only once every keyshare has confirmed the meter's enrollment.
    #[arg(long = "keyshare", value_name = "NAME=URL")]
    pub keyshares: Vec<String>,
    /// Seconds to wait for every keyshare's receipts.
    #[arg(long, default_value_t = 120)]
    pub receipt_wait_secs: u64,
    /// Directory of the meters' device keys (`<meter>.device`) and seed files
    /// (`<meter>.e<epoch>.seeds`), secret, mode 0600: made on first use, reused after. A meter
    /// whose seeds are lost needs a new --epoch.
    #[arg(long, default_value = "psm-data/meter-keys")]
    pub meter_keys: PathBuf,
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
    /// Interval length in seconds: 300, 900, 1800 or 3600.
    #[arg(long, default_value_t = 900)]
    pub interval: u32,
    #[command(flatten)]
    pub keys: MeterKeyArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: std::path::PathBuf,
    /// File format: greenbutton (ESPI XML), gbcsv (a utility's Green Button CSV export), csv
    /// (meter_id,timestamp,wh[,channel]), nem12, or auto (.xml is ESPI; a file starting
    /// 100,NEM12 is NEM12; a CSV with DATE/START TIME/USAGE columns is gbcsv; otherwise plain
    /// csv).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Print the per meter-day report as JSON on stdout (status, intervals stored, reasons).
    #[arg(long)]
    pub json: bool,
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
    pub keys: MeterKeyArgs,
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

/// What a submission did with its batches (one per meter-day, or run of a day, and channel;
/// registers count one per meter-day).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Newly stored.
    pub stored: u32,
    /// Already stored with the same bytes (a retry).
    pub duplicates: u32,
    /// Already stored with other bytes — an earlier run encrypted the same slots (encryption
    /// is randomized) — and kept as stored.
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
            "{} batches stored, {} were already there",
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

/// A short content hash for idempotency keys.
fn content_key(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        let p = p.as_ref();
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().to_hex()[..24].to_owned()
}

/// Submits one request. When ingest refuses it because a batch in it overlaps slots already
/// stored with other bytes (resuming an interrupted import, or rerunning a simulation:
/// encryption is randomized), submits the batches one by one and keeps what is stored.
async fn submit_chunk(
    client: &mut IngestClient<Channel>,
    key_prefix: &str,
    batches: Vec<ReadingBatch>,
) -> anyhow::Result<Counts> {
    let key = format!(
        "{key_prefix}-{}",
        content_key(batches.iter().map(|b| &b.ciphertext_hash))
    );
    let request = |k: String, batches: Vec<ReadingBatch>| SubmitReadingsRequest {
        idempotency_key: k,
        batches,
    };
    match client
        .submit_readings(request(key.clone(), batches.clone()))
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

/// A progress bar on stderr (drawn only on a terminal).
fn progress_bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "  [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} ({{per_sec}}, {{eta}} left)"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Simulates a town and submits it.
pub async fn simulate_and_submit(ch: Channel, a: &SimulateArgs) -> anyhow::Result<Submitted> {
    if !INTERVALS.contains(&a.interval) {
        bail!("--interval {}: expected one of {INTERVALS:?}", a.interval);
    }
    let first_day = parse_day(&a.start)?;
    let meters = town(a.meters, a.businesses, a.seed);
    let days: Vec<MeterDay> = meters
        .iter()
        .flat_map(|m| {
            (0..i64::from(a.days)).map(move |d| MeterDay {
                meter_id: m.id.clone(),
                flow: Flow::Net,
                day: first_day + d,
                interval_seconds: a.interval,
                first_interval: 0,
                values: m.day(first_day + d, a.interval),
            })
        })
        .collect();
    let tls = a.client.tls("headend/headend-1")?;
    let mut counts = submit_days(
        ch.clone(),
        &a.keys,
        &tls,
        &days,
        &format!("sim-{}-{}", a.seed, a.start),
    )
    .await?;
    // Businesses also send their registers (peak demand, daily total) on the tfhe track, for
    // demand charges and tiered tariffs.
    let business_days: Vec<MeterDay> = days
        .into_iter()
        .filter(|d| {
            meters
                .iter()
                .any(|m| m.id == d.meter_id && m.site == psm_meterdata::simulate::Site::Business)
        })
        .collect();
    if !business_days.is_empty() {
        counts += submit_registers(
            ch,
            &business_days,
            &a.keys.meter_keys,
            &format!("sim-registers-{}-{}", a.seed, a.start),
        )
        .await?;
    }
    Ok(Submitted { meters, counts })
}

/// The keyshares' enrollment keys, (party name, key) in the manifest's party order: one file
/// per party, none for a party the deployment does not have, each signed by its anchor.
fn enrollment_keys(
    files: &[PathBuf],
    manifest: &Manifest,
    anchors: &Anchors,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let parties = manifest.party_names.join(", ");
    if files.is_empty() {
        bail!(
            "no --enrollment-key given: pass the enrollment.pub of every keyshare ({parties}), one --enrollment-key FILE each (a keyshare writes it into its data directory at start)"
        );
    }
    let mut published = Vec::new();
    for f in files {
        let k = PublishedKey::read(f)?;
        if !manifest.party_names.contains(&k.party) {
            bail!(
                "{}: keyshare {:?} is not a party of this deployment (its parties are {parties})",
                f.display(),
                k.party
            );
        }
        published.push(k);
    }
    envelope::keys_in_party_order(&published, &manifest.party_names, anchors).map_err(|e| {
        anyhow::anyhow!("{e}: pass one --enrollment-key and one --anchor per keyshare ({parties})")
    })
}

/// A meter's device signing key, read from `dir` or made there first (`<meter>.device`, mode
/// 0600): its public half is what the regulators register for the meter.
pub fn load_or_create_device(dir: &Path, meter: &str) -> anyhow::Result<SecretKey> {
    let path = dir.join(format!("{meter}.device"));
    Ok(SecretKey::read_or_create(&path)
        .with_context(|| format!("the device key of {meter}"))?
        .0)
}

/// Waits until every keyshare has activated every enrollment, checking each receipt against the
/// keyshare's anchor and the manifest the meter signed. A refusal stops at once.
async fn await_receipts(
    k: &MeterKeyArgs,
    tls: &TlsPaths,
    anchors: &Anchors,
    parties: &[String],
    enrollments: &[Enrollment],
) -> anyhow::Result<()> {
    use psm_proto::v1::keyshare_client::KeyshareClient;
    use psm_proto::v1::{EnrollmentState, GetReceiptsRequest};
    let mut urls = BTreeMap::new();
    for ks in &k.keyshares {
        let (name, url) = ks
            .split_once('=')
            .with_context(|| format!("--keyshare {ks:?}: expected NAME=URL"))?;
        if urls.insert(name.to_owned(), url.to_owned()).is_some() {
            bail!("--keyshare {name} is given twice");
        }
    }
    for p in parties {
        if !urls.contains_key(p) {
            bail!(
                "no --keyshare {p}=URL: a meter encrypts only once every keyshare ({}) has confirmed its enrollment",
                parties.join(", ")
            );
        }
    }
    let hashes: HashMap<&str, [u8; 32]> = enrollments
        .iter()
        .map(|e| (e.meter_id.as_str(), psm_core::signing::manifest_hash(e)))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(k.receipt_wait_secs);
    for p in parties {
        let ch = psm_net::client::channel(
            &urls[p],
            p,
            Some(psm_net::Role::Keyshare),
            tls,
            &psm_net::client::ClientOptions::default(),
        )?;
        let mut client = KeyshareClient::new(ch);
        let mut waiting: Vec<&str> = enrollments.iter().map(|e| e.meter_id.as_str()).collect();
        loop {
            let mut still = Vec::new();
            let mut last_reason = String::new();
            for chunk in waiting.chunks(10_000) {
                let r = client
                    .get_receipts(GetReceiptsRequest {
                        meter_ids: chunk.iter().map(|m| m.to_string()).collect(),
                        epoch: k.epoch,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("receipts from {p}: {}", s.message()))?
                    .into_inner();
                for a in r.answers {
                    let Some(&m) = chunk.iter().find(|m| **m == a.meter_id) else {
                        bail!(
                            "{p} answered for meter {} it was not asked about",
                            a.meter_id
                        );
                    };
                    match EnrollmentState::try_from(a.state).unwrap_or(EnrollmentState::Unknown) {
                        EnrollmentState::Active => {
                            let receipt = a
                                .receipt
                                .with_context(|| format!("{p} sent no receipt for {m}"))?;
                            if receipt.party != *p {
                                bail!("the receipt for {m} from {p} names {}", receipt.party);
                            }
                            anchors
                                .verify_receipt(&receipt, m, k.epoch, &hashes[m])
                                .map_err(|e| anyhow::anyhow!("{e}: not encrypting"))?;
                        }
                        EnrollmentState::Refused => bail!(
                            "{p} refused the enrollment of {m} for epoch {}: {}",
                            k.epoch,
                            a.reason
                        ),
                        _ => {
                            last_reason = format!("{m}: {}", a.reason);
                            still.push(m);
                        }
                    }
                }
            }
            if still.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{p} has not confirmed {} enrollment(s) within {} s (last: {last_reason}); nothing was encrypted for them; run again later",
                    still.len(),
                    k.receipt_wait_secs
                );
            }
            waiting = still;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

fn seeds_path(dir: &Path, meter: &str, epoch: u32) -> PathBuf {
    dir.join(format!("{meter}.e{epoch}.seeds"))
}

fn enrollment_path(dir: &Path, meter: &str, epoch: u32) -> PathBuf {
    dir.join(format!("{meter}.e{epoch}.enrollment"))
}

/// A meter's seeds for `epoch`: read from `dir`, or made and written there first.
fn load_or_create_seeds(
    dir: &Path,
    meter: &str,
    epoch: u32,
    scheme: Scheme,
) -> anyhow::Result<MeterSeeds> {
    let path = seeds_path(dir, meter, epoch);
    if path.exists() {
        let s = MeterSeeds::read(&path)
            .with_context(|| format!("reading the seeds of {meter} for epoch {epoch}"))?;
        if s.epoch != epoch {
            bail!(
                "{} holds seeds for epoch {}, not {epoch}; it was renamed or overwritten",
                path.display(),
                s.epoch
            );
        }
        if s.seeds.len() != scheme.share_count() {
            bail!(
                "{} holds {} seeds; this deployment's {}-of-{} scheme needs {}: they were made for another deployment (use a new --epoch or another --meter-keys directory)",
                path.display(),
                s.seeds.len(),
                scheme.threshold(),
                scheme.parties(),
                scheme.share_count()
            );
        }
        return Ok(s);
    }
    let s = MeterSeeds::generate(scheme, epoch);
    s.write(&path)
        .with_context(|| format!("writing the seeds of {meter}"))?;
    Ok(s)
}

/// A meter's enrollment: the one sealed earlier for these seeds and keys (kept in `dir`, so a
/// retry sends the same bytes — sealing is randomized), or a new one, written before it is sent.
fn load_or_seal_enrollment(
    dir: &Path,
    meter: &str,
    seeds: &MeterSeeds,
    scheme: Scheme,
    manifest: &Manifest,
    keys: &[(String, Vec<u8>)],
    device: &SecretKey,
) -> anyhow::Result<Enrollment> {
    let path = enrollment_path(dir, meter, seeds.epoch);
    let fingerprint = content_key(keys.iter().flat_map(|(n, k)| [n.as_bytes(), k.as_slice()]));
    let commitments: Vec<Vec<u8>> = seeds
        .commitments(meter)
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    if let Ok(bytes) = std::fs::read(&path) {
        let cached = bytes
            .strip_prefix(fingerprint.as_bytes())
            .and_then(|rest| Enrollment::decode(rest).ok())
            .filter(|e| {
                e.meter_id == meter
                    && e.epoch == seeds.epoch
                    && e.commitments == commitments
                    && envelope::check_shape(e, scheme, &manifest.party_names).is_ok()
                    && psm_core::signing::verify_enrollment(e, &device.public()).is_ok()
            });
        if let Some(e) = cached {
            return Ok(e);
        }
    }
    let e = envelope::enroll(meter, seeds, scheme, keys, device)
        .with_context(|| format!("sealing the seeds of {meter}"))?;
    let mut bytes = fingerprint.into_bytes();
    bytes.extend_from_slice(&e.encode_to_vec());
    psm_core::keys::write_atomic(&path, &bytes, 0o600)
        .with_context(|| format!("writing the enrollment of {meter}"))?;
    Ok(e)
}

/// Creates the seeds directory, readable by its owner only.
pub fn create_key_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("creating the meter key directory {}", dir.display()))
}

/// Enrolls every meter (requests of at most 1,000). Ingest answers ALREADY_EXISTS when it holds
/// another enrollment for a meter and epoch: the local seeds are not the enrolled ones.
async fn enroll_all(
    client: &mut IngestClient<Channel>,
    enrollments: Vec<Enrollment>,
    k: &MeterKeyArgs,
    key_prefix: &str,
) -> anyhow::Result<(u32, u32)> {
    let (mut stored, mut duplicates) = (0, 0);
    for chunk in enrollments.chunks(ENROLLMENTS_PER_REQUEST) {
        let key = format!(
            "{key_prefix}-enroll-{}",
            content_key(chunk.iter().map(|e| e.encode_to_vec()))
        );
        match client
            .enroll(EnrollRequest {
                idempotency_key: key,
                enrollments: chunk.to_vec(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                stored += r.stored;
                duplicates += r.duplicates;
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => bail!(
                "ingest already holds a different enrollment under epoch {} than the seeds in {} ({}): those seeds were replaced or lost since the meter enrolled, and readings under epoch {} can no longer be encrypted for it — enroll new seeds under a new --epoch",
                k.epoch,
                k.meter_keys.display(),
                s.message(),
                k.epoch
            ),
            Err(s) => bail!("enrolling meters: {}", s.message()),
        }
    }
    Ok((stored, duplicates))
}

/// A meter's keys for the run: import when it has import or net readings, export when it has
/// export readings or a negative net reading.
struct Keys {
    import: Option<MeterKey>,
    export: Option<MeterKey>,
}

/// Encrypts one meter-day (or run of a day) against the day's masks: an import register's
/// values on the import channel, an export register's on the export channel; net values as
/// import = max(v, 0) and, when the meter exports, export = max(−v, 0).
fn encrypt_day(
    d: &MeterDay,
    keys: &Keys,
    masks: &IntervalMasks,
    epoch: u32,
    device: &SecretKey,
) -> anyhow::Result<Vec<ReadingBatch>> {
    let context = || format!("{} {}", d.meter_id, format_day(d.day));
    let offset = d.first_interval as usize;
    let (import, export): (Option<Vec<i64>>, Option<Vec<i64>>) = match d.flow {
        Flow::Import => (Some(d.values.clone()), None),
        Flow::Export => (None, Some(d.values.clone())),
        Flow::Net => (
            Some(d.values.iter().map(|v| (*v).max(0)).collect()),
            keys.export
                .as_ref()
                .map(|_| d.values.iter().map(|v| v.saturating_neg().max(0)).collect()),
        ),
    };
    let mut out = Vec::with_capacity(2);
    for (values, key, channel) in [
        (import, &keys.import, LinearChannel::Import),
        (export, &keys.export, LinearChannel::Export),
    ] {
        let (Some(values), Some(key)) = (values, key) else {
            continue;
        };
        let bodies = masks.encrypt(key, offset, &values).with_context(context)?;
        out.push(psm_core::wire::linear_batch_to_proto(
            &d.meter_id,
            d.day,
            epoch,
            channel,
            d.interval_seconds,
            d.first_interval,
            &bodies,
        ));
    }
    for b in &mut out {
        psm_core::signing::sign_batch(b, device);
    }
    Ok(out)
}

/// Enrolls the meters of `days` (seeds made on first use) and submits their readings, encrypted
/// on all cores, in requests of at most 1,000 batches, with a progress bar. Import and export
/// registers go to their channels; a net value v is import max(v, 0) and export max(−v, 0), and
/// a meter with any negative net value sends export batches for all its net days.
pub async fn submit_days(
    ch: Channel,
    k: &MeterKeyArgs,
    tls: &TlsPaths,
    days: &[MeterDay],
    key_prefix: &str,
) -> anyhow::Result<Counts> {
    if k.epoch == 0 || k.epoch > envelope::MAX_EPOCH {
        bail!("--epoch {}: expected 1..={}", k.epoch, envelope::MAX_EPOCH);
    }
    let manifest = fetch_manifest(ch.clone()).await?;
    let scheme = Scheme::new(manifest.parties, manifest.threshold)
        .context("the manifest from ingest names an impossible scheme")?;
    let anchors = Anchors::read(&k.anchors)?;
    let keys = enrollment_keys(&k.enrollment_keys, &manifest, &anchors)?;

    // Meters in order of first appearance, and which registers each has: (import, export).
    let mut meters: Vec<&str> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut registers: Vec<(bool, bool)> = Vec::new();
    for d in days {
        let i = *index.entry(d.meter_id.as_str()).or_insert_with(|| {
            meters.push(d.meter_id.as_str());
            registers.push((false, false));
            meters.len() - 1
        });
        match d.flow {
            Flow::Import => registers[i].0 = true,
            Flow::Export => registers[i].1 = true,
            Flow::Net => {
                registers[i].0 = true;
                registers[i].1 |= d.values.iter().any(|v| *v < 0);
            }
        }
    }

    // Seeds first (written before anything leaves this machine), then enrollments.
    create_key_dir(&k.meter_keys)?;
    let seeds: Vec<MeterSeeds> = tokio::task::block_in_place(|| {
        meters
            .par_iter()
            .map(|m| load_or_create_seeds(&k.meter_keys, m, k.epoch, scheme))
            .collect::<anyhow::Result<_>>()
    })?;
    let devices: Vec<SecretKey> = tokio::task::block_in_place(|| {
        meters
            .par_iter()
            .map(|m| load_or_create_device(&k.meter_keys, m))
            .collect::<anyhow::Result<_>>()
    })?;
    let enrollments: Vec<Enrollment> = tokio::task::block_in_place(|| {
        meters
            .par_iter()
            .zip(&seeds)
            .zip(&devices)
            .map(|((m, s), d)| {
                load_or_seal_enrollment(&k.meter_keys, m, s, scheme, &manifest, &keys, d)
            })
            .collect::<anyhow::Result<_>>()
    })?;
    let mut client = IngestClient::new(ch);
    let (new, again) = enroll_all(&mut client, enrollments.clone(), k, key_prefix).await?;
    eprintln!(
        "  {} meters enrolled for epoch {} ({new} new, {again} already enrolled)",
        meters.len(),
        k.epoch
    );
    await_receipts(k, tls, &anchors, &manifest.party_names, &enrollments).await?;
    eprintln!(
        "  every keyshare ({}) confirmed every enrollment, receipts checked against their anchors",
        manifest.party_names.join(", ")
    );

    let mut counts = Counts::default();
    let bar = progress_bar(days.len(), "meter-days");
    let all: Vec<usize> = (0..meters.len()).collect();
    for pass in all.chunks(METERS_PER_PASS) {
        let meter_keys: HashMap<usize, Keys> = tokio::task::block_in_place(|| {
            pass.par_iter()
                .map(|&i| {
                    let (import, export) = registers[i];
                    (
                        i,
                        Keys {
                            import: import.then(|| seeds[i].key(LinearChannel::Import)),
                            export: export.then(|| seeds[i].key(LinearChannel::Export)),
                        },
                    )
                })
                .collect()
        });
        // This pass's meter-days by (day, interval length): one set of masks for each.
        let mut groups: BTreeMap<(i64, u32), Vec<(&MeterDay, &Keys)>> = BTreeMap::new();
        for d in days {
            if let Some(keys) = meter_keys.get(&index[d.meter_id.as_str()]) {
                groups
                    .entry((d.day, d.interval_seconds))
                    .or_default()
                    .push((d, keys));
            }
        }
        for ((day, interval_seconds), group) in groups {
            if !INTERVALS.contains(&interval_seconds) {
                bail!("interval {interval_seconds} s: expected one of {INTERVALS:?}");
            }
            let slots_per_interval = u64::from(interval_seconds) / SLOT_SECONDS as u64;
            let per_day = (SLOTS_PER_DAY as u64 / slots_per_interval) as usize;
            let first_slot = u64::try_from(day)
                .ok()
                .and_then(|d| d.checked_mul(SLOTS_PER_DAY as u64))
                .with_context(|| format!("day {day} is before 1970"))?;
            let masks = tokio::task::block_in_place(|| {
                IntervalMasks::new(k.epoch, first_slot, slots_per_interval, per_day)
            });
            for chunk in group.chunks(BATCHES_PER_REQUEST / 2) {
                let batches: Vec<ReadingBatch> = tokio::task::block_in_place(|| {
                    chunk
                        .par_iter()
                        .map(|(d, keys)| {
                            let device = &devices[index[d.meter_id.as_str()]];
                            encrypt_day(d, keys, &masks, k.epoch, device)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })?
                .into_iter()
                .flatten()
                .collect();
                counts += submit_chunk(&mut client, key_prefix, batches).await?;
                bar.inc(chunk.len() as u64);
            }
        }
    }
    bar.finish_and_clear();
    Ok(counts)
}

/// Derives each meter-day's registers from its readings, encrypts them with a zero-knowledge
/// proof bound to the meter-day (about 1.6 s of a core each, all cores used) and submits them on
/// the tfhe track in requests of at most 50, with a progress bar.
pub async fn submit_registers(
    ch: Channel,
    days: &[MeterDay],
    meter_keys: &Path,
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
    let mut devices: HashMap<&str, SecretKey> = HashMap::new();
    for d in days {
        if !devices.contains_key(d.meter_id.as_str()) {
            devices.insert(&d.meter_id, load_or_create_device(meter_keys, &d.meter_id)?);
        }
    }
    let mut client = IngestClient::new(ch);
    let mut counts = Counts::default();
    eprintln!("  registers (peak demand, daily total) with zero-knowledge proofs:");
    let bar = progress_bar(days.len(), "meter-days");
    for chunk in days.chunks(50) {
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
                    let mut b = ReadingBatch {
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
                        ..Default::default()
                    };
                    psm_core::signing::sign_batch(&mut b, &devices[d.meter_id.as_str()]);
                    Ok(b)
                })
                .collect::<Result<Vec<_>, psm_core::registers::RegisterError>>()
        })?;
        counts += submit_chunk(&mut client, key_prefix, batches).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(counts)
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
                "auto" if is_nem12(&text) => "nem12",
                "auto" if is_green_button_csv(&text) => "gbcsv",
                "auto" => "csv",
                f @ ("greenbutton" | "gbcsv" | "csv" | "nem12") => f,
                other => {
                    bail!("--format {other:?}: expected greenbutton, gbcsv, csv, nem12 or auto")
                }
            };
            let named = |e: psm_meterdata::import::ImportError| {
                anyhow::anyhow!("{}: {e}", a.file.display())
            };
            let parsed = match format {
                "greenbutton" => parse_green_button(&text, &a.prefix).map_err(named)?,
                "gbcsv" => {
                    let meter = a
                        .meter
                        .as_deref()
                        .context("a Green Button CSV names no meter: pass --meter ID")?;
                    parse_green_button_csv(&text, meter, &a.time_zone).map_err(named)?
                }
                "nem12" => parse_nem12(&text).map_err(named)?,
                _ => parse_plain_csv(&text).map_err(named)?,
            };
            let imported = to_days(&parsed);
            let (complete, partial, skipped) = imported.counts();
            let meters: std::collections::BTreeSet<&str> = imported
                .report
                .iter()
                .map(|r| r.meter_id.as_str())
                .collect();
            if !a.json {
                for r in imported
                    .report
                    .iter()
                    .filter(|r| r.status != DayStatus::Complete || !r.notes.is_empty())
                {
                    eprintln!(
                        "  {} {} {}: {:?}, {}/{} intervals{}{}",
                        r.meter_id,
                        r.flow.name(),
                        r.day,
                        r.status,
                        r.stored,
                        r.expected,
                        if r.notes.is_empty() { "" } else { "; " },
                        r.notes.join("; ")
                    );
                }
            }
            let counts = if imported.days.is_empty() {
                Counts::default()
            } else {
                let ch = a.client.channel("headend/headend-1")?;
                let tls = a.client.tls("headend/headend-1")?;
                let key = format!("import-{}", blake3::hash(text.as_bytes()).to_hex());
                rt.block_on(submit_days(ch, &a.keys, &tls, &imported.days, &key[..40]))?
            };
            if a.json {
                let out = serde_json::json!({
                    "file": a.file.display().to_string(),
                    "format": format,
                    "meters": meters.len(),
                    "meter_days": {"complete": complete, "partial": partial, "skipped": skipped},
                    "readings_stored": imported.readings(),
                    "batches": {"stored": counts.stored, "already_there": counts.duplicates, "kept": counts.kept},
                    "days": imported.report,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{} meters: {complete} complete, {partial} partial and {skipped} skipped meter-days, {} readings: {counts}",
                    meters.len(),
                    imported.readings()
                );
            }
            if imported.days.is_empty() {
                bail!("{} holds no reading that can be stored", a.file.display());
            }
        }
        MeterCommand::Simulate(a) => {
            let ch = a.client.channel("headend/headend-1")?;
            let s = rt.block_on(simulate_and_submit(ch, &a))?;
            println!("{} meters × {} days: {}", s.meters.len(), a.days, s.counts);
        }
    }
    Ok(())
}
