//! Aggregate: per-interval net energy of a cohort. Readings are streamed from ingest, summed as
//! compact lists (word by word, never expanded per reading), coarsened to the requested
//! granularity, and threshold-decrypted in shards small enough for the flooding invariants;
//! the shards' clear sums are added.

use std::collections::{BTreeMap, BTreeSet};

use psm_core::aggregate::{bucket, max_summands, noise_log2, sum_words};
use psm_core::linear::LINEAR_ENCODING;
use psm_core::lwe::{words_from_le_bytes, LweBatch};
use psm_core::readings::{check_linear_shape, parse_day, validate_meter_id, DAY_SECONDS};
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    AggregateRequest, AggregateResponse, ComputationKind, ComputationManifest, InputRef,
    PartyFault, QuorumReport, StreamReadingsRequest, TimeRange, Track,
};
use tonic::transport::Channel;
use tonic::Status;

use crate::decrypt::ThresholdDecryptor;

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
}

/// A summed shard waiting for decryption.
struct Shard {
    day: i64,
    k: usize,
    words: Vec<u128>,
    inputs: Vec<InputRef>,
}

/// The running sum of one (day, interval length) group.
struct Acc {
    words: Option<Vec<u128>>,
    inputs: Vec<InputRef>,
}

fn merge_report(into: &mut QuorumReport, r: QuorumReport) {
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

impl Aggregator<'_> {
    pub async fn run(&self, req: AggregateRequest) -> Result<AggregateResponse, Status> {
        let key = &req.idempotency_key;
        if !(1..=128).contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Status::invalid_argument(
                "idempotency_key must be 1..=128 printable ASCII characters",
            ));
        }
        let cohort: BTreeSet<&str> = req.meter_ids.iter().map(String::as_str).collect();
        if cohort.len() != req.meter_ids.len() {
            return Err(Status::invalid_argument("meter_ids lists a meter twice"));
        }
        for m in &cohort {
            validate_meter_id(m).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if cohort.len() < self.min_cohort {
            return Err(Status::failed_precondition(format!(
                "cohort of {} meters is below the minimum of {}: aggregates of fewer meters are not released",
                cohort.len(),
                self.min_cohort
            )));
        }
        if cohort.len() > MAX_COHORT {
            return Err(Status::resource_exhausted(format!(
                "cohort of {} meters; the limit is {MAX_COHORT}",
                cohort.len()
            )));
        }
        let range = req
            .range
            .ok_or_else(|| Status::invalid_argument("range is required"))?;
        if range.start_unix % DAY_SECONDS != 0
            || range.end_unix % DAY_SECONDS != 0
            || range.end_unix <= range.start_unix
        {
            return Err(Status::invalid_argument(
                "range must be whole UTC days: start and end at 00:00 UTC, end after start",
            ));
        }
        let first_day = range.start_unix / DAY_SECONDS;
        let days = range.end_unix / DAY_SECONDS - first_day;
        if days > MAX_AGGREGATE_DAYS {
            return Err(Status::invalid_argument(format!(
                "range spans {days} days; the limit is {MAX_AGGREGATE_DAYS}"
            )));
        }
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
        let mut stream = IngestClient::new(self.ingest.clone())
            .max_decoding_message_size(psm_net::config::DEFAULT_MAX_RESPONSE_BYTES)
            .stream_readings(StreamReadingsRequest {
                meter_ids: req.meter_ids.clone(),
                range: Some(TimeRange {
                    start_unix: range.start_unix,
                    end_unix: range.end_unix,
                }),
                track: Track::Linear as i32,
            })
            .await
            .map_err(|e| Status::unavailable(format!("ingest: {}", e.message())))?
            .into_inner();
        let mut accs: BTreeMap<(i64, u32), Acc> = BTreeMap::new();
        let mut shards: Vec<Shard> = Vec::new();
        let mut seen: BTreeSet<(String, i64)> = BTreeSet::new();
        while let Some(b) = stream
            .message()
            .await
            .map_err(|e| Status::unavailable(format!("ingest: {}", e.message())))?
        {
            let day =
                parse_day(&b.day).map_err(|e| Status::internal(format!("ingest returned {e}")))?;
            if !cohort.contains(b.meter_id.as_str()) || day < first_day || day >= first_day + days {
                continue;
            }
            let kid = b
                .key
                .as_ref()
                .map(|k| k.key_id.as_str())
                .unwrap_or_default();
            if kid != self.linear_key_id {
                return Err(Status::failed_precondition(format!(
                    "{} {} is under key {kid:?}, not {}",
                    b.meter_id, b.day, self.linear_key_id
                )));
            }
            check_linear_shape(b.interval_seconds, b.count, b.ciphertext.len()).map_err(|e| {
                Status::internal(format!("stored batch {} {}: {e}", b.meter_id, b.day))
            })?;
            if !g.is_multiple_of(b.interval_seconds) {
                return Err(Status::invalid_argument(format!(
                    "granularity {g} s is not a multiple of meter {}'s {} s intervals",
                    b.meter_id, b.interval_seconds
                )));
            }
            let k = (g / b.interval_seconds) as usize;
            let shard_cap = (max_sum / k).min(self.max_shard_meters);
            if shard_cap == 0 {
                return Err(Status::invalid_argument(format!(
                    "granularity {g} s adds {k} intervals per value; one decryption may hold at most {max_sum} summands: choose a finer granularity"
                )));
            }
            seen.insert((b.meter_id.clone(), day));
            let words =
                words_from_le_bytes(&b.ciphertext).map_err(|e| Status::internal(e.to_string()))?;
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
            if acc.inputs.len() == shard_cap {
                if let Some(words) = acc.words.take() {
                    shards.push(Shard {
                        day,
                        k,
                        words,
                        inputs: std::mem::take(&mut acc.inputs),
                    });
                }
            }
        }
        for ((day, interval), acc) in accs {
            if let Some(words) = acc.words {
                shards.push(Shard {
                    day,
                    k: (g / interval) as usize,
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

        // Decrypt each shard and add the clear sums per output interval.
        let mut totals = vec![0i128; buckets_per_day * days as usize];
        let mut report = QuorumReport::default();
        for (i, s) in shards.into_iter().enumerate() {
            let summands = s.inputs.len() * s.k;
            let count = s.words.len() - psm_core::linear::LINEAR_DIMENSION;
            let compact = LweBatch::Compact {
                dimension: psm_core::linear::LINEAR_DIMENSION,
                count,
                words: s.words,
            };
            let batch = if s.k == 1 {
                compact
            } else {
                bucket(&compact, s.k)
            };
            let manifest = ComputationManifest {
                kind: ComputationKind::Aggregate as i32,
                inputs: s.inputs,
                range: Some(TimeRange {
                    start_unix: s.day * DAY_SECONDS,
                    end_unix: (s.day + 1) * DAY_SECONDS,
                }),
                ..Default::default()
            };
            let out = self
                .decryptor
                .decrypt(
                    self.linear_key_id,
                    &batch,
                    LINEAR_ENCODING,
                    noise_log2(summands),
                    manifest,
                    &format!("{key}/{i}"),
                )
                .await
                .map_err(|e| Status::unavailable(format!("threshold decryption failed: {e}")))?;
            merge_report(&mut report, out.report);
            let base = (s.day - first_day) as usize * buckets_per_day;
            for (j, v) in out.values.into_iter().enumerate() {
                totals[base + j] += v;
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
