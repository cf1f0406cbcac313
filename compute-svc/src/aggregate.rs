//! Aggregate: per-interval net energy of a cohort. Readings are streamed from ingest, summed as
//! compact lists (word by word, never expanded per reading), coarsened to the requested
//! granularity, and threshold-decrypted in shards small enough for the flooding invariants;
//! the shards' clear sums are added.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use psm_core::aggregate::{max_summands, sum_words};
use psm_core::linear::LINEAR_ENCODING;
use psm_core::program::aggregate_output;
use psm_core::readings::{parse_day, DAY_SECONDS};
use psm_proto::v1::{
    AggregateProgram, AggregateRequest, AggregateResponse, ComputationKind, InputRef, PartyFault,
    QuorumReport, TimeRange,
};
use tonic::transport::Channel;
use tonic::Status;

use crate::decrypt::{manifest, ThresholdDecryptor};
use crate::inputs::{
    check_cohort, check_idempotency_key, checked_words, next, stream_linear, whole_days,
};

/// Longest range of one Aggregate request, days.
pub const MAX_AGGREGATE_DAYS: i64 = 31;
/// Largest cohort of one Aggregate request.
pub const MAX_COHORT: usize = 100_000;

/// What an Aggregate needs besides the request.
pub struct Aggregator<'a> {
    pub ingest: Channel,
    pub decryptor: &'a ThresholdDecryptor,
    pub linear_key_id: &'a str,
    pub min_cohort: usize,
    /// Upper bound on meters per decrypted shard (the invariants may impose a lower one).
    pub max_shard_meters: usize,
    pub job: &'a crate::jobs::JobHandle,
}

/// A summed shard waiting for decryption.
struct Shard {
    day: i64,
    /// Stored intervals added into one decrypted value.
    k: usize,
    /// Decrypted values added (in the clear) into one output value.
    per_output: usize,
    interval: u32,
    words: Vec<u128>,
    inputs: Vec<InputRef>,
}

/// The running sum of one (day, interval length) group.
struct Acc {
    words: Option<Vec<u128>>,
    inputs: Vec<InputRef>,
}

pub(crate) fn merge_report(into: &mut QuorumReport, r: QuorumReport) {
    for u in r.used {
        if !into.used.contains(&u) {
            into.used.push(u);
        }
    }
    for f in r.faults {
        if !into
            .faults
            .iter()
            .any(|g: &PartyFault| g.party == f.party && g.reason == f.reason)
        {
            into.faults.push(f);
        }
    }
}

/// How many stored intervals to add into one decrypted value: the largest divisor of `k` (the
/// intervals per output value) for which a shard of `meters` still fits one decryption. Coarse
/// outputs of many meters would otherwise need shards too small for the keyshares' cohort
/// minimum; instead finer cohort sums are decrypted and added in the clear.
fn decryption_k(k: usize, meters: usize, max_summands: usize) -> usize {
    (1..=k)
        .rev()
        .find(|d| k.is_multiple_of(*d) && d * meters.max(1) <= max_summands)
        .unwrap_or(1)
}

