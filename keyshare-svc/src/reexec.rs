//! Verification by re-execution: the keyshare fetches the inputs a manifest names from ingest,
//! checks they are the stored bytes, evaluates the program itself with the same code compute
//! uses, and compares the output. Evaluation is deterministic, so an honest compute node's output
//! is reproduced exactly; anything else is refused.

use std::collections::HashMap;

use prost::Message;
use psm_core::aggregate::sum_words;
use psm_core::lwe::LweBatch;
use psm_core::program::{aggregate_output, BillEvaluator};
use psm_core::readings::{parse_day, DAY_SECONDS};
use psm_net::client::{next_reading, stream_readings};
use psm_proto::v1::{AggregateProgram, ComputationKind, ComputationManifest, TimeRange, Track};
use tonic::transport::Channel;
use tonic::Code;

use crate::policy::{refuse, Checked, Refusal};

const RULE: &str = "re-execution";

/// Re-executes linear-track programs against ingest's stored readings.
pub struct Reexecutor {
    /// None when no ingest is configured: linear requests are then refused.
    pub ingest: Option<Channel>,
    pub linear_key_id: String,
    pub max_summands: usize,
}

/// A fetched input: (day, interval seconds, count, compact-list words).
type StoredDay = (i64, u32, usize, Vec<u128>);

/// A re-executed output and its noise bound (log2).
pub struct Recomputed {
    pub batch: LweBatch,
    pub noise_log2: u32,
}

fn mismatch(msg: impl std::fmt::Display) -> Refusal {
    refuse(RULE, Code::FailedPrecondition, msg)
}

impl Reexecutor {
    /// Fetches the manifest's inputs and recomputes its output.
    pub async fn linear(
        &self,
        m: &ComputationManifest,
        c: &Checked,
    ) -> Result<Recomputed, Refusal> {
        let ingest = self.ingest.clone().ok_or_else(|| {
            refuse(
                RULE,
                Code::FailedPrecondition,
                "this keyshare has no [keyshare] ingest_url, so it cannot re-execute linear-track computations and releases none",
            )
        })?;
        // Where each named input goes: its position in evaluation order.
        let wanted: HashMap<(&str, &str), usize> = m
            .inputs
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.meter_id.as_str(), r.day.as_str()), i))
            .collect();
        let range = TimeRange {
            start_unix: c.first_day * DAY_SECONDS,
            end_unix: c.end_day * DAY_SECONDS,
        };
        let mut stream = stream_readings(ingest, c.meters.clone(), range, Track::Linear)
            .await
            .map_err(|s| refuse(RULE, Code::Unavailable, s.message()))?;
        if c.kind == ComputationKind::Analytics {
            return Err(mismatch(
                "analytics are tfhe-track programs; no linear-track analytics program exists",
            ));
        }
        let bill = c.kind == ComputationKind::Bill;
        // Bills are evaluated in the manifest's order (band pieces depend on it); aggregates are
        // sums and are added as they arrive.
        let mut by_position: Vec<Option<StoredDay>> = vec![None; m.inputs.len()];
        let mut sum: Option<Vec<u128>> = None;
        let mut interval = None;
        while let Some(b) = next_reading(&mut stream)
            .await
            .map_err(|s| refuse(RULE, Code::Unavailable, s.message()))?
        {
            let Some(&pos) = wanted.get(&(b.meter_id.as_str(), b.day.as_str())) else {
                continue;
            };
            if by_position[pos].is_some() {
                continue;
            }
            let named = &m.inputs[pos];
            if b.ciphertext_hash != named.ciphertext_hash {
                return Err(mismatch(format!(
                    "input {} {} does not match the reading stored at ingest",
                    b.meter_id, b.day
                )));
            }
            let words = psm_core::wire::linear_words(&b, &self.linear_key_id)
                .map_err(|e| mismatch(format!("stored input {e}")))?;
            let day = parse_day(&b.day).map_err(|e| mismatch(format!("ingest returned {e}")))?;
            if bill {
                by_position[pos] = Some((day, b.interval_seconds, b.count as usize, words));
            } else {
                if *interval.get_or_insert(b.interval_seconds) != b.interval_seconds {
                    return Err(mismatch(
                        "an aggregate's inputs must share one interval length",
                    ));
                }
                by_position[pos] = Some((day, b.interval_seconds, 0, Vec::new()));
                sum = Some(match sum.take() {
                    None => words,
                    Some(a) => sum_words(&[&a, &words]),
                });
            }
        }
        if let Some(pos) = by_position.iter().position(Option::is_none) {
            let r = &m.inputs[pos];
            return Err(mismatch(format!(
                "input {} {} is not stored at ingest",
                r.meter_id, r.day
            )));
        }

        if bill {
            let t = psm_proto::v1::Tariff::decode(m.program.as_slice())
                .map_err(|e| refuse("manifest", Code::InvalidArgument, format!("tariff: {e}")))?;
            let tariff = psm_core::wire::tariff_from_proto(&t)
                .map_err(|e| refuse("manifest", Code::InvalidArgument, e))?;
            let mut eval = BillEvaluator::new(&tariff, self.max_summands);
            for (day, interval, count, words) in by_position.into_iter().flatten() {
                eval.add_day(day, interval, count, words);
            }
            let (_, batch, noise_log2) = eval.finish();
            Ok(Recomputed { batch, noise_log2 })
        } else {
            let p = AggregateProgram::decode(m.program.as_slice())
                .map_err(|e| refuse("manifest", Code::InvalidArgument, e))?;
            let interval = interval.unwrap_or(1);
            if c.end_day - c.first_day != 1 || p.granularity_seconds % interval != 0 {
                return Err(mismatch(format!(
                    "an aggregate release covers one day with a granularity that is a multiple of its inputs' {interval} s intervals"
                )));
            }
            let k = (p.granularity_seconds / interval) as usize;
            let summed = sum.unwrap_or_default();
            let (batch, noise_log2) = aggregate_output(summed, m.inputs.len(), k);
            Ok(Recomputed { batch, noise_log2 })
        }
    }
}
