//! Releases: what a keyshare contributes to, derived from what it approves.
//!
//! A release names kind, epoch, channel, program and a slot-aligned range; from them every
//! output's slots and weights follow ([`ReleaseSpec::output_runs`]) — compute chooses only which
//! outputs it asks for and the effective cohort of each (the members whose bodies it summed).
//! Party P answers for each share U it holds d_U = ⟨Σ_τ w_τ a_τ, Σ_{i∈C} z_{i,U}⟩ + E_U, with E_U
//! from its flooding key over the hash of exactly (kind, epoch, channel, cohort, slots, weights).

use prost::Message;
use psm_proto::v1::{AggregateProgram, ComputationKind, LinearRelease};

use super::mask::SlotRun;
use super::{
    dot, Channel, LinearError, DELTA_LOG2, FLOOD_LOG2, MAX_COHORT, MAX_WEIGHT, READING_NOISE_LOG2,
    SLOTS_PER_DAY, SLOT_SECONDS,
};
use crate::linear::envelope::MAX_EPOCH;
use crate::readings::validate_meter_id;
use crate::threshold::{FloodKey, Scheme};
use psm_tariff::Tariff;

/// Longest re-issue reason, bytes (it goes into every keyshare's audit log).
pub const MAX_REISSUE_REASON_BYTES: usize = 200;

/// A re-issue reason goes into every keyshare's audit log: bounded, one line of printable text
/// (no control characters that could forge what an auditor's terminal shows). Both tracks.
pub fn check_reissue_reason(r: &str) -> Result<(), String> {
    if r.len() > MAX_REISSUE_REASON_BYTES || r.chars().any(char::is_control) {
        return Err(format!(
            "reissue_reason must be at most {MAX_REISSUE_REASON_BYTES} bytes of printable text on one line"
        ));
    }
    Ok(())
}

/// Longest bill range, days.
pub const MAX_BILL_DAYS: i64 = 62;
/// Longest aggregate range, days.
pub const MAX_AGGREGATE_DAYS: i64 = 31;
/// Most members over all cohorts of one release.
pub const MAX_RELEASE_MEMBERS: usize = 2 * MAX_COHORT;
/// Most outputs of one release (31 days of 15-minute buckets).
pub const MAX_OUTPUTS: usize = 3_000;
/// Most distinct cohorts of one release (each costs a keyshare a cohort key per share).
pub const MAX_COHORTS: usize = 256;

/// The program of a release.
#[derive(Debug, Clone)]
pub enum Program {
    /// A time-of-use bill: one output per band, weight 1 on each of the band's slots; on the
    /// import channel of a tariff with dynamic prices, one output over every slot, weighted by
    /// the slot's price.
    Bill(Box<Tariff>),
    /// Per-bucket sums: one output per bucket of this many slots, weight 1.
    Aggregate { bucket_slots: u64 },
}

/// A release's public part, validated.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    pub kind: ComputationKind,
    pub epoch: u32,
    pub channel: Channel,
    /// Slots [start_slot, end_slot).
    pub start_slot: u64,
    pub end_slot: u64,
    pub program: Program,
    /// BLAKE3 of the program bytes (what keyshares allow tariffs by).
    pub program_hash: [u8; 32],
}

/// A validated release request: the spec, the cohorts and the outputs asked for
/// (derived index, cohort index).
#[derive(Debug, Clone)]
pub struct Release {
    pub spec: ReleaseSpec,
    pub cohorts: Vec<Vec<String>>,
    pub outputs: Vec<(usize, usize)>,
    pub reissue_reason: String,
}

fn bad(m: impl Into<String>) -> LinearError {
    LinearError::Release(m.into())
}

impl ReleaseSpec {
    /// The price series that weighs this release's slots: a bill's dynamic import prices.
    pub fn prices(&self) -> Option<&psm_tariff::PriceSeries> {
        match &self.program {
            Program::Bill(t) if self.channel == Channel::Import => t.import_prices.as_ref(),
            _ => None,
        }
    }

