//! Aggregate: per-interval energy of a cohort on the linear track. The cohort's batches are
//! streamed from ingest and checked; each output interval (bucket) sums the bodies of the members
//! whose readings tile it exactly — its effective cohort, which a member missing a reading is not
//! in for that bucket only. Buckets whose effective cohort is below the minimum are withheld. One
//! release asks the keyshares for their contributions to every other bucket, naming each
//! bucket's effective cohort (identical cohorts listed once).

use crate::error::ComputeError;
use std::collections::HashMap;

use prost::Message;
use psm_core::linear::release::{
    MAX_AGGREGATE_DAYS, MAX_COHORTS, MAX_OUTPUTS, MAX_RELEASE_MEMBERS,
};
use psm_core::linear::{Channel, SLOT_SECONDS};
use psm_core::readings::DAY_SECONDS;
use psm_core::wire::LinearBatch;
use psm_proto::v1::{
    AggregateProgram, AggregateRequest, AggregateResponse, Cohort, ComputationKind, LinearRelease,
    ReleaseOutput,
};
use rayon::prelude::*;
use tonic::transport::Channel as GrpcChannel;

use crate::decrypt::ThresholdDecryptor;
use crate::inputs::{
    check_cohort, check_epoch, check_idempotency_key, check_range, checked_linear, covering_days,
    next, stream_linear,
};

/// Largest cohort of one Aggregate request (ingest streams at most 100,000 meters).
pub const MAX_COHORT: usize = 100_000;
/// Stored batches checked together (on every core) before they are added.
const CHUNK: usize = 4_096;

/// What an Aggregate needs besides the request.
pub struct Aggregator<'a> {
    pub ingest: GrpcChannel,
    pub decryptor: &'a ThresholdDecryptor,
    pub min_cohort: usize,
    pub job: &'a crate::jobs::JobHandle,
}

/// The channel of a request: unspecified means import.
pub fn request_channel(v: i32) -> Result<Channel, ComputeError> {
    if v == psm_proto::v1::Channel::Unspecified as i32 {
        return Ok(Channel::Import);
    }
    Channel::from_proto(v).ok_or_else(|| {
        ComputeError::invalid(format!(
            "channel {v} is not CHANNEL_IMPORT or CHANNEL_EXPORT"
        ))
    })
}

/// Why stored batches could not be summed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SumError {
    /// Two stored intervals of one meter cover the same slot: ingest refuses that, so the store
    /// is inconsistent.
    #[error("stored batches of meter {meter:?} overlap at slot {slot} (ingest refuses overlapping batches: the store is inconsistent)")]
    Overlap { meter: String, slot: u64 },
}

/// The sums of one contiguous range of meters (indices local to it). Per meter it keeps which
/// slots of the range are covered (to catch overlaps), which buckets it completed, and the
/// running sums of buckets it has only partly covered so far (usually none: a day's batch
/// completes its buckets at once).
struct Shard {
    start_slot: u64,
    bucket_slots: u64,
    buckets: usize,
    /// u64 words per meter of `covered` and `done`.
    slot_words: usize,
    bucket_words: usize,
    covered: Vec<u64>,
    done: Vec<u64>,
    /// Per meter, sorted by bucket: (bucket, slots covered so far, their body sum).
    partial: Vec<Vec<(u32, u32, u128)>>,
    sums: Vec<u128>,
    members: Vec<u32>,
    /// Batches used per meter.
    batches: Vec<u32>,
}

/// Why the buckets' effective cohorts cannot go into one release.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("more than {0} distinct effective cohorts")]
    Cohorts(usize),
    #[error(
        "{0}+ member entries over the distinct effective cohorts (at most {MAX_RELEASE_MEMBERS})"
    )]
    Members(usize),
}

/// One bucket's place in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Members per bucket (its effective cohort size).
    pub members: Vec<u32>,
    /// Distinct effective cohorts of the released buckets, as meter indices ascending.
    pub cohorts: Vec<Vec<u32>>,
    /// Released buckets: (bucket, cohort index, body sum), by bucket ascending.
    pub outputs: Vec<(usize, usize, u128)>,
}

