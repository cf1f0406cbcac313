//! What this keyshare lets be decrypted: the regulator's rules, checked on every request's
//! manifest. A refusal carries the rule's name, which is also its audit-log entry. Releases that
//! later decisions depend on (cohorts for the differencing guard, bills for one bill per period)
//! are remembered in sled, written durably before the partials leave.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use prost::Message;
use psm_core::keys::KeyKind;
use psm_core::readings::{format_day, parse_day, validate_meter_id, DAY_SECONDS};
use psm_proto::v1::{ComputationKind, ComputationManifest, Track};
use serde::Deserialize;
use tonic::Status;

use crate::rules::Rule;

/// Most inputs one manifest may name.
pub const MAX_INPUTS: usize = 100_000;
/// Longest range of one release, days (the longest billing period).
pub const MAX_RELEASE_DAYS: i64 = 62;

/// A refusal: the status returned and the rule recorded in the audit log (the rule's name).
#[derive(Debug)]
pub struct Refusal {
    pub status: Status,
    pub rule: &'static str,
}

/// Builds a refusal by `rule`, whose message starts with the rule's name.
pub fn refuse(rule: Rule, code: tonic::Code, msg: impl std::fmt::Display) -> Refusal {
    Refusal {
        status: Status::new(code, format!("{rule}: {msg}")),
        rule: rule.name(),
    }
}

fn precondition(rule: Rule, msg: impl std::fmt::Display) -> Refusal {
    refuse(rule, tonic::Code::FailedPrecondition, msg)
}

fn malformed(msg: impl std::fmt::Display) -> Refusal {
    refuse(Rule::Manifest, tonic::Code::InvalidArgument, msg)
}

/// The `[keyshare.policy]` section: this regulator's rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Smallest cohort an aggregate or analytics release may cover (k-anonymity); also the
    /// smallest difference allowed between releases over overlapping time ranges.
    pub min_cohort: usize,
    /// Programs (tariffs, analytics queries) this keyshare allows, as BLAKE3-256 hex of their
    /// encoding. The built-in aggregate (sum) program needs no listing.
    pub allowed_programs: Vec<String>,
    /// Allow any bill or analytics program (development only; logged at start).
    pub allow_any_program: bool,
    /// PartialDecrypt requests per minute per caller.
    pub rate_limit_per_minute: u32,
    /// How many times a bill for one (meter, channel, period) may be re-issued (with a reason).
    pub max_reissues: u32,
    /// Shortest linear-track bill, days (short bills would release a few readings each).
    pub min_bill_days: u32,
    /// Narrowest tariff band a bill may release, in hours per week averaged over the period.
    pub min_band_hours_per_week: u32,
    /// Fewest distinct local days each released bill band must cover: seasons and holiday
    /// lists could otherwise narrow a band onto a single day and release that day's total.
    pub min_band_days: u32,
    /// Tariff files (TOML, docs/tariffs.md) this keyshare allows, in addition to
    /// `allowed_programs`: each is allowed by the hash `psm tariff check` prints for it. A file
    /// given with the date it was approved (`{ file = "...", approved = "2026-01-01T00:00:00Z" }`)
    /// may also carry dynamic prices, for periods starting from then.
    pub allowed_tariffs: Vec<AllowedTariff>,
    /// Highest dynamic price over lowest, within one bill: with prices 1, 2^11 and 2^22 on
    /// three slots, one weighted sum would spell out three readings.
    pub max_price_ratio: u32,
    /// `"registered"`: a bill covers exactly one billing cycle of the meter's registry
    /// `billing_day`, local midnight to local midnight in the tariff's time zone. `"any"`: any
    /// period of at least `min_bill_days` (development and tests; logged at start).
    pub billing_cycle: BillingCycle,
}

/// One entry of `allowed_tariffs`: a file, or a file and when it was approved.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AllowedTariff {
    File(PathBuf),
    Approved { file: PathBuf, approved: String },
}

/// What `[keyshare.policy]` allows programs by: every allowed hash, and for tariffs approved on
/// a stated date that date (Unix seconds).
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    pub programs: BTreeSet<[u8; 32]>,
    pub approved: std::collections::BTreeMap<[u8; 32], i64>,
}

/// Which periods bills may cover (`[keyshare.policy] billing_cycle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingCycle {
    Registered,
    Any,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_cohort: 5,
            allowed_programs: Vec::new(),
            allow_any_program: false,
            rate_limit_per_minute: 600,
            max_reissues: 1,
            min_bill_days: 28,
            min_band_hours_per_week: 4,
            min_band_days: 4,
            allowed_tariffs: Vec::new(),
            max_price_ratio: 8,
            billing_cycle: BillingCycle::Registered,
        }
    }
}

