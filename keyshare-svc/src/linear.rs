//! The linear track at a keyshare: enrolled seeds, the release ledger, and contributions.
//!
//! A keyshare never reads a linear-track ciphertext. It holds, for every enrolled meter and
//! epoch, the seeds σ_U of the shares U it holds (opened from HPKE envelopes fetched from ingest
//! and checked against their commitments), derives the slots and weights of a release itself,
//! and answers d_U = ⟨Σ_τ w_τ a_τ, Σ_{i∈C} PRG(σ_{i,U})⟩ + E_U. Cohort key shares and mask sums
//! are cached (the cohort key shares are secrets, zeroized on eviction).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use prost::Message;
use psm_core::linear::envelope::{open_enrollment, EnrollmentSecret};
use psm_core::linear::key::{cohort_share_key, MeterKey, Seed};
use psm_core::linear::mask::{mask_sum, SlotRun};
use psm_core::linear::release::{contribution, Program, Release};
use psm_core::linear::{Channel as LinearChannel, SLOTS_PER_DAY, SLOT_SECONDS};
use psm_core::threshold::{FloodKey, Scheme};
use psm_proto::v1::{ComputationKind, Enrollment, StreamEnrollmentsRequest};
use tonic::transport::Channel;
use tonic::Code;

use crate::audit::{AuditLog, Decision};
use crate::layout::Layout;
use crate::peers::Peers;
use crate::policy::{refuse, Refusal};
use crate::rules::Rule;
use psm_core::registry::{Encryption, Registry};
use psm_proto::v1::{EnrollmentRef, EnrollmentState};

/// Cached cohort key shares (64 KiB each).
const COHORT_KEY_CACHE: usize = 1024;
/// Cached mask sums (64 KiB each).
const MASK_CACHE: usize = 1024;
/// Enrollments decided per batch of a sync (one flush and one audit write each).
const SYNC_BATCH: usize = 200;
/// Largest enrollment message accepted from ingest (7 parties, 4-of-7: 35 shares × 4 holders of
/// ~1.2 KB envelopes is ~170 KB).
const MAX_ENROLLMENT_BYTES: usize = 1 << 20;

fn store(e: impl std::fmt::Display) -> Refusal {
    refuse(
        Rule::Internal,
        Code::Unavailable,
        format!("linear-track store: {e}"),
    )
}

/// The seeds an enrollment gave this keyshare, or why it gave none.
type Opened = Result<Vec<(usize, Seed)>, String>;

/// Who this keyshare is in the scheme.
pub struct Party {
    pub scheme: Scheme,
    /// 0-based.
    pub index: usize,
    pub names: Vec<String>,
    pub flood_key: FloodKey,
    pub enrollment_secret: EnrollmentSecret,
}

impl Party {
    pub fn name(&self) -> &str {
        &self.names[self.index]
    }
}

/// What a sync did: enrollments opened and checked here (pending the co-holders), refused, and
/// activated (confirmed by every co-holder).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub accepted: usize,
    pub refused: usize,
    pub activated: usize,
}

/// An enrollment decision byte: opened here, waiting for the co-holders.
const PENDING: u8 = b'P';
/// Confirmed by every co-holder: releases may use it.
const ACTIVE: u8 = b'A';
const REFUSED: u8 = b'R';
/// Enrollments confirmed per ConfirmEnrollments call.
pub const CONFIRM_BATCH: usize = 1_000;

/// Where an enrollment stands here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentStatus {
    pub state: EnrollmentState,
    pub manifest_hash: [u8; 32],
    pub reason: String,
}

/// The refusal of a member that is not on this keyshare's registry (both tracks).
pub fn not_registered(meter: &str) -> Refusal {
    refuse(
        Rule::Registry,
        Code::FailedPrecondition,
        format!("meter {meter} is not on this keyshare's registry"),
    )
}

/// The name of the linear track's bill ledger tree (the tfhe track's ledger reads it too).
pub const BILLS_TREE: &str = "linear_bills";

/// The keyshare's linear-track state.
pub struct LinearState {
    party: Party,
    registry: Registry,
    ingest: Option<Channel>,
    db: sled::Db,
    /// The tfhe track's releases, whose ledger lock and bills this track's ledger shares.
    releases: Arc<crate::policy::Releases>,
    /// meter ‖ 0 ‖ epoch ‖ share → σ.
    seeds: sled::Tree,
    /// H(σ) → meter ‖ 0 ‖ epoch ‖ share: duplicate seeds across meters are refused.
    owners: sled::Tree,
    /// meter ‖ 0 ‖ epoch → decision byte ‖ enrollment hash ‖ manifest hash ‖ reason.
    enrolled: sled::Tree,
    /// meter ‖ 0 ‖ epoch → (): enrollments waiting for the co-holders' confirmation.
    pending: sled::Tree,
    /// "cursor" → last ingest sequence number seen.
    meta: sled::Tree,
    /// meter ‖ 0 ‖ channel ‖ start slot → end slot ‖ re-issues ‖ release hashes.
    bills: sled::Tree,
    /// channel ‖ lo ‖ hi ‖ cohort hash → (): aggregate outputs released.
    outputs: sled::Tree,
    /// cohort hash → members joined by '\n'.
    cohorts: sled::Tree,
    /// Layout hash → layout: the cells of bills.
    layouts: sled::Tree,
    /// Bill key (as in `bills`) → its layout hash.
    bill_layouts: sled::Tree,
    /// meter ‖ 0 ‖ channel ‖ member id → (lo ‖ hi)*: the slots over which the meter was released in an
    /// aggregate of that cohort (merged ranges).
    member_spans: sled::Tree,
    /// member id ‖ channel ‖ start ‖ end → layout hashes: the layouts the cohort's members
    /// were billed under for that period.
    cohort_bills: sled::Tree,
    /// member id → the cohort's meter-encrypted members joined by '\n'.
    cohort_members: sled::Tree,
    /// member id → how many those are (u32): read on every bill, where the list is not needed.
    cohort_sizes: sled::Tree,
    /// member id ‖ channel ‖ start ‖ end → [`Billed`]: which of the cohort's members are billed
    /// for that period.
    cohort_billed: sled::Tree,
    /// The secret key of [`billed_part`] (in `meta`).
    billed_key: [u8; 32],
    /// Tariff hash → when the regulator approved it (`allowed_tariffs` with a date): the
    /// earliest period start its dynamic prices may bill.
    approved: BTreeMap<[u8; 32], i64>,
    sync_lock: tokio::sync::Mutex<()>,
    confirm_lock: tokio::sync::Mutex<()>,
    keys: Mutex<LruCache<[u8; 32], Arc<MeterKey>>>,
    masks: Mutex<LruCache<[u8; 32], Arc<Vec<u128>>>>,
}

/// A release checked against this keyshare's policy, with everything derived from it.
pub struct Admitted {
    pub release: Release,
    /// Per output: its runs and output hash.
    pub runs: Vec<Vec<SlotRun>>,
    pub output_hashes: Vec<[u8; 32]>,
    pub cohort_hashes: Vec<[u8; 32]>,
    /// BLAKE3 over the output hashes: identifies the release in the ledger.
    pub release_hash: [u8; 32],
    pub headend_encrypted: Vec<String>,
    /// Per cohort: its meter-encrypted members (what the utility does not already know), and
    /// their ledger identity H(epoch ‖ members) for the differencing rule.
    pub private_members: Vec<Vec<String>>,
    pub ledger_ids: Vec<[u8; 32]>,
    /// Per cohort: H(meter-encrypted members), whatever the epoch: which cohort a meter was
    /// released in, for the rules relating bills to aggregates.
    pub member_ids: Vec<[u8; 32]>,
    /// A bill's cells over its period (every band and price level, asked for or not).
    pub layout: Option<Layout>,
}

/// The policy numbers a linear release is judged by.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_cohort: usize,
    pub max_reissues: u32,
    /// Shortest bill, days.
    pub min_bill_days: u32,
    /// Narrowest tariff band a bill may release, hours per week on average over the period.
    pub min_band_hours_per_week: u32,
    /// Fewest distinct local days a released bill band may cover (seasons and holidays could
    /// otherwise narrow a wide band onto one day).
    pub min_band_days: u32,
    /// Highest dynamic price over lowest within one bill.
    pub max_price_ratio: u32,
    pub billing_cycle: crate::policy::BillingCycle,
}

/// The band-width rule for one band of a bill: enough hours per week on average, spread over
/// enough local days.
fn band_width(
    rule: Rule,
    limits: Limits,
    period: u64,
    tz: chrono_tz::Tz,
    what: &str,
    r: &[(u64, u64)],
) -> Result<(), Refusal> {
    // A band narrower than the minimum would isolate a few readings per bill.
    let slots: u64 = r.iter().map(|(s, e)| e - s).sum();
    let need = (u64::from(limits.min_band_hours_per_week) * 12 * period)
        .div_ceil(7 * SLOTS_PER_DAY as u64);
    if slots < need {
        return Err(refuse(
                rule,
                Code::FailedPrecondition,
                format!(
                    "{what} covers {slots} five-minute slots of the period; this keyshare releases a bill only when every band with slots in it has at least {} hours per week ({need} slots here), whether asked for or not",
                    limits.min_band_hours_per_week
                ),
            ));
    }
    // Wide enough in hours but on a few days (a season's sliver at the edge of a
    // cycle, a holidays-only band): it would release those days' totals.
    let days = psm_tariff::local_days(
        tz,
        r.iter()
            .map(|(s, e)| (*s as i64 * SLOT_SECONDS, *e as i64 * SLOT_SECONDS)),
    );
    if days < limits.min_band_days as usize {
        return Err(refuse(
                rule,
                Code::FailedPrecondition,
                format!(
                    "{what} covers an hour or more on {days} local day(s) of the period; this keyshare releases a bill only when every band with slots in it is spread over at least {} days (min_band_days), whether asked for or not",
                    limits.min_band_days
                ),
            ));
    }
    Ok(())
}

/// A cohort's member id and the slot ranges a meter was aggregated over in it.
type CohortSpans = ([u8; 32], Vec<(u64, u64)>);

/// A cohort's members billed for each period (start, end) its slots meet.
type BilledPerPeriod = BTreeMap<(u64, u64), Vec<String>>;

/// A cohort's billed set and count for each period.
type SetPerPeriod = BTreeMap<(u64, u64), ([u8; 32], u32)>;

/// A cohort's member id, channel and period: what one [`Billed`] record is of.
type CohortPeriod = ([u8; 32], u8, (u64, u64));

/// A [`Billed`] record an aggregate creates, with its cohort id, period and members billed.
type NewRecord<'a> = ([u8; 32], (u64, u64), Billed, &'a Vec<String>);

/// Most separate slot ranges a cohort may be aggregated over (kept exactly: a range widened
/// to save space would hide the slots its members were left out of).
const MAX_SPANS: usize = 256;

/// Slot ranges sorted, with ranges that touch or overlap merged.
fn merge_spans(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some((_, last)) if s <= *last => *last = (*last).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The slots of merged ranges `a` that are also in merged ranges `b`.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Whether every slot of merged ranges `inner` is in merged ranges `outer`.
fn covers(outer: &[(u64, u64)], inner: &[(u64, u64)]) -> bool {
    let slots = |r: &[(u64, u64)]| r.iter().map(|(s, e)| e - s).sum::<u64>();
    slots(&intersect(outer, inner)) == slots(inner)
}

/// A member's part of a cohort's billed-set hash (the XOR over its billed members): the
/// ledger compares which members are billed without storing every name per cohort. Keyed
/// with this keyshare's secret [`BILLED_KEY`]: an XOR of public hashes is linear, and the
/// utility could solve for two member sets with one hash (a billed member swapped unseen).
fn billed_part(key: &[u8; 32], meter: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"psm/v2/billed-member");
    h.update(meter.as_bytes());
    *h.finalize().as_bytes()
}

fn billed_set<'a>(key: &[u8; 32], members: impl IntoIterator<Item = &'a String>) -> [u8; 32] {
    let mut acc = [0u8; 32];
    for m in members {
        for (a, b) in acc.iter_mut().zip(billed_part(key, m)) {
            *a ^= b;
        }
    }
    acc
}

/// The `linear_meta` entry holding the key of [`billed_part`], made on first open (`/2`: a
/// store from before the markers were tagged has its records rebuilt).
const BILLED_KEY: &[u8] = b"billed-set-key/2";

/// Which members of a cohort are billed for one period: the XOR of their [`billed_part`]s,
/// how many, and one of them (whose cohorts over the period are the group's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Billed {
    set: [u8; 32],
    count: u32,
    rep: String,
}

/// A bill as the rules relating bills to aggregates see it.
#[derive(Clone, Copy)]
struct BillSide<'a> {
    meter: &'a str,
    channel: LinearChannel,
    layout: &'a Layout,
    /// The linear ledger's key of the bill (a tfhe-track bill has none).
    bill_key: Option<&'a [u8]>,
}

/// The layout a tfhe-track bill over whole UTC days [first_day, end_day) releases: one cell.
fn flat_layout(first_day: i64, end_day: i64) -> Layout {
    let (start, end) = (
        first_day.max(0) as u64 * SLOTS_PER_DAY as u64,
        end_day.max(0) as u64 * SLOTS_PER_DAY as u64,
    );
    Layout::of_bill(
        chrono_tz::UTC,
        start,
        end,
        &[vec![SlotRun {
            start,
            end,
            weight: 1,
        }]],
    )
}

/// The members billed for one period and what they were aggregated in over it.
struct Group<'a> {
    period: (u64, u64),
    /// Every cohort (id, all its slots) they were aggregated in over the period.
    cohorts: &'a [CohortSpans],
    /// How many are billed.
    billed: usize,
    /// Their bills' layouts.
    layouts: &'a [Layout],
    /// The members of cohorts not recorded yet (this release's).
    fresh: &'a BTreeMap<[u8; 32], &'a Vec<String>>,
}

impl Billed {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.set.to_vec();
        v.extend_from_slice(&self.count.to_be_bytes());
        v.extend_from_slice(self.rep.as_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Billed> {
        Some(Billed {
            set: v.get(..32)?.try_into().ok()?,
            count: u32::from_be_bytes(v.get(32..36)?.try_into().ok()?),
            rep: String::from_utf8(v.get(36..)?.to_vec()).ok()?,
        })
    }
}

/// Two bill layouts of one period may be known for one meter (its own, and another member's
/// through their cohort's aggregate): every cell where they cross must be as wide as a band.
fn compatible(limits: Limits, meter: &str, a: &Layout, b: &Layout) -> Result<(), Refusal> {
    if (a.start, a.end) != (b.start, b.end) {
        return Err(store("layouts of different periods compared"));
    }
    let period = a.end - a.start;
    for runs in a.atoms(b).values() {
        for tz in [a.tz, b.tz] {
            band_width(
                Rule::CohortBills,
                limits,
                period,
                tz,
                &format!(
                    "where the bands or price levels of {meter}'s bill and another bill of its aggregated cohort over {} .. {} cross, a cell",
                    slot_time(a.start),
                    slot_time(a.end)
                ),
                runs,
            )?;
        }
    }
    Ok(())
}

/// The slot ranges of runs.
fn spans(r: &[SlotRun]) -> Vec<(u64, u64)> {
    r.iter().map(|x| (x.start, x.end)).collect()
}

fn seed_key(meter: &str, epoch: u32, share: usize) -> Vec<u8> {
    let mut k = meter.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.push(share as u8);
    k
}

fn enrolled_key(meter: &str, epoch: u32) -> Vec<u8> {
    let mut k = meter.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn seed_id(seed: &Seed) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/seed-id");
    h.update(&seed.0);
    *h.finalize().as_bytes()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// "2026-01-05 00:00 UTC".
fn slot_time(slot: u64) -> String {
    let secs = slot as i64 * psm_core::linear::SLOT_SECONDS;
    let day = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02} UTC",
        psm_core::readings::format_day(day),
        rem / 3600,
        rem % 3600 / 60
    )
}

impl LinearState {
    /// Opens the state's trees in the keyshare's release store (`releases`' database).
    pub fn open(
        releases: Arc<crate::policy::Releases>,
        party: Party,
        registry: Registry,
        ingest: Option<Channel>,
    ) -> Result<Self, crate::KeyshareError> {
        let db = releases.db();
        let cap = |n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        let meta = db.open_tree("linear_meta")?;
        let (billed_key, fresh_key) = match meta.get(BILLED_KEY)? {
            Some(k) => (
                k.as_ref().try_into().map_err(|_| {
                    crate::KeyshareError::Ledger(format!(
                        "the {} entry of linear_meta is not 32 bytes",
                        String::from_utf8_lossy(BILLED_KEY)
                    ))
                })?,
                false,
            ),
            None => {
                let mut k = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
                (k, true)
            }
        };
        let state = LinearState {
            seeds: db.open_tree("linear_seeds")?,
            owners: db.open_tree("linear_seed_owners")?,
            enrolled: db.open_tree("linear_enrolled")?,
            pending: db.open_tree("linear_pending")?,
            meta,
            bills: db.open_tree(BILLS_TREE)?,
            outputs: db.open_tree("linear_outputs")?,
            cohorts: db.open_tree("linear_cohorts")?,
            layouts: db.open_tree("linear_layouts")?,
            bill_layouts: db.open_tree("linear_bill_layouts")?,
            member_spans: db.open_tree("linear_member_spans")?,
            cohort_bills: db.open_tree("linear_cohort_bills")?,
            cohort_members: db.open_tree("linear_cohort_members")?,
            cohort_sizes: db.open_tree("linear_cohort_sizes")?,
            cohort_billed: db.open_tree("linear_cohort_billed")?,
            billed_key,
            db,
            party,
            registry,
            ingest,
            approved: BTreeMap::new(),
            sync_lock: tokio::sync::Mutex::new(()),
            confirm_lock: tokio::sync::Mutex::new(()),
            releases,
            keys: Mutex::new(LruCache::new(cap(COHORT_KEY_CACHE))),
            masks: Mutex::new(LruCache::new(cap(MASK_CACHE))),
        };
        if fresh_key {
            // Records written before the key (or none, over a store's spans from before them)
            // are rebuilt keyed.
            if !state.cohort_billed.is_empty() || !state.member_spans.is_empty() {
                let n = state
                    .rebuild_billed()
                    .map_err(|e| crate::KeyshareError::Ledger(e.status.message().to_owned()))?;
                tracing::info!(records = n, "rebuilt the cohorts' billed records keyed");
            }
            state.meta.insert(BILLED_KEY, &billed_key[..])?;
            state.db.flush()?;
        }
        Ok(state)
    }

    /// The approval dates of tariffs allowed with one (`allowed_tariffs`).
    pub fn with_approvals(mut self, approved: BTreeMap<[u8; 32], i64>) -> Self {
        self.approved = approved;
        self
    }