impl Shard {
    fn new(meters: usize, start_slot: u64, end_slot: u64, bucket_slots: u64) -> Self {
        let slots = (end_slot - start_slot) as usize;
        let buckets = slots / bucket_slots as usize;
        let slot_words = slots.div_ceil(64);
        let bucket_words = buckets.div_ceil(64);
        Shard {
            start_slot,
            bucket_slots,
            buckets,
            slot_words,
            bucket_words,
            covered: vec![0; meters * slot_words],
            done: vec![0; meters * bucket_words],
            partial: (0..meters).map(|_| Vec::new()).collect(),
            sums: vec![0; buckets],
            members: vec![0; buckets],
            batches: vec![0; meters],
        }
    }

    fn end_slot(&self) -> u64 {
        self.start_slot + self.buckets as u64 * self.bucket_slots
    }

    fn add(&mut self, m: usize, meter: &str, b: &LinearBatch) -> Result<(), SumError> {
        let (start, end) = (self.start_slot, self.end_slot());
        let (first, last) = (b.first_slot.max(start), b.end_slot().min(end));
        if first >= last {
            return Ok(());
        }
        self.batches[m] += 1;
        // A batch's intervals are consecutive, so only another batch can overlap it.
        let words = &mut self.covered[m * self.slot_words..(m + 1) * self.slot_words];
        if let Err(k) = mark(words, (first - start) as usize, (last - start) as usize) {
            return Err(SumError::Overlap {
                meter: meter.to_owned(),
                slot: start + k as u64,
            });
        }
        let (spi, bs) = (b.slots_per_interval, self.bucket_slots);
        // The first interval starting inside the range; earlier ones straddle its start or lie
        // before it.
        let i0 = if b.first_slot >= start {
            0
        } else {
            (start - b.first_slot).div_ceil(spi) as usize
        };
        let mut s = b.first_slot + i0 as u64 * spi;
        let (mut bucket, mut off) = (((s - start) / bs) as usize, (s - start) % bs);
        // The bucket being filled by consecutive intervals: (bucket, slots, sum).
        let mut run: Option<(usize, u64, u128)> = None;
        for body in b.bodies.get(i0..).unwrap_or(&[]) {
            if s + spi > end {
                break; // this one straddles the range's end, the rest lie after it
            }
            if off + spi <= bs {
                match &mut run {
                    Some((rb, n, sum)) if *rb == bucket => {
                        *n += spi;
                        *sum = sum.wrapping_add(*body);
                    }
                    _ => {
                        if let Some(r) = run.take() {
                            self.flush(m, meter, r)?;
                        }
                        run = Some((bucket, spi, *body));
                    }
                }
            } // else it straddles a bucket edge: its buckets miss this meter
            s += spi;
            off += spi;
            while off >= bs {
                off -= bs;
                bucket += 1;
            }
        }
        if let Some(r) = run {
            self.flush(m, meter, r)?;
        }
        Ok(())
    }

    /// Adds slots and a sum to meter `m`'s bucket; a bucket that is now covered completely
    /// joins the sums.
    fn flush(
        &mut self,
        m: usize,
        meter: &str,
        (bucket, n, sum): (usize, u64, u128),
    ) -> Result<(), SumError> {
        let partial = &mut self.partial[m];
        let (n, sum) = match partial.binary_search_by_key(&(bucket as u32), |p| p.0) {
            Ok(i) => {
                let p = partial[i];
                if u64::from(p.1) + n < self.bucket_slots {
                    partial[i] = (p.0, p.1 + n as u32, p.2.wrapping_add(sum));
                    return Ok(());
                }
                partial.remove(i);
                (u64::from(p.1) + n, p.2.wrapping_add(sum))
            }
            Err(i) => {
                if n < self.bucket_slots {
                    partial.insert(i, (bucket as u32, n as u32, sum));
                    return Ok(());
                }
                (n, sum)
            }
        };
        let word = &mut self.done[m * self.bucket_words + bucket / 64];
        let bit = 1u64 << (bucket % 64);
        if n != self.bucket_slots || *word & bit != 0 {
            // Unreachable when no slot is covered twice (checked above).
            return Err(SumError::Overlap {
                meter: meter.to_owned(),
                slot: self.start_slot + bucket as u64 * self.bucket_slots,
            });
        }
        *word |= bit;
        self.sums[bucket] = self.sums[bucket].wrapping_add(sum);
        self.members[bucket] += 1;
        Ok(())
    }