impl PolicyConfig {
    /// Checks the configuration; returns the allowed program hashes and approval dates.
    pub fn validate(&self) -> Result<Allowed, String> {
        if self.min_cohort == 0 {
            return Err("[keyshare.policy] min_cohort must be at least 1".into());
        }
        if self.rate_limit_per_minute == 0 {
            return Err("[keyshare.policy] rate_limit_per_minute must be at least 1".into());
        }
        if self.min_bill_days == 0 || self.min_bill_days > 62 {
            return Err("[keyshare.policy] min_bill_days is 1..=62".into());
        }
        if self.min_band_days == 0 || self.min_band_days > 31 {
            return Err("[keyshare.policy] min_band_days is 1..=31".into());
        }
        if self.max_price_ratio == 0 {
            return Err("[keyshare.policy] max_price_ratio is at least 1".into());
        }
        let mut allowed = self
            .allowed_programs
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        format!("[keyshare.policy] allowed_programs: {h:?} is not a BLAKE3-256 hex hash")
                    })
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let mut approved = std::collections::BTreeMap::new();
        for entry in &self.allowed_tariffs {
            let (path, date) = match entry {
                AllowedTariff::File(p) => (p, None),
                AllowedTariff::Approved { file, approved } => (file, Some(approved)),
            };
            let checked = psm_tariff::file::load(path)
                .map_err(|e| format!("[keyshare.policy] allowed_tariffs: {e}"))?;
            allowed.insert(checked.hash);
            if let Some(d) = date {
                let at = chrono::DateTime::parse_from_rfc3339(d).map_err(|e| {
                    format!(
                        "[keyshare.policy] allowed_tariffs: {}: approved = {d:?} is not an RFC 3339 time: {e}",
                        path.display()
                    )
                })?;
                approved.insert(checked.hash, at.timestamp());
            }
        }
        Ok(Allowed {
            programs: allowed,
            approved,
        })
    }

    /// The numbers linear-track releases are judged by.
    pub fn linear_limits(&self) -> crate::linear::Limits {
        crate::linear::Limits {
            min_cohort: self.min_cohort,
            max_reissues: self.max_reissues,
            min_bill_days: self.min_bill_days,
            min_band_hours_per_week: self.min_band_hours_per_week,
            min_band_days: self.min_band_days,
            max_price_ratio: self.max_price_ratio,
            billing_cycle: self.billing_cycle,
        }
    }
}

/// The billing-cycle rule, for bills on both tracks: with `billing_cycle = "registered"`, the
/// period must be exactly one cycle of the meter's registered billing day, in the registry's
/// time zone for the meter when it names one (so the caller's choice of tariff cannot move the
/// cycle), else in the tariff's.
pub fn check_billing_cycle(
    cycle: BillingCycle,
    registry: &psm_core::registry::Registry,
    meter: &str,
    tariff: &psm_tariff::Tariff,
    (start_unix, end_unix): (i64, i64),
) -> Result<(), Refusal> {
    if cycle == BillingCycle::Any {
        return Ok(());
    }
    let (day, zone) = registry
        .billing_cycle(meter)
        .ok_or_else(|| crate::linear::not_registered(meter))?;
    // A tariff in another zone would count days, months, seasons and bands on other local days
    // than the cycle's, leaving slivers of days at its edges.
    if let Some(z) = zone.filter(|z| *z != tariff.tz) {
        return Err(precondition(
            Rule::BillingCycle,
            format!(
                "meter {meter} is registered in {}; its bills use tariffs in that time zone, not {}",
                z.name(),
                tariff.tz.name()
            ),
        ));
    }
    psm_tariff::check_cycle(zone.unwrap_or(tariff.tz), day, start_unix, end_unix)
        .map_err(|e| precondition(Rule::BillingCycle, format!("meter {meter}: {}", e.0)))
}

/// Per-caller request quota, and a tally of refusals not yet written to the audit log.
pub struct RateLimiter {
    quota: psm_net::quota::Quota,
    /// caller → (refusals since its last rate-limit record, when that record was written).
    unrecorded: std::sync::Mutex<HashMap<String, (u64, Instant)>>,
}

/// How often a caller's rate-limit refusals are written to the audit log at most; the ones in
/// between are counted and summarized in the next record (a flood of refused requests must not
/// become a flood of fsynced records).
pub const RATE_LIMIT_RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            quota: psm_net::quota::Quota::new(u64::from(per_minute)),
            unrecorded: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A rate-limit refusal of `caller`: Some(refusals counted but not recorded since its last
    /// record) when this one is to be recorded, None when it is only counted.
    pub fn refusal_to_record(&self, caller: &str) -> Option<u64> {
        let now = Instant::now();
        let mut map = self
            .unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(caller) {
            Some((n, at)) if now.duration_since(*at) < RATE_LIMIT_RECORD_INTERVAL => {
                *n += 1;
                None
            }
            Some((n, at)) => {
                let before = *n;
                (*n, *at) = (0, now);
                Some(before)
            }
            None => {
                if map.len() >= psm_net::quota::MAX_CALLERS {
                    map.clear();
                }
                map.insert(caller.to_owned(), (0, now));
                Some(0)
            }
        }
    }

    /// Refusals of `caller` counted but not yet recorded (reset to 0): the next record about
    /// that caller says how many.
    pub fn take_unrecorded(&self, caller: &str) -> u64 {
        let mut map = self
            .unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get_mut(caller).map_or(0, |(n, _)| std::mem::take(n))
    }

    /// Takes one request of `caller`'s quota or refuses.
    pub fn admit(&self, caller: &str) -> Result<(), Refusal> {
        self.quota.take(caller, 1).map_err(|over| {
            let wait = match over {
                psm_net::quota::OverQuota::RetryIn(w) => w.as_secs() + 1,
                psm_net::quota::OverQuota::TooLarge => 60,
            };
            refuse(
                Rule::RateLimit,
                tonic::Code::ResourceExhausted,
                format!(
                    "{caller} is over this keyshare's limit of {} requests per minute; retry in {wait} s",
                    self.quota.per_minute(),
                ),
            )
        })
    }
}

/// "bill", "aggregate" or "analytics".
pub fn kind_name(k: ComputationKind) -> &'static str {
    match k {
        ComputationKind::Bill => "bill",
        ComputationKind::Aggregate => "aggregate",
        ComputationKind::Analytics => "analytics",
        ComputationKind::Unspecified => "unspecified computation",
    }
}

