//! What this keyshare lets be decrypted: the regulator's rules, checked on every request's
//! manifest. A refusal carries the rule's name, which is also its audit-log entry. Releases that
//! later decisions depend on (cohorts for the differencing guard, bills for one bill per period)
//! are remembered in sled, written durably before the partials leave.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Instant;

use prost::Message;
use psm_core::keys::KeyKind;
use psm_core::readings::{format_day, parse_day, validate_meter_id, DAY_SECONDS};
use psm_proto::v1::{AggregateProgram, ComputationKind, ComputationManifest, Track};
use serde::Deserialize;
use tonic::Status;

/// Most inputs one manifest may name.
pub const MAX_INPUTS: usize = 100_000;
/// Longest range of one release, days (the longest billing period).
pub const MAX_RELEASE_DAYS: i64 = 62;

/// A refusal: the status returned and the rule recorded in the audit log.
#[derive(Debug)]
pub struct Refusal {
    pub status: Status,
    pub rule: &'static str,
}

/// Builds a refusal whose message starts with the rule's name.
pub fn refuse(rule: &'static str, code: tonic::Code, msg: impl std::fmt::Display) -> Refusal {
    Refusal {
        status: Status::new(code, format!("{rule}: {msg}")),
        rule,
    }
}

fn precondition(rule: &'static str, msg: impl std::fmt::Display) -> Refusal {
    refuse(rule, tonic::Code::FailedPrecondition, msg)
}

fn malformed(msg: impl std::fmt::Display) -> Refusal {
    refuse("manifest", tonic::Code::InvalidArgument, msg)
}

/// When the keyshare re-executes a tfhe-track computation before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReexecMode {
    Always,
    /// A deterministic sample of requests (by request hash), `reexecute_tfhe_sample_percent`.
    Sampled,
    Off,
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
    /// Re-execution of tfhe-track computations. The linear track is always re-executed.
    pub reexecute_tfhe: ReexecMode,
    /// Share of tfhe-track requests re-executed when `reexecute_tfhe = "sampled"`, percent.
    pub reexecute_tfhe_sample_percent: u8,
    /// How many times a bill for one (meter, channel, period) may be re-issued (with a reason).
    pub max_reissues: u32,
    /// Shortest linear-track bill, days (short bills would release a few readings each).
    pub min_bill_days: u32,
    /// Narrowest tariff band a bill may release, in hours per week averaged over the period.
    pub min_band_hours_per_week: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_cohort: 5,
            allowed_programs: Vec::new(),
            allow_any_program: false,
            rate_limit_per_minute: 600,
            reexecute_tfhe: ReexecMode::Always,
            reexecute_tfhe_sample_percent: 10,
            max_reissues: 1,
            min_bill_days: 28,
            min_band_hours_per_week: 4,
        }
    }
}

impl PolicyConfig {
    /// Checks the configuration; returns the allowed program hashes.
    pub fn validate(&self) -> Result<BTreeSet<[u8; 32]>, String> {
        if self.min_cohort == 0 {
            return Err("[keyshare.policy] min_cohort must be at least 1".into());
        }
        if self.rate_limit_per_minute == 0 {
            return Err("[keyshare.policy] rate_limit_per_minute must be at least 1".into());
        }
        if self.min_bill_days == 0 || self.min_bill_days > 62 {
            return Err("[keyshare.policy] min_bill_days is 1..=62".into());
        }
        if self.reexecute_tfhe_sample_percent > 100 {
            return Err("[keyshare.policy] reexecute_tfhe_sample_percent is 0..=100".into());
        }
        self.allowed_programs
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        format!("[keyshare.policy] allowed_programs: {h:?} is not a BLAKE3-256 hex hash")
                    })
            })
            .collect()
    }

    /// The numbers linear-track releases are judged by.
    pub fn linear_limits(&self) -> crate::linear::Limits {
        crate::linear::Limits {
            min_cohort: self.min_cohort,
            max_reissues: self.max_reissues,
            min_bill_days: self.min_bill_days,
            min_band_hours_per_week: self.min_band_hours_per_week,
        }
    }

    /// Whether a tfhe-track request with this hash is re-executed.
    pub fn reexecute_tfhe(&self, request_hash: &[u8; 32]) -> bool {
        match self.reexecute_tfhe {
            ReexecMode::Always => true,
            ReexecMode::Off => false,
            ReexecMode::Sampled => {
                u32::from(request_hash[0]) * 100
                    < u32::from(self.reexecute_tfhe_sample_percent) * 256
            }
        }
    }
}