impl Aggregator<'_> {
    pub async fn run(&self, req: AggregateRequest) -> Result<AggregateResponse, Status> {
        let key = &req.idempotency_key;
        check_idempotency_key(key)?;
        let cohort = check_cohort(&req.meter_ids, self.min_cohort, MAX_COHORT, "aggregates")?;
        let (first_day, days) = whole_days(req.range.as_ref(), MAX_AGGREGATE_DAYS)?;
        let range = TimeRange {
            start_unix: first_day * DAY_SECONDS,
            end_unix: (first_day + days) * DAY_SECONDS,
        };
        let g = req.granularity_seconds;
        if g == 0 || DAY_SECONDS % i64::from(g) != 0 {
            return Err(Status::invalid_argument(format!(
                "granularity {g} s must divide a day (86400 s)"
            )));
        }
        let buckets_per_day = (DAY_SECONDS / i64::from(g)) as usize;
        let max_sum = max_summands(self.decryptor.scheme());

        // Stream, validate and sum. Accumulators per (day, interval length); a full shard is set
        // aside for decryption.
        let mut stream = stream_linear(self.ingest.clone(), req.meter_ids.clone(), range).await?;
        let mut accs: BTreeMap<(i64, u32), Acc> = BTreeMap::new();
        let mut shards: Vec<Shard> = Vec::new();
        let mut seen: BTreeSet<(String, i64)> = BTreeSet::new();
        while let Some(b) = next(&mut stream).await? {
            let day =
                parse_day(&b.day).map_err(|e| Status::internal(format!("ingest returned {e}")))?;
            if !cohort.contains(b.meter_id.as_str()) || day < first_day || day >= first_day + days {
                continue;
            }
            let words = checked_words(&b, self.linear_key_id)?;
            if !g.is_multiple_of(b.interval_seconds) {
                return Err(Status::invalid_argument(format!(
                    "granularity {g} s is not a multiple of meter {}'s {} s intervals",
                    b.meter_id, b.interval_seconds
                )));
            }
            let k = decryption_k(
                (g / b.interval_seconds) as usize,
                cohort.len().min(self.max_shard_meters),
                max_sum,
            );
            let shard_cap = (max_sum / k).min(self.max_shard_meters);
            seen.insert((b.meter_id.clone(), day));
            let acc = accs
                .entry((day, b.interval_seconds))
                .or_insert_with(|| Acc {
                    words: None,
                    inputs: Vec::new(),
                });
            acc.words = Some(match acc.words.take() {
                None => words,
                Some(a) => sum_words(&[&a, &words]),
            });
            acc.inputs.push(InputRef {
                meter_id: b.meter_id,
                day: b.day,
                track: b.track,
                ciphertext_hash: b.ciphertext_hash,
            });
            // Balanced shards: a cohort just over the cap is split in halves, not into a full
            // shard and a tiny one (which keyshares would refuse as below their minimum).
            let shards_needed = cohort.len().div_ceil(shard_cap);
            let shard_size = cohort.len().div_ceil(shards_needed);
            if acc.inputs.len() == shard_size {
                if let Some(words) = acc.words.take() {
                    shards.push(Shard {
                        day,
                        k,
                        per_output: (g / b.interval_seconds) as usize / k,
                        interval: b.interval_seconds,
                        words,
                        inputs: std::mem::take(&mut acc.inputs),
                    });
                }
            }
        }
        for ((day, interval), acc) in accs {
            if let Some(words) = acc.words {
                let k = decryption_k(
                    (g / interval) as usize,
                    cohort.len().min(self.max_shard_meters),
                    max_sum,
                );
                shards.push(Shard {
                    day,
                    k,
                    per_output: (g / interval) as usize / k,
                    interval,
                    words,
                    inputs: acc.inputs,
                });
            }
        }
        for m in &cohort {
            for d in first_day..first_day + days {
                if !seen.contains(&(m.to_string(), d)) {
                    return Err(Status::failed_precondition(format!(
                        "meter {m} has no readings for {}; aggregate a range every meter has reported",
                        psm_core::readings::format_day(d)
                    )));
                }
            }
        }

        // Every shard is released on its own, so each must be a cohort the keyshares accept.
        if let Some(s) = shards.iter().find(|s| s.inputs.len() < self.min_cohort) {
            return Err(Status::failed_precondition(format!(
                "only {} meters of the cohort report {} s intervals on {}; their sum would be released on its own and is below the minimum of {}",
                s.inputs.len(),
                s.interval,
                psm_core::readings::format_day(s.day),
                self.min_cohort
            )));
        }

        // Decrypt each shard and add the clear sums per output interval.
        let mut totals = vec![0i128; buckets_per_day * days as usize];
        let mut report = QuorumReport::default();
        let n = shards.len();
        for (i, s) in shards.into_iter().enumerate() {
            self.job.step(
                &format!("decrypting shard {}/{n}", i + 1),
                (10 + 90 * i / n.max(1)) as u32,
            );
            let (batch, noise) = aggregate_output(s.words, s.inputs.len(), s.k);
            let program = AggregateProgram {
                granularity_seconds: s.interval * s.k as u32,
            }
            .encode_to_vec();
            let manifest = manifest(ComputationKind::Aggregate, program, s.inputs, s.day, 1, "");
            let out = self
                .decryptor
                .decrypt(
                    self.linear_key_id,
                    &batch,
                    LINEAR_ENCODING,
                    noise,
                    manifest,
                    &format!("{key}/{i}"),
                )
                .await
                .map_err(|e| e.to_status())?;
            merge_report(&mut report, out.report);
            let base = (s.day - first_day) as usize * buckets_per_day;
            for (j, v) in out.values.into_iter().enumerate() {
                totals[base + j / s.per_output] += v;
            }
        }
        let energy_wh = totals
            .into_iter()
            .map(|v| i64::try_from(v).map_err(|_| Status::internal("sum out of range")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AggregateResponse {
            interval_start_unix: (0..energy_wh.len() as i64)
                .map(|i| range.start_unix + i * i64::from(g))
                .collect(),
            energy_wh,
            cohort_size: cohort.len() as u32,
            quorum: Some(report),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::decryption_k;

    #[test]
    fn decryption_granularity_keeps_cohorts_whole() {
        // Hourly sums of 15-minute readings: 4 per value while 128 meters fit one decryption.
        assert_eq!(decryption_k(4, 100, 512), 4);
        assert_eq!(decryption_k(4, 128, 512), 4);
        assert_eq!(decryption_k(4, 129, 512), 2);
        // Daily sums (96 intervals) of 6 meters: 64 does not divide 96, 48 does.
        assert_eq!(decryption_k(96, 6, 512), 48);
        assert_eq!(decryption_k(96, 1000, 512), 1);
    }
}