/// What a manifest asks to release, once its shape is checked.
#[derive(Debug, Clone)]
pub struct Checked {
    pub kind: ComputationKind,
    /// The track of the key asked for: a bill has one part per track.
    pub track: Track,
    pub first_day: i64,
    /// Exclusive.
    pub end_day: i64,
    /// Distinct meters of the inputs, sorted.
    pub meters: Vec<String>,
    pub program_hash: Option<[u8; 32]>,
    /// (meter, day, ciphertext hash) of every input: pinned by the first release that uses
    /// them, so no later release can decrypt other bytes for the same meter-day.
    pub inputs: Vec<(String, i64, [u8; 32])>,
}

impl Checked {
    /// "2026-01-05..2026-01-11" (inclusive days).
    pub fn days(&self) -> String {
        if self.end_day - self.first_day == 1 {
            format_day(self.first_day)
        } else {
            format!(
                "{}..{}",
                format_day(self.first_day),
                format_day(self.end_day - 1)
            )
        }
    }
}

/// Checks a manifest's shape against the key it asks for and this keyshare's rules that need no
/// state: k-anonymity and allowed programs.
pub fn check_manifest(
    cfg: &PolicyConfig,
    allowed: &BTreeSet<[u8; 32]>,
    m: &ComputationManifest,
    key_kind: KeyKind,
) -> Result<Checked, Refusal> {
    let kind = match ComputationKind::try_from(m.kind) {
        Ok(ComputationKind::Unspecified) | Err(_) => {
            return Err(precondition(
                Rule::ManifestRequired,
                "the manifest must state the computation kind (bill, aggregate or analytics)",
            ))
        }
        Ok(k) => k,
    };
    let range = m
        .range
        .as_ref()
        .ok_or_else(|| malformed("the manifest has no time range"))?;
    if range.start_unix % DAY_SECONDS != 0
        || range.end_unix % DAY_SECONDS != 0
        || range.end_unix <= range.start_unix
    {
        return Err(malformed("the range must be whole UTC days"));
    }
    let (first_day, end_day) = (range.start_unix / DAY_SECONDS, range.end_unix / DAY_SECONDS);
    if end_day - first_day > MAX_RELEASE_DAYS {
        return Err(malformed(format!(
            "the range spans {} days; the limit is {MAX_RELEASE_DAYS}",
            end_day - first_day
        )));
    }
    if m.inputs.is_empty() || m.inputs.len() > MAX_INPUTS {
        return Err(malformed(format!(
            "{} inputs; a release names 1..={MAX_INPUTS}",
            m.inputs.len()
        )));
    }
    let track = match key_kind {
        KeyKind::Tfhe => Track::Tfhe,
    };
    // Re-execution expands every input in memory: the same bound as compute's.
    if m.inputs.len() > psm_core::tfhe_program::MAX_TFHE_INPUTS {
        return Err(refuse(
            Rule::SizeLimit,
            tonic::Code::ResourceExhausted,
            format!(
                "{} inputs; a tfhe-track program is re-executed on at most {}",
                m.inputs.len(),
                psm_core::tfhe_program::MAX_TFHE_INPUTS
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut meters = BTreeSet::new();
    let mut previous: Option<(&str, i64)> = None;
    let mut seen_days = Vec::with_capacity(m.inputs.len());
    for i in &m.inputs {
        validate_meter_id(&i.meter_id).map_err(malformed)?;
        let day = parse_day(&i.day).map_err(malformed)?;
        seen_days.push(day);
        if day < first_day || day >= end_day {
            return Err(malformed(format!(
                "input {} {} lies outside the range",
                i.meter_id, i.day
            )));
        }
        if i.track != track as i32 {
            return Err(malformed(format!(
                "input {} {} is not on the {} track of the key asked for",
                i.meter_id,
                i.day,
                track.as_str_name()
            )));
        }
        if i.ciphertext_hash.len() != 32 {
            return Err(malformed(format!(
                "input {} {}: ciphertext_hash must be 32 bytes",
                i.meter_id, i.day
            )));
        }
        if !seen.insert((i.meter_id.as_str(), day)) {
            return Err(malformed(format!(
                "input {} {} is named twice",
                i.meter_id, i.day
            )));
        }
        // Canonical order, (meter, day) ascending: one computation has one manifest, and
        // re-execution groups by meter without trusting the order it was given.
        let here = (i.meter_id.as_str(), day);
        if previous.is_some_and(|p| p > here) {
            return Err(malformed(format!(
                "input {} {} is out of order: inputs are sorted by meter id, then day",
                i.meter_id, i.day
            )));
        }
        previous = Some(here);
        meters.insert(i.meter_id.clone());
    }
    let inputs = m
        .inputs
        .iter()
        .zip(&seen_days)
        .map(|(i, day)| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&i.ciphertext_hash);
            (i.meter_id.clone(), *day, h)
        })
        .collect();
    psm_core::linear::release::check_reissue_reason(&m.reissue_reason).map_err(malformed)?;
    let program_hash = if m.program.is_empty() && m.program_hash.is_empty() {
        None
    } else {
        let h = *blake3::hash(&m.program).as_bytes();
        if m.program_hash != h {
            return Err(malformed("program_hash is not the BLAKE3-256 of program"));
        }
        Some(h)
    };
    let checked = Checked {
        kind,
        track,
        first_day,
        end_day,
        meters: meters.into_iter().collect(),
        program_hash,
        inputs,
    };
    let program_allowed = |what: &str| -> Result<(), Refusal> {
        let h =
            program_hash.ok_or_else(|| malformed(format!("a {what} must carry its program")))?;
        if cfg.allow_any_program || allowed.contains(&h) {
            Ok(())
        } else {
            Err(refuse(
                Rule::AllowedProgram,
                tonic::Code::PermissionDenied,
                format!(
                    "{what} program {} is not among this keyshare's allowed_programs",
                    hex::encode(h)
                ),
            ))
        }
    };
    match kind {
        ComputationKind::Bill => {
            if checked.meters.len() != 1 {
                return Err(precondition(
                    Rule::BillShape,
                    format!(
                        "a bill covers one meter; the inputs name {}",
                        checked.meters.len()
                    ),
                ));
            }
            if (seen.len() as i64) != end_day - first_day {
                return Err(precondition(
                    Rule::BillShape,
                    format!(
                        "a bill must use every day of its period {} exactly once; the inputs name {} days",
                        checked.days(),
                        seen.len()
                    ),
                ));
            }
            if end_day - first_day < i64::from(cfg.min_bill_days) {
                return Err(precondition(
                    Rule::BillPeriod,
                    format!(
                        "the bill covers {} day(s); this keyshare releases bills of at least {} days (min_bill_days), since short bills release a few readings each",
                        end_day - first_day,
                        cfg.min_bill_days
                    ),
                ));
            }
            program_allowed("bill")?;
        }
        ComputationKind::Aggregate | ComputationKind::Analytics => {
            if checked.meters.len() < cfg.min_cohort {
                return Err(precondition(
                    Rule::KAnonymity,
                    format!(
                        "the release covers {} meter(s); this keyshare releases cohorts of at least {}",
                        checked.meters.len(),
                        cfg.min_cohort
                    ),
                ));
            }
            if kind == ComputationKind::Analytics {
                program_allowed("analytics")?;
                // Every meter on every day of the range, once: a histogram over a cohort whose
                // members cover different days would difference into one meter's day.
                let days = (end_day - first_day) as usize;
                if seen.len() != checked.meters.len() * days {
                    return Err(precondition(
                        Rule::AnalyticsShape,
                        format!(
                            "a histogram must use every day of {} for each of its {} meters exactly once; the inputs name {} meter-days, not {}",
                            checked.days(),
                            checked.meters.len(),
                            seen.len(),
                            checked.meters.len() * days
                        ),
                    ));
                }
                let q = psm_proto::v1::AnalyticsRequest::decode(m.program.as_slice())
                    .map_err(|e| malformed(format!("analytics program: {e}")))?;
                if q.range.as_ref() != Some(range)
                    || !q.meter_ids.is_empty()
                    || !q.idempotency_key.is_empty()
                {
                    return Err(malformed(
                        "the analytics program must state exactly the manifest's range and no cohort or idempotency key",
                    ));
                }
            } else {
                return Err(precondition(
                    Rule::Manifest,
                    "aggregates are linear-track releases (Keyshare.Release); no tfhe-track aggregate program exists",
                ));
            }
        }
        ComputationKind::Unspecified => unreachable!("refused above"),
    }
    Ok(checked)
}

fn store(e: sled::Error) -> Refusal {
    store_text(e)
}

fn store_text(e: impl std::fmt::Display) -> Refusal {
    refuse(
        Rule::Internal,
        tonic::Code::Unavailable,
        format!("release store: {e}"),
    )
}

/// Remembered releases: bills per (meter, period) and released cohorts per time range.
pub struct Releases {
    db: sled::Db,
    bills: sled::Tree,
    cohorts: sled::Tree,
    /// (meter, day) → the ciphertext hash of the tfhe-track registers first released for it.
    pinned: sled::Tree,
    /// The linear track's bills (its ledger's tree), so neither track bills a period that
    /// partially overlaps a period the other billed.
    linear_bills: sled::Tree,
    /// Held by both tracks' ledgers while they check and record.
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The linear track's judgement of a tfhe-track bill against the aggregates its meter was in
/// (`cohort-bills`), run under the ledger lock; the argument says whether to record.
pub type BillsWithAggregates = dyn Fn(bool) -> Result<(), Refusal> + Send + Sync;

/// Slots of a day (the linear track's unit).
const SLOTS_PER_DAY: u64 = psm_core::linear::SLOTS_PER_DAY as u64;

fn pin_key(meter: &str, day: i64) -> Vec<u8> {
    let mut k = meter.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&(day as u64).to_be_bytes());
    k
}

/// The key prefix of a meter's bills on one track (a bill's linear and tfhe parts are separate
/// releases, each once per period).
fn bill_prefix(meter: &str, track: Track) -> Vec<u8> {
    let mut k = meter.as_bytes().to_vec();
    k.push(0);
    k.push(track as u8);
    k
}

/// A bill release: prefix, first day, request hash → end day, program (tariff) hash.
fn bill_key(meter: &str, track: Track, first_day: i64, request_hash: &[u8; 32]) -> Vec<u8> {
    let mut k = bill_prefix(meter, track);
    k.extend_from_slice(&(first_day as u64).to_be_bytes());
    k.extend_from_slice(request_hash);
    k
}

fn day_at(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b) as i64
}

impl Releases {
    pub fn open(dir: &Path) -> Result<Self, sled::Error> {
        let db = sled::open(dir)?;
        Ok(Releases {
            bills: db.open_tree("bills")?,
            cohorts: db.open_tree("cohorts")?,
            pinned: db.open_tree("tfhe_pinned_inputs")?,
            linear_bills: db.open_tree(crate::linear::BILLS_TREE)?,
            db,
            lock: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The lock both tracks' ledgers hold (the linear track takes it too).
    pub fn ledger_lock(&self) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.lock.clone()
    }

    /// Writes a tfhe-track bill as [`Self::admit`] would (tests of the linear track's rules).
    #[cfg(test)]
    pub(crate) fn record_tfhe_bill_for_test(&self, meter: &str, first_day: i64, end_day: i64) {
        let key = bill_key(meter, Track::Tfhe, first_day, &[first_day as u8; 32]);
        let mut v = (end_day as u64).to_be_bytes().to_vec();
        v.extend_from_slice(&[0; 32]);
        self.bills.insert(key, v).unwrap();
    }

    /// Every tfhe-track bill of `meter`: (first day, end day).
    pub fn tfhe_bills_of(&self, meter: &str) -> Result<Vec<(i64, i64)>, Refusal> {
        let prefix = bill_prefix(meter, Track::Tfhe);
        let mut out = Vec::new();
        for kv in self.bills.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store)?;
            if k.len() < prefix.len() + 8 || v.len() < 8 {
                return Err(store_text("corrupt tfhe bill record"));
            }
            out.push((day_at(&k, prefix.len()), day_at(&v, 0)));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The tfhe-track bills of `meter` overlapping the slots [start, end) whose period is not
    /// exactly that: (first day, end day) of the first. For the linear track's ledger.
    pub fn tfhe_bill_overlapping(
        &self,
        meter: &str,
        start_slot: u64,
        end_slot: u64,
    ) -> Result<Option<(i64, i64)>, Refusal> {
        let prefix = bill_prefix(meter, Track::Tfhe);
        for kv in self.bills.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store)?;
            let (first, end) = (day_at(&k, prefix.len()), day_at(&v, 0));
            let (s, e) = (first as u64 * SLOTS_PER_DAY, end as u64 * SLOTS_PER_DAY);
            if s < end_slot && start_slot < e && (s, e) != (start_slot, end_slot) {
                return Ok(Some((first, end)));
            }
        }
        Ok(None)
    }

    fn check(
        &self,
        c: &Checked,
        cfg: &PolicyConfig,
        request_hash: &[u8; 32],
        reissue_reason: &str,
    ) -> Result<(), Refusal> {
        // A meter-day's stored registers never change (ingest stores a day once): a release
        // naming other bytes for a meter-day released before is a substitution, by a head-end
        // or a lying ingest, that would difference against the first.
        for (meter, day, hash) in &c.inputs {
            if let Some(v) = self.pinned.get(pin_key(meter, *day)).map_err(store)? {
                if v.as_ref() != hash.as_slice() {
                    return Err(precondition(
                        Rule::InputPinned,
                        format!(
                            "input {meter} {} names registers with hash {}, but {} was released for that meter-day before; a meter-day's registers are released as stored the first time, never replaced",
                            format_day(*day),
                            &hex::encode(hash)[..16],
                            &hex::encode(&v)[..16.min(2 * v.len())]
                        ),
                    ));
                }
            }
        }
        match c.kind {
            ComputationKind::Bill => {
                let meter = &c.meters[0];
                // The linear parts of bills: a tfhe-track bill over a period partially
                // overlapping a linear-track bill would difference into the days between them
                // (the tiered cost reveals the total, the band totals sum to it).
                let (s, e) = (
                    c.first_day as u64 * SLOTS_PER_DAY,
                    c.end_day as u64 * SLOTS_PER_DAY,
                );
                let mut lp = meter.as_bytes().to_vec();
                lp.push(0);
                for kv in self.linear_bills.scan_prefix(&lp) {
                    let (k, v) = kv.map_err(store)?;
                    if k.len() != lp.len() + 9 || v.len() < 8 {
                        return Err(store_text("corrupt linear bill record"));
                    }
                    let start = day_at(&k, lp.len() + 1) as u64;
                    let end = day_at(&v, 0) as u64;
                    if start < e && s < end && (start, end) != (s, e) {
                        return Err(precondition(
                            Rule::OneBillPerPeriod,
                            format!(
                                "meter {meter}'s linear-track bill covers slots {start}..{end}, which partially overlaps {}; a meter's bills on both tracks cover equal or disjoint periods",
                                c.days()
                            ),
                        ));
                    }
                }
                let prefix = bill_prefix(meter, c.track);
                // Earlier bills overlapping this period, other than this very request.
                let mut reissues = 0u32;
                for kv in self.bills.scan_prefix(&prefix) {
                    let (k, v) = kv.map_err(store)?;
                    let first = day_at(&k, prefix.len());
                    let end = day_at(&v, 0);
                    if k[prefix.len() + 8..] == request_hash[..]
                        || first >= c.end_day
                        || end <= c.first_day
                    {
                        continue;
                    }
                    let earlier = Checked {
                        first_day: first,
                        end_day: end,
                        ..c.clone()
                    };
                    if reissue_reason.trim().is_empty() {
                        return Err(precondition(
                            Rule::OneBillPerPeriod,
                            format!(
                                "meter {meter} was already billed for {}, which overlaps {}; re-issue with a stated reason",
                                earlier.days(),
                                c.days()
                            ),
                        ));
                    }
                    // A re-issue repeats the same period under the same tariff: anything else
                    // would difference into the readings where the two bills differ.
                    let same_program = c.program_hash.is_some_and(|h| v.get(8..40) == Some(&h[..]));
                    if (first, end) != (c.first_day, c.end_day) || !same_program {
                        return Err(precondition(
                            Rule::OneBillPerPeriod,
                            format!(
                                "meter {meter} was billed for {} under tariff {}; a re-issue must cover exactly that period under the same tariff",
                                earlier.days(),
                                v.get(8..16).map(hex::encode).unwrap_or_else(|| "?".into())
                            ),
                        ));
                    }
                    reissues += 1;
                }
                if reissues > cfg.max_reissues {
                    return Err(precondition(
                        Rule::OneBillPerPeriod,
                        format!(
                            "meter {meter}'s bill for {} was already re-issued {} time(s); this keyshare allows {} (max_reissues)",
                            c.days(),
                            reissues - 1,
                            cfg.max_reissues
                        ),
                    ));
                }
            }
            ComputationKind::Aggregate | ComputationKind::Analytics => {
                let from = (c.first_day - MAX_RELEASE_DAYS).max(0) as u64;
                let to = c.end_day as u64;
                let mine: BTreeSet<&str> = c.meters.iter().map(String::as_str).collect();
                for kv in self
                    .cohorts
                    .range(from.to_be_bytes().to_vec()..to.to_be_bytes().to_vec())
                {
                    let (k, v) = kv.map_err(store)?;
                    let (first, end) = (day_at(&k, 0), day_at(&k, 8));
                    if end <= c.first_day {
                        continue;
                    }
                    let theirs: BTreeSet<&str> =
                        std::str::from_utf8(&v).unwrap_or("").split('\n').collect();
                    // Counts add across cohorts: over one range H(A∪{x}) + H(B) − H(A∪B) is
                    // x's band, though each pair differs by k or more. So released cohorts over
                    // overlapping ranges are equal or disjoint, as on the linear track (over
                    // different ranges the counts are of different totals, but nothing is lost
                    // by holding them to the same rule).
                    let shared = mine.intersection(&theirs).count();
                    if shared > 0 && mine != theirs {
                        let earlier = Checked {
                            first_day: first,
                            end_day: end,
                            ..c.clone()
                        };
                        return Err(precondition(
                            Rule::Differencing,
                            format!(
                                "this cohort of {} meters shares {shared} with a different cohort of {} released for {}, which overlaps {}; cohorts released over overlapping ranges are equal or disjoint",
                                mine.len(),
                                theirs.len(),
                                earlier.days(),
                                c.days()
                            ),
                        ));
                    }
                }
            }
            ComputationKind::Unspecified => {}
        }
        Ok(())
    }

    /// The database the keyshare's release state lives in (the linear track keeps its trees
    /// there too: one sled database per process).
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }

    /// Checks the stateful rules without recording (an early refusal before costly work).
    pub async fn precheck(
        &self,
        c: &Checked,
        cfg: &PolicyConfig,
        request_hash: &[u8; 32],
        reissue_reason: &str,
        bills: Option<&BillsWithAggregates>,
    ) -> Result<(), Refusal> {
        let _g = self.lock.lock().await;
        self.check(c, cfg, request_hash, reissue_reason)?;
        if let (ComputationKind::Bill, Some(judge)) = (c.kind, bills) {
            judge(false)?;
        }
        Ok(())
    }

    /// Checks the stateful rules again and records the release durably, atomically with respect
    /// to other requests.
    pub async fn admit(
        &self,
        c: &Checked,
        cfg: &PolicyConfig,
        request_hash: &[u8; 32],
        reissue_reason: &str,
        bills: Option<&BillsWithAggregates>,
    ) -> Result<(), Refusal> {
        let _g = self.lock.lock().await;
        self.check(c, cfg, request_hash, reissue_reason)?;
        // A bill's part in the rules relating bills to aggregates: checked and recorded before
        // the bill itself (which it must not yet see as this period's bill).
        if let (ComputationKind::Bill, Some(judge)) = (c.kind, bills) {
            judge(true)?;
        }
        let mut pins = sled::Batch::default();
        for (meter, day, hash) in &c.inputs {
            pins.insert(pin_key(meter, *day), hash.to_vec());
        }
        self.pinned.apply_batch(pins).map_err(store)?;
        match c.kind {
            ComputationKind::Bill => {
                // end day, program hash
                let mut v = (c.end_day as u64).to_be_bytes().to_vec();
                v.extend_from_slice(&c.program_hash.unwrap_or_default());
                self.bills
                    .insert(
                        bill_key(&c.meters[0], c.track, c.first_day, request_hash),
                        v,
                    )
                    .map_err(store)?;
            }
            ComputationKind::Aggregate | ComputationKind::Analytics => {
                let members = c.meters.join("\n");
                let mut k = (c.first_day as u64).to_be_bytes().to_vec();
                k.extend_from_slice(&(c.end_day as u64).to_be_bytes());
                k.extend_from_slice(blake3::hash(members.as_bytes()).as_bytes());
                self.cohorts.insert(k, members.as_bytes()).map_err(store)?;
            }
            ComputationKind::Unspecified => {}
        }
        self.db.flush_async().await.map_err(store)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_proto::v1::{InputRef, TimeRange};

    const D: i64 = 20_000;

    /// A manifest naming every day of `days` for each meter, in canonical order; its program
    /// is a histogram query over exactly that range.
    fn manifest(kind: ComputationKind, meters: &[&str], days: i64) -> ComputationManifest {
        let range = TimeRange {
            start_unix: D * DAY_SECONDS,
            end_unix: (D + days) * DAY_SECONDS,
        };
        let program = psm_proto::v1::AnalyticsRequest {
            range: Some(range),
            band_edges_wh: vec![0, 1000],
            ..Default::default()
        }
        .encode_to_vec();
        ComputationManifest {
            kind: kind as i32,
            program_hash: blake3::hash(&program).as_bytes().to_vec(),
            program,
            inputs: meters
                .iter()
                .flat_map(|m| {
                    (0..days).map(move |d| InputRef {
                        meter_id: (*m).into(),
                        day: format_day(D + d),
                        track: Track::Tfhe as i32,
                        ciphertext_hash: vec![0; 32],
                    })
                })
                .collect(),
            range: Some(range),
            ..Default::default()
        }
    }

    fn rule(r: Result<impl Sized, Refusal>) -> &'static str {
        r.err().map_or("allowed", |r| r.rule)
    }

    #[test]
    fn manifests_are_checked_before_anything_else() {
        let cfg = PolicyConfig {
            min_bill_days: 1,
            ..PolicyConfig::default()
        };
        let five = ["a", "b", "c", "d", "e"];
        let histogram = manifest(ComputationKind::Analytics, &five, 1);
        let bill = manifest(ComputationKind::Bill, &["a"], 3);
        let hash =
            |m: &ComputationManifest| -> [u8; 32] { m.program_hash.clone().try_into().unwrap() };
        let allowed = BTreeSet::from([hash(&histogram), hash(&bill)]);
        let check =
            |m: &ComputationManifest| rule(check_manifest(&cfg, &allowed, m, KeyKind::Tfhe));
        assert_eq!(check(&histogram), "allowed");
        assert_eq!(
            check(&manifest(ComputationKind::Analytics, &five[..4], 1)),
            "k-anonymity"
        );
        assert_eq!(
            check(&manifest(ComputationKind::Unspecified, &five, 1)),
            "manifest-required"
        );
        // Aggregates are linear-track releases, never tfhe-track decryptions.
        assert_eq!(
            check(&manifest(ComputationKind::Aggregate, &five, 1)),
            "manifest"
        );
        let mut twice = histogram.clone();
        twice.inputs.push(twice.inputs[0].clone());
        assert_eq!(check(&twice), "manifest");
        let mut wrong_track = histogram.clone();
        wrong_track.inputs[0].track = Track::Linear as i32;
        assert_eq!(check(&wrong_track), "manifest");
        let mut outside = histogram.clone();
        outside.inputs[0].day = format_day(D + 1);
        assert_eq!(check(&outside), "manifest");
        let mut forged = histogram.clone();
        forged.program_hash[0] ^= 1;
        assert_eq!(check(&forged), "manifest");
        // More inputs than re-execution may hold in memory.
        let mut huge = histogram.clone();
        huge.inputs = (0..=psm_core::tfhe_program::MAX_TFHE_INPUTS)
            .map(|k| InputRef {
                meter_id: format!("m{k:05}"),
                ..histogram.inputs[0].clone()
            })
            .collect();
        assert_eq!(check(&huge), "size-limit");
        // Bills: one meter, every day once, an allowed program.
        assert_eq!(check(&bill), "allowed");
        let none = BTreeSet::new();
        assert_eq!(
            rule(check_manifest(&cfg, &none, &bill, KeyKind::Tfhe)),
            "allowed-program"
        );
        let mut gap = bill.clone();
        gap.inputs.pop();
        assert_eq!(check(&gap), "bill-shape");
        let two = manifest(ComputationKind::Bill, &["a", "b"], 1);
        assert_eq!(check(&two), "bill-shape");
    }

    #[test]
    fn manifests_must_be_canonical_and_cover_their_range() {
        let cfg = PolicyConfig {
            min_bill_days: 28,
            ..PolicyConfig::default()
        };
        let five = ["a", "b", "c", "d", "e"];
        let query = |m: &mut ComputationManifest| {
            m.kind = ComputationKind::Analytics as i32;
            m.program = psm_proto::v1::AnalyticsRequest {
                range: m.range,
                band_edges_wh: vec![0, 1000],
                ..Default::default()
            }
            .encode_to_vec();
            m.program_hash = blake3::hash(&m.program).as_bytes().to_vec();
        };
        let open = PolicyConfig {
            allow_any_program: true,
            ..cfg.clone()
        };
        let none = BTreeSet::new();
        let check = |m: &ComputationManifest| rule(check_manifest(&open, &none, m, KeyKind::Tfhe));
        let mut histogram = manifest(ComputationKind::Analytics, &five, 3);
        query(&mut histogram);
        assert_eq!(check(&histogram), "allowed");
        // The attack: the same five meters, one of them on one day only.
        let mut partial = histogram.clone();
        partial
            .inputs
            .retain(|i| i.meter_id != "e" || i.day == format_day(D));
        assert_eq!(check(&partial), "analytics-shape");
        // Inputs out of canonical order.
        let mut shuffled = histogram.clone();
        shuffled.inputs.swap(0, 1);
        assert_eq!(check(&shuffled), "manifest");
        // A program whose own range is not the manifest's.
        let mut other_range = histogram.clone();
        let mut wide = histogram.range.unwrap();
        wide.end_unix += DAY_SECONDS;
        other_range.program = psm_proto::v1::AnalyticsRequest {
            range: Some(wide),
            band_edges_wh: vec![0, 1000],
            ..Default::default()
        }
        .encode_to_vec();
        other_range.program_hash = blake3::hash(&other_range.program).as_bytes().to_vec();
        assert_eq!(check(&other_range), "manifest");
        // Bills shorter than min_bill_days: one-day bills for every day are refused.
        let day_bill = manifest(ComputationKind::Bill, &["a"], 1);
        assert_eq!(check(&day_bill), "bill-period");
        assert_eq!(
            check(&manifest(ComputationKind::Bill, &["a"], 28)),
            "allowed"
        );
    }

    #[tokio::test]
    async fn releases_remember_cohorts_and_bills_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PolicyConfig::default();
        let c = &cfg;
        let checked = |meters: &[&str], days: i64| Checked {
            kind: ComputationKind::Analytics,
            track: Track::Tfhe,
            first_day: D,
            end_day: D + days,
            meters: meters.iter().map(|m| m.to_string()).collect(),
            program_hash: Some([7; 32]),
            inputs: vec![],
        };
        let h = [1u8; 32];
        let ten: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = ten.iter().map(String::as_str).collect();
        {
            let r = Releases::open(dir.path()).unwrap();
            assert_eq!(
                rule(r.admit(&checked(&refs[..5], 1), c, &h, "", None).await),
                "allowed"
            );
        }
        let r = Releases::open(dir.path()).unwrap();
        // One more meter over the same range: their difference is that meter's day. Refused,
        // also after a restart; a disjoint cohort: allowed.
        assert_eq!(
            rule(r.admit(&checked(&refs[..6], 1), c, &h, "", None).await),
            "differencing"
        );
        assert_eq!(
            rule(r.admit(&checked(&refs[5..], 1), c, &h, "", None).await),
            "allowed"
        );
        // Three releases that each differ pairwise by k or more, and add up to one meter:
        // H(A∪{x}) + H(B) − H(A∪B). Over the same range cohorts are equal or disjoint, so the
        // union of two released cohorts is refused.
        assert_eq!(
            rule(r.admit(&checked(&refs, 1), c, &h, "", None).await),
            "differencing"
        );
        // Over an overlapping range too (nested ranges would otherwise let cohorts differ).
        assert_eq!(
            rule(r.admit(&checked(&refs[..6], 2), c, &h, "", None).await),
            "differencing"
        );
        // The same cohort over an overlapping range is allowed.
        assert_eq!(
            rule(r.admit(&checked(&refs[..5], 2), c, &h, "", None).await),
            "allowed"
        );
        // The same cohort again is no new information.
        assert_eq!(
            rule(r.admit(&checked(&refs[..5], 1), c, &h, "", None).await),
            "allowed"
        );

        let bill = |days: i64, tariff: u8| Checked {
            kind: ComputationKind::Bill,
            track: Track::Tfhe,
            first_day: D,
            end_day: D + days,
            meters: vec!["a".into()],
            program_hash: Some([tariff; 32]),
            inputs: vec![],
        };
        assert_eq!(
            rule(r.admit(&bill(30, 1), c, &[2; 32], "", None).await),
            "allowed"
        );
        assert_eq!(
            rule(r.admit(&bill(30, 1), c, &[2; 32], "", None).await),
            "allowed"
        );
        assert_eq!(
            rule(r.admit(&bill(29, 1), c, &[3; 32], "", None).await),
            "one-bill-per-period"
        );
        // A stated reason does not open another period, nor another tariff ...
        assert_eq!(
            rule(
                r.admit(&bill(29, 1), c, &[3; 32], "meter replaced", None)
                    .await
            ),
            "one-bill-per-period"
        );
        assert_eq!(
            rule(
                r.admit(&bill(30, 2), c, &[3; 32], "meter replaced", None)
                    .await
            ),
            "one-bill-per-period"
        );
        // ... it re-issues the same one, max_reissues (1) times.
        assert_eq!(
            rule(
                r.admit(&bill(30, 1), c, &[3; 32], "meter replaced", None)
                    .await
            ),
            "allowed"
        );
        assert_eq!(
            rule(r.admit(&bill(30, 1), c, &[4; 32], "again", None).await),
            "one-bill-per-period"
        );

        // Inputs are pinned: a later release naming other registers for a meter-day released
        // before (a substitution by a head-end or a lying ingest) is refused.
        let with_input = |meter: &str, hash: u8| Checked {
            kind: ComputationKind::Bill,
            track: Track::Tfhe,
            first_day: D + 100,
            end_day: D + 130,
            meters: vec![meter.into()],
            program_hash: Some([1; 32]),
            inputs: vec![(meter.into(), D + 100, [hash; 32])],
        };
        assert_eq!(
            rule(r.admit(&with_input("p", 1), c, &[5; 32], "", None).await),
            "allowed"
        );
        assert_eq!(
            rule(
                r.admit(&with_input("p", 2), c, &[6; 32], "new registers", None)
                    .await
            ),
            "input-pinned"
        );
        assert_eq!(
            rule(
                r.admit(&with_input("p", 1), c, &[7; 32], "meter replaced", None)
                    .await
            ),
            "allowed",
            "the same registers again are a re-issue"
        );

        // A linear-track bill of meter q over days 200..228 (as its ledger writes it): a tfhe
        // bill shifted by a day would difference into single days; the same period is fine.
        let mut k = b"q\0".to_vec();
        k.push(0);
        k.extend_from_slice(&((D + 200) as u64 * SLOTS_PER_DAY).to_be_bytes());
        let mut v = ((D + 228) as u64 * SLOTS_PER_DAY).to_be_bytes().to_vec();
        v.extend_from_slice(&[0u8; 36]);
        r.linear_bills.insert(k, v).unwrap();
        let shifted = |first: i64| Checked {
            first_day: D + first,
            end_day: D + first + 28,
            meters: vec!["q".into()],
            ..bill(28, 1)
        };
        assert_eq!(
            rule(r.admit(&shifted(201), c, &[8; 32], "", None).await),
            "one-bill-per-period"
        );
        assert_eq!(
            rule(r.admit(&shifted(200), c, &[9; 32], "", None).await),
            "allowed"
        );
        assert_eq!(
            r.tfhe_bill_overlapping(
                "q",
                (D + 201) as u64 * SLOTS_PER_DAY,
                (D + 229) as u64 * SLOTS_PER_DAY
            )
            .unwrap(),
            Some((D + 200, D + 228)),
            "and the linear ledger sees the tfhe bill"
        );
    }
}