    /// Number of outputs the program defines over the range.
    pub fn output_count(&self) -> usize {
        match &self.program {
            Program::Bill(_) if self.prices().is_some() => 1,
            Program::Bill(t) => t.bands.len(),
            Program::Aggregate { bucket_slots } => {
                ((self.end_slot - self.start_slot) / bucket_slots) as usize
            }
        }
    }

    /// The slots and weights of output `index` (empty for a band with no slot in the range).
    pub fn output_runs(&self, index: usize) -> Vec<SlotRun> {
        self.runs_of(&[index]).pop().unwrap_or_default()
    }

    /// The slots and weights of the outputs `indices`, in that order; a bill's bands are placed
    /// once for the whole range rather than once per band.
    pub fn runs_of(&self, indices: &[usize]) -> Vec<Vec<SlotRun>> {
        match &self.program {
            Program::Aggregate { bucket_slots } => indices
                .iter()
                .map(|i| {
                    let start = self.start_slot + *i as u64 * bucket_slots;
                    vec![SlotRun {
                        start,
                        end: start + bucket_slots,
                        weight: 1,
                    }]
                })
                .collect(),
            Program::Bill(_) => {
                let mut per: Vec<Vec<SlotRun>> = vec![Vec::new(); self.output_count()];
                let weights = self.slot_weights();
                for ((slot, band), weight) in
                    (self.start_slot..).zip(self.slot_outputs()).zip(weights)
                {
                    let Some(runs) = per.get_mut(band) else {
                        continue;
                    };
                    match runs.last_mut() {
                        Some(r) if r.end == slot && r.weight == weight => r.end = slot + 1,
                        _ => runs.push(SlotRun {
                            start: slot,
                            end: slot + 1,
                            weight,
                        }),
                    }
                }
                indices
                    .iter()
                    .map(|i| per.get(*i).cloned().unwrap_or_default())
                    .collect()
            }
        }
    }

    /// The weight of every slot of the range: its price under dynamic prices, else 1.
    pub fn slot_weights(&self) -> Vec<i64> {
        (self.start_slot..self.end_slot)
            .map(|s| {
                self.prices()
                    .map_or(1, |p| p.at(s as i64 * SLOT_SECONDS).unwrap_or(0))
            })
            .collect()
    }

    /// The bands of every slot of the range (bills), computed once for all outputs.
    pub fn slot_outputs(&self) -> Vec<usize> {
        let dynamic = self.prices().is_some();
        (self.start_slot..self.end_slot)
            .map(|s| match &self.program {
                Program::Bill(_) if dynamic => 0,
                Program::Bill(t) => t.band_at(
                    self.start_slot as i64 * SLOT_SECONDS,
                    s as i64 * SLOT_SECONDS,
                ),
                Program::Aggregate { bucket_slots } => {
                    ((s - self.start_slot) / bucket_slots) as usize
                }
            })
            .collect()
    }
}