    /// Whether each meter completed every bucket.
    fn full(&self) -> impl Iterator<Item = bool> + '_ {
        let bw = self.bucket_words;
        let last = match self.buckets % 64 {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        };
        self.done
            .chunks_exact(bw.max(1))
            .map(move |w| w[..bw - 1].iter().all(|x| *x == u64::MAX) && w[bw - 1] == last)
    }

    fn is_done(&self, m: usize, bucket: usize) -> bool {
        self.done[m * self.bucket_words + bucket / 64] & (1 << (bucket % 64)) != 0
    }
}

/// Per-bucket sums over the members that tile each bucket, built batch by batch in whatever
/// order ingest streams them; the meters are split into contiguous shards added on every core.
pub struct Accumulator {
    shards: Vec<Shard>,
    /// Meters per shard (the last may hold fewer).
    per: usize,
    buckets: usize,
}

impl Accumulator {
    /// Buckets of `bucket_slots` slots over slots [start_slot, end_slot) for `meters` meters,
    /// in about `shards` shards.
    pub fn new(
        meters: usize,
        start_slot: u64,
        end_slot: u64,
        bucket_slots: u64,
        shards: usize,
    ) -> Self {
        let per = meters.div_ceil(shards.max(1)).max(1);
        let shards: Vec<Shard> = (0..meters.div_ceil(per).max(1))
            .map(|i| {
                let n = per.min(meters.saturating_sub(i * per));
                Shard::new(n, start_slot, end_slot, bucket_slots)
            })
            .collect();
        let buckets = shards[0].buckets;
        Accumulator {
            shards,
            per,
            buckets,
        }
    }

    /// Adds meter `m`'s batch (already checked, of the requested epoch and channel). Intervals
    /// outside the range are ignored; one that straddles a bucket's edge makes that meter miss
    /// the buckets it touches.
    pub fn add(&mut self, m: usize, meter: &str, b: &LinearBatch) -> Result<(), SumError> {
        self.shards[m / self.per].add(m % self.per, meter, b)
    }

    /// [`Accumulator::add`] for many batches ((meter index, batch); `meters` names them), one
    /// worker per shard.
    pub fn add_all(
        &mut self,
        batches: &[(usize, LinearBatch)],
        meters: &[&str],
    ) -> Result<(), SumError> {
        let per = self.per;
        let mut groups: Vec<Vec<&(usize, LinearBatch)>> = vec![Vec::new(); self.shards.len()];
        for x in batches {
            groups[x.0 / per].push(x);
        }
        self.shards
            .par_iter_mut()
            .zip(groups)
            .try_for_each(|(shard, group)| {
                group
                    .into_iter()
                    .try_for_each(|(m, b)| shard.add(m % per, meters[*m], b))
            })
    }

    /// Batches used of meter `m`.
    pub fn batches(&self, m: usize) -> u32 {
        self.shards[m / self.per].batches[m % self.per]
    }

    fn is_done(&self, m: usize, bucket: usize) -> bool {
        self.shards[m / self.per].is_done(m % self.per, bucket)
    }

    /// Which buckets are released (effective cohort of at least `min_cohort`) and with which
    /// cohort. Identical cohorts are listed once: meters that completed every bucket are in
    /// every cohort, so buckets are told apart only by which of the other meters they hold.
    /// Refuses when the distinct cohorts exceed what one release may name: more than
    /// [`MAX_COHORTS`], or more than `max_members` members over all of them.
    pub fn plan(&self, min_cohort: usize, max_members: usize) -> Result<Plan, PlanError> {
        self.plan_within(min_cohort, (MAX_COHORTS, max_members))
    }