/// Per-caller token buckets.
pub struct RateLimiter {
    per_minute: f64,
    buckets: std::sync::Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute: f64::from(per_minute),
            buckets: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller` or refuses.
    pub fn admit(&self, caller: &str) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets
            .entry(caller.to_owned())
            .or_insert((self.per_minute, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_minute / 60.0;
        *tokens = (*tokens + refill).min(self.per_minute);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(refuse(
                "rate-limit",
                tonic::Code::ResourceExhausted,
                format!(
                    "{caller} is over this keyshare's limit of {} requests per minute; retry later",
                    self.per_minute
                ),
            ))
        }
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
                "manifest-required",
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
    let mut seen = BTreeSet::new();
    let mut meters = BTreeSet::new();
    for i in &m.inputs {
        validate_meter_id(&i.meter_id).map_err(malformed)?;
        let day = parse_day(&i.day).map_err(malformed)?;
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
        meters.insert(i.meter_id.clone());
    }
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
    };
    let program_allowed = |what: &str| -> Result<(), Refusal> {
        let h =
            program_hash.ok_or_else(|| malformed(format!("a {what} must carry its program")))?;
        if cfg.allow_any_program || allowed.contains(&h) {
            Ok(())
        } else {
            Err(refuse(
                "allowed-program",
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
                    "bill-shape",
                    format!(
                        "a bill covers one meter; the inputs name {}",
                        checked.meters.len()
                    ),
                ));
            }
            if (seen.len() as i64) != end_day - first_day {
                return Err(precondition(
                    "bill-shape",
                    format!(
                        "a bill must use every day of its period {} exactly once; the inputs name {} days",
                        checked.days(),
                        seen.len()
                    ),
                ));
            }
            program_allowed("bill")?;
        }
        ComputationKind::Aggregate | ComputationKind::Analytics => {
            if checked.meters.len() < cfg.min_cohort {
                return Err(precondition(
                    "k-anonymity",
                    format!(
                        "the release covers {} meter(s); this keyshare releases cohorts of at least {}",
                        checked.meters.len(),
                        cfg.min_cohort
                    ),
                ));
            }
            if kind == ComputationKind::Analytics {
                program_allowed("analytics")?;
            } else {
                let p = AggregateProgram::decode(m.program.as_slice())
                    .map_err(|e| malformed(format!("aggregate program: {e}")))?;
                if program_hash.is_none() || p.granularity_seconds == 0 {
                    return Err(malformed(
                        "an aggregate must carry its program (AggregateProgram)",
                    ));
                }
            }
        }
        ComputationKind::Unspecified => unreachable!("refused above"),
    }
    Ok(checked)
}

fn store(e: sled::Error) -> Refusal {
    refuse(
        "internal",
        tonic::Code::Unavailable,
        format!("release store: {e}"),
    )
}

/// Remembered releases: bills per (meter, period) and released cohorts per time range.
pub struct Releases {
    db: sled::Db,
    bills: sled::Tree,
    cohorts: sled::Tree,
    lock: tokio::sync::Mutex<()>,
}

/// The key prefix of a meter's bills on one track (a bill's linear and tfhe parts are separate
/// releases, each once per period).
fn bill_prefix(meter: &str, track: Track) -> Vec<u8> {
    let mut k = meter.as_bytes().to_vec();
    k.push(0);
    k.push(track as u8);
    k
}

/// A bill release: prefix, first day, request hash → end day.
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
            db,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn check(
        &self,
        c: &Checked,
        min_cohort: usize,
        request_hash: &[u8; 32],
        reissue_reason: &str,
    ) -> Result<(), Refusal> {
        match c.kind {
            ComputationKind::Bill => {
                let meter = &c.meters[0];
                let prefix = bill_prefix(meter, c.track);
                for kv in self.bills.scan_prefix(&prefix) {
                    let (k, v) = kv.map_err(store)?;
                    let first = day_at(&k, prefix.len());
                    let end = day_at(&v, 0);
                    let same_request = k[prefix.len() + 8..] == request_hash[..];
                    if first < c.end_day && end > c.first_day && !same_request {
                        if reissue_reason.trim().is_empty() {
                            let earlier = Checked {
                                first_day: first,
                                end_day: end,
                                ..c.clone()
                            };
                            return Err(precondition(
                                "one-bill-per-period",
                                format!(
                                    "meter {meter} was already billed for {}, which overlaps {}; re-issue with a stated reason",
                                    earlier.days(),
                                    c.days()
                                ),
                            ));
                        }
                        break;
                    }
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
                    let end = day_at(&k, 8);
                    if end <= c.first_day {
                        continue;
                    }
                    let theirs: BTreeSet<&str> =
                        std::str::from_utf8(&v).unwrap_or("").split('\n').collect();
                    let diff = mine.symmetric_difference(&theirs).count();
                    if diff > 0 && diff < min_cohort {
                        let earlier = Checked {
                            first_day: day_at(&k, 0),
                            end_day: end,
                            ..c.clone()
                        };
                        return Err(precondition(
                            "differencing",
                            format!(
                                "this cohort of {} meters differs by {diff} from a cohort of {} released for {}; overlapping releases must differ by at least {min_cohort} meters",
                                mine.len(),
                                theirs.len(),
                                earlier.days()
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
        min_cohort: usize,
        request_hash: &[u8; 32],
        reissue_reason: &str,
    ) -> Result<(), Refusal> {
        let _g = self.lock.lock().await;
        self.check(c, min_cohort, request_hash, reissue_reason)
    }

    /// Checks the stateful rules again and records the release durably, atomically with respect
    /// to other requests.
    pub async fn admit(
        &self,
        c: &Checked,
        min_cohort: usize,
        request_hash: &[u8; 32],
        reissue_reason: &str,
    ) -> Result<(), Refusal> {
        let _g = self.lock.lock().await;
        self.check(c, min_cohort, request_hash, reissue_reason)?;
        match c.kind {
            ComputationKind::Bill => {
                self.bills
                    .insert(
                        bill_key(&c.meters[0], c.track, c.first_day, request_hash),
                        (c.end_day as u64).to_be_bytes().to_vec(),
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

    fn manifest(kind: ComputationKind, meters: &[&str], days: i64) -> ComputationManifest {
        let program = AggregateProgram {
            granularity_seconds: 900,
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
            range: Some(TimeRange {
                start_unix: D * DAY_SECONDS,
                end_unix: (D + days) * DAY_SECONDS,
            }),
            ..Default::default()
        }
    }

    fn rule(r: Result<impl Sized, Refusal>) -> &'static str {
        r.err().map_or("allowed", |r| r.rule)
    }

    #[test]
    fn manifests_are_checked_before_anything_else() {
        let cfg = PolicyConfig::default();
        let none = BTreeSet::new();
        let check = |m: &ComputationManifest| rule(check_manifest(&cfg, &none, m, KeyKind::Tfhe));
        let five = ["a", "b", "c", "d", "e"];
        assert_eq!(
            check(&manifest(ComputationKind::Aggregate, &five, 1)),
            "allowed"
        );
        assert_eq!(
            check(&manifest(ComputationKind::Aggregate, &five[..4], 1)),
            "k-anonymity"
        );
        assert_eq!(
            check(&manifest(ComputationKind::Unspecified, &five, 1)),
            "manifest-required"
        );
        let mut twice = manifest(ComputationKind::Aggregate, &five, 1);
        twice.inputs.push(twice.inputs[0].clone());
        assert_eq!(check(&twice), "manifest");
        let mut wrong_track = manifest(ComputationKind::Aggregate, &five, 1);
        wrong_track.inputs[0].track = Track::Linear as i32;
        assert_eq!(check(&wrong_track), "manifest");
        let mut outside = manifest(ComputationKind::Aggregate, &five, 1);
        outside.inputs[0].day = format_day(D + 1);
        assert_eq!(check(&outside), "manifest");
        let mut forged = manifest(ComputationKind::Aggregate, &five, 1);
        forged.program_hash[0] ^= 1;
        assert_eq!(check(&forged), "manifest");
        // Bills: one meter, every day once, an allowed program.
        let bill = manifest(ComputationKind::Bill, &["a"], 3);
        assert_eq!(check(&bill), "allowed-program");
        let h: [u8; 32] = bill.program_hash.clone().try_into().unwrap();
        let allowed = BTreeSet::from([h]);
        assert_eq!(
            rule(check_manifest(&cfg, &allowed, &bill, KeyKind::Tfhe)),
            "allowed"
        );
        let mut gap = bill.clone();
        gap.inputs.pop();
        assert_eq!(
            rule(check_manifest(&cfg, &allowed, &gap, KeyKind::Tfhe)),
            "bill-shape"
        );
        let two = manifest(ComputationKind::Bill, &["a", "b"], 1);
        assert_eq!(
            rule(check_manifest(&cfg, &allowed, &two, KeyKind::Tfhe)),
            "bill-shape"
        );
    }

    #[tokio::test]
    async fn releases_remember_cohorts_and_bills_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PolicyConfig::default();
        let none = BTreeSet::new();
        let checked = |meters: &[&str], days: i64| {
            check_manifest(
                &cfg,
                &none,
                &manifest(ComputationKind::Aggregate, meters, days),
                KeyKind::Tfhe,
            )
            .unwrap()
        };
        let h = [1u8; 32];
        let ten: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = ten.iter().map(String::as_str).collect();
        {
            let r = Releases::open(dir.path()).unwrap();
            assert_eq!(
                rule(r.admit(&checked(&refs[..5], 1), 5, &h, "").await),
                "allowed"
            );
        }
        let r = Releases::open(dir.path()).unwrap();
        // One more meter on an overlapping range: refused; five more: allowed.
        assert_eq!(
            rule(r.admit(&checked(&refs[..6], 2), 5, &h, "").await),
            "differencing"
        );
        assert_eq!(
            rule(r.admit(&checked(&refs, 1), 5, &h, "").await),
            "allowed"
        );
        // The same cohort again is no new information.
        assert_eq!(
            rule(r.admit(&checked(&refs[..5], 1), 5, &h, "").await),
            "allowed"
        );

        let bill = |days: i64| Checked {
            kind: ComputationKind::Bill,
            track: Track::Tfhe,
            first_day: D,
            end_day: D + days,
            meters: vec!["a".into()],
            program_hash: None,
        };
        assert_eq!(rule(r.admit(&bill(3), 5, &[2; 32], "").await), "allowed");
        assert_eq!(rule(r.admit(&bill(3), 5, &[2; 32], "").await), "allowed");
        assert_eq!(
            rule(r.admit(&bill(2), 5, &[3; 32], "").await),
            "one-bill-per-period"
        );
        assert_eq!(
            rule(r.admit(&bill(2), 5, &[3; 32], "meter replaced").await),
            "allowed"
        );
    }
}