/// Checks a release from the wire: everything a keyshare needs before looking at its policy.
pub fn release_from_proto(r: &LinearRelease) -> Result<Release, LinearError> {
    let kind = match ComputationKind::try_from(r.kind) {
        Ok(k @ (ComputationKind::Bill | ComputationKind::Aggregate)) => k,
        _ => {
            return Err(bad(
                "kind must be BILL or AGGREGATE (analytics run on the tfhe track)",
            ))
        }
    };
    if r.epoch == 0 || r.epoch > MAX_EPOCH {
        return Err(bad(format!("epoch {} outside 1..={MAX_EPOCH}", r.epoch)));
    }
    let channel = Channel::from_proto(r.channel)
        .ok_or_else(|| bad("channel must be CHANNEL_IMPORT or CHANNEL_EXPORT"))?;
    let range = r
        .range
        .as_ref()
        .ok_or_else(|| bad("a release needs a range"))?;
    if range.start_unix < 0
        || range.start_unix % SLOT_SECONDS != 0
        || range.end_unix % SLOT_SECONDS != 0
        || range.end_unix <= range.start_unix
    {
        return Err(bad(
            "the range must start and end on 5-minute UTC boundaries, end after start",
        ));
    }
    let (start_slot, end_slot) = (
        (range.start_unix / SLOT_SECONDS) as u64,
        (range.end_unix / SLOT_SECONDS) as u64,
    );
    let days = (end_slot - start_slot).div_ceil(SLOTS_PER_DAY as u64) as i64;
    let program_hash = *blake3::hash(&r.program).as_bytes();
    let program = match kind {
        ComputationKind::Bill => {
            if days > MAX_BILL_DAYS {
                return Err(bad(format!("a bill covers at most {MAX_BILL_DAYS} days")));
            }
            let t = psm_proto::v1::Tariff::decode(r.program.as_slice())
                .map_err(|e| bad(format!("the program is not a Tariff: {e}")))?;
            let tariff = psm_tariff::from_proto(&t).map_err(|e| bad(e.to_string()))?;
            tariff
                .check_in_force(range.start_unix, range.end_unix)
                .map_err(|e| bad(e.to_string()))?;
            if let Some(p) = tariff
                .import_prices
                .as_ref()
                .filter(|_| channel == Channel::Import)
            {
                p.over(range.start_unix, range.end_unix)
                    .map_err(|e| bad(e.to_string()))?;
            }
            Program::Bill(Box::new(tariff))
        }
        _ => {
            if days > MAX_AGGREGATE_DAYS {
                return Err(bad(format!(
                    "an aggregate covers at most {MAX_AGGREGATE_DAYS} days"
                )));
            }
            let p = AggregateProgram::decode(r.program.as_slice())
                .map_err(|e| bad(format!("the program is not an AggregateProgram: {e}")))?;
            if p.encode_to_vec() != r.program {
                return Err(bad("the AggregateProgram is not canonically encoded"));
            }
            let g = i64::from(p.granularity_seconds);
            if g == 0 || g % SLOT_SECONDS != 0 || 86_400 % g != 0 {
                return Err(bad(
                    "granularity must be a multiple of 300 s that divides a day",
                ));
            }
            if range.start_unix % g != 0 || range.end_unix % g != 0 {
                return Err(bad(
                    "an aggregate's range must be aligned to its granularity",
                ));
            }
            Program::Aggregate {
                bucket_slots: (g / SLOT_SECONDS) as u64,
            }
        }
    };
    let spec = ReleaseSpec {
        kind,
        epoch: r.epoch,
        channel,
        start_slot,
        end_slot,
        program,
        program_hash,
    };
    if r.cohorts.is_empty() || r.cohorts.len() > MAX_COHORTS {
        return Err(bad(format!(
            "a release names 1..={MAX_COHORTS} distinct cohorts, not {}",
            r.cohorts.len()
        )));
    }
    if r.outputs.len() > MAX_OUTPUTS {
        return Err(bad(format!(
            "{} outputs in one release; the limit is {MAX_OUTPUTS}",
            r.outputs.len()
        )));
    }
    let mut total = 0usize;
    let mut cohorts = Vec::with_capacity(r.cohorts.len());
    for (c, cohort) in r.cohorts.iter().enumerate() {
        let ids = &cohort.meter_ids;
        if ids.is_empty() || ids.len() > MAX_COHORT {
            return Err(bad(format!(
                "cohort {c} has {} members; 1..={MAX_COHORT}",
                ids.len()
            )));
        }
        total += ids.len();
        if total > MAX_RELEASE_MEMBERS {
            return Err(bad(format!(
                "more than {MAX_RELEASE_MEMBERS} members in one release"
            )));
        }
        for w in ids.windows(2) {
            if w[0] >= w[1] {
                return Err(bad(format!(
                    "cohort {c} must list meter ids strictly ascending without repeats ({:?} before {:?})",
                    w[0], w[1]
                )));
            }
        }
        for id in ids {
            validate_meter_id(id).map_err(|e| bad(e.to_string()))?;
        }
        cohorts.push(ids.clone());
    }
    let count = spec.output_count();
    if r.outputs.is_empty() {
        return Err(bad("a release asks for at least one output"));
    }
    let mut used = vec![false; cohorts.len()];
    let mut outputs = Vec::with_capacity(r.outputs.len());
    let mut last = None;
    for o in &r.outputs {
        let (i, c) = (o.index as usize, o.cohort as usize);
        if i >= count {
            return Err(bad(format!(
                "output {i} does not exist; the program has {count}"
            )));
        }
        if last.is_some_and(|l| l >= i) {
            return Err(bad("outputs must be listed by strictly ascending index"));
        }
        last = Some(i);
        if c >= cohorts.len() {
            return Err(bad(format!(
                "output {i} names cohort {c}, which does not exist"
            )));
        }
        used[c] = true;
        outputs.push((i, c));
    }
    if used.iter().any(|u| !u) {
        return Err(bad("every cohort must be used by an output"));
    }
    if kind == ComputationKind::Bill && (cohorts.len() != 1 || cohorts[0].len() != 1) {
        return Err(bad("a bill covers exactly one meter"));
    }
    check_reissue_reason(&r.reissue_reason).map_err(bad)?;
    Ok(Release {
        spec,
        cohorts,
        outputs,
        reissue_reason: r.reissue_reason.clone(),
    })
}