    /// [`Accumulator::plan`] with both limits given (most cohorts, most members).
    fn plan_within(&self, min_cohort: usize, limits: (usize, usize)) -> Result<Plan, PlanError> {
        let (max_cohorts, max_members) = limits;
        let full: Vec<bool> = self.shards.iter().flat_map(Shard::full).collect();
        let meters = full.len();
        let mut members = vec![0u32; self.buckets];
        let mut sums = vec![0u128; self.buckets];
        for s in &self.shards {
            for b in 0..self.buckets {
                members[b] += s.members[b];
                sums[b] = sums[b].wrapping_add(s.sums[b]);
            }
        }
        let irregular: Vec<usize> = (0..meters).filter(|m| !full[*m]).collect();
        let mut by_signature: HashMap<Vec<u64>, usize> = HashMap::new();
        let mut cohorts: Vec<Vec<u32>> = Vec::new();
        let mut outputs = Vec::new();
        let mut total = 0usize;
        for b in 0..self.buckets {
            if (members[b] as usize) < min_cohort.max(1) {
                continue;
            }
            let mut sig = vec![0u64; irregular.len().div_ceil(64)];
            for (i, m) in irregular.iter().enumerate() {
                if self.is_done(*m, b) {
                    sig[i / 64] |= 1 << (i % 64);
                }
            }
            let next = cohorts.len();
            let c = *by_signature.entry(sig).or_insert(next);
            if c == next {
                let list: Vec<u32> = (0..meters)
                    .filter(|m| full[*m] || self.is_done(*m, b))
                    .map(|m| m as u32)
                    .collect();
                total += list.len();
                if total > max_members {
                    return Err(PlanError::Members(total));
                }
                if cohorts.len() == max_cohorts {
                    return Err(PlanError::Cohorts(max_cohorts));
                }
                cohorts.push(list);
            }
            outputs.push((b, c, sums[b]));
        }
        Ok(Plan {
            members,
            cohorts,
            outputs,
        })
    }
}

impl Aggregator<'_> {
    pub async fn run(&self, req: AggregateRequest) -> Result<AggregateResponse, ComputeError> {
        let key = &req.idempotency_key;
        check_idempotency_key(key)?;
        let epoch = check_epoch(req.epoch)?;
        let channel = request_channel(req.channel)?;
        let g = i64::from(req.granularity_seconds);
        if g == 0 || g % SLOT_SECONDS != 0 || DAY_SECONDS % g != 0 {
            return Err(ComputeError::invalid(format!(
                "granularity_seconds {g} must be a multiple of 300 that divides a day (86400)"
            )));
        }
        let range = check_range(
            req.range.as_ref(),
            g,
            MAX_AGGREGATE_DAYS * DAY_SECONDS,
            "range",
        )?;
        let intervals = (range.end_unix - range.start_unix) / g;
        if intervals > MAX_OUTPUTS as i64 {
            return Err(ComputeError::invalid(format!(
                "{intervals} output intervals of {g} s; one aggregate releases at most {MAX_OUTPUTS}: use a coarser granularity or a shorter range"
            )));
        }
        let cohort = check_cohort(&req.meter_ids, self.min_cohort, MAX_COHORT, "aggregates")?;
        let meters: Vec<&str> = cohort.iter().copied().collect();
        let (start_slot, end_slot) = (
            (range.start_unix / SLOT_SECONDS) as u64,
            (range.end_unix / SLOT_SECONDS) as u64,
        );
        let bucket_slots = (g / SLOT_SECONDS) as u64;
        let mut acc = Accumulator::new(
            meters.len(),
            start_slot,
            end_slot,
            bucket_slots,
            rayon::current_num_threads(),
        );

        // Stream, check (on every core) and add.
        self.job.step("summing readings", 5);
        let covering = covering_days(range.start_unix, range.end_unix);
        let expected =
            meters.len() as u64 * ((covering.end_unix - covering.start_unix) / DAY_SECONDS) as u64;
        let mut stream = stream_linear(
            self.ingest.clone(),
            meters.iter().map(|m| m.to_string()).collect(),
            covering,
        )
        .await?;
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut seen = 0u64;
        loop {
            let b = next(&mut stream).await?;
            let end = b.is_none();
            if let Some(b) = b {
                if b.epoch == epoch && b.channel == channel.to_proto() as i32 {
                    chunk.push(b);
                }
            }
            if chunk.len() == CHUNK || (end && !chunk.is_empty()) {
                seen += chunk.len() as u64;
                tokio::task::block_in_place(|| {
                    let parsed = check_chunk(&chunk, &meters)?;
                    acc.add_all(&parsed, &meters)
                        .map_err(|e| ComputeError::internal(e.to_string()))
                })?;
                chunk.clear();
                self.job.step(
                    &format!("summing readings: {seen} batches"),
                    5 + (55 * seen / expected.max(1)).min(55) as u32,
                );
            }
            if end {
                break;
            }
        }

        let plan = acc
            .plan(self.min_cohort, MAX_RELEASE_MEMBERS)
            .map_err(|e| {
                ComputeError::precondition(format!(
                    "the output intervals' effective cohorts cannot be listed in one release ({e}): the meters' readings have gaps in many different intervals; ask for a range they report completely, or a shorter one"
                ))
            })?;
        if plan.outputs.is_empty() {
            let best = plan.members.iter().copied().max().unwrap_or(0);
            let with_data = (0..meters.len()).filter(|m| acc.batches(*m) > 0).count();
            return Err(ComputeError::precondition(format!(
                "no output interval can be released: each needs at least {} members whose epoch-{epoch} {} readings cover it completely; the best has {best} ({with_data} of {} meters have such readings in the range)",
                self.min_cohort,
                channel.name(),
                meters.len()
            )));
        }

        self.job.step("releasing through the keyshares", 70);
        let release = LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch,
            channel: channel.to_proto() as i32,
            program: AggregateProgram {
                granularity_seconds: req.granularity_seconds,
            }
            .encode_to_vec(),
            range: Some(range),
            cohorts: plan
                .cohorts
                .iter()
                .map(|c| Cohort {
                    meter_ids: c.iter().map(|m| meters[*m as usize].to_owned()).collect(),
                })
                .collect(),
            outputs: plan
                .outputs
                .iter()
                .map(|(b, c, _)| ReleaseOutput {
                    index: *b as u32,
                    cohort: *c as u32,
                })
                .collect(),
            reissue_reason: String::new(),
        };
        let sums: Vec<u128> = plan.outputs.iter().map(|(_, _, s)| *s).collect();
        let out = self
            .decryptor
            .release(release, &sums, key)
            .await
            .map_err(ComputeError::from)?;
        if out.values.len() != plan.outputs.len() {
            return Err(ComputeError::internal(format!(
                "{} values released for {} outputs",
                out.values.len(),
                plan.outputs.len()
            )));
        }
        let buckets = plan.members.len();
        let mut energy_wh = vec![0i64; buckets];
        let mut interval_cohort_size = vec![0u32; buckets];
        for ((b, _, _), v) in plan.outputs.iter().zip(out.values) {
            energy_wh[*b] = i64::try_from(v).map_err(|_| {
                ComputeError::internal(format!("interval {b}: sum {v} out of range"))
            })?;
            interval_cohort_size[*b] = plan.members[*b];
        }
        Ok(AggregateResponse {
            interval_start_unix: (0..buckets as i64)
                .map(|i| range.start_unix + i * g)
                .collect(),
            energy_wh,
            cohort_size: meters.len() as u32,
            quorum: Some(out.report),
            interval_cohort_size,
            headend_encrypted: out.headend_encrypted,
        })
    }
}