    pub fn party(&self) -> &Party {
        &self.party
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn cursor(&self) -> Result<u64, Refusal> {
        Ok(self.meta.get(b"cursor").map_err(store)?.map_or(0, |v| {
            if v.len() == 8 {
                u64_at(&v, 0)
            } else {
                0
            }
        }))
    }

    /// Whether the meter's enrollment for `epoch` is active here (accepted and confirmed by every
    /// co-holder).
    pub fn is_enrolled(&self, meter: &str, epoch: u32) -> Result<bool, Refusal> {
        Ok(self
            .status(meter, epoch)?
            .is_some_and(|s| s.state == EnrollmentState::Active))
    }

    /// Where (meter, epoch) stands here; `None` when it was never decided.
    pub fn status(&self, meter: &str, epoch: u32) -> Result<Option<EnrollmentStatus>, Refusal> {
        let Some(v) = self
            .enrolled
            .get(enrolled_key(meter, epoch))
            .map_err(store)?
        else {
            return Ok(None);
        };
        if v.len() < 65 {
            return Err(store("corrupt enrollment record"));
        }
        let state = match v[0] {
            PENDING => EnrollmentState::Pending,
            ACTIVE => EnrollmentState::Active,
            REFUSED => EnrollmentState::Refused,
            _ => return Err(store("corrupt enrollment record")),
        };
        let mut manifest_hash = [0u8; 32];
        manifest_hash.copy_from_slice(&v[33..65]);
        Ok(Some(EnrollmentStatus {
            state,
            manifest_hash,
            reason: String::from_utf8_lossy(&v[65..]).into_owned(),
        }))
    }

    /// Fetches and decides new enrollments, then confirms the pending ones with the co-holders.
    pub async fn sync(&self, audit: &AuditLog, peers: &Peers) -> Result<SyncReport, Refusal> {
        let mut r = self.fetch_and_decide(audit).await?;
        r.activated = self.confirm_pending(audit, peers).await?;
        Ok(r)
    }

    /// Fetches the enrollments ingest stored since the last sync, decides each locally (registry,
    /// device signature, envelopes, commitments, duplicate seeds), stores the accepted seeds
    /// durably as pending and audits every decision. One runs at a time; it never calls a
    /// co-holder (co-holders call it while answering a confirmation).
    pub async fn fetch_and_decide(&self, audit: &AuditLog) -> Result<SyncReport, Refusal> {
        let _g = self.sync_lock.lock().await;
        let ingest = self.ingest.clone().ok_or_else(|| {
            refuse(
                Rule::Enrollment,
                Code::FailedPrecondition,
                "this keyshare has no [keyshare] ingest_url, so it cannot fetch enrollments",
            )
        })?;
        let mut report = SyncReport::default();
        let after = self.cursor()?;
        let mut stream = psm_proto::v1::ingest_client::IngestClient::new(ingest)
            .max_decoding_message_size(MAX_ENROLLMENT_BYTES)
            .stream_enrollments(StreamEnrollmentsRequest {
                meter_ids: Vec::new(),
                after_seq: after,
            })
            .await
            .map_err(|e| {
                refuse(
                    Rule::Enrollment,
                    Code::Unavailable,
                    format!("cannot fetch enrollments from ingest: {}", e.message()),
                )
            })?
            .into_inner();
        let mut batch = Vec::new();
        let mut last = after;
        loop {
            let next = stream.message().await.map_err(|e| {
                refuse(
                    Rule::Enrollment,
                    Code::Unavailable,
                    format!("ingest: {}", e.message()),
                )
            })?;
            let done = next.is_none();
            if let Some(e) = next {
                if e.seq <= last {
                    return Err(refuse(
                        Rule::Enrollment,
                        Code::Unavailable,
                        format!(
                            "ingest sent enrollment sequence {} after {last}: out of order",
                            e.seq
                        ),
                    ));
                }
                last = e.seq;
                batch.push(e);
            }
            if batch.len() >= SYNC_BATCH || (done && !batch.is_empty()) {
                let r = self
                    .decide_batch(std::mem::take(&mut batch), last, audit)
                    .await?;
                report.accepted += r.accepted;
                report.refused += r.refused;
            }
            if done {
                break;
            }
        }
        Ok(report)
    }

    /// Decides a batch of enrollments, stores the outcome and the cursor, audits.
    async fn decide_batch(
        &self,
        batch: Vec<Enrollment>,
        cursor: u64,
        audit: &AuditLog,
    ) -> Result<SyncReport, Refusal> {
        // Opening envelopes is CPU work: on the blocking pool, all cores.
        let opened: Vec<(Enrollment, Opened)> = {
            let party = &self.party;
            tokio::task::block_in_place(|| {
                use rayon::prelude::*;
                batch
                    .into_par_iter()
                    .map(|e| {
                        let r = open_enrollment(
                            &e,
                            party.scheme,
                            &party.names,
                            party.index,
                            &party.enrollment_secret,
                        )
                        .map_err(|x| x.to_string());
                        (e, r)
                    })
                    .collect()
            })
        };
        let mut decisions: Vec<(bool, &'static str, String, [u8; 32])> = Vec::new();
        let mut report = SyncReport::default();
        let mut seeds = sled::Batch::default();
        let mut owners = sled::Batch::default();
        let mut enrolled = sled::Batch::default();
        let mut pending = sled::Batch::default();
        let mut new_ids: HashSet<[u8; 32]> = HashSet::new();
        let mut decided: HashSet<Vec<u8>> = HashSet::new();
        let value = |state: u8, hash: &[u8; 32], mhash: &[u8; 32], reason: &str| {
            let mut v = vec![state];
            v.extend_from_slice(hash);
            v.extend_from_slice(mhash);
            v.extend_from_slice(reason.as_bytes());
            v
        };
        for (mut e, opened) in opened {
            e.seq = 0;
            let hash = *blake3::hash(&e.encode_to_vec()).as_bytes();
            let mhash = psm_core::signing::manifest_hash(&e);
            let ekey = enrolled_key(&e.meter_id, e.epoch);
            let what = format!("meter {} epoch {}", e.meter_id, e.epoch);
            if let Some(prev) = self.enrolled.get(&ekey).map_err(store)? {
                if prev.get(1..33) == Some(&hash[..]) {
                    continue; // decided before
                }
                decisions.push((
                    false,
                    "enrollment",
                    format!("{what}: a different enrollment was already decided; the first stays (a new epoch is a rotation)"),
                    hash,
                ));
                report.refused += 1;
                continue;
            }
            let refuse_with =
                |reason: String| (false, "enrollment", format!("{what}: {reason}"), hash);
            let Some(entry) = self.registry.lookup(&e.meter_id) else {
                // Not recorded as decided: once the regulator registers the meter, a later
                // re-sync from the start can accept it.
                decisions.push(refuse_with("not on this keyshare's registry".into()));
                report.refused += 1;
                continue;
            };
            if let Some(device) = entry.device_key {
                if let Err(x) = psm_core::signing::verify_enrollment(&e, &device) {
                    // Not recorded as decided either: a forgery must not block the meter's own
                    // enrollment.
                    decisions.push((false, "device-signature", format!("{what}: {x}"), hash));
                    report.refused += 1;
                    continue;
                }
            }
            if !decided.insert(ekey.clone()) {
                decisions.push((
                    false,
                    "enrollment",
                    format!("{what}: enrolled twice in one batch; the first stays"),
                    hash,
                ));
                report.refused += 1;
                continue;
            }
            let enc = entry.encryption;
            let seeds_opened = match opened {
                Ok(s) => s,
                Err(reason) => {
                    enrolled.insert(ekey.clone(), value(REFUSED, &hash, &mhash, &reason));
                    decisions.push(refuse_with(reason));
                    report.refused += 1;
                    continue;
                }
            };
            let mut duplicate = None;
            let mut own: HashSet<[u8; 32]> = HashSet::new();
            for (u, s) in &seeds_opened {
                let id = seed_id(s);
                if !own.insert(id) {
                    duplicate = Some("another share of the same enrollment".into());
                }
                let mine = seed_key(&e.meter_id, e.epoch, *u);
                match self.owners.get(id).map_err(store)? {
                    Some(owner) if owner.as_ref() != mine.as_slice() => {
                        duplicate = Some(String::from_utf8_lossy(&owner).replace('\0', " "));
                    }
                    _ if new_ids.contains(&id) => {
                        duplicate = Some("another meter of this batch".into())
                    }
                    _ => {}
                }
            }
            if let Some(other) = duplicate {
                let reason = format!(
                    "a seed equals one already enrolled ({other}); duplicate seeds across meters are refused"
                );
                enrolled.insert(ekey.clone(), value(REFUSED, &hash, &mhash, &reason));
                decisions.push(refuse_with(reason));
                report.refused += 1;
                continue;
            }
            for (u, s) in &seeds_opened {
                let id = seed_id(s);
                new_ids.insert(id);
                let k = seed_key(&e.meter_id, e.epoch, *u);
                owners.insert(&id, k.clone());
                seeds.insert(k, &s.0[..]);
            }
            enrolled.insert(ekey.clone(), value(PENDING, &hash, &mhash, ""));
            pending.insert(ekey, &[][..]);
            let mark = match enc {
                Encryption::Meter => "",
                Encryption::Headend => " (head-end-encrypted: plaintext to the utility)",
            };
            let signed = if entry.device_key.is_some() {
                "device signature valid, "
            } else {
                "not signature-checked (development registry), "
            };
            decisions.push((
                true,
                "enrollment",
                format!(
                    "{what}{mark}: {signed}shares {:?} opened and matching their commitments; pending confirmation by the co-holders (manifest {})",
                    seeds_opened.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
                    &hex::encode(mhash)[..16]
                ),
                hash,
            ));
            report.accepted += 1;
        }
        self.seeds.apply_batch(seeds).map_err(store)?;
        self.owners.apply_batch(owners).map_err(store)?;
        self.enrolled.apply_batch(enrolled).map_err(store)?;
        self.pending.apply_batch(pending).map_err(store)?;
        self.meta
            .insert(b"cursor", &cursor.to_be_bytes())
            .map_err(store)?;
        self.db.flush_async().await.map_err(store)?;
        let records: Vec<Decision> = decisions
            .iter()
            .map(|(allow, rule, reason, hash)| Decision {
                caller: "ingest (enrollment sync)",
                allow: *allow,
                rule,
                reason,
                request_hash: hash,
            })
            .collect();
        if !records.is_empty() {
            audit.append_many(&records).await.map_err(|e| {
                refuse(Rule::Internal, Code::Unavailable, format!("audit log: {e}"))
            })?;
        }
        if report.accepted + report.refused > 0 {
            tracing::info!(
                accepted = report.accepted,
                refused = report.refused,
                cursor,
                "enrollments decided"
            );
        }
        Ok(report)
    }

    /// Confirms pending enrollments with every co-holder: one is activated when every co-holder
    /// has accepted the identical manifest, refused when one refused it or holds another
    /// manifest (a split view), and left pending while one cannot be reached or has not decided
    /// yet. Returns how many were activated. One runs at a time.
    pub async fn confirm_pending(&self, audit: &AuditLog, peers: &Peers) -> Result<usize, Refusal> {
        let _g = self.confirm_lock.lock().await;
        let mut activated = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut keys = Vec::new();
            let iter = match &after {
                Some(a) => self.pending.range::<&[u8], _>((
                    std::ops::Bound::Excluded(a.as_slice()),
                    std::ops::Bound::Unbounded,
                )),
                None => self.pending.iter(),
            };
            for kv in iter {
                keys.push(kv.map_err(store)?.0.to_vec());
                if keys.len() >= CONFIRM_BATCH {
                    break;
                }
            }
            let Some(last) = keys.last().cloned() else {
                break;
            };
            after = Some(last);
            activated += self.confirm_batch(&keys, audit, peers).await?;
            if keys.len() < CONFIRM_BATCH {
                break;
            }
        }
        Ok(activated)
    }

    async fn confirm_batch(
        &self,
        keys: &[Vec<u8>],
        audit: &AuditLog,
        peers: &Peers,
    ) -> Result<usize, Refusal> {
        let mut refs = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(sep) = k.len().checked_sub(5).filter(|i| k[*i] == 0) else {
                return Err(store("corrupt pending key"));
            };
            let meter = String::from_utf8_lossy(&k[..sep]).into_owned();
            let mut e = [0u8; 4];
            e.copy_from_slice(&k[sep + 1..]);
            let epoch = u32::from_be_bytes(e);
            let st = self.status(&meter, epoch)?;
            let mhash = st.map(|s| s.manifest_hash).unwrap_or_default();
            refs.push(EnrollmentRef {
                meter_id: meter,
                epoch,
                manifest_hash: mhash.to_vec(),
            });
        }
        let coholders = peers.coholders();
        let answers = futures::future::join_all(
            coholders
                .iter()
                .map(|p| peers.confirm_enrollments(*p, refs.clone())),
        )
        .await;
        // Per enrollment: Some(reason) to refuse, or whether every co-holder accepted it.
        let mut outcome: Vec<(Option<String>, Vec<String>)> = vec![(None, Vec::new()); refs.len()];
        for (p, answer) in coholders.iter().zip(answers) {
            let name = peers.name(*p);
            match answer {
                Err(e) => {
                    for o in &mut outcome {
                        o.1.push(format!("{name} ({e})"));
                    }
                }
                Ok(confs) => {
                    for ((o, c), r) in outcome.iter_mut().zip(confs).zip(&refs) {
                        let state = EnrollmentState::try_from(c.state)
                            .unwrap_or(EnrollmentState::Unspecified);
                        if c.meter_id != r.meter_id || c.epoch != r.epoch {
                            o.1.push(format!("{name} (answered for another enrollment)"));
                            continue;
                        }
                        match state {
                            EnrollmentState::Refused => {
                                o.0.get_or_insert(format!(
                                    "co-holder {name} refused it: {}",
                                    c.reason
                                ));
                            }
                            EnrollmentState::Pending | EnrollmentState::Active
                                if c.manifest_hash != r.manifest_hash =>
                            {
                                o.0.get_or_insert(format!(
                                    "co-holder {name} accepted a different manifest ({}) for it than this keyshare ({}): the two were shown different enrollments",
                                    hex::encode(c.manifest_hash.get(..8).unwrap_or_default()),
                                    hex::encode(&r.manifest_hash[..8])
                                ));
                            }
                            EnrollmentState::Pending | EnrollmentState::Active => {}
                            _ => o.1.push(format!("{name} (has not decided it)")),
                        }
                    }
                }
            }
        }
        let mut enrolled = sled::Batch::default();
        let mut pending = sled::Batch::default();
        let mut seeds = sled::Batch::default();
        let mut decisions: Vec<(bool, String)> = Vec::new();
        let mut activated = 0;
        let names: Vec<&str> = coholders.iter().map(|p| peers.name(*p)).collect();
        for ((k, r), (refusal, waiting)) in keys.iter().zip(&refs).zip(outcome) {
            let what = format!("meter {} epoch {}", r.meter_id, r.epoch);
            let Some(v) = self.enrolled.get(k).map_err(store)? else {
                continue;
            };
            if let Some(reason) = refusal {
                let mut nv = v[..65].to_vec();
                nv[0] = REFUSED;
                nv.extend_from_slice(reason.as_bytes());
                enrolled.insert(k.as_slice(), nv);
                pending.remove(k.as_slice());
                for u in self.party.scheme.held_by(self.party.index) {
                    seeds.remove(seed_key(&r.meter_id, r.epoch, u));
                }
                decisions.push((false, format!("{what}: refused: {reason}")));
            } else if waiting.is_empty() {
                let mut nv = v[..65].to_vec();
                nv[0] = ACTIVE;
                enrolled.insert(k.as_slice(), nv);
                pending.remove(k.as_slice());
                activated += 1;
                decisions.push((
                    true,
                    format!("{what}: active, confirmed by {}", names.join(", ")),
                ));
            } else {
                tracing::debug!(%what, waiting = %waiting.join("; "), "enrollment still pending");
            }
        }
        if decisions.is_empty() {
            return Ok(0);
        }
        self.enrolled.apply_batch(enrolled).map_err(store)?;
        self.pending.apply_batch(pending).map_err(store)?;
        self.seeds.apply_batch(seeds).map_err(store)?;
        self.db.flush_async().await.map_err(store)?;
        let hash = [0u8; 32];
        let records: Vec<Decision> = decisions
            .iter()
            .map(|(allow, reason)| Decision {
                caller: "co-holders (enrollment confirmation)",
                allow: *allow,
                rule: if *allow { "enrollment" } else { "co-holder" },
                reason,
                request_hash: &hash,
            })
            .collect();
        audit
            .append_many(&records)
            .await
            .map_err(|e| refuse(Rule::Internal, Code::Unavailable, format!("audit log: {e}")))?;
        tracing::info!(
            activated,
            decided = decisions.len(),
            "enrollments confirmed"
        );
        Ok(activated)
    }

