//! Analytics on the tfhe track: a histogram of a cohort's period totals. Each meter's daily
//! totals are summed on ciphertexts, compared with the band edges, and the comparisons summed
//! per band; only the counts are squashed and decrypted.

use crate::error::ComputeError;
use prost::Message;
use psm_core::tfhe_program::histogram;
use psm_proto::v1::{AnalyticsRequest, AnalyticsResponse, ComputationKind};
use tonic::transport::Channel;

use crate::decrypt::{manifest, ThresholdDecryptor};
use crate::inputs::{check_cohort, check_idempotency_key, whole_days};
use crate::jobs::JobHandle;
use crate::tfhe::{expand_all, TfheEngine};

/// Longest range of one histogram, days.
pub const MAX_ANALYTICS_DAYS: i64 = 62;
/// Largest cohort of one histogram (every meter-day is expanded: ~0.3 s of a core each).
pub const MAX_ANALYTICS_COHORT: usize = 10_000;
/// Most band edges (16 bands).
pub const MAX_EDGES: usize = 17;

/// What an Analytics request needs besides the request.
pub struct Analyst<'a> {
    pub ingest: Channel,
    pub decryptor: &'a ThresholdDecryptor,
    pub tfhe: &'a TfheEngine,
    pub min_cohort: usize,
    pub job: &'a JobHandle,
}

/// The program the keyshares allow by hash: the request without its idempotency key and cohort.
pub fn program(req: &AnalyticsRequest) -> Vec<u8> {
    AnalyticsRequest {
        idempotency_key: String::new(),
        meter_ids: Vec::new(),
        range: req.range,
        band_edges_wh: req.band_edges_wh.clone(),
    }
    .encode_to_vec()
}

impl Analyst<'_> {
    pub async fn run(&self, req: AnalyticsRequest) -> Result<AnalyticsResponse, ComputeError> {
        check_idempotency_key(&req.idempotency_key)?;
        let cohort = check_cohort(
            &req.meter_ids,
            self.min_cohort,
            MAX_ANALYTICS_COHORT,
            "histograms",
        )?;
        let edges = &req.band_edges_wh;
        if edges.len() < 2 || edges.len() > MAX_EDGES || edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ComputeError::invalid(format!(
                "band_edges_wh must hold 2..={MAX_EDGES} strictly ascending values"
            )));
        }
        let (first_day, days) = whole_days(req.range.as_ref(), MAX_ANALYTICS_DAYS)?;
        let meters: Vec<String> = cohort.iter().map(|m| m.to_string()).collect();
        if meters.len() * days as usize > psm_core::tfhe_program::MAX_TFHE_INPUTS {
            return Err(ComputeError::exhausted(format!(
                "{} meters × {days} days = {} meter-days; a histogram takes at most {} (every day's registers are expanded in memory): ask for fewer meters or a shorter range",
                meters.len(),
                meters.len() * days as usize,
                psm_core::tfhe_program::MAX_TFHE_INPUTS
            )));
        }

        self.job.step("loading the tfhe server key", 2);
        let loaded = self.tfhe.loaded().await?;
        self.job.step("fetching register readings", 5);
        let regs = self
            .tfhe
            .registers(self.ingest.clone(), &meters, first_day, days)
            .await?;
        self.job.step("waiting for the tfhe evaluator", 5);
        let turn = self.tfhe.turn().await?;
        let inputs = regs.iter().map(|r| r.input.clone()).collect();
        let job = self.job;
        let days_per_meter = days as usize;
        let parts = tokio::task::block_in_place(|| {
            let expanded = expand_all(&loaded, &regs, job, 5, 60)?;
            // regs are sorted by (meter, day): consecutive runs of `days` belong to one meter.
            let mut totals: Vec<tfhe::FheUint32> = expanded.into_iter().map(|(_, t)| t).collect();
            let mut per_meter = Vec::new();
            while !totals.is_empty() {
                let rest = totals.split_off(days_per_meter.min(totals.len()));
                per_meter.push(std::mem::replace(&mut totals, rest));
            }
            histogram(per_meter, edges, &|step, p| {
                job.step(step, 60 + p * 35 / 100)
            })
            .map_err(|e| ComputeError::internal(format!("tfhe evaluation: {e}")))
        })?;
        drop(turn); // decryption (and keyshares' re-execution) need not hold the evaluator
        self.job.step("decrypting the counts", 95);
        let program = program(&req);
        let manifest = manifest(
            ComputationKind::Analytics,
            program,
            inputs,
            first_day,
            days,
            "",
        );
        let (values, out) = self
            .tfhe
            .decrypt(self.decryptor, parts, manifest, &req.idempotency_key)
            .await?;
        Ok(AnalyticsResponse {
            counts: values.into_iter().map(|v| v as u32).collect(),
            cohort_size: meters.len() as u32,
            quorum: Some(out.report),
        })
    }
}