/// BLAKE3 of a sorted cohort.
pub fn cohort_hash(members: &[String]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/cohort");
    h.update(&(members.len() as u64).to_le_bytes());
    for m in members {
        h.update(&(m.len() as u64).to_le_bytes());
        h.update(m.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The hash an output's flooding is keyed on: exactly what is decrypted (kind, epoch, channel,
/// cohort, slots and weights). Not the output's position in the request: asking for the same
/// value at another position gets the same answer, not a fresh flooding of it.
pub fn output_hash(spec: &ReleaseSpec, cohort: &[u8; 32], runs: &[SlotRun]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/release-output");
    h.update(&[spec.kind as u8, spec.channel.tag()]);
    h.update(&spec.epoch.to_le_bytes());
    h.update(cohort);
    h.update(&(runs.len() as u64).to_le_bytes());
    for r in runs {
        h.update(&r.start.to_le_bytes());
        h.update(&r.end.to_le_bytes());
        h.update(&r.weight.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// Checks that the sum of `cohort` members' bodies over `runs` decrypts correctly after
/// flooding: C(n, t−1)·2^70 + |C|·Σ|w_τ|·2^30 < Δ/2, exactly; that weights are bounded; and that
/// the largest possible message |C|·Σ|w_τ|·MAX_READING_WH fits the 47 bits of magnitude, so no
/// sum wraps.
pub fn check_noise(scheme: Scheme, cohort: usize, runs: &[SlotRun]) -> Result<(), LinearError> {
    let nb = |m: String| LinearError::NoiseBound(m);
    if cohort == 0 || cohort > MAX_COHORT {
        return Err(nb(format!("cohort of {cohort} outside 1..={MAX_COHORT}")));
    }
    let mut weight_sum: u128 = 0;
    for r in runs {
        if r.weight.unsigned_abs() > MAX_WEIGHT as u64 {
            return Err(nb(format!("weight {} exceeds ±{MAX_WEIGHT}", r.weight)));
        }
        weight_sum += u128::from(r.end - r.start) * u128::from(r.weight.unsigned_abs());
    }
    let total = (cohort as u128)
        .checked_mul(weight_sum)
        .and_then(|x| x.checked_mul(1u128 << READING_NOISE_LOG2))
        .and_then(|x| {
            // Each used contribution errs by its flooding plus the combiner's agreement window.
            x.checked_add(
                (scheme.share_count() as u128 * crate::threshold::CONTRIBUTION_ERROR_FLOODS)
                    << FLOOD_LOG2,
            )
        });
    let message = (cohort as u128)
        .checked_mul(weight_sum)
        .and_then(|x| x.checked_mul(super::MAX_READING_WH as u128));
    if message.is_none_or(|m| m >= 1u128 << (127 - DELTA_LOG2)) {
        return Err(nb(format!(
            "{cohort} members × total weight {weight_sum} of readings up to {} Wh could exceed the encoding's ±2^{} Wh",
            super::MAX_READING_WH,
            127 - DELTA_LOG2
        )));
    }
    match total {
        Some(t) if t < 1u128 << (DELTA_LOG2 - 1) => Ok(()),
        _ => Err(nb(format!(
            "{cohort} members × total weight {weight_sum} of reading noise 2^{READING_NOISE_LOG2} plus {} contributions erring by up to 3·2^{FLOOD_LOG2} could reach Δ/2 = 2^{}",
            scheme.share_count(),
            DELTA_LOG2 - 1
        ))),
    }
}

/// E_U for one output: uniform in [−2^70, 2^70), from the party's flooding key.
pub fn flooding(key: &FloodKey, share_index: usize, output: &[u8; 32]) -> u128 {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(b"psm/v2/linear-flood");
    h.update(&(share_index as u32).to_le_bytes());
    h.update(output);
    let mut b = [0u8; 16];
    h.finalize_xof().fill(&mut b);
    let mask = (1u128 << (FLOOD_LOG2 + 1)) - 1;
    (u128::from_le_bytes(b) & mask).wrapping_sub(1u128 << FLOOD_LOG2)
}

/// d_U = ⟨mask sum, cohort share key⟩ + E_U.
pub fn contribution(
    mask_sum: &[u128],
    cohort_share_key: &[u128],
    key: &FloodKey,
    share_index: usize,
    output: &[u8; 32],
) -> u128 {
    dot(mask_sum, cohort_share_key).wrapping_add(flooding(key, share_index, output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_proto::v1::{Cohort, ReleaseOutput, TimeRange};

    fn agg(meters: &[&str], g: u32, days: i64) -> LinearRelease {
        let start = 20_000 * 86_400;
        LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
            program: AggregateProgram {
                granularity_seconds: g,
            }
            .encode_to_vec(),
            range: Some(TimeRange {
                start_unix: start,
                end_unix: start + days * 86_400,
            }),
            cohorts: vec![Cohort {
                meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            }],
            outputs: vec![ReleaseOutput {
                index: 0,
                cohort: 0,
            }],
            reissue_reason: String::new(),
        }
    }

    #[test]
    fn aggregate_outputs_are_buckets_of_weight_one() {
        let r = release_from_proto(&agg(&["a", "b"], 900, 1)).unwrap();
        assert_eq!(r.spec.output_count(), 96);
        let runs = r.spec.output_runs(95);
        assert_eq!(runs[0].end - runs[0].start, 3);
        assert_eq!(runs[0].end, r.spec.end_slot);
        assert_eq!(runs[0].weight, 1);
    }

    #[test]
    fn malformed_releases_are_refused() {
        let ok = agg(&["a", "b"], 900, 1);
        assert!(release_from_proto(&ok).is_ok());
        let mut unsorted = ok.clone();
        unsorted.cohorts[0].meter_ids = vec!["b".into(), "a".into()];
        assert!(release_from_proto(&unsorted).is_err());
        let mut dup = ok.clone();
        dup.cohorts[0].meter_ids = vec!["a".into(), "a".into()];
        assert!(release_from_proto(&dup).is_err());
        let mut beyond = ok.clone();
        beyond.outputs = vec![ReleaseOutput {
            index: 96,
            cohort: 0,
        }];
        assert!(release_from_proto(&beyond).is_err());
        let mut twice = ok.clone();
        twice.outputs = vec![
            ReleaseOutput {
                index: 1,
                cohort: 0,
            },
            ReleaseOutput {
                index: 1,
                cohort: 0,
            },
        ];
        assert!(release_from_proto(&twice).is_err());
        let mut unaligned = ok.clone();
        unaligned.range.as_mut().unwrap().start_unix += 300;
        assert!(release_from_proto(&unaligned).is_err());
        assert!(release_from_proto(&agg(&["a"], 700, 1)).is_err());
        assert!(release_from_proto(&agg(&["a"], 900, 32)).is_err());
        let mut epoch0 = ok.clone();
        epoch0.epoch = 0;
        assert!(release_from_proto(&epoch0).is_err());
        let mut nochan = ok.clone();
        nochan.channel = 0;
        assert!(release_from_proto(&nochan).is_err());
        let mut analytics = ok.clone();
        analytics.kind = ComputationKind::Analytics as i32;
        assert!(release_from_proto(&analytics).is_err());
        // A non-canonical program encoding (a repeated field) is refused.
        let mut noncanon = ok.clone();
        noncanon
            .program
            .extend_from_slice(&noncanon.program.clone());
        assert!(release_from_proto(&noncanon).is_err());
        let mut unused = ok.clone();
        unused.cohorts.push(Cohort {
            meter_ids: vec!["c".into()],
        });
        assert!(release_from_proto(&unused).is_err());
    }

    #[test]
    fn noise_bound_is_enforced_exactly() {
        let s = Scheme::new(3, 2).unwrap();
        let day = |w: i64| {
            vec![SlotRun {
                start: 0,
                end: 288,
                weight: w,
            }]
        };
        check_noise(s, MAX_COHORT, &day(1)).unwrap();
        // A 62-day bill with weight 2^10; the largest weight on a day.
        check_noise(
            s,
            1,
            &[SlotRun {
                start: 0,
                end: 62 * 288,
                weight: 1 << 10,
            }],
        )
        .unwrap();
        check_noise(s, 1, &day(MAX_WEIGHT)).unwrap();
        assert!(check_noise(s, 1, &day(MAX_WEIGHT + 1)).is_err());
        // Messages that could wrap are refused: a million meters over 5 days of slots.
        let span = |end: u64| {
            [SlotRun {
                start: 0,
                end,
                weight: 1,
            }]
        };
        let e = check_noise(s, MAX_COHORT, &span(5 * 288)).unwrap_err();
        assert!(e.to_string().contains("encoding"), "{e}");
        // The noise bound binds before the message bound for weights near 2^20 on long ranges.
        let e = check_noise(
            s,
            1,
            &[SlotRun {
                start: 0,
                end: 1 << 30,
                weight: MAX_WEIGHT,
            }],
        )
        .unwrap_err();
        assert!(!e.to_string().is_empty());
        // Seven parties (35 shares) still fit a day of a million meters.
        check_noise(Scheme::new(7, 4).unwrap(), MAX_COHORT, &day(1)).unwrap();
    }

    #[test]
    fn flooding_is_bounded_deterministic_and_keyed() {
        let k = FloodKey([3; 32]);
        let h = [9u8; 32];
        assert_eq!(flooding(&k, 0, &h), flooding(&k, 0, &h));
        assert_ne!(flooding(&k, 0, &h), flooding(&k, 1, &h));
        assert_ne!(flooding(&k, 0, &h), flooding(&FloodKey([4; 32]), 0, &h));
        for i in 0..1000u32 {
            let mut o = [0u8; 32];
            o[..4].copy_from_slice(&i.to_le_bytes());
            let e = flooding(&k, 0, &o) as i128;
            assert!((-(1i128 << 70)..(1i128 << 70)).contains(&e));
        }
    }
}