    /// Checks a release against the registry, k-anonymity and the allowed programs, derives
    /// every output's slots, weights and hash, and checks the noise bound.
    pub fn admit(
        &self,
        release: Release,
        limits: Limits,
        program_allowed: impl Fn(&[u8; 32]) -> bool,
    ) -> Result<Admitted, Refusal> {
        let min_cohort = limits.min_cohort;
        let spec = &release.spec;
        if spec.kind == ComputationKind::Bill && !program_allowed(&spec.program_hash) {
            return Err(refuse(
                Rule::AllowedProgram,
                Code::PermissionDenied,
                format!(
                    "bill program (tariff) {} is not among this keyshare's allowed_programs",
                    hex::encode(spec.program_hash)
                ),
            ));
        }
        if let (ComputationKind::Bill, Program::Bill(tariff)) = (spec.kind, &spec.program) {
            let meter = release.cohorts.first().and_then(|c| c.first());
            crate::policy::check_billing_cycle(
                limits.billing_cycle,
                &self.registry,
                meter.map_or("", String::as_str),
                tariff,
                (
                    spec.start_slot as i64 * SLOT_SECONDS,
                    spec.end_slot as i64 * SLOT_SECONDS,
                ),
            )?;
        }
        if spec.kind == ComputationKind::Bill {
            // Days of 24 hours, less the hour a daylight-saving change may take from a
            // local month: a February cycle over the spring change still has its 28 days.
            let seconds = (spec.end_slot - spec.start_slot) as i64 * SLOT_SECONDS;
            if seconds < i64::from(limits.min_bill_days) * 86_400 - 3_600 {
                return Err(refuse(
                    Rule::BillPeriod,
                    Code::FailedPrecondition,
                    format!(
                        "a bill covers at least {} day(s) (less an hour for a daylight-saving change); this one covers {} .. {}",
                        limits.min_bill_days,
                        slot_time(spec.start_slot),
                        slot_time(spec.end_slot)
                    ),
                ));
            }
        }
        if let (Some(prices), Program::Bill(_)) = (spec.prices(), &spec.program) {
            let (start, end) = (
                spec.start_slot as i64 * SLOT_SECONDS,
                spec.end_slot as i64 * SLOT_SECONDS,
            );
            // Prices chosen once the period has begun could be fitted to what the utility has
            // learnt of it; prices approved before are common to every meter on the tariff.
            match self.approved.get(&spec.program_hash) {
                None => {
                    return Err(refuse(
                        Rule::PriceSeries,
                        Code::FailedPrecondition,
                        format!(
                            "tariff {} has dynamic prices, which this keyshare bills only for a tariff file listed in allowed_tariffs with the date it was approved ({{ file = ..., approved = ... }})",
                            hex::encode(spec.program_hash)
                        ),
                    ))
                }
                Some(at) if *at > start => {
                    return Err(refuse(
                        Rule::PriceSeries,
                        Code::FailedPrecondition,
                        format!(
                            "tariff {}'s dynamic prices were approved at {}, after the period starts ({}); prices are approved before the periods they price",
                            hex::encode(spec.program_hash),
                            slot_time((*at / SLOT_SECONDS).max(0) as u64),
                            slot_time(spec.start_slot)
                        ),
                    ))
                }
                Some(_) => {}
            }
            let (lo, hi) = prices
                .over(start, end)
                .map_err(|e| refuse(Rule::Release, Code::InvalidArgument, e))?;
            if hi > lo.saturating_mul(i64::from(limits.max_price_ratio)) {
                return Err(refuse(
                    Rule::PriceSeries,
                    Code::FailedPrecondition,
                    format!(
                        "the dynamic prices over the period run from {lo} to {hi} milli-minor units per kWh; this keyshare bills prices within a ratio of {} (max_price_ratio), so one weighted sum cannot spell out single readings",
                        limits.max_price_ratio
                    ),
                ));
            }
        }
        let mut headend = Vec::new();
        let mut private_members = Vec::with_capacity(release.cohorts.len());
        for (c, members) in release.cohorts.iter().enumerate() {
            let (private, he) = self.registry.split(members).map_err(not_registered)?;
            headend.extend(he.into_iter().cloned());
            let private: Vec<String> = private.into_iter().cloned().collect();
            let counted = private.len();
            private_members.push(private);
            if spec.kind == ComputationKind::Aggregate && counted < min_cohort {
                return Err(refuse(
                    Rule::KAnonymity,
                    Code::FailedPrecondition,
                    format!(
                        "cohort {c} has {counted} meter-encrypted member(s) of {}; this keyshare releases cohorts of at least {min_cohort} (head-end-encrypted meters do not count)",
                        members.len()
                    ),
                ));
            }
        }
        headend.sort();
        headend.dedup();
        let cohort_hashes: Vec<[u8; 32]> = release
            .cohorts
            .iter()
            .map(|c| psm_core::linear::release::cohort_hash(c))
            .collect();
        // Every band with slots in a bill's period is judged, asked for or not: a narrow band
        // left out of the request would still be the difference between the period's total
        // (a tfhe-track tiered cost over the same period) and the bands released.
        // A bill's bands are placed once, for this check and for the outputs asked for.
        let mut bill_runs: Vec<Vec<SlotRun>> = Vec::new();
        if let Program::Bill(tariff) = &spec.program {
            let all: Vec<usize> = (0..spec.output_count()).collect();
            bill_runs = spec.runs_of(&all);
            for (index, r) in all.iter().zip(&bill_runs) {
                if r.is_empty() {
                    continue;
                }
                if spec.prices().is_none() {
                    let name = tariff.bands.get(*index).map_or("?", |b| b.name.as_str());
                    band_width(
                        Rule::BandWidth,
                        limits,
                        spec.end_slot - spec.start_slot,
                        tariff.tz,
                        &format!("band {index} ({name:?})"),
                        &spans(r),
                    )?;
                    continue;
                }
                // Decryption is exact: one weighted sum Σ p·x packs the sum of every price
                // level's slots (a level at p + 1 for one hour is that hour's reading, the sum
                // mod p). Each level is therefore a band: at most as many, each as wide.
                let mut levels: BTreeMap<i64, Vec<SlotRun>> = BTreeMap::new();
                for run in r {
                    levels.entry(run.weight).or_default().push(*run);
                }
                if levels.len() > psm_tariff::MAX_BANDS {
                    return Err(refuse(
                        Rule::PriceSeries,
                        Code::FailedPrecondition,
                        format!(
                            "the dynamic prices take {} distinct values over the period; this keyshare bills at most {} price levels, each spread like a band (one weighted sum releases every level's total)",
                            levels.len(),
                            psm_tariff::MAX_BANDS
                        ),
                    ));
                }
                for (price, runs) in &levels {
                    band_width(
                        Rule::BandWidth,
                        limits,
                        spec.end_slot - spec.start_slot,
                        tariff.tz,
                        &format!("price level {price} (milli-minor units per kWh)"),
                        &spans(runs),
                    )?;
                }
            }
        }
        let layout = match &spec.program {
            Program::Bill(tariff) => Some(Layout::of_bill(
                tariff.tz,
                spec.start_slot,
                spec.end_slot,
                &bill_runs,
            )),
            Program::Aggregate { .. } => None,
        };
        let indices: Vec<usize> = release.outputs.iter().map(|(i, _)| *i).collect();
        let asked = if bill_runs.is_empty() {
            spec.runs_of(&indices)
        } else {
            indices
                .iter()
                .map(|i| bill_runs.get(*i).cloned().unwrap_or_default())
                .collect()
        };
        let mut runs = Vec::with_capacity(release.outputs.len());
        let mut output_hashes = Vec::with_capacity(release.outputs.len());
        for ((index, cohort), r) in release.outputs.iter().zip(asked) {
            if r.is_empty() {
                return Err(refuse(
                    Rule::Release,
                    Code::InvalidArgument,
                    format!("output {index} has no slot in the range"),
                ));
            }
            psm_core::linear::release::check_noise(
                self.party.scheme,
                release.cohorts[*cohort].len(),
                &r,
            )
            .map_err(|e| refuse(Rule::NoiseBound, Code::InvalidArgument, e.detail()))?;
            output_hashes.push(psm_core::linear::release::output_hash(
                spec,
                &cohort_hashes[*cohort],
                &r,
            ));
            runs.push(r);
        }
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v2/release");
        for o in &output_hashes {
            h.update(o);
        }
        let ledger_ids = private_members
            .iter()
            .map(|members| {
                let mut h = blake3::Hasher::new();
                h.update(b"psm/v2/ledger-cohort");
                h.update(&spec.epoch.to_le_bytes());
                h.update(&psm_core::linear::release::cohort_hash(members));
                *h.finalize().as_bytes()
            })
            .collect();
        let member_ids = private_members
            .iter()
            .map(|m| psm_core::linear::release::cohort_hash(m))
            .collect();
        Ok(Admitted {
            release,
            runs,
            output_hashes,
            cohort_hashes,
            release_hash: *h.finalize().as_bytes(),
            headend_encrypted: headend,
            private_members,
            ledger_ids,
            member_ids,
            layout,
        })
    }

    fn bill_prefix(meter: &str, channel: u8) -> Vec<u8> {
        let mut k = meter.as_bytes().to_vec();
        k.push(0);
        k.push(channel);
        k
    }

    /// The stateful rules: bills of one (meter, channel) never overlap (a re-issue covers exactly
    /// the same range, at most `max_reissues` times, with a reason); an aggregate output over
    /// slots that an earlier output covered must have the same cohort or one differing by at
    /// least `min_cohort` meters. With `record`, also writes the release durably.
    async fn ledger(&self, a: &Admitted, limits: Limits, record: bool) -> Result<(), Refusal> {
        let lock = self.releases.ledger_lock();
        let _g = lock.lock().await;
        tokio::task::block_in_place(|| self.ledger_locked(a, limits, record))?;
        if record {
            self.db.flush_async().await.map_err(store)?;
        }
        Ok(())
    }