/// Sets bits [from, to) of `words`, a word at a time; Err(the first that was already set).
fn mark(words: &mut [u64], from: usize, to: usize) -> Result<(), usize> {
    let mut k = from;
    while k < to {
        let (w, lo) = (k / 64, k % 64);
        let n = (64 - lo).min(to - k);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << lo
        };
        let hit = words[w] & mask;
        if hit != 0 {
            return Err(w * 64 + hit.trailing_zeros() as usize);
        }
        words[w] |= mask;
        k += n;
    }
    Ok(())
}

/// Checks a chunk of stored batches on every core: (meter index, batch); batches of meters not
/// asked for are dropped.
fn check_chunk(
    chunk: &[psm_proto::v1::ReadingBatch],
    meters: &[&str],
) -> Result<Vec<(usize, LinearBatch)>, ComputeError> {
    chunk
        .par_iter()
        .filter_map(|b| {
            let m = meters.binary_search(&b.meter_id.as_str()).ok()?;
            Some(checked_linear(b).map(|lb| (m, lb)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 20_000;
    const D0: u64 = DAY * 288;

    /// A batch of `n` intervals of `spi` slots from absolute slot `first`, bodies `base + i`.
    fn batch(first: u64, spi: u64, n: usize, base: u128) -> LinearBatch {
        LinearBatch {
            meter_id: "m".into(),
            day: DAY as i64,
            epoch: 1,
            channel: Channel::Import,
            interval_seconds: (spi * 300) as u32,
            first_slot: first,
            slots_per_interval: spi,
            bodies: (0..n as u128).map(|i| base + i).collect(),
        }
    }

    #[test]
    fn mixed_interval_lengths_tile_buckets() {
        // Hourly buckets over a day: 5-, 15-, 30- and 60-minute meters all tile them.
        let mut acc = Accumulator::new(4, D0, D0 + 288, 12, 3);
        acc.add(0, "a", &batch(D0, 1, 288, 0)).unwrap();
        acc.add(1, "b", &batch(D0, 3, 96, 1000)).unwrap();
        acc.add(2, "c", &batch(D0, 6, 48, 2000)).unwrap();
        acc.add(3, "d", &batch(D0, 12, 24, 3000)).unwrap();
        let plan = acc.plan(4, usize::MAX).unwrap();
        assert_eq!(plan.cohorts, vec![vec![0, 1, 2, 3]]);
        assert_eq!(plan.outputs.len(), 24);
        let (b, c, s) = plan.outputs[1];
        assert_eq!((b, c), (1, 0));
        let a: u128 = (12..24).sum();
        let q: u128 = (4..8).map(|i| 1000 + i).sum();
        let h: u128 = (2..4).map(|i| 2000 + i).sum();
        assert_eq!(s, a + q + h + 3001);
        assert!(plan.members.iter().all(|m| *m == 4));
    }

    #[test]
    fn coarse_intervals_and_gaps_leave_only_their_buckets() {
        // 15-minute buckets: the hourly meter straddles every edge and is in none; meter 1
        // misses one reading (bucket 5), meter 2 reports in two batches (a partial day, then
        // the rest) and completes bucket 10 only with the second.
        let mut acc = Accumulator::new(4, D0, D0 + 288, 3, 3);
        acc.add(0, "a", &batch(D0, 3, 96, 0)).unwrap();
        acc.add(1, "b", &batch(D0, 3, 5, 0)).unwrap();
        acc.add(1, "b", &batch(D0 + 18, 3, 90, 0)).unwrap();
        acc.add(2, "c", &batch(D0, 1, 31, 0)).unwrap();
        acc.add(2, "c", &batch(D0 + 31, 1, 257, 0)).unwrap();
        acc.add(3, "h", &batch(D0, 12, 24, 0)).unwrap();
        let plan = acc.plan(2, usize::MAX).unwrap();
        assert_eq!(plan.members[5], 2);
        assert_eq!(plan.members[10], 3);
        assert_eq!(plan.cohorts, vec![vec![0, 1, 2], vec![0, 2]]);
        assert_eq!(plan.outputs[5].1, 1);
        assert!(plan.outputs.iter().filter(|o| o.1 == 1).count() == 1);
        // With a minimum of 3, bucket 5 is withheld.
        let strict = acc.plan(3, usize::MAX).unwrap();
        assert_eq!(strict.outputs.len(), 95);
        assert!(strict.outputs.iter().all(|o| o.0 != 5));
        assert_eq!(strict.cohorts.len(), 1);
    }

    #[test]
    fn intervals_straddling_the_range_are_left_out() {
        // 15-minute buckets from 00:15 to 03:15: the hourly meter's first interval (00:00-01:00)
        // straddles the range's start and its last (03:00-04:00) its end; the ones between
        // straddle bucket edges. Intervals outside the range are ignored.
        let mut acc = Accumulator::new(2, D0 + 3, D0 + 39, 3, 3);
        acc.add(0, "a", &batch(D0, 3, 96, 0)).unwrap();
        acc.add(1, "h", &batch(D0, 12, 24, 0)).unwrap();
        let plan = acc.plan(1, usize::MAX).unwrap();
        assert_eq!(plan.members, vec![1; 12]);
        assert_eq!(plan.cohorts, vec![vec![0]]);
        assert_eq!(plan.outputs[0], (0, 0, 1));
        assert_eq!(plan.outputs[11], (11, 0, 12));
        assert_eq!(acc.batches(1), 1);
    }

    #[test]
    fn overlaps_are_store_errors() {
        let mut acc = Accumulator::new(1, D0, D0 + 288, 3, 3);
        acc.add(0, "a", &batch(D0, 3, 10, 0)).unwrap();
        let e = acc.add(0, "a", &batch(D0 + 27, 1, 4, 0)).unwrap_err();
        assert_eq!(
            e,
            SumError::Overlap {
                meter: "a".into(),
                slot: D0 + 27
            }
        );
    }

    #[test]
    fn too_many_distinct_cohorts_are_refused() {
        // Meter i misses bucket i: every bucket has its own cohort.
        let mut acc = Accumulator::new(8, D0, D0 + 24, 3, 3);
        for m in 0..8 {
            for b in 0..8u64 {
                if b != m as u64 {
                    acc.add(m, "x", &batch(D0 + 3 * b, 3, 1, 0)).unwrap();
                }
            }
        }
        let plan = acc.plan(7, usize::MAX).unwrap();
        assert_eq!(plan.cohorts.len(), 8);
        assert_eq!(
            acc.plan_within(7, (usize::MAX, 50)).unwrap_err(),
            PlanError::Members(56)
        );
        assert_eq!(
            acc.plan_within(7, (5, usize::MAX)).unwrap_err(),
            PlanError::Cohorts(5)
        );
    }

    #[test]
    fn marking_finds_the_first_overlap() {
        let mut w = vec![0u64; 3];
        mark(&mut w, 3, 130).unwrap();
        assert_eq!(w[0], !0b111);
        assert_eq!(w[1], u64::MAX);
        assert_eq!(w[2], 0b11);
        mark(&mut w, 0, 3).unwrap();
        mark(&mut w, 130, 192).unwrap();
        assert_eq!(w, vec![u64::MAX; 3]);
        let mut w = vec![0u64; 2];
        mark(&mut w, 70, 80).unwrap();
        assert_eq!(mark(&mut w, 60, 100), Err(70));
    }

    #[test]
    fn request_channel_defaults_to_import() {
        assert_eq!(request_channel(0).unwrap(), Channel::Import);
        assert_eq!(request_channel(2).unwrap(), Channel::Export);
        assert!(request_channel(9).is_err());
    }

    /// 100,000 meters × a day of 15-minute readings in 15-minute buckets.
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn summing_100k_meters_is_fast() {
        let meters = 100_000;
        let names: Vec<String> = (0..meters).map(|m| format!("m{m:06}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let batches: Vec<(usize, LinearBatch)> = (0..meters)
            .map(|m| (m, batch(D0, 3, 96, m as u128)))
            .collect();
        for shards in [1, rayon::current_num_threads()] {
            let t = std::time::Instant::now();
            let mut acc = Accumulator::new(meters, D0, D0 + 288, 3, shards);
            acc.add_all(&batches, &names).unwrap();
            let plan = acc.plan(5, MAX_RELEASE_MEMBERS).unwrap();
            eprintln!("{shards} shard(s): summed and planned in {:?}", t.elapsed());
            assert_eq!(plan.outputs.len(), 96);
            assert_eq!(plan.cohorts.len(), 1);
        }
    }

    #[test]
    fn shards_give_the_same_plan() {
        let names = ["a", "b", "c", "d", "e"];
        let mut batches = Vec::new();
        for m in 0..5 {
            let gaps = [m * 7, m * 7 + 1];
            let mut i = 0;
            while i < 96 {
                if gaps.contains(&i) {
                    i += 1;
                    continue;
                }
                let n = (1..96 - i)
                    .find(|n| gaps.contains(&(i + n)))
                    .unwrap_or(96 - i);
                batches.push((m, batch(D0 + 3 * i as u64, 3, n, m as u128)));
                i += n;
            }
        }
        let plans: Vec<Plan> = [1, 2, 5, 9]
            .iter()
            .map(|s| {
                let mut acc = Accumulator::new(5, D0, D0 + 288, 6, *s);
                acc.add_all(&batches, &names).unwrap();
                acc.plan(3, usize::MAX).unwrap()
            })
            .collect();
        assert!(plans.iter().all(|p| *p == plans[0]));
        assert!(plans[0].cohorts.len() > 1);
        // Meter 0 misses the first half hour only; meter 1 misses 01:45-02:15 (two buckets).
        assert_eq!(plans[0].members[0], 4);
        assert_eq!((plans[0].members[3], plans[0].members[4]), (4, 4));
        assert!(plans[0].members[5..].iter().all(|m| *m >= 4));
    }
}