    /// [`Self::ledger`]'s sled work, under the ledger lock (blocking).
    fn ledger_locked(&self, a: &Admitted, limits: Limits, record: bool) -> Result<(), Refusal> {
        let max_reissues = limits.max_reissues;
        let spec = &a.release.spec;
        let ch = spec.channel.tag();
        match spec.kind {
            ComputationKind::Bill => {
                let meter = &a.release.cohorts[0][0];
                // The tfhe part of bills: periods on both tracks are equal or disjoint.
                if let Some((first, end)) =
                    self.releases
                        .tfhe_bill_overlapping(meter, spec.start_slot, spec.end_slot)?
                {
                    return Err(refuse(
                        Rule::OneBillPerPeriod,
                        Code::FailedPrecondition,
                        format!(
                            "meter {meter}'s tfhe-track bill covers days {}..{} (exclusive), which partially overlaps {} .. {}; a meter's bills on both tracks cover equal or disjoint periods",
                            psm_core::readings::format_day(first),
                            psm_core::readings::format_day(end),
                            slot_time(spec.start_slot),
                            slot_time(spec.end_slot)
                        ),
                    ));
                }
                let prefix = Self::bill_prefix(meter, ch);
                let mut exact: Option<(Vec<u8>, u32, Vec<[u8; 32]>)> = None;
                for kv in self.bills.scan_prefix(&prefix) {
                    let (k, v) = kv.map_err(store)?;
                    if k.len() != prefix.len() + 8 || v.len() < 44 || (v.len() - 44) % 32 != 0 {
                        return Err(store("corrupt bill record"));
                    }
                    let (start, end) = (u64_at(&k, prefix.len()), u64_at(&v, 0));
                    if start >= spec.end_slot || end <= spec.start_slot {
                        continue;
                    }
                    if start != spec.start_slot || end != spec.end_slot {
                        return Err(refuse(
                            Rule::OneBillPerPeriod,
                            Code::FailedPrecondition,
                            format!(
                                "meter {meter} ({}) was billed for {} .. {}, which overlaps {} .. {}; bills of a meter never overlap, and a re-issue covers exactly the same period",
                                spec.channel.name(),
                                slot_time(start),
                                slot_time(end),
                                slot_time(spec.start_slot),
                                slot_time(spec.end_slot)
                            ),
                        ));
                    }
                    let mut r = [0u8; 4];
                    r.copy_from_slice(&v[8..12]);
                    if v[12..44] != spec.program_hash[..]
                        && !v[44..].chunks_exact(32).any(|c| c == a.release_hash)
                    {
                        return Err(refuse(
                            Rule::OneBillPerPeriod,
                            Code::FailedPrecondition,
                            format!(
                                "meter {meter} ({}) was billed for this period under another tariff; a re-issue uses the same tariff (their difference would isolate the readings between the two band layouts)",
                                spec.channel.name()
                            ),
                        ));
                    }
                    let hashes = v[44..]
                        .chunks_exact(32)
                        .map(|c| {
                            let mut h = [0u8; 32];
                            h.copy_from_slice(c);
                            h
                        })
                        .collect();
                    exact = Some((k.to_vec(), u32::from_be_bytes(r), hashes));
                }
                let (key, reissues, mut hashes) = match exact {
                    Some((_, _, ref hashes)) if hashes.contains(&a.release_hash) => return Ok(()),
                    Some((k, n, hashes)) => {
                        let reason = a.release.reissue_reason.trim();
                        if reason.is_empty() {
                            return Err(refuse(
                                Rule::OneBillPerPeriod,
                                Code::FailedPrecondition,
                                format!(
                                    "meter {meter} ({}) was already billed for exactly this period differently; re-issue it with a stated reason",
                                    spec.channel.name()
                                ),
                            ));
                        }
                        if n >= max_reissues {
                            return Err(refuse(
                                Rule::OneBillPerPeriod,
                                Code::FailedPrecondition,
                                format!(
                                    "meter {meter}'s bill for this period was re-issued {n} time(s); this keyshare allows {max_reissues}"
                                ),
                            ));
                        }
                        (k, n + 1, hashes)
                    }
                    None => {
                        let mut k = prefix.clone();
                        k.extend_from_slice(&spec.start_slot.to_be_bytes());
                        (k, 0, Vec::new())
                    }
                };
                self.cross_bill(a, limits, &key, record)?;
                if record {
                    hashes.push(a.release_hash);
                    let mut v = spec.end_slot.to_be_bytes().to_vec();
                    v.extend_from_slice(&reissues.to_be_bytes());
                    v.extend_from_slice(&spec.program_hash);
                    for h in &hashes {
                        v.extend_from_slice(h);
                    }
                    self.bills.insert(key, v).map_err(store)?;
                }
            }
            _ => {
                // Over overlapping slots, the released meter-encrypted cohorts (per epoch) must be
                // equal or disjoint: then every linear combination of released sums is a sum
                // over whole released cohorts, each at least k meters. (Pairwise "differ by k"
                // is not enough: R1 − R2 + R3 can isolate one meter.)
                let mut lo_all = u64::MAX;
                let mut hi_all = 0u64;
                for r in &a.runs {
                    lo_all = lo_all.min(r[0].start);
                    hi_all = hi_all.max(r[r.len() - 1].end);
                }
                let mut from = vec![ch];
                from.extend_from_slice(&lo_all.saturating_sub(SLOTS_PER_DAY as u64).to_be_bytes());
                let mut to = vec![ch];
                to.extend_from_slice(&hi_all.to_be_bytes());
                let mut earlier: Vec<(u64, u64, [u8; 32])> = Vec::new();
                for kv in self.outputs.range(from..to) {
                    let (k, _) = kv.map_err(store)?;
                    if k.len() != 49 {
                        return Err(store("corrupt output record"));
                    }
                    let (elo, ehi) = (u64_at(&k, 1), u64_at(&k, 9));
                    if ehi <= lo_all || elo >= hi_all {
                        continue;
                    }
                    let mut theirs = [0u8; 32];
                    theirs.copy_from_slice(&k[17..49]);
                    earlier.push((elo, ehi, theirs));
                }
                let mut verdict: BTreeMap<([u8; 32], [u8; 32]), bool> = BTreeMap::new();
                for (o, (_, cohort)) in a.release.outputs.iter().enumerate() {
                    let mine = a.ledger_ids[*cohort];
                    let (lo, hi) = (a.runs[o][0].start, a.runs[o][a.runs[o].len() - 1].end);
                    for (elo, ehi, theirs) in &earlier {
                        if *ehi <= lo || *elo >= hi || *theirs == mine {
                            continue;
                        }
                        let disjoint = match verdict.get(&(mine, *theirs)) {
                            Some(d) => *d,
                            None => {
                                let v = self
                                    .cohorts
                                    .get(theirs)
                                    .map_err(store)?
                                    .ok_or_else(|| store("a released cohort is missing"))?;
                                let text = String::from_utf8_lossy(&v);
                                let other: HashSet<&str> = text.split('\n').collect();
                                let d = !a.private_members[*cohort]
                                    .iter()
                                    .any(|m| other.contains(m.as_str()));
                                verdict.insert((mine, *theirs), d);
                                d
                            }
                        };
                        if !disjoint {
                            return Err(refuse(
                                Rule::Differencing,
                                Code::FailedPrecondition,
                                format!(
                                    "the cohort of {} meter-encrypted meters for {} .. {} overlaps, without being equal to it, a cohort released for {} .. {} (same channel, or another epoch); releases over the same slots must have equal or disjoint cohorts",
                                    a.private_members[*cohort].len(),
                                    slot_time(lo),
                                    slot_time(hi),
                                    slot_time(*elo),
                                    slot_time(*ehi)
                                ),
                            ));
                        }
                    }
                }
                self.cross_aggregate(a, limits, record)?;
                if record {
                    for (c, id) in a.ledger_ids.iter().enumerate() {
                        if !self.cohorts.contains_key(id).map_err(store)? {
                            self.cohorts
                                .insert(id, a.private_members[c].join("\n").as_bytes())
                                .map_err(store)?;
                        }
                    }
                    for (o, (_, cohort)) in a.release.outputs.iter().enumerate() {
                        let (lo, hi) = (a.runs[o][0].start, a.runs[o][a.runs[o].len() - 1].end);
                        let mut k = vec![ch];
                        k.extend_from_slice(&lo.to_be_bytes());
                        k.extend_from_slice(&hi.to_be_bytes());
                        k.extend_from_slice(&a.ledger_ids[*cohort]);
                        self.outputs.insert(k, &[][..]).map_err(store)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The rule relating a bill to the aggregates its meter was released in. An aggregate of
    /// a cohort less the bills of its other members is this meter's total over those members'
    /// cells; with its own bill it would be its readings where the two layouts cross. So the
    /// members of each cohort the meter was aggregated in over this period are billed over the
    /// same period, and every layout they were billed under crosses this bill's only in cells
    /// as wide as a band. The billed members of a period are aggregated together or not at
    /// all: every cohort this meter was aggregated in over the period holds the same billed
    /// members, and so does every cohort of theirs. Otherwise one cohort less another is the
    /// readings of a member left out of one of them: this meter's own (its bill less the
    /// aggregates it was in), or another's. A member that is not billed may be left out (no
    /// readings then); [`Self::left_out_check`] holds it to the band-width rule. With
    /// `record`, also writes the bill's layout and adds it to its cohorts'. A head-end-encrypted
    /// meter's readings are the utility's already.
    fn cross_bill(
        &self,
        a: &Admitted,
        limits: Limits,
        bill_key: &[u8],
        record: bool,
    ) -> Result<(), Refusal> {
        let (Some(layout), Some(meter)) = (&a.layout, a.private_members[0].first()) else {
            return Ok(());
        };
        let bill = BillSide {
            meter,
            channel: a.release.spec.channel,
            layout,
            bill_key: Some(bill_key),
        };
        self.judge_bill(limits, &bill, record)
    }

    /// A tfhe-track bill in the rules relating bills to aggregates: its tiered cost gives the
    /// period's import total, so it counts as an import bill of one cell over its whole UTC
    /// days. Called by the tfhe ledger under the shared ledger lock: first to check, then, before
    /// the tfhe bill itself is written, to record.
    pub fn judge_tfhe_bill(
        &self,
        limits: Limits,
        meter: &str,
        (first_day, end_day): (i64, i64),
        record: bool,
    ) -> Result<(), Refusal> {
        let one = [meter.to_owned()];
        let (private, _) = self.registry.split(&one).map_err(not_registered)?;
        if private.is_empty() {
            return Ok(());
        }
        let layout = flat_layout(first_day, end_day);
        let bill = BillSide {
            meter,
            channel: LinearChannel::Import,
            layout: &layout,
            bill_key: None,
        };
        self.judge_bill(limits, &bill, record)
    }

    /// [`Self::cross_bill`] for either track's bill.
    fn judge_bill(&self, limits: Limits, bill: &BillSide, record: bool) -> Result<(), Refusal> {
        let BillSide {
            meter,
            channel,
            layout,
            bill_key,
        } = *bill;
        let (start, end) = (layout.start, layout.end);
        let ch = channel.tag();
        let mine = layout.hash();
        let cohorts = self.cohorts_of(meter, ch, start, end)?;
        let mut known: BTreeMap<[u8; 32], Layout> = BTreeMap::new();
        for (id, _) in &cohorts {
            for (s, e, hashes) in self.cohort_bill_records(id, ch, start, end)? {
                if (s, e) != (start, end) {
                    return Err(refuse(
                        Rule::CohortBills,
                        Code::FailedPrecondition,
                        format!(
                            "another member of a cohort that meter {meter} was aggregated in was billed ({}) for {} .. {}, which overlaps {} .. {} without being the same period; members of a released cohort are billed over the same cycles",
                            channel.name(),
                            slot_time(s),
                            slot_time(e),
                            slot_time(start),
                            slot_time(end)
                        ),
                    ));
                }
                for h in hashes {
                    if h != mine && !known.contains_key(&h) {
                        let other = self.layout(&h)?;
                        compatible(limits, meter, layout, &other)?;
                        known.insert(h, other);
                    }
                }
            }
        }
        // Each cohort's record with this meter counted. A re-issue, this period's bill on the
        // other track, or a bill retried after a crash that kept its records but lost the bill
        // is counted already (its marker); its layout is judged again (another track's may be
        // another).
        let period = (start, end);
        let mut records = Vec::with_capacity(cohorts.len());
        let mut prior_rep = None;
        for (id, _) in &cohorts {
            let counted = self
                .cohort_billed
                .contains_key(Self::billed_marker(id, ch, period, meter))
                .map_err(store)?;
            let stored = self.billed_record(id, ch, period)?;
            if records.is_empty() {
                prior_rep = stored
                    .as_ref()
                    .map(|b| b.rep.clone())
                    .filter(|r| r != meter);
            }
            let mut b = stored.unwrap_or_else(|| Billed {
                set: [0; 32],
                count: 0,
                rep: meter.to_owned(),
            });
            if !counted {
                for (x, y) in b.set.iter_mut().zip(billed_part(&self.billed_key, meter)) {
                    *x ^= y;
                }
                b.count += 1;
                if meter < b.rep.as_str() {
                    b.rep = meter.to_owned();
                }
            }
            records.push((b, counted));
        }
        let group = records.first().map(|(b, _)| b.clone());
        let of = |b: &Billed| (b.set, b.count);
        if records
            .iter()
            .any(|(r, _)| Some(of(r)) != group.as_ref().map(of))
        {
            return Err(refuse(
                Rule::CohortBills,
                Code::FailedPrecondition,
                format!(
                    "meter {meter} was aggregated ({}) over {} .. {} in cohorts that do not hold the same billed members: a billed member was left out of one of them, or aggregated in another cohort; with this bill the aggregates would difference into the readings of the member left out",
                    channel.name(),
                    slot_time(start),
                    slot_time(end)
                ),
            ));
        }
        // A member billed before this bill (the record's one, before this meter was counted).
        if let Some(rep) = &prior_rep {
            let ids = |c: &[CohortSpans]| c.iter().map(|(id, _)| *id).collect::<Vec<_>>();
            let mut theirs = ids(&self.cohorts_of(rep, ch, start, end)?);
            let mut ours = ids(&cohorts);
            theirs.sort_unstable();
            ours.sort_unstable();
            if theirs != ours {
                return Err(refuse(
                    Rule::CohortBills,
                    Code::FailedPrecondition,
                    format!(
                        "meter {}, billed ({}) for {} .. {} and aggregated with meter {meter} then, was also aggregated without it within that period (or {meter} without {}); this bill less those aggregates would be {meter}'s readings where it was left out, so a meter left out of its cohort's aggregate over part of a billing period is not billed for that period",
                        rep,
                        channel.name(),
                        slot_time(start),
                        slot_time(end),
                        rep
                    ),
                ));
            }
        }
        let billed = group.as_ref().map_or(1, |g| g.count as usize);
        let mut layouts: Vec<Layout> = known.values().cloned().collect();
        layouts.push(layout.clone());
        let group = Group {
            period,
            cohorts: &cohorts,
            billed,
            layouts: &layouts,
            fresh: &BTreeMap::new(),
        };
        self.left_out_check(limits, &group, &|m| {
            Ok(m == meter || self.billed_for(m, ch, period)?)
        })?;
        if record {
            self.layouts.insert(mine, layout.encode()).map_err(store)?;
            if let Some(key) = bill_key {
                self.bill_layouts.insert(key, &mine[..]).map_err(store)?;
            }
            for (id, _) in &cohorts {
                self.add_cohort_bill(id, ch, period, &mine)?;
            }
            // One batch: every cohort's record counts the meter, or none does.
            let mut batch = sled::Batch::default();
            for ((id, _), (b, counted)) in cohorts.iter().zip(records) {
                if !counted {
                    batch.insert(Self::billed_key(id, ch, period), b.encode());
                    batch.insert(Self::billed_marker(id, ch, period, meter), &[][..]);
                }
            }
            self.cohort_billed.apply_batch(batch).map_err(store)?;
        }
        Ok(())
    }

    /// The aggregate side of [`Self::cross_bill`]: a cohort's members share a billing cycle,
    /// the layouts members were already billed under over its slots cross only in band-wide
    /// cells, and the members billed for a period it covers are the billed members of every
    /// other cohort they were aggregated in over that period (none left out, none added).
    fn cross_aggregate(&self, a: &Admitted, limits: Limits, record: bool) -> Result<(), Refusal> {
        let rel_ch = a.release.spec.channel.tag();
        // The slots of each cohort in this release (its outputs' buckets).
        let mut slots: Vec<Vec<(u64, u64)>> = vec![Vec::new(); a.private_members.len()];
        for (o, (_, c)) in a.release.outputs.iter().enumerate() {
            let r = &a.runs[o];
            slots[*c].push((r[0].start, r[r.len() - 1].end));
        }
        let slots: Vec<Vec<(u64, u64)>> = slots.into_iter().map(merge_spans).collect();
        // Each cohort's slots over all releases, with this one's.
        let mut merged: Vec<Vec<(u64, u64)>> = Vec::with_capacity(slots.len());
        for (c, members) in a.private_members.iter().enumerate() {
            let Some(first) = members.first() else {
                merged.push(Vec::new());
                continue;
            };
            let mut all = self.span_record(first, rel_ch, &a.member_ids[c])?;
            all.extend_from_slice(&slots[c]);
            let all = merge_spans(all);
            if all.len() > MAX_SPANS {
                return Err(refuse(
                    Rule::CohortBills,
                    Code::FailedPrecondition,
                    format!(
                        "cohort {c} would be aggregated over {} separate slot ranges; this keyshare keeps at most {MAX_SPANS} per cohort exactly: aggregate it over whole days",
                        all.len()
                    ),
                ));
            }
            merged.push(all);
        }
        // The one-cell layouts of tfhe-track bills, known here whether stored yet or not (a
        // tfhe bill from before it was judged against aggregates has none stored).
        let mut flats: BTreeMap<[u8; 32], Layout> = BTreeMap::new();
        // Billed members per period on this release's channel, over each cohort's slots.
        let mut groups: Vec<BilledPerPeriod> = Vec::new();
        let mut per_cohort = Vec::new();
        for (c, members) in a.private_members.iter().enumerate() {
            let id = a.member_ids[c];
            let (Some((lo, _)), Some((_, hi))) = (slots[c].first(), slots[c].last()) else {
                groups.push(BilledPerPeriod::new());
                continue;
            };
            let (lo, hi) = (*lo, *hi);
            self.shared_cycle(members, limits)?;
            // Bills of the members over these slots, per channel and period.
            let mut bills: BTreeMap<(u8, u64, u64), Vec<[u8; 32]>> = BTreeMap::new();
            let mut billed: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
            for m in members {
                for ch in [LinearChannel::Import.tag(), LinearChannel::Export.tag()] {
                    let prefix = Self::bill_prefix(m, ch);
                    for kv in self.bills.scan_prefix(&prefix) {
                        let (k, v) = kv.map_err(store)?;
                        if k.len() != prefix.len() + 8 || v.len() < 8 {
                            return Err(store("corrupt bill record"));
                        }
                        let (s, e) = (u64_at(&k, prefix.len()), u64_at(&v, 0));
                        if s >= hi || e <= lo {
                            continue;
                        }
                        let h = self
                            .bill_layouts
                            .get(&k)
                            .map_err(store)?
                            .filter(|h| h.len() == 32)
                            .ok_or_else(|| store("a bill's layout is missing"))?;
                        let mut hash = [0u8; 32];
                        hash.copy_from_slice(&h);
                        let at = bills.entry((ch, s, e)).or_default();
                        if !at.contains(&hash) {
                            at.push(hash);
                        }
                        if ch == rel_ch && !intersect(&slots[c], &[(s, e)]).is_empty() {
                            billed.entry((s, e)).or_default().push(m.clone());
                        }
                    }
                }
                // tfhe-track bills: import bills of one cell (their tiered cost gives the total).
                for (first, last) in self.releases.tfhe_bills_of(m)? {
                    let flat = flat_layout(first, last);
                    let (s, e) = (flat.start, flat.end);
                    if s >= hi || e <= lo {
                        continue;
                    }
                    let ch = LinearChannel::Import.tag();
                    let at = bills.entry((ch, s, e)).or_default();
                    if !at.contains(&flat.hash()) {
                        at.push(flat.hash());
                    }
                    flats.insert(flat.hash(), flat);
                    if ch == rel_ch && !intersect(&slots[c], &[(s, e)]).is_empty() {
                        billed.entry((s, e)).or_default().push(m.clone());
                    }
                }
            }
            // A meter billed on both tracks for one period is one billed member.
            for members in billed.values_mut() {
                members.sort_unstable();
                members.dedup();
            }
            let mut prev: Option<(u8, u64, u64)> = None;
            for (&(ch, s, e), hashes) in &bills {
                if let Some((pch, ps, pe)) = prev.filter(|p| p.0 == ch) {
                    if s < pe && (ps, pe) != (s, e) {
                        return Err(refuse(
                            Rule::CohortBills,
                            Code::FailedPrecondition,
                            format!(
                                "members of cohort {c} were billed ({}) over {} .. {} and {} .. {}, periods that overlap without being equal; this keyshare aggregates over billed periods only cohorts billed on one cycle",
                                if pch == LinearChannel::Import.tag() { "import" } else { "export" },
                                slot_time(ps),
                                slot_time(pe),
                                slot_time(s),
                                slot_time(e)
                            ),
                        ));
                    }
                }
                prev = Some((ch, s, e));
                let layouts = hashes
                    .iter()
                    .map(|h| flats.get(h).cloned().map_or_else(|| self.layout(h), Ok))
                    .collect::<Result<Vec<_>, _>>()?;
                for (i, x) in layouts.iter().enumerate() {
                    for y in &layouts[i + 1..] {
                        compatible(limits, &format!("a member of cohort {c}"), x, y)?;
                    }
                }
            }
            groups.push(billed);
            per_cohort.push((id, members, bills));
        }
        // The billed members of a period are aggregated together: each cohort over the period
        // holds all of a group or none of it.
        let keyed: Vec<SetPerPeriod> = groups
            .iter()
            .map(|periods| {
                periods
                    .iter()
                    .map(|(p, m)| (*p, (billed_set(&self.billed_key, m), m.len() as u32)))
                    .collect()
            })
            .collect();
        // Which of this release's cohorts hold each member.
        let mut holding: HashMap<&str, Vec<usize>> = HashMap::new();
        for (d, members) in a.private_members.iter().enumerate() {
            for m in members {
                holding.entry(m.as_str()).or_default().push(d);
            }
        }
        // This release's cohorts, not recorded yet.
        let fresh: BTreeMap<[u8; 32], &Vec<String>> = a
            .member_ids
            .iter()
            .copied()
            .zip(&a.private_members)
            .collect();
        let mut new_records: Vec<NewRecord> = Vec::new();
        for (c, periods) in groups.iter().enumerate() {
            let id = a.member_ids[c];
            for (period, members) in periods {
                let Some(&(set, count)) = keyed[c].get(period) else {
                    continue;
                };
                let differs = |m: &str| {
                    refuse(
                        Rule::CohortBills,
                        Code::FailedPrecondition,
                        format!(
                            "meter {m} is billed for {} .. {} and was aggregated over that period in a cohort whose billed members differ from cohort {c}'s; this aggregate would leave a billed member out of its cohort (or add one), and with their bills the two aggregates would difference into that member's readings",
                            slot_time(period.0),
                            slot_time(period.1)
                        ),
                    )
                };
                // The cohort's own record (from an earlier release over the period) holds
                // the members billed now.
                match self.billed_record(&id, rel_ch, *period)? {
                    Some(b) if (b.set, b.count) != (set, count) => {
                        return Err(differs(&members[0]))
                    }
                    Some(_) => {}
                    None => new_records.push((
                        id,
                        *period,
                        Billed {
                            set,
                            count,
                            rep: members[0].clone(),
                        },
                        members,
                    )),
                }
                for m in members {
                    for &d in holding.get(m.as_str()).into_iter().flatten() {
                        if d != c
                            && !intersect(&slots[d], &[*period]).is_empty()
                            && keyed[d].get(period) != Some(&(set, count))
                        {
                            return Err(differs(m));
                        }
                    }
                    for (other, _) in self.cohorts_of(m, rel_ch, period.0, period.1)? {
                        // A cohort of this release over the period was compared above; over
                        // another period only its record speaks for this one.
                        let here = a.member_ids.iter().enumerate().any(|(d, id)| {
                            *id == other && !intersect(&slots[d], &[*period]).is_empty()
                        });
                        if here {
                            continue;
                        }
                        let same = self
                            .billed_record(&other, rel_ch, *period)?
                            .is_some_and(|b| b.set == set && b.count == count);
                        if !same {
                            return Err(differs(m));
                        }
                    }
                }
                // The group's cohorts over the period: the recorded ones of a billed member and
                // this release's that hold it, with the slots this release adds.
                let rep = &members[0];
                let mut group = self.cohorts_of(rep, rel_ch, period.0, period.1)?;
                for &d in holding.get(rep.as_str()).into_iter().flatten() {
                    let id = a.member_ids[d];
                    match group.iter_mut().find(|(g, _)| *g == id) {
                        Some(known) => known.1 = merged[d].clone(),
                        None if !intersect(&slots[d], &[*period]).is_empty() => {
                            group.push((id, merged[d].clone()))
                        }
                        None => {}
                    }
                }
                let layouts = per_cohort
                    .iter()
                    .find(|(cid, _, _)| *cid == id)
                    .and_then(|(_, _, bills)| bills.get(&(rel_ch, period.0, period.1)))
                    .map(|hashes| {
                        hashes
                            .iter()
                            .map(|h| flats.get(h).cloned().map_or_else(|| self.layout(h), Ok))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?
                    .unwrap_or_default();
                let g = Group {
                    period: *period,
                    cohorts: &group,
                    billed: members.len(),
                    layouts: &layouts,
                    fresh: &fresh,
                };
                self.left_out_check(limits, &g, &|m| {
                    Ok(members.iter().any(|b| b == m) || self.billed_for(m, rel_ch, *period)?)
                })?;
            }
        }
        if record {
            for (c, members) in a.private_members.iter().enumerate() {
                if slots[c].is_empty() {
                    continue;
                }
                let id = a.member_ids[c];
                if !self.cohort_members.contains_key(id).map_err(store)? {
                    self.cohort_members
                        .insert(id, members.join("\n").as_bytes())
                        .map_err(store)?;
                    self.cohort_sizes
                        .insert(id, &(members.len() as u32).to_be_bytes())
                        .map_err(store)?;
                }
                for m in members {
                    self.put_spans(m, rel_ch, &id, &merged[c])?;
                }
            }
            let mut batch = sled::Batch::default();
            for (id, period, b, members) in new_records {
                batch.insert(Self::billed_key(&id, rel_ch, period), b.encode());
                for m in members {
                    batch.insert(Self::billed_marker(&id, rel_ch, period, m), &[][..]);
                }
            }
            self.cohort_billed.apply_batch(batch).map_err(store)?;
            for (h, flat) in &flats {
                if !self.layouts.contains_key(h).map_err(store)? {
                    self.layouts.insert(h, flat.encode()).map_err(store)?;
                }
            }
            for (id, _, bills) in per_cohort {
                for ((ch, s, e), hashes) in bills {
                    for h in hashes {
                        self.add_cohort_bill(&id, ch, (s, e), &h)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `members` of one cohort must share their registered billing cycle: a cohort across
    /// cycles would leave each member's bill a few days' readings off another's. Without
    /// registered cycles bills are checked against the cohort when they come.
    fn shared_cycle(&self, members: &[String], limits: Limits) -> Result<(), Refusal> {
        if limits.billing_cycle != crate::policy::BillingCycle::Registered {
            return Ok(());
        }
        let mut cycle = None;
        for m in members {
            let c = self
                .registry
                .billing_cycle(m)
                .ok_or_else(|| not_registered(m))?;
            match cycle {
                None => cycle = Some((m, c)),
                Some((first, f)) if f != c => {
                    let show = |(day, zone): (u8, Option<chrono_tz::Tz>)| {
                        format!(
                            "day {day} in {}",
                            zone.map_or("the tariff's zone", |z| z.name())
                        )
                    };
                    return Err(refuse(
                        Rule::CohortBills,
                        Code::FailedPrecondition,
                        format!(
                            "meter {first} is billed on {} and meter {m} on {}; this keyshare aggregates cohorts of one billing cycle (their bills and the aggregate would difference into the days between the cycles)",
                            show(f),
                            show(c)
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The cohorts `meter` was aggregated in on channel `ch` over slots overlapping
    /// [start, end), with all their slots.
    fn cohorts_of(
        &self,
        meter: &str,
        ch: u8,
        start: u64,
        end: u64,
    ) -> Result<Vec<CohortSpans>, Refusal> {
        Ok(self
            .spans_of(meter, ch)?
            .into_iter()
            .filter(|(_, spans)| spans.iter().any(|(s, e)| *s < end && *e > start))
            .collect())
    }

    /// Every cohort `meter` was aggregated in on channel `ch` (readings of the two channels
    /// never combine into one another's), with the slot ranges.
    fn spans_of(&self, meter: &str, ch: u8) -> Result<Vec<CohortSpans>, Refusal> {
        let mut prefix = meter.as_bytes().to_vec();
        prefix.push(0);
        prefix.push(ch);
        let mut out = Vec::new();
        for kv in self.member_spans.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store)?;
            if k.len() != prefix.len() + 32 || v.len() % 16 != 0 {
                return Err(store("corrupt member span record"));
            }
            let mut id = [0u8; 32];
            id.copy_from_slice(&k[prefix.len()..]);
            let spans = v
                .chunks_exact(16)
                .map(|c| (u64_at(c, 0), u64_at(c, 8)))
                .collect();
            out.push((id, spans));
        }
        Ok(out)
    }

    fn span_key(meter: &str, ch: u8, id: &[u8; 32]) -> Vec<u8> {
        let mut key = meter.as_bytes().to_vec();
        key.push(0);
        key.push(ch);
        key.extend_from_slice(id);
        key
    }

    /// The slots `meter` was aggregated over in cohort `id` (merged ranges).
    fn span_record(&self, meter: &str, ch: u8, id: &[u8; 32]) -> Result<Vec<(u64, u64)>, Refusal> {
        let v = self
            .member_spans
            .get(Self::span_key(meter, ch, id))
            .map_err(store)?;
        let v = v.as_deref().unwrap_or_default();
        if v.len() % 16 != 0 {
            return Err(store("corrupt member span record"));
        }
        Ok(v.chunks_exact(16)
            .map(|c| (u64_at(c, 0), u64_at(c, 8)))
            .collect())
    }

    fn put_spans(
        &self,
        meter: &str,
        ch: u8,
        id: &[u8; 32],
        spans: &[(u64, u64)],
    ) -> Result<(), Refusal> {
        let v: Vec<u8> = spans
            .iter()
            .flat_map(|(s, e)| s.to_be_bytes().into_iter().chain(e.to_be_bytes()))
            .collect();
        self.member_spans
            .insert(Self::span_key(meter, ch, id), v)
            .map_err(store)?;
        Ok(())
    }

    /// The meter-encrypted members of cohort `id`.
    fn members_of(&self, id: &[u8; 32]) -> Result<Vec<String>, Refusal> {
        let v = self
            .cohort_members
            .get(id)
            .map_err(store)?
            .ok_or_else(|| store("an aggregated cohort's members are missing"))?;
        Ok(String::from_utf8_lossy(&v)
            .split('\n')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// How many meter-encrypted members cohort `id` has.
    fn size_of(&self, id: &[u8; 32]) -> Result<usize, Refusal> {
        let v = self
            .cohort_sizes
            .get(id)
            .map_err(store)?
            .ok_or_else(|| store("an aggregated cohort's size is missing"))?;
        let b: [u8; 4] = v
            .as_ref()
            .try_into()
            .map_err(|_| store("corrupt cohort size"))?;
        Ok(u32::from_be_bytes(b) as usize)
    }

    fn billed_key(id: &[u8; 32], ch: u8, (start, end): (u64, u64)) -> Vec<u8> {
        let mut key = id.to_vec();
        key.push(ch);
        key.extend_from_slice(&start.to_be_bytes());
        key.extend_from_slice(&end.to_be_bytes());
        key
    }

    fn billed_record(
        &self,
        id: &[u8; 32],
        ch: u8,
        period: (u64, u64),
    ) -> Result<Option<Billed>, Refusal> {
        self.cohort_billed
            .get(Self::billed_key(id, ch, period))
            .map_err(store)?
            .map(|v| Billed::decode(&v).ok_or_else(|| store("corrupt cohort billed record")))
            .transpose()
    }

    /// The marker of `meter` counted in cohort `id`'s [`Billed`] record for `period` (next to
    /// the record, in one batch with it: a retried bill is not counted twice).
    fn billed_marker(id: &[u8; 32], ch: u8, period: (u64, u64), meter: &str) -> Vec<u8> {
        let mut key = Self::billed_key(id, ch, period);
        key.push(1);
        key.extend_from_slice(meter.as_bytes());
        key
    }

    /// The periods (start, end) of `meter`'s bills on channel `ch`, on either track (a
    /// tfhe-track bill is an import bill over its whole UTC days).
    fn bill_periods(&self, meter: &str, ch: u8) -> Result<Vec<(u64, u64)>, Refusal> {
        let mut out = Vec::new();
        if ch == LinearChannel::Import.tag() {
            for (first, last) in self.releases.tfhe_bills_of(meter)? {
                let layout = flat_layout(first, last);
                out.push((layout.start, layout.end));
            }
        }
        let prefix = Self::bill_prefix(meter, ch);
        for kv in self.bills.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store)?;
            if k.len() != prefix.len() + 8 || v.len() < 8 {
                return Err(store("corrupt bill record"));
            }
            out.push((u64_at(&k, prefix.len()), u64_at(&v, 0)));
        }
        Ok(out)
    }

    /// Whether `meter` has a bill on channel `ch` for exactly `period`, on either track (a bill
    /// for an overlapping period does not take its readings out of this one's).
    fn billed_for(&self, meter: &str, ch: u8, period: (u64, u64)) -> Result<bool, Refusal> {
        Ok(self.bill_periods(meter, ch)?.contains(&period))
    }

    /// Rebuilds every cohort's [`Billed`] records and markers from the member spans and the
    /// bills (what they are defined by): on the first open with a [`BILLED_KEY`], over the
    /// records of the earlier unkeyed hash. Returns how many records it wrote.
    fn rebuild_billed(&self) -> Result<usize, Refusal> {
        let mut sets: BTreeMap<CohortPeriod, BTreeSet<String>> = BTreeMap::new();
        for kv in self.member_spans.iter() {
            let (k, v) = kv.map_err(store)?;
            let corrupt = || store("corrupt member span record");
            let at = k.len().checked_sub(34).ok_or_else(corrupt)?;
            if k[at] != 0 || v.len() % 16 != 0 {
                return Err(corrupt());
            }
            let meter = std::str::from_utf8(&k[..at]).map_err(|_| corrupt())?;
            let ch = k[at + 1];
            let id: [u8; 32] = k[at + 2..].try_into().map_err(|_| corrupt())?;
            let spans: Vec<(u64, u64)> = v
                .chunks_exact(16)
                .map(|c| (u64_at(c, 0), u64_at(c, 8)))
                .collect();
            for (s, e) in self.bill_periods(meter, ch)? {
                if spans.iter().any(|(a, b)| *a < e && *b > s) {
                    sets.entry((id, ch, (s, e)))
                        .or_default()
                        .insert(meter.to_owned());
                }
            }
        }
        let mut batch = sled::Batch::default();
        for kv in self.cohort_billed.iter() {
            let (k, _) = kv.map_err(store)?;
            batch.remove(k);
        }
        for ((id, ch, period), members) in &sets {
            let Some(rep) = members.first() else {
                continue;
            };
            let b = Billed {
                set: billed_set(&self.billed_key, members),
                count: members.len() as u32,
                rep: rep.clone(),
            };
            batch.insert(Self::billed_key(id, *ch, *period), b.encode());
            for m in members {
                batch.insert(Self::billed_marker(id, *ch, *period, m), &[][..]);
            }
        }
        self.cohort_billed.apply_batch(batch).map_err(store)?;
        Ok(sets.len())
    }

    /// The rule for members left out, for one [`Group`]: with [`Self::cross_bill`]'s rule each
    /// of its cohorts holds all of its billed members, and cohorts over the same slots are
    /// equal (the differencing rule). Where a cell of their bills was aggregated whole in
    /// cohorts of them, their bills less those aggregates are the sum, over the members not
    /// billed, of each one's readings over the slots of the cell where it was with them. That
    /// sum is released only as an aggregate would be, of at least `min_cohort` members, or as
    /// bills would be, every member's part as wide as a band: one member over a week does not
    /// mask another's hour (the utility may know the first's readings: a premises it cut off).
    fn left_out_check(
        &self,
        limits: Limits,
        g: &Group,
        is_billed: &dyn Fn(&str) -> Result<bool, Refusal>,
    ) -> Result<(), Refusal> {
        let (period, group, billed, layouts, fresh) =
            (g.period, g.cohorts, g.billed, g.layouts, g.fresh);
        let clip = |s: &[(u64, u64)]| intersect(s, &[period]);
        let mut live = Vec::new();
        let mut with_others = Vec::new();
        for (id, spans) in group {
            let size = match fresh.get(id) {
                Some(m) => m.len(),
                None => self.size_of(id)?,
            };
            let spans = clip(spans);
            live.extend_from_slice(&spans);
            if size > billed {
                with_others.push((id, spans));
            }
        }
        if with_others.is_empty() {
            return Ok(());
        }
        let live = merge_spans(live);
        let wide = |l: &Layout, part: &[(u64, u64)]| {
            band_width(Rule::CohortBills, limits, l.end - l.start, l.tz, "", part).is_ok()
        };
        let judge = |l: &Layout, who: &str, others: usize, part: &[(u64, u64)]| {
            band_width(
                Rule::CohortBills,
                limits,
                l.end - l.start,
                l.tz,
                &format!(
                    "{who} is not billed for {} .. {} and was aggregated with the members billed over part of it; their bills less the aggregates give its readings there, summed with those of {others} other member(s) left out (fewer than {} in all), and within a cell of their bills that part",
                    slot_time(period.0),
                    slot_time(period.1),
                    limits.min_cohort
                ),
                part,
            )
        };
        // A cell's total is taken out of the aggregates only where every slot of it was
        // aggregated in a cohort of the group. A member's part holds each of its cohorts' in
        // the cell and the width rule is monotone: where every cohort's part is wide (or
        // empty), so is every member's.
        let cells: Vec<(&Layout, Vec<(u64, u64)>)> = layouts
            .iter()
            .flat_map(|l| l.cells().into_values().map(move |cell| (l, cell)))
            .filter(|(l, cell)| {
                covers(&live, cell)
                    && with_others.iter().any(|(_, spans)| {
                        let part = intersect(cell, spans);
                        !part.is_empty() && !wide(l, &part)
                    })
            })
            .collect();
        if cells.is_empty() {
            return Ok(());
        }
        // Each member not billed, with the slots of the period it was aggregated in with them.
        let mut parts: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for (id, spans) in &with_others {
            let members = match fresh.get(*id) {
                Some(m) => m.to_vec(),
                None => self.members_of(id)?,
            };
            for m in members {
                if !is_billed(&m)? {
                    parts.entry(m).or_default().extend_from_slice(spans);
                }
            }
        }
        let parts: Vec<(String, Vec<(u64, u64)>)> = parts
            .into_iter()
            .map(|(m, spans)| (m, merge_spans(spans)))
            .collect();
        for (l, cell) in &cells {
            let here: Vec<(&String, Vec<(u64, u64)>)> = parts
                .iter()
                .map(|(m, spans)| (m, intersect(cell, spans)))
                .filter(|(_, part)| !part.is_empty())
                .collect();
            if here.is_empty() {
                // A cohort larger than the members billed holds none that is not billed: the
                // records and the bills disagree.
                return Err(store(
                    "a cohort's billed record disagrees with its members' bills",
                ));
            }
            if here.len() >= limits.min_cohort {
                continue;
            }
            for (m, part) in &here {
                judge(l, &format!("meter {m}"), here.len() - 1, part)?;
            }
        }
        Ok(())
    }

    /// The periods (start, end) overlapping [start, end) over which members of cohort `id` were
    /// billed on channel `ch`, with their layouts.
    #[allow(clippy::type_complexity)]
    fn cohort_bill_records(
        &self,
        id: &[u8; 32],
        ch: u8,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64, Vec<[u8; 32]>)>, Refusal> {
        let mut prefix = id.to_vec();
        prefix.push(ch);
        let mut out = Vec::new();
        for kv in self.cohort_bills.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(store)?;
            if k.len() != prefix.len() + 16 || v.len() % 32 != 0 {
                return Err(store("corrupt cohort bill record"));
            }
            let (s, e) = (u64_at(&k, prefix.len()), u64_at(&k, prefix.len() + 8));
            if s >= end || e <= start {
                continue;
            }
            let hashes = v
                .chunks_exact(32)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect();
            out.push((s, e, hashes));
        }
        Ok(out)
    }

    fn add_cohort_bill(
        &self,
        id: &[u8; 32],
        ch: u8,
        (start, end): (u64, u64),
        layout: &[u8; 32],
    ) -> Result<(), Refusal> {
        let mut key = id.to_vec();
        key.push(ch);
        key.extend_from_slice(&start.to_be_bytes());
        key.extend_from_slice(&end.to_be_bytes());
        let mut v = self
            .cohort_bills
            .get(&key)
            .map_err(store)?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        if !v.chunks_exact(32).any(|c| c == layout) {
            v.extend_from_slice(layout);
            self.cohort_bills.insert(key, v).map_err(store)?;
        }
        Ok(())
    }

    fn layout(&self, hash: &[u8; 32]) -> Result<Layout, Refusal> {
        self.layouts
            .get(hash)
            .map_err(store)?
            .and_then(|v| Layout::decode(&v))
            .ok_or_else(|| store("a bill layout is missing or corrupt"))
    }

    /// Checks the stateful rules without recording (an early refusal before costly work).
    pub async fn precheck(&self, a: &Admitted, limits: Limits) -> Result<(), Refusal> {
        self.ledger(a, limits, false).await
    }

    /// Checks the stateful rules again and records the release durably.
    pub async fn record(&self, a: &Admitted, limits: Limits) -> Result<(), Refusal> {
        self.ledger(a, limits, true).await
    }

    /// The members of `a` without an accepted enrollment for its epoch here.
    pub fn missing_enrollments(&self, a: &Admitted) -> Result<Vec<String>, Refusal> {
        let epoch = a.release.spec.epoch;
        let mut missing = Vec::new();
        for c in &a.release.cohorts {
            for m in c {
                if !self.is_enrolled(m, epoch)? {
                    missing.push(m.clone());
                }
            }
        }
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    fn seeds_of(&self, members: &[String], epoch: u32, share: usize) -> Result<Vec<Seed>, Refusal> {
        members
            .iter()
            .map(|m| {
                let v = self
                    .seeds
                    .get(seed_key(m, epoch, share))
                    .map_err(store)?
                    .ok_or_else(|| {
                        refuse(
                            Rule::Enrollment,
                            Code::FailedPrecondition,
                            format!(
                                "meter {m} has no enrolled seed for epoch {epoch} at this keyshare"
                            ),
                        )
                    })?;
                let mut s = [0u8; 32];
                if v.len() != 32 {
                    return Err(store("a stored seed is not 32 bytes"));
                }
                s.copy_from_slice(&v);
                Ok(Seed(s))
            })
            .collect()
    }

    fn cohort_key(
        &self,
        a: &Admitted,
        cohort: usize,
        share: usize,
    ) -> Result<Arc<MeterKey>, Refusal> {
        let spec = &a.release.spec;
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v2/cohort-key-id");
        h.update(&spec.epoch.to_le_bytes());
        h.update(&[spec.channel.tag(), share as u8]);
        h.update(&a.cohort_hashes[cohort]);
        let id = *h.finalize().as_bytes();
        if let Some(k) = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return Ok(k.clone());
        }
        let seeds = self.seeds_of(&a.release.cohorts[cohort], spec.epoch, share)?;
        let refs: Vec<&Seed> = seeds.iter().collect();
        let key = Arc::new(cohort_share_key(&refs, spec.channel));
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(id, key.clone());
        Ok(key)
    }

    fn mask(&self, epoch: u32, runs: &[SlotRun]) -> Arc<Vec<u128>> {
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v2/mask-sum-id");
        h.update(&epoch.to_le_bytes());
        for r in runs {
            h.update(&r.start.to_le_bytes());
            h.update(&r.end.to_le_bytes());
            h.update(&r.weight.to_le_bytes());
        }
        let id = *h.finalize().as_bytes();
        if let Some(m) = self
            .masks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return m.clone();
        }
        let m = Arc::new(mask_sum(epoch, runs));
        self.masks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(id, m.clone());
        m
    }

    /// This party's contributions: for every share it holds, one d_U per output. CPU-bound:
    /// call from a blocking context.
    pub fn contributions(&self, a: &Admitted) -> Result<Vec<(usize, Vec<u128>)>, Refusal> {
        let held = self.party.scheme.held_by(self.party.index);
        let masks: Vec<Arc<Vec<u128>>> = a
            .runs
            .iter()
            .map(|r| self.mask(a.release.spec.epoch, r))
            .collect();
        let mut out = Vec::with_capacity(held.len());
        for u in held {
            let mut keys: BTreeMap<usize, Arc<MeterKey>> = BTreeMap::new();
            let mut values = Vec::with_capacity(a.release.outputs.len());
            for (o, (_, cohort)) in a.release.outputs.iter().enumerate() {
                let key = match keys.get(cohort) {
                    Some(k) => k.clone(),
                    None => {
                        let k = self.cohort_key(a, *cohort, u)?;
                        keys.insert(*cohort, k.clone());
                        k
                    }
                };
                values.push(contribution(
                    &masks[o],
                    &key.0,
                    &self.party.flood_key,
                    u,
                    &a.output_hashes[o],
                ));
            }
            out.push((u, values));
        }
        Ok(out)
    }
}

impl Drop for LinearState {
    fn drop(&mut self) {
        // Cohort key shares are secrets: MeterKey zeroizes itself when the last Arc goes.
        if let Ok(mut k) = self.keys.lock() {
            k.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_core::linear::envelope::{enroll, generate_keypair};
    use psm_core::linear::key::MeterSeeds;
    use psm_core::linear::release::release_from_proto;
    use psm_proto::v1::{AggregateProgram, Cohort, LinearRelease, ReleaseOutput, TimeRange};

    const DAY: i64 = 20_500;

    /// A registry entry for `id` with a device key derived from the id (tests only).
    fn device(id: &str) -> psm_core::signing::SecretKey {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, blake3::hash(id.as_bytes()).as_bytes()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        psm_core::signing::SecretKey::read(&p).unwrap()
    }

    fn entry(id: &str, enc: &str) -> String {
        format!(
            "[[meters]]\nid = \"{id}\"\nencryption = \"{enc}\"\ndevice_key = \"{}\"\n",
            hex::encode(device(id).public())
        )
    }

    impl LinearState {
        /// Marks a pending enrollment active without asking co-holders (unit tests of what
        /// comes after; the confirmation itself is tested end to end over mTLS).
        fn activate_for_test(&self, meter: &str, epoch: u32) {
            let k = enrolled_key(meter, epoch);
            let mut v = self.enrolled.get(&k).unwrap().unwrap().to_vec();
            v[0] = ACTIVE;
            self.enrolled.insert(k, v).unwrap();
        }
    }

    fn limits(min_cohort: usize) -> Limits {
        Limits {
            min_cohort,
            max_reissues: 1,
            min_bill_days: 1,
            min_band_hours_per_week: 4,
            min_band_days: 4,
            max_price_ratio: 8,
            billing_cycle: crate::policy::BillingCycle::Any,
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        state: LinearState,
        audit: AuditLog,
        keys: Vec<(String, Vec<u8>)>,
        scheme: Scheme,
    }

    fn fixture(registry: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scheme = Scheme::new(3, 2).unwrap();
        let names: Vec<String> = (1..=3).map(|i| format!("ks-{i}")).collect();
        let pairs: Vec<_> = (0..3).map(|_| generate_keypair()).collect();
        let keys = names
            .iter()
            .cloned()
            .zip(pairs.iter().map(|p| p.1.clone()))
            .collect();
        let reg = dir.path().join("registry.toml");
        std::fs::write(&reg, registry).unwrap();
        let releases = Arc::new(crate::policy::Releases::open(&dir.path().join("db")).unwrap());
        let state = LinearState::open(
            releases,
            Party {
                scheme,
                index: 0,
                names,
                flood_key: FloodKey([5; 32]),
                enrollment_secret: pairs[0].0.clone(),
            },
            Registry::load(Some(&reg)).unwrap(),
            None,
        )
        .unwrap();
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        Fixture {
            _dir: dir,
            state,
            audit,
            keys,
            scheme,
        }
    }

    fn aggregate(members: &[&str], key: &str) -> Release {
        let _ = key;
        release_from_proto(&LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: AggregateProgram {
                granularity_seconds: 3600,
            }
            .encode_to_vec(),
            range: Some(TimeRange {
                start_unix: DAY * 86_400,
                end_unix: (DAY + 1) * 86_400,
            }),
            cohorts: vec![Cohort {
                meter_ids: members.iter().map(|m| m.to_string()).collect(),
            }],
            outputs: (0..24)
                .map(|i| ReleaseOutput {
                    index: i,
                    cohort: 0,
                })
                .collect(),
            reissue_reason: String::new(),
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enrollments_are_decided_and_audited() {
        let reg = entry("a", "meter") + &entry("b", "headend") + &entry("c", "meter");
        let f = fixture(&reg);
        let sa = MeterSeeds::generate(f.scheme, 1);
        let ea = enroll("a", &sa, f.scheme, &f.keys, &device("a")).unwrap();
        let eb = enroll(
            "b",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &device("b"),
        )
        .unwrap();
        // Not on the registry.
        let ez = enroll(
            "z",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &device("z"),
        )
        .unwrap();
        // c reuses a's seeds (a head-end fronting two ids with one key).
        let ec = enroll("c", &sa, f.scheme, &f.keys, &device("c")).unwrap();
        let seq = |mut e: Enrollment, s| {
            e.seq = s;
            e
        };
        let r = f
            .state
            .decide_batch(
                vec![seq(ea.clone(), 1), seq(eb, 2), seq(ez, 3), seq(ec, 4)],
                4,
                &f.audit,
            )
            .await
            .unwrap();
        assert_eq!(
            r,
            SyncReport {
                accepted: 2,
                refused: 2,
                activated: 0,
            }
        );
        // Accepted here, but not active before the co-holders confirm.
        let state = |m| f.state.status(m, 1).unwrap().map(|s| s.state);
        assert_eq!(state("a"), Some(EnrollmentState::Pending));
        assert_eq!(state("b"), Some(EnrollmentState::Pending));
        assert!(!f.state.is_enrolled("a", 1).unwrap());
        assert_eq!(state("z"), None);
        assert_eq!(state("c"), Some(EnrollmentState::Refused));
        // The same enrollment again is no new decision; another one for (a, 1) is refused.
        let ea2 = enroll(
            "a",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &device("a"),
        )
        .unwrap();
        let r = f
            .state
            .decide_batch(vec![seq(ea, 5), seq(ea2, 6)], 6, &f.audit)
            .await
            .unwrap();
        assert_eq!(
            r,
            SyncReport {
                accepted: 0,
                refused: 1,
                activated: 0,
            }
        );
        assert_eq!(f.state.cursor().unwrap(), 6);
        f.state.activate_for_test("a", 1);
        let records = f.audit.read(0, 100).unwrap();
        assert_eq!(records.len(), 5);
        assert!(records.iter().all(|r| r.rule == "enrollment"));
        assert!(
            records[2].reason.contains("registry"),
            "{}",
            records[2].reason
        );
        assert!(
            records[3].reason.contains("duplicate seeds"),
            "{}",
            records[3].reason
        );
        assert!(
            records[1].reason.contains("head-end"),
            "{}",
            records[1].reason
        );
        // The contributions use the stored seeds: a's share keys for the shares party 0 holds.
        let one = release_from_proto(&LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: AggregateProgram {
                granularity_seconds: 3600,
            }
            .encode_to_vec(),
            range: Some(TimeRange {
                start_unix: DAY * 86_400,
                end_unix: DAY * 86_400 + 3600,
            }),
            cohorts: vec![Cohort {
                meter_ids: vec!["a".into()],
            }],
            outputs: vec![ReleaseOutput {
                index: 0,
                cohort: 0,
            }],
            reissue_reason: String::new(),
        })
        .unwrap();
        let adm = f.state.admit(one, limits(1), |_| true).unwrap();
        let c = f.state.contributions(&adm).unwrap();
        let held = f.scheme.held_by(0);
        assert_eq!(c.iter().map(|(u, _)| *u).collect::<Vec<_>>(), held);
        let a = mask_sum(1, &adm.runs[0]);
        for (u, v) in &c {
            let want = contribution(
                &a,
                &cohort_share_key(&[&sa.seeds[*u]], psm_core::linear::Channel::Import).0,
                &FloodKey([5; 32]),
                *u,
                &adm.output_hashes[0],
            );
            assert_eq!(v[0], want);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn head_end_members_do_not_hide_a_difference() {
        let mut reg = String::new();
        for i in 0..6 {
            reg.push_str(&entry(&format!("m{i}"), "meter"));
        }
        for i in 0..4 {
            reg.push_str(&entry(&format!("h{i}"), "headend"));
        }
        let f = fixture(&reg);
        // {m0..m4} ∪ {h0..h3}, then {m0..m5}: the head-end meters' readings are known to the
        // utility, so the difference that matters is m5 alone.
        let first = f
            .state
            .admit(
                aggregate(&["h0", "h1", "h2", "h3", "m0", "m1", "m2", "m3", "m4"], ""),
                limits(5),
                |_| true,
            )
            .unwrap();
        assert_eq!(first.headend_encrypted, ["h0", "h1", "h2", "h3"]);
        f.state.record(&first, limits(5)).await.unwrap();
        let probe = f
            .state
            .admit(
                aggregate(&["m0", "m1", "m2", "m3", "m4", "m5"], ""),
                limits(5),
                |_| true,
            )
            .unwrap();
        assert_eq!(
            f.state
                .precheck(&probe, limits(5))
                .await
                .err()
                .map(|r| r.rule),
            Some("differencing")
        );
        // The same meter-encrypted members without the head-end ones: no new information.
        let same = f
            .state
            .admit(
                aggregate(&["m0", "m1", "m2", "m3", "m4"], ""),
                limits(5),
                |_| true,
            )
            .unwrap();
        f.state.record(&same, limits(5)).await.unwrap();
    }

    /// A head-end that enrolls seeds of its own for a registered meter id (front-running the
    /// meter) cannot sign for the meter's device key: refused as `device-signature`, and not
    /// decided, so the meter's own enrollment is still accepted afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_enrollment_not_signed_by_the_device_is_refused_without_blocking_the_meter() {
        let f = fixture(&entry("m1", "meter"));
        let forged = enroll(
            "m1",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &psm_core::signing::SecretKey::generate(),
        )
        .unwrap();
        let mut re_signed = enroll(
            "m1",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &device("m1"),
        )
        .unwrap();
        // The meter's signature copied onto other commitments does not verify either.
        re_signed.commitments[0] = forged.commitments[0].clone();
        let seq = |mut e: Enrollment, s| {
            e.seq = s;
            e
        };
        let r = f
            .state
            .decide_batch(vec![seq(forged, 1), seq(re_signed, 2)], 2, &f.audit)
            .await
            .unwrap();
        assert_eq!((r.accepted, r.refused), (0, 2));
        assert_eq!(f.state.status("m1", 1).unwrap(), None);
        let records = f.audit.read(0, 10).unwrap();
        assert!(
            records.iter().all(|r| r.rule == "device-signature"),
            "{records:?}"
        );
        let genuine = enroll(
            "m1",
            &MeterSeeds::generate(f.scheme, 1),
            f.scheme,
            &f.keys,
            &device("m1"),
        )
        .unwrap();
        let r = f
            .state
            .decide_batch(vec![seq(genuine, 3)], 3, &f.audit)
            .await
            .unwrap();
        assert_eq!(r.accepted, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_enrollment_with_repeated_seeds_is_refused() {
        let f = fixture("development_allow_all = true\n");
        let mut seeds = MeterSeeds::generate(f.scheme, 1);
        seeds.seeds[2] = seeds.seeds[1].clone(); // both held by party 0
        let mut e = enroll("twin", &seeds, f.scheme, &f.keys, &device("twin")).unwrap();
        e.seq = 1;
        let r = f.state.decide_batch(vec![e], 1, &f.audit).await.unwrap();
        assert_eq!(
            r,
            SyncReport {
                accepted: 0,
                refused: 1,
                activated: 0,
            }
        );
        assert!(!f.state.is_enrolled("twin", 1).unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ledger_refuses_differencing_and_overlapping_bills() {
        let f = fixture("development_allow_all = true\n");
        let ten: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let ids: Vec<&str> = ten.iter().map(String::as_str).collect();
        let first = f
            .state
            .admit(aggregate(&ids[..5], "a"), limits(5), |_| true)
            .unwrap();
        f.state.record(&first, limits(5)).await.unwrap();
        // The same cohort again: allowed.
        let again = f
            .state
            .admit(aggregate(&ids[..5], "b"), limits(5), |_| true)
            .unwrap();
        f.state.record(&again, limits(5)).await.unwrap();
        // One meter more over the same slots: refused (R1 − R2 + R3 combinations are why
        // cohorts over the same slots must be equal or disjoint); a disjoint five: allowed; all
        // ten (a superset of both): refused.
        let six = f
            .state
            .admit(aggregate(&ids[..6], "c"), limits(5), |_| true)
            .unwrap();
        let e = f.state.precheck(&six, limits(5)).await.unwrap_err();
        assert_eq!(e.rule, "differencing");
        let other = f
            .state
            .admit(aggregate(&ids[5..], "d"), limits(5), |_| true)
            .unwrap();
        f.state.record(&other, limits(5)).await.unwrap();
        let all = f
            .state
            .admit(aggregate(&ids, "d"), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            f.state
                .precheck(&all, limits(5))
                .await
                .err()
                .map(|r| r.rule),
            Some("differencing")
        );
        // k-anonymity counts registered meter-encrypted members.
        let four = f
            .state
            .admit(aggregate(&ids[..4], "e"), limits(5), |_| true);
        assert_eq!(four.err().map(|r| r.rule), Some("k-anonymity"));

        // Bills: one meter, never overlapping; a re-issue covers exactly the same period.
        // Tariffs whose first band ends at a different hour: different slots, different values.
        let tariff = |name: &str| {
            let split = 6 + name.len() as u32 % 10 + u32::from(name.as_bytes()[1] - b'0');
            let band = |n: &str, start_hour, end_hour| psm_proto::v1::TariffBand {
                name: n.into(),
                weekday_mask: 0x7f,
                start_hour,
                end_hour,
                import_price_milli: 10_000,
                export_price_milli: 5_000,
                month_mask: 0,
            };
            psm_proto::v1::Tariff {
                name: name.into(),
                time_zone: "UTC".into(),
                bands: vec![band("night", 0, split), band("day", split, 24)],
                currency: "EUR".into(),
                ..Default::default()
            }
        };
        let bill_in = |name: &str, days: i64, reason: &str, epoch: u32| {
            release_from_proto(&LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch,
                channel: psm_proto::v1::Channel::Import as i32,
                program: tariff(name).encode_to_vec(),
                range: Some(TimeRange {
                    start_unix: DAY * 86_400,
                    end_unix: (DAY + days) * 86_400,
                }),
                cohorts: vec![Cohort {
                    meter_ids: vec!["m0".into()],
                }],
                outputs: vec![ReleaseOutput {
                    index: 0,
                    cohort: 0,
                }],
                reissue_reason: reason.into(),
            })
            .unwrap()
        };
        let bill = |name: &str, days: i64, reason: &str| bill_in(name, days, reason, 1);
        let rule = |r: Result<(), Refusal>| r.err().map_or("allowed", |r| r.rule);
        let b = f
            .state
            .admit(bill("t1", 28, ""), limits(5), |_| true)
            .unwrap();
        assert_eq!(rule(f.state.record(&b, limits(5)).await), "allowed");
        assert_eq!(
            rule(f.state.record(&b, limits(5)).await),
            "allowed",
            "a repeat"
        );
        let shorter = f
            .state
            .admit(bill("t1", 27, "fix"), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            rule(f.state.record(&shorter, limits(5)).await),
            "one-bill-per-period"
        );
        // Another tariff over exactly the same period: refused, with or without a reason (the
        // two band layouts would difference into the readings between their edges).
        let other = f
            .state
            .admit(bill("t2", 28, ""), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            rule(f.state.record(&other, limits(5)).await),
            "one-bill-per-period"
        );
        let other = f
            .state
            .admit(bill("t2", 28, "new tariff"), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            rule(f.state.record(&other, limits(5)).await),
            "one-bill-per-period"
        );
        // A correction (new epoch) under the same tariff: without a reason refused, with one
        // allowed once, a second re-issue refused.
        let fix = f
            .state
            .admit(bill_in("t1", 28, "", 2), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            rule(f.state.record(&fix, limits(5)).await),
            "one-bill-per-period"
        );
        let fix = f
            .state
            .admit(bill_in("t1", 28, "meter replaced", 2), limits(5), |_| true)
            .unwrap();
        assert_eq!(rule(f.state.record(&fix, limits(5)).await), "allowed");
        let again = f
            .state
            .admit(bill_in("t1", 28, "again", 3), limits(5), |_| true)
            .unwrap();
        assert_eq!(
            rule(f.state.record(&again, limits(5)).await),
            "one-bill-per-period"
        );
        // Periods shorter than min_bill_days, and bands narrower than the minimum, are refused.
        let strict = Limits {
            min_bill_days: 28,
            ..limits(5)
        };
        let short = f.state.admit(bill("t1", 27, ""), strict, |_| true);
        assert_eq!(short.err().map(|r| r.rule), Some("bill-period"));
        let narrow = Limits {
            min_band_hours_per_week: 7 * 23,
            ..limits(5)
        };
        let n = f.state.admit(bill("t1", 28, ""), narrow, |_| true);
        assert_eq!(n.err().map(|r| r.rule), Some("band-width"));
        // Not allowed tariffs are refused before anything else.
        let denied = f.state.admit(bill("t4", 28, ""), limits(5), |_| false);
        assert_eq!(denied.err().map(|r| r.rule), Some("allowed-program"));
    }

    /// Bills on the example rate sheet against the rules that seasons, holidays and local
    /// cycles bring: the sliver of a season at a cycle's edge is not released, cycles are the
    /// registry's, and a cycle 23 hours short (daylight saving) still counts its local days.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seasonal_bills_are_released_only_on_registered_cycles_and_wide_bands() {
        let f = fixture(&(entry("m1", "meter") + "billing_day = 27\n"));
        let file =
            psm_tariff::file::check(include_str!("../../deploy/tariffs/us-seasonal-tou.toml"))
                .unwrap();
        let ny = file.tariff.tz;
        let at = |y, m, d| {
            psm_tariff::day_start(ny, chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap()).unwrap()
        };
        let release_of = |program: Vec<u8>, (start, end): (i64, i64), outputs: &[u32]| {
            release_from_proto(&LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch: 1,
                channel: psm_proto::v1::Channel::Import as i32,
                program,
                range: Some(TimeRange {
                    start_unix: start,
                    end_unix: end,
                }),
                cohorts: vec![Cohort {
                    meter_ids: vec!["m1".into()],
                }],
                outputs: outputs
                    .iter()
                    .map(|i| ReleaseOutput {
                        index: *i,
                        cohort: 0,
                    })
                    .collect(),
                reissue_reason: String::new(),
            })
            .unwrap()
        };
        let release =
            |period, outputs: &[u32]| release_of(file.wire.encode_to_vec(), period, outputs);
        let registered = Limits {
            min_bill_days: 28,
            billing_cycle: crate::policy::BillingCycle::Registered,
            ..limits(5)
        };
        let rule = |r: Result<Admitted, Refusal>| r.err().map(|r| r.rule);
        // 2026-09-27 .. 2026-10-27 is billed in September's season (summer) throughout, so no
        // band is a sliver of a season at the cycle's edge: the summer bands are released, the
        // winter ones have no slot in it.
        let cycle = (at(2026, 9, 27), at(2026, 10, 27));
        let summer = f
            .state
            .admit(release(cycle, &[0, 1, 2, 3]), registered, |_| true);
        assert!(summer.is_ok(), "{:?}", summer.err());
        let winter = f.state.admit(release(cycle, &[7]), registered, |_| true);
        assert_eq!(rule(winter), Some("release"));
        // A band on holidays alone is wide in hours (24 per holiday) but on one day of the
        // November cycle (Thanksgiving, 26 November): it would release that day's total.
        let holidays_alone = file
            .wire
            .bands
            .iter()
            .cloned()
            .flat_map(|b| {
                if b.weekday_mask & psm_tariff::HOLIDAY_BIT == 0 {
                    return vec![b];
                }
                let mut weekend = b.clone();
                weekend.weekday_mask &= !psm_tariff::HOLIDAY_BIT;
                let mut holidays = b;
                holidays.name.push_str(" (holidays)");
                holidays.weekday_mask = psm_tariff::HOLIDAY_BIT;
                vec![weekend, holidays]
            })
            .collect::<Vec<_>>();
        let narrow = psm_proto::v1::Tariff {
            bands: holidays_alone,
            ..file.wire.clone()
        };
        let holiday_band = narrow
            .bands
            .iter()
            .position(|b| b.name == "winter weekend and holiday (holidays)")
            .unwrap() as u32;
        let thanksgiving_cycle = (at(2026, 10, 27), at(2026, 11, 27));
        let one_day = f.state.admit(
            release_of(narrow.encode_to_vec(), thanksgiving_cycle, &[holiday_band]),
            registered,
            |_| true,
        );
        assert_eq!(rule(one_day), Some("band-width"));
        // A period that is not this meter's cycle (billing day 27), by an hour or by a day.
        let shifted = f.state.admit(
            release((cycle.0 + 3600, cycle.1 + 3600), &[7]),
            registered,
            |_| true,
        );
        assert_eq!(rule(shifted), Some("billing-cycle"));
        let other_day = f.state.admit(
            release((at(2026, 9, 28), at(2026, 10, 28)), &[7]),
            registered,
            |_| true,
        );
        assert_eq!(rule(other_day), Some("billing-cycle"));
        // 2026-02-27 .. 2026-03-27 is 27 days and 23 hours (clocks go forward on 8 March) but
        // 28 local days: not too short.
        let spring = (at(2026, 2, 27), at(2026, 3, 27));
        assert_eq!((spring.1 - spring.0) % 86_400, 86_400 - 3600);
        let ok = f
            .state
            .admit(release(spring, &[4, 5, 6, 7]), registered, |_| true);
        assert!(ok.is_ok(), "{:?}", ok.err());
        // A meter not on the registry has no cycle.
        let stranger = release_from_proto(&LinearRelease {
            cohorts: vec![Cohort {
                meter_ids: vec!["m9".into()],
            }],
            ..psm_proto::v1::LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch: 1,
                channel: psm_proto::v1::Channel::Import as i32,
                program: file.wire.encode_to_vec(),
                range: Some(TimeRange {
                    start_unix: spring.0,
                    end_unix: spring.1,
                }),
                cohorts: vec![],
                outputs: vec![ReleaseOutput {
                    index: 4,
                    cohort: 0,
                }],
                reissue_reason: String::new(),
            }
        })
        .unwrap();
        assert_eq!(
            rule(f.state.admit(stranger, registered, |_| true)),
            Some("registry")
        );
    }

    /// A registry that fixes a meter's time zone fixes its cycles: a tariff in another zone
    /// cannot move them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_registry_zone_fixes_the_cycle_whatever_the_tariff_zone() {
        let f = fixture(
            &(entry("m1", "meter") + "billing_day = 1\ntime_zone = \"America/New_York\"\n"),
        );
        let tariff = |zone: &str| psm_proto::v1::Tariff {
            name: "flat".into(),
            time_zone: zone.into(),
            bands: vec![psm_proto::v1::TariffBand {
                name: "all".into(),
                weekday_mask: 0x7f,
                start_hour: 0,
                end_hour: 24,
                import_price_milli: 10_000,
                export_price_milli: 0,
                month_mask: 0,
            }],
            currency: "USD".into(),
            ..Default::default()
        };
        let release = |zone: &str, (start, end): (i64, i64)| {
            release_from_proto(&LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch: 1,
                channel: psm_proto::v1::Channel::Import as i32,
                program: tariff(zone).encode_to_vec(),
                range: Some(TimeRange {
                    start_unix: start,
                    end_unix: end,
                }),
                cohorts: vec![Cohort {
                    meter_ids: vec!["m1".into()],
                }],
                outputs: vec![ReleaseOutput {
                    index: 0,
                    cohort: 0,
                }],
                reissue_reason: String::new(),
            })
            .unwrap()
        };
        let registered = Limits {
            billing_cycle: crate::policy::BillingCycle::Registered,
            ..limits(5)
        };
        // A tariff in another zone than the registry's is refused outright, on the UTC month
        // and on New York's: it would count days, seasons and bands on other local days.
        let utc = (1_767_225_600, 1_767_225_600 + 31 * 86_400);
        let ny = (utc.0 + 5 * 3600, utc.1 + 5 * 3600);
        for period in [utc, ny] {
            let e = f
                .state
                .admit(release("UTC", period), registered, |_| true)
                .err()
                .unwrap();
            assert_eq!(e.rule, "billing-cycle");
            assert!(
                e.status
                    .message()
                    .contains("registered in America/New_York"),
                "{}",
                e.status.message()
            );
        }
        // In the meter's zone, its January is a cycle and the UTC month is not.
        assert!(f
            .state
            .admit(release("America/New_York", ny), registered, |_| true)
            .is_ok());
        let e = f
            .state
            .admit(release("America/New_York", utc), registered, |_| true)
            .err()
            .unwrap();
        assert_eq!(e.rule, "billing-cycle");
    }

    /// A narrow band left out of a bill's request is still judged: otherwise the period's total
    /// (a tfhe-track tiered cost over the same period) minus the released bands would be it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_narrow_band_left_out_of_the_request_still_refuses_the_bill() {
        let f = fixture(&entry("m1", "meter"));
        let band = |name: &str, mask: u32| psm_proto::v1::TariffBand {
            name: name.into(),
            weekday_mask: mask,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 10_000,
            export_price_milli: 0,
            month_mask: 0,
        };
        // One holiday in January 2026 (UTC), its own band.
        let t = psm_proto::v1::Tariff {
            name: "holiday apart".into(),
            time_zone: "UTC".into(),
            bands: vec![band("rest", 0x7f), band("holiday", psm_tariff::HOLIDAY_BIT)],
            holidays: vec!["2026-01-01".into()],
            currency: "EUR".into(),
            ..Default::default()
        };
        let jan = (1_767_225_600, 1_767_225_600 + 31 * 86_400);
        let only_rest = release_from_proto(&LinearRelease {
            kind: ComputationKind::Bill as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: t.encode_to_vec(),
            range: Some(TimeRange {
                start_unix: jan.0,
                end_unix: jan.1,
            }),
            cohorts: vec![Cohort {
                meter_ids: vec!["m1".into()],
            }],
            outputs: vec![ReleaseOutput {
                index: 0,
                cohort: 0,
            }],
            reissue_reason: String::new(),
        })
        .unwrap();
        let registered = Limits {
            billing_cycle: crate::policy::BillingCycle::Registered,
            ..limits(5)
        };
        let e = f
            .state
            .admit(only_rest, registered, |_| true)
            .err()
            .unwrap();
        assert_eq!(e.rule, "band-width");
        assert!(
            e.status.message().contains("whether asked for or not"),
            "{}",
            e.status.message()
        );
    }

    /// Dynamic prices weigh one import output; they bill only when approved before the
    /// period and within max_price_ratio.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dynamic_prices_need_an_approval_before_the_period_and_a_bounded_spread() {
        let mut f = fixture(&entry("m1", "meter"));
        let jan = (1_767_225_600i64, 1_767_225_600 + 31 * 86_400);
        let tariff = |prices: Vec<i64>| psm_proto::v1::Tariff {
            name: "dynamic".into(),
            time_zone: "UTC".into(),
            bands: vec![psm_proto::v1::TariffBand {
                name: "all".into(),
                weekday_mask: 0x7f,
                start_hour: 0,
                end_hour: 24,
                export_price_milli: 5_000,
                ..Default::default()
            }],
            import_prices: Some(psm_proto::v1::PriceSeries {
                interval_seconds: 3600,
                start_unix: jan.0,
                price_milli: prices,
            }),
            currency: "GBP".into(),
            ..Default::default()
        };
        let hourly: Vec<i64> = (0..31 * 24).map(|h| 10_000 + (h % 24) * 1_000).collect();
        let release = |t: &psm_proto::v1::Tariff, channel: psm_proto::v1::Channel| {
            release_from_proto(&LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch: 1,
                channel: channel as i32,
                program: t.encode_to_vec(),
                range: Some(TimeRange {
                    start_unix: jan.0,
                    end_unix: jan.1,
                }),
                cohorts: vec![Cohort {
                    meter_ids: vec!["m1".into()],
                }],
                outputs: vec![ReleaseOutput {
                    index: 0,
                    cohort: 0,
                }],
                reissue_reason: String::new(),
            })
            .unwrap()
        };
        let import = psm_proto::v1::Channel::Import;
        let t = tariff(hourly.clone());
        let hash = *blake3::hash(&t.encode_to_vec()).as_bytes();
        let rule = |r: Result<Admitted, Refusal>| r.err().map(|r| r.rule);
        // Allowed by hash alone (allowed_programs, allow_any_program): no approval date.
        assert_eq!(
            rule(f.state.admit(release(&t, import), limits(5), |_| true)),
            Some("price-series")
        );
        // Approved a day after the period started: the prices could be fitted to it.
        f.state.approved.insert(hash, jan.0 + 86_400);
        let late = f
            .state
            .admit(release(&t, import), limits(5), |_| true)
            .err()
            .unwrap();
        assert_eq!(late.rule, "price-series");
        assert!(
            late.status.message().contains("after the period starts"),
            "{}",
            late.status.message()
        );
        // Approved before: one output, every slot weighted by its hour's price.
        f.state.approved.insert(hash, jan.0 - 86_400);
        let a = f
            .state
            .admit(release(&t, import), limits(5), |_| true)
            .unwrap();
        assert_eq!(a.runs.len(), 1);
        let weights: Vec<i64> = a.runs[0]
            .iter()
            .flat_map(|r| (r.start..r.end).map(move |_| r.weight))
            .collect();
        assert_eq!(weights.len(), 31 * 288);
        assert!(weights
            .chunks(12)
            .zip(&hourly)
            .all(|(w, p)| w.iter().all(|x| x == p)));
        // The export channel of the same tariff is per band, weight 1.
        let e = f
            .state
            .admit(
                release(&t, psm_proto::v1::Channel::Export),
                limits(5),
                |_| true,
            )
            .unwrap();
        assert!(e.runs[0].iter().all(|r| r.weight == 1));
        // Prices 1,000 and 100,000 in one period: a spread of 100 would let one weighted sum
        // separate readings; the keyshare bills spreads up to max_price_ratio (8).
        let mut wide = hourly.clone();
        wide[5] = 1_000;
        wide[6] = 100_000;
        let wt = tariff(wide);
        f.state.approved.insert(
            *blake3::hash(&wt.encode_to_vec()).as_bytes(),
            jan.0 - 86_400,
        );
        let e = f
            .state
            .admit(release(&wt, import), limits(5), |_| true)
            .err()
            .unwrap();
        assert_eq!(e.rule, "price-series");
        assert!(
            e.status.message().contains("max_price_ratio"),
            "{}",
            e.status.message()
        );
        // One hour a milli-unit dearer: within any ratio, but S mod 10,000 would be that hour's
        // reading. Each price level is judged as a band.
        let mut packed = vec![10_000i64; 31 * 24];
        packed[100] = 10_001;
        let pt = tariff(packed);
        f.state.approved.insert(
            *blake3::hash(&pt.encode_to_vec()).as_bytes(),
            jan.0 - 86_400,
        );
        let e = f
            .state
            .admit(release(&pt, import), limits(5), |_| true)
            .err()
            .unwrap();
        assert_eq!(e.rule, "band-width");
        assert!(
            e.status.message().contains("price level 10001"),
            "{}",
            e.status.message()
        );
        // Every hour its own price: more levels than a tariff may have bands.
        let many: Vec<i64> = (0..31 * 24).map(|h| 10_000 + h).collect();
        let mt = tariff(many);
        f.state.approved.insert(
            *blake3::hash(&mt.encode_to_vec()).as_bytes(),
            jan.0 - 86_400,
        );
        let e = f
            .state
            .admit(release(&mt, import), limits(5), |_| true)
            .err()
            .unwrap();
        assert_eq!(e.rule, "price-series");
        assert!(
            e.status.message().contains("price levels"),
            "{}",
            e.status.message()
        );
    }

    /// January 2026, UTC.
    const JAN: i64 = 1_767_225_600;

    /// An hourly aggregate over day `day` (days since JAN) of `cohorts`, outputs (hour, cohort).
    fn hourly(cohorts: &[&[String]], day: i64, outputs: &[(u32, u32)]) -> Release {
        hourly_over(cohorts, day..day + 1, outputs)
    }

    /// An hourly aggregate over `days` (since JAN) of `cohorts`, outputs (hour of the range,
    /// cohort).
    fn hourly_over(
        cohorts: &[&[String]],
        days: std::ops::Range<i64>,
        outputs: &[(u32, u32)],
    ) -> Release {
        release_from_proto(&LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: AggregateProgram {
                granularity_seconds: 3600,
            }
            .encode_to_vec(),
            range: Some(TimeRange {
                start_unix: JAN + days.start * 86_400,
                end_unix: JAN + days.end * 86_400,
            }),
            cohorts: cohorts
                .iter()
                .map(|c| {
                    let mut meter_ids = c.to_vec();
                    meter_ids.sort();
                    Cohort { meter_ids }
                })
                .collect(),
            outputs: outputs
                .iter()
                .map(|(index, cohort)| ReleaseOutput {
                    index: *index,
                    cohort: *cohort,
                })
                .collect(),
            reissue_reason: String::new(),
        })
        .unwrap()
    }

    fn all_day(cohort: u32) -> Vec<(u32, u32)> {
        (0..24).map(|h| (h, cohort)).collect()
    }

    /// Night 0..split at 10.000, day split..24 at 20.000, in UTC.
    fn two_band(split: u32) -> psm_proto::v1::Tariff {
        let band = |n: &str, start_hour, end_hour, price| psm_proto::v1::TariffBand {
            name: n.into(),
            weekday_mask: 0x7f,
            start_hour,
            end_hour,
            import_price_milli: price,
            export_price_milli: 0,
            month_mask: 0,
        };
        let mut bands = vec![band("day", split, 24, 20_000)];
        if split > 0 {
            bands.insert(0, band("night", 0, split, 10_000));
        }
        psm_proto::v1::Tariff {
            name: format!("split at {split}"),
            time_zone: "UTC".into(),
            bands,
            currency: "EUR".into(),
            ..Default::default()
        }
    }

    /// A January import bill of `meter` under `t`, every output asked for.
    fn january_bill(meter: &str, t: &psm_proto::v1::Tariff) -> Release {
        bill_over(meter, t, (JAN, JAN + 31 * 86_400))
    }

    /// An import bill of `meter` under `t` over [start, end) (Unix seconds).
    fn bill_over(meter: &str, t: &psm_proto::v1::Tariff, (start, end): (i64, i64)) -> Release {
        release_from_proto(&LinearRelease {
            kind: ComputationKind::Bill as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: t.encode_to_vec(),
            range: Some(TimeRange {
                start_unix: start,
                end_unix: end,
            }),
            cohorts: vec![Cohort {
                meter_ids: vec![meter.into()],
            }],
            outputs: (0..t.bands.len().max(1) as u32)
                .map(|index| ReleaseOutput { index, cohort: 0 })
                .collect(),
            reissue_reason: String::new(),
        })
        .unwrap()
    }

    /// A January bill of `meter` under `t` checked, not recorded: refused by `cohort-bills`,
    /// with this message.
    async fn cohort_bills_refusal(
        f: &Fixture,
        meter: &str,
        t: &psm_proto::v1::Tariff,
        limits: Limits,
    ) -> String {
        let b = f
            .state
            .admit(january_bill(meter, t), limits, |_| true)
            .unwrap();
        let e = f.state.precheck(&b, limits).await.unwrap_err();
        assert_eq!(e.rule, "cohort-bills", "{}", e.status.message());
        e.status.message().to_owned()
    }

    /// Admits and records; the refusing rule, or "allowed".
    async fn release(f: &Fixture, r: Release, limits: Limits) -> &'static str {
        match f.state.admit(r, limits, |_| true) {
            Err(e) => e.rule,
            Ok(a) => match f.state.record(&a, limits).await {
                Err(e) => e.rule,
                Ok(()) => "allowed",
            },
        }
    }

    fn meters(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("m{i}")).collect()
    }

    /// The review's finding: C's aggregate, C ∖ {m0} billed under price levels Q, and m0 under
    /// P whose dear level is Q's and one more hour: Σ bills of the others under Q, less C's
    /// aggregate over Q's levels, is m0's Q totals; with m0's P bill, that hour's reading.
    /// Layouts of one aggregated cohort must cross only in band-wide cells, whichever comes
    /// last; layouts that only refine each other (flat against two bands) are billed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn price_levels_of_one_cohort_cross_only_in_band_wide_cells() {
        let dynamic = |prices: Vec<i64>| psm_proto::v1::Tariff {
            name: "dynamic".into(),
            time_zone: "UTC".into(),
            bands: vec![psm_proto::v1::TariffBand {
                name: "all".into(),
                weekday_mask: 0x7f,
                start_hour: 0,
                end_hour: 24,
                export_price_milli: 5_000,
                ..Default::default()
            }],
            import_prices: Some(psm_proto::v1::PriceSeries {
                interval_seconds: 3600,
                start_unix: JAN,
                price_milli: prices,
            }),
            currency: "GBP".into(),
            ..Default::default()
        };
        let q_prices: Vec<i64> = (0..31 * 24)
            .map(|h| if h % 24 < 12 { 10_000 } else { 20_000 })
            .collect();
        let mut p_prices = q_prices.clone();
        p_prices[9 * 24 + 5] = 20_000;
        let (q, p) = (dynamic(q_prices), dynamic(p_prices));
        let approve = |f: &mut Fixture| {
            for t in [&q, &p] {
                f.state
                    .approved
                    .insert(*blake3::hash(&t.encode_to_vec()).as_bytes(), JAN - 86_400);
            }
        };
        let any = limits(5);
        let c = meters(0..6);
        let mut f = fixture("development_allow_all = true\n");
        approve(&mut f);
        assert_eq!(
            release(&f, hourly(&[&c], 0, &all_day(0)), any).await,
            "allowed"
        );
        for m in &c[1..] {
            assert_eq!(release(&f, january_bill(m, &q), any).await, "allowed");
        }
        let e = cohort_bills_refusal(&f, "m0", &p, any).await;
        assert!(
            e.contains("cross") && e.contains("12 five-minute slots"),
            "{}",
            e
        );
        // Under the others' layout m0 is billed: its bill is what the difference gives anyway.
        assert_eq!(release(&f, january_bill("m0", &q), any).await, "allowed");

        // The other order: every bill first (no cohort yet), then the aggregate is refused.
        let mut f = fixture("development_allow_all = true\n");
        approve(&mut f);
        for m in &c[1..] {
            assert_eq!(release(&f, january_bill(m, &q), any).await, "allowed");
        }
        assert_eq!(release(&f, january_bill("m0", &p), any).await, "allowed");
        assert_eq!(
            release(&f, hourly(&[&c], 0, &all_day(0)), any).await,
            "cohort-bills"
        );

        // Flat, two bands and those bands at dynamic levels refine one another: all billed
        // within one cohort. Two-band layouts whose edges are an hour apart cross in 7 hours a
        // week, band-wide at 4 hours a week but not at 8.
        let d = meters(6..12);
        assert_eq!(
            release(&f, hourly(&[&d], 0, &all_day(0)), any).await,
            "allowed"
        );
        assert_eq!(
            release(&f, january_bill("m6", &two_band(0)), any).await,
            "allowed"
        );
        assert_eq!(
            release(&f, january_bill("m7", &two_band(12)), any).await,
            "allowed"
        );
        assert_eq!(release(&f, january_bill("m8", &q), any).await, "allowed");
        assert_eq!(
            release(&f, january_bill("m9", &two_band(11)), any).await,
            "allowed"
        );
        let strict = Limits {
            min_band_hours_per_week: 8,
            ..any
        };
        assert_eq!(
            release(&f, january_bill("m10", &two_band(13)), strict).await,
            "cohort-bills"
        );
    }

    /// Day `day` of January hourly: `c` at `hour`, `rest` at every other hour.
    fn one_hour_apart(c: &[String], rest: &[String], day: i64, hour: u32) -> Release {
        let outputs: Vec<(u32, u32)> = (0..24).map(|h| (h, u32::from(h != hour))).collect();
        hourly(&[c, rest], day, &outputs)
    }

    /// The variant of R1 that needs no tariff: C = {m0} ∪ A over one hour, A over the rest of
    /// the month, and A's January bills. Σ A's bills less A's aggregates is A's hour, and C's
    /// hour less that is m0's reading. Refused whichever comes last: the bill that leaves m0
    /// the one member of C not billed, or the aggregate that covers the bills' period whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_aggregated_over_one_hour_is_not_differenced_out_of_the_bills() {
        let any = limits(5);
        let (c, a) = (meters(0..6), meters(1..6));
        let flat = two_band(0);

        // Aggregates first: a bill is released while the others' sum (m0's hour and the rest
        // of the month of the members not billed yet) has min_cohort members.
        let f = fixture("development_allow_all = true\n");
        assert_eq!(
            release(&f, one_hour_apart(&c, &a, 0, 5), any).await,
            "allowed"
        );
        for day in 1..31 {
            assert_eq!(
                release(&f, hourly(&[&a], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(release(&f, january_bill("m1", &flat), any).await, "allowed");
        let e = cohort_bills_refusal(&f, "m2", &flat, any).await;
        assert!(
            e.contains("meter m0") && e.contains("12 five-minute slots"),
            "{}",
            e
        );

        // Bills first: aggregates are released until they cover the bills' period whole.
        let f = fixture("development_allow_all = true\n");
        for m in &a {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
        assert_eq!(
            release(&f, one_hour_apart(&c, &a, 0, 5), any).await,
            "allowed"
        );
        for day in 1..30 {
            assert_eq!(
                release(&f, hourly(&[&a], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(
            release(&f, hourly(&[&a], 30, &all_day(0)), any).await,
            "cohort-bills"
        );
    }

    /// January hourly: `a` at hour 5 of the first day, `c` at every other hour.
    async fn month_with_an_hour_left_out(f: &Fixture, c: &[String], a: &[String], any: Limits) {
        assert_eq!(release(f, one_hour_apart(a, c, 0, 5), any).await, "allowed");
        for day in 1..31 {
            assert_eq!(
                release(f, hourly(&[c], day, &all_day(0)), any).await,
                "allowed"
            );
        }
    }

    /// The one-hour variant with A billed on the tfhe track: a tiered cost gives the period's
    /// total as a one-band bill does, so those bills count the same, in both orders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tfhe_track_bills_count_as_one_band_bills_against_aggregates() {
        let any = limits(5);
        let (c, a) = (meters(0..6), meters(1..6));
        let january = (JAN / 86_400, JAN / 86_400 + 31);
        let tfhe_bill = |f: &Fixture, m: &str| {
            f.state.judge_tfhe_bill(any, m, january, true)?;
            f.state
                .releases
                .record_tfhe_bill_for_test(m, january.0, january.1);
            Ok::<(), Refusal>(())
        };

        let f = fixture("development_allow_all = true\n");
        assert_eq!(
            release(&f, one_hour_apart(&c, &a, 0, 5), any).await,
            "allowed"
        );
        for day in 1..31 {
            assert_eq!(
                release(&f, hourly(&[&a], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        tfhe_bill(&f, "m1").unwrap();
        let e = f
            .state
            .judge_tfhe_bill(any, "m2", january, false)
            .unwrap_err();
        assert_eq!(e.rule, "cohort-bills");
        assert!(
            e.status.message().contains("meter m0"),
            "{}",
            e.status.message()
        );

        // Bills first, then the aggregate that covers their period whole is refused; a linear
        // bill of a member for the same period as its tfhe bill counts it once.
        let f = fixture("development_allow_all = true\n");
        for m in &a {
            tfhe_bill(&f, m).unwrap();
        }
        assert_eq!(
            release(&f, january_bill("m1", &two_band(0)), any).await,
            "allowed"
        );
        assert_eq!(
            release(&f, one_hour_apart(&c, &a, 0, 5), any).await,
            "allowed"
        );
        for day in 1..30 {
            assert_eq!(
                release(&f, hourly(&[&a], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(
            release(&f, hourly(&[&a], 30, &all_day(0)), any).await,
            "cohort-bills"
        );
    }

    /// A release over the last day of January and the first of February is judged per
    /// period: January's billed members are one cohort on January 31 whatever the cohort of
    /// February 1 (m0 without readings then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_across_two_billing_periods_is_judged_per_period() {
        let any = limits(5);
        let (c, a) = (meters(0..6), meters(1..6));
        let f = fixture("development_allow_all = true\n");
        for m in &c {
            assert_eq!(
                release(&f, january_bill(m, &two_band(0)), any).await,
                "allowed"
            );
        }
        let outputs: Vec<(u32, u32)> = (0..48).map(|h| (h, u32::from(h >= 24))).collect();
        let across = hourly_over(&[&c, &a], 30..32, &outputs);
        assert_eq!(release(&f, across, any).await, "allowed");
        // But within January, a billed member left out of an hour is refused.
        assert_eq!(
            release(&f, one_hour_apart(&a, &c, 29, 5), any).await,
            "cohort-bills"
        );

        // The review's attack: C billed and aggregated over January but one hour h; then one
        // release of A = C ∖ {m0} at h and of C in February. C's bills less its aggregates are
        // C's hour, and A's hour less that is m0's reading: C's January record speaks for C
        // though this release's C is in another period.
        let f = fixture("development_allow_all = true\n");
        for m in &c {
            assert_eq!(
                release(&f, january_bill(m, &two_band(0)), any).await,
                "allowed"
            );
        }
        for day in 0..31 {
            let hours: Vec<(u32, u32)> = (0..24)
                .filter(|h| day != 29 || *h != 5)
                .map(|h| (h, 0))
                .collect();
            assert_eq!(
                release(&f, hourly(&[&c], day, &hours), any).await,
                "allowed"
            );
        }
        // Day 29 (January 30) hour 5 of the first cohort, February 1 hour 0 of the last.
        let across = |cohorts: &[&[String]]| {
            hourly_over(cohorts, 29..32, &[(5, 0), (48, cohorts.len() as u32 - 1)])
        };
        assert_eq!(release(&f, across(&[&a, &c]), any).await, "cohort-bills");
        // C itself at h and in February is what its record says: released.
        assert_eq!(release(&f, across(&[&c]), any).await, "allowed");
    }

    /// Compute leaves a member without a reading out of that hour's cohort. Then the others
    /// are billed, but the member left out is not (its bill less the aggregates it was in
    /// would be that hour's reading, had it one), in either order; a head-end that claims a
    /// reading is missing gains nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_left_out_of_an_hour_is_not_billed_for_that_period() {
        let any = limits(5);
        let (c, a) = (meters(0..6), meters(1..6));
        let flat = two_band(0);
        let f = fixture("development_allow_all = true\n");
        month_with_an_hour_left_out(&f, &c, &a, any).await;
        for m in &a {
            let b = f
                .state
                .admit(january_bill(m, &flat), any, |_| true)
                .unwrap();
            if let Err(e) = f.state.record(&b, any).await {
                panic!("{m}: {}", e.status.message());
            }
        }
        let e = cohort_bills_refusal(&f, "m0", &flat, any).await;
        assert!(e.contains("without it"), "{}", e);

        // The member left out billed first: then the others are not.
        let f = fixture("development_allow_all = true\n");
        month_with_an_hour_left_out(&f, &c, &a, any).await;
        assert_eq!(release(&f, january_bill("m0", &flat), any).await, "allowed");
        assert_eq!(
            release(&f, january_bill("m1", &flat), any).await,
            "cohort-bills"
        );
    }

    /// Two members left out at once: K over January but one hour, K ∪ {m0, m1} at that hour.
    /// K's bills less K's aggregates are K's hour, and the hour's aggregate less that is
    /// m0's reading plus m1's, a "cohort" of two. Refused whichever comes last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_members_left_out_of_the_billed_are_not_differenced_out_of_the_bills() {
        let any = limits(5);
        let (k, with_two) = (meters(2..7), meters(0..7));
        let flat = two_band(0);
        let f = fixture("development_allow_all = true\n");
        month_with_an_hour_left_out(&f, &k, &with_two, any).await;
        for m in &k[..2] {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
        let e = cohort_bills_refusal(&f, "m4", &flat, any).await;
        assert!(
            e.contains("meter m0 is not billed") && e.contains("12 five-minute slots"),
            "{}",
            e
        );

        let f = fixture("development_allow_all = true\n");
        for m in &k {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
        assert_eq!(
            release(&f, one_hour_apart(&with_two, &k, 0, 5), any).await,
            "allowed"
        );
        for day in 1..30 {
            assert_eq!(
                release(&f, hourly(&[&k], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(
            release(&f, hourly(&[&k], 30, &all_day(0)), any).await,
            "cohort-bills"
        );

        // Five members left out of the hour (min_cohort): their sum is an aggregate.
        let (k, with_five) = (meters(5..10), meters(0..10));
        let f = fixture("development_allow_all = true\n");
        month_with_an_hour_left_out(&f, &k, &with_five, any).await;
        for m in &k {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
    }

    /// Two members left out in two cohorts: K ∪ {m0} at one hour, K ∪ {m1} at another, K over
    /// the rest of January. Neither cohort with K alone covers the bills' cells, both together
    /// do: the bills less the aggregates are m0's hour plus m1's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_left_out_in_separate_cohorts_are_judged_together() {
        let any = limits(5);
        let k = meters(2..7);
        let with = |m: &str| {
            let mut c = k.clone();
            c.push(m.to_owned());
            c
        };
        let flat = two_band(0);
        let f = fixture("development_allow_all = true\n");
        assert_eq!(
            release(&f, one_hour_apart(&with("m0"), &k, 0, 5), any).await,
            "allowed"
        );
        assert_eq!(
            release(&f, one_hour_apart(&with("m1"), &k, 1, 7), any).await,
            "allowed"
        );
        for day in 2..31 {
            assert_eq!(
                release(&f, hourly(&[&k], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        for m in &k[..2] {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
        let e = cohort_bills_refusal(&f, "m4", &flat, any).await;
        assert!(e.contains("meter m0 is not billed"), "{}", e);
        // With the left-out members over band-wide parts (a week each), they are billed.
        let f = fixture("development_allow_all = true\n");
        for day in 0..14 {
            let c = with(if day < 7 { "m0" } else { "m1" });
            assert_eq!(
                release(&f, hourly(&[&c], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        for day in 14..31 {
            assert_eq!(
                release(&f, hourly(&[&k], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        for m in &k {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
    }

    /// The second review's attack: m0 billed for December 5 .. January 2 (on either track), K
    /// for January, C = K ∪ {m0} at one hour of January 21 and K over the rest. m0's bill is
    /// not January's: K's bills less K's aggregates are K's hour, and C's hour less that is
    /// m0's reading. Only a bill for exactly the period takes a member out of the sum.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_billed_for_an_overlapping_period_is_still_left_out() {
        let any = limits(5);
        let (c, k) = (meters(0..6), meters(1..6));
        let flat = two_band(0);
        for tfhe in [false, true] {
            let f = fixture("development_allow_all = true\n");
            let december = (JAN - 27 * 86_400, JAN + 86_400);
            if tfhe {
                let days = (december.0 / 86_400, december.1 / 86_400);
                f.state.judge_tfhe_bill(any, "m0", days, true).unwrap();
                f.state
                    .releases
                    .record_tfhe_bill_for_test("m0", days.0, days.1);
            } else {
                assert_eq!(
                    release(&f, bill_over("m0", &flat, december), any).await,
                    "allowed"
                );
            }
            for m in &k {
                assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
            }
            assert_eq!(
                release(&f, one_hour_apart(&c, &k, 20, 5), any).await,
                "allowed"
            );
            for day in (0..30).filter(|d| *d != 20) {
                assert_eq!(
                    release(&f, hourly(&[&k], day, &all_day(0)), any).await,
                    "allowed"
                );
            }
            assert_eq!(
                release(&f, hourly(&[&k], 30, &all_day(0)), any).await,
                "cohort-bills",
                "tfhe: {tfhe}"
            );
        }
    }

    /// The second review's finding: one member over a band-wide part does not mask another's
    /// hour. K billed for January; K ∪ {m6} over a week, K ∪ {m0} at one hour, K over the rest:
    /// the bills less the aggregates are m6's week plus m0's hour, and a utility that knows
    /// m6's week (a premises it cut off reads 0) has m0's hour.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_band_wide_part_does_not_mask_another_members_hour() {
        let any = limits(5);
        let k = meters(1..6);
        let with = |m: &str| {
            let mut c = k.clone();
            c.push(m.to_owned());
            c
        };
        let f = fixture("development_allow_all = true\n");
        for m in &k {
            assert_eq!(
                release(&f, january_bill(m, &two_band(0)), any).await,
                "allowed"
            );
        }
        for day in 1..8 {
            assert_eq!(
                release(&f, hourly(&[&with("m6")], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(
            release(&f, one_hour_apart(&with("m0"), &k, 10, 5), any).await,
            "allowed"
        );
        for day in (0..30).filter(|d| !(1..8).contains(d) && *d != 10) {
            assert_eq!(
                release(&f, hourly(&[&k], day, &all_day(0)), any).await,
                "allowed"
            );
        }
        assert_eq!(
            release(&f, hourly(&[&k], 30, &all_day(0)), any).await,
            "cohort-bills"
        );
    }

    /// The utility can compute an unkeyed XOR of hashes itself, and solve for two member sets
    /// with one XOR (Gaussian elimination over a few hundred meter names): the keyshare's
    /// billed-set hash is keyed with its own secret, kept across restarts.
    #[test]
    fn the_billed_set_hash_is_keyed_so_the_utility_cannot_solve_for_collisions() {
        let public = |m: &str| {
            let mut h = blake3::Hasher::new();
            h.update(b"psm/v2/billed-member");
            h.update(m.as_bytes());
            *h.finalize().as_bytes()
        };
        // Rows of 256 hash bits and a parity bit (a dependency has an even count), each with
        // the names combined into it.
        let names = meters(0..300);
        let row = |m: &str| {
            let mut v = [0u64; 5];
            for (i, b) in public(m).iter().enumerate() {
                v[i / 8] |= u64::from(*b) << (8 * (i % 8));
            }
            v[4] = 1;
            v
        };
        let bit = |v: &[u64], i: usize| v[i / 64] >> (i % 64) & 1 == 1;
        let mut basis: Vec<(usize, [u64; 5], Vec<u64>)> = Vec::new();
        let mut found = None;
        for (i, m) in names.iter().enumerate() {
            let (mut v, mut c) = (row(m), vec![0u64; 5]);
            c[i / 64] |= 1 << (i % 64);
            for (p, bv, bc) in &basis {
                if bit(&v, *p) {
                    v.iter_mut().zip(bv).for_each(|(x, y)| *x ^= y);
                    c.iter_mut().zip(bc).for_each(|(x, y)| *x ^= y);
                }
            }
            match (0..320).find(|i| bit(&v, *i)) {
                Some(p) => basis.push((p, v, c)),
                None => {
                    found = Some(c);
                    break;
                }
            }
        }
        let combo = found.expect("300 rows of 257 bits are dependent");
        let set: Vec<String> = (0..300)
            .filter(|i| bit(&combo, *i))
            .map(|i| names[i].clone())
            .collect();
        let (s, t) = set.split_at(set.len() / 2);
        assert_eq!(s.len(), t.len());
        let xor = |ms: &[String]| {
            ms.iter().fold([0u8; 32], |mut acc, m| {
                acc.iter_mut().zip(public(m)).for_each(|(a, b)| *a ^= b);
                acc
            })
        };
        assert_eq!(xor(s), xor(t), "the unkeyed hash collides");
        let f = fixture("development_allow_all = true\n");
        let key = f.state.billed_key;
        assert_ne!(billed_set(&key, s), billed_set(&key, t));
        assert_ne!(
            key,
            fixture("development_allow_all = true\n").state.billed_key
        );
        let f = restart(f);
        assert_eq!(f.state.billed_key, key);
    }

    /// The same keyshare after a restart: its state opened again over the same store.
    fn restart(f: Fixture) -> Fixture {
        let Fixture {
            _dir,
            state,
            audit,
            keys,
            scheme,
        } = f;
        let releases = state.releases.clone();
        let party = Party {
            scheme: state.party.scheme,
            index: state.party.index,
            names: state.party.names.clone(),
            flood_key: state.party.flood_key.clone(),
            enrollment_secret: state.party.enrollment_secret.clone(),
        };
        let registry = state.registry.clone();
        drop(state);
        let state = LinearState::open(releases, party, registry, None).unwrap();
        Fixture {
            _dir,
            state,
            audit,
            keys,
            scheme,
        }
    }

    fn billed_tree(f: &Fixture) -> Vec<(sled::IVec, sled::IVec)> {
        f.state.cohort_billed.iter().map(|kv| kv.unwrap()).collect()
    }

    /// The billed records are what the spans and bills define: a restart keeps them, a rebuild
    /// reproduces them, a bill retried after a crash that lost the bill but kept its records
    /// counts once, and records of the earlier unkeyed hash are rebuilt keyed, the rule holding
    /// on them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn billed_records_are_rebuilt_from_the_bills_and_count_a_retried_bill_once() {
        let any = limits(5);
        let (c, a) = (meters(0..6), meters(1..6));
        let flat = two_band(0);
        let f = fixture("development_allow_all = true\n");
        month_with_an_hour_left_out(&f, &c, &a, any).await;
        for m in &a {
            assert_eq!(release(&f, january_bill(m, &flat), any).await, "allowed");
        }
        let before = billed_tree(&f);
        assert!(!before.is_empty());
        let f = restart(f);
        assert_eq!(billed_tree(&f), before);
        assert!(f.state.rebuild_billed().unwrap() > 0);
        assert_eq!(billed_tree(&f), before);

        // m5's bill lost after its records were written: the retry counts it once.
        let prefix = LinearState::bill_prefix("m5", LinearChannel::Import.tag());
        let lost: Vec<_> = f
            .state
            .bills
            .scan_prefix(&prefix)
            .map(|kv| kv.unwrap().0)
            .collect();
        assert_eq!(lost.len(), 1);
        f.state.bills.remove(&lost[0]).unwrap();
        assert_eq!(release(&f, january_bill("m5", &flat), any).await, "allowed");
        assert_eq!(billed_tree(&f), before);

        // A store from before the key: its records are rebuilt keyed on open.
        f.state.meta.remove(BILLED_KEY).unwrap();
        let f = restart(f);
        let after = billed_tree(&f);
        assert_eq!(after.len(), before.len());
        assert_ne!(after, before);
        let january = (JAN as u64 / 300, (JAN as u64 + 31 * 86_400) / 300);
        let ch = LinearChannel::Import.tag();
        let cohorts = f.state.cohorts_of("m1", ch, january.0, january.1).unwrap();
        assert_eq!(cohorts.len(), 2);
        for (id, _) in cohorts {
            let b = f.state.billed_record(&id, ch, january).unwrap().unwrap();
            assert_eq!((b.set, b.count), (billed_set(&f.state.billed_key, &a), 5));
        }
        let e = cohort_bills_refusal(&f, "m0", &flat, any).await;
        assert!(e.contains("without it"), "{}", e);
    }

    /// A cohort across billing cycles would leave each member's bill some days off another's;
    /// with registered cycles such a cohort is not aggregated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cohort_across_billing_cycles_is_not_aggregated() {
        let reg: String = (0..6)
            .map(|i| {
                let day = if i == 5 { 15 } else { 1 };
                entry(&format!("m{i}"), "meter") + &format!("billing_day = {day}\n")
            })
            .collect();
        let f = fixture(&reg);
        let registered = Limits {
            billing_cycle: crate::policy::BillingCycle::Registered,
            ..limits(5)
        };
        let e = f
            .state
            .admit(hourly(&[&meters(0..6)], 0, &all_day(0)), registered, |_| {
                true
            })
            .unwrap();
        let e = f.state.precheck(&e, registered).await.unwrap_err();
        assert_eq!(e.rule, "cohort-bills");
        assert!(
            e.status.message().contains("billed on day 1") && e.status.message().contains("day 15"),
            "{}",
            e.status.message()
        );
    }
}
