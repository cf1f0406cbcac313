//! Bill: one meter's net energy per time-of-use band over a billing period, summed from the
//! encrypted interval readings, threshold-decrypted (only the band totals), and priced.

use prost::Message;
use psm_core::aggregate::max_summands;
use psm_core::linear::LINEAR_ENCODING;
use psm_core::program::BillEvaluator;
use psm_core::readings::{parse_day, validate_meter_id, DAY_SECONDS};
use psm_core::tariff::{demand_line, price, tier_line, Tariff, Tier};
use psm_core::tfhe_program::bill_registers;
use psm_proto::v1::{
    BillLine, BillRequest, BillResponse, ComputationKind, InputRef, QuorumReport, TimeRange,
};
use tonic::transport::Channel;
use tonic::Status;

use crate::aggregate::merge_report;
use crate::decrypt::{manifest, ThresholdDecryptor};
use crate::inputs::{check_idempotency_key, checked_words, next, stream_linear, whole_days};
use crate::jobs::JobHandle;
use crate::tfhe::{expand_all, TfheEngine};

/// Longest billing period, days.
pub const MAX_BILL_DAYS: i64 = 62;

/// What a Bill needs besides the request.
pub struct Biller<'a> {
    pub ingest: Channel,
    pub decryptor: &'a ThresholdDecryptor,
    pub linear_key_id: &'a str,
    pub tfhe: &'a TfheEngine,
    pub job: &'a JobHandle,
}

/// The tariff of a request, validated: time-of-use bands, and the tfhe-track parts (demand rate
/// per kW, tiers).
pub fn tariff_from_proto(t: &psm_proto::v1::Tariff) -> Result<(Tariff, i64, Vec<Tier>), Status> {
    let bad = |e: String| Status::invalid_argument(e);
    let tariff = psm_core::wire::tariff_from_proto(t).map_err(|e| bad(e.to_string()))?;
    if !(0..=100_000_000).contains(&t.demand_rate_per_kw_milli) {
        return Err(bad("tariff: demand rate out of range".into()));
    }
    let tiers: Vec<(u64, i64)> = t
        .tiers
        .iter()
        .map(|x| (x.up_to_kwh, x.price_milli))
        .collect();
    let tiers = psm_core::tariff::tiers(&tiers).map_err(|e| bad(e.to_string()))?;
    Ok((tariff, t.demand_rate_per_kw_milli, tiers))
}

impl Biller<'_> {
    pub async fn run(&self, req: BillRequest) -> Result<BillResponse, Status> {
        check_idempotency_key(&req.idempotency_key)?;
        validate_meter_id(&req.meter_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let proto_tariff = req
            .tariff
            .clone()
            .ok_or_else(|| Status::invalid_argument("a tariff is required"))?;
        let (tariff, demand_rate, tiers) = tariff_from_proto(&proto_tariff)?;
        let (first_day, days) = whole_days(req.period.as_ref(), MAX_BILL_DAYS)?;
        let period = TimeRange {
            start_unix: first_day * DAY_SECONDS,
            end_unix: (first_day + days) * DAY_SECONDS,
        };
        let max_sum = max_summands(self.decryptor.scheme());
        let program = proto_tariff.encode_to_vec();
        self.job.step("summing interval readings per band", 5);

        let mut stream =
            stream_linear(self.ingest.clone(), vec![req.meter_id.clone()], period).await?;
        let mut eval = BillEvaluator::new(&tariff, max_sum);
        let mut inputs = Vec::new();
        let mut seen_days = std::collections::BTreeSet::new();
        while let Some(b) = next(&mut stream).await? {
            let day =
                parse_day(&b.day).map_err(|e| Status::internal(format!("ingest returned {e}")))?;
            if b.meter_id != req.meter_id
                || day < first_day
                || day >= first_day + days
                || !seen_days.insert(day)
            {
                continue;
            }
            let words = checked_words(&b, self.linear_key_id)?;
            eval.add_day(day, b.interval_seconds, b.count as usize, words);
            inputs.push(InputRef {
                meter_id: b.meter_id,
                day: b.day,
                track: b.track,
                ciphertext_hash: b.ciphertext_hash,
            });
        }
        for d in first_day..first_day + days {
            if !seen_days.contains(&d) {
                return Err(Status::failed_precondition(format!(
                    "meter {} has no readings for {}; a bill needs every day of its period",
                    req.meter_id,
                    psm_core::readings::format_day(d)
                )));
            }
        }

        // One decryption of every band total (several pieces per band when a band holds more
        // intervals than one decryption may).
        let (sums, batch, noise) = eval.finish();
        let manifest = manifest(
            ComputationKind::Bill,
            program.clone(),
            inputs,
            first_day,
            days,
            &req.reissue_reason,
        );
        self.job.step("decrypting band totals", 20);
        let out = self
            .decryptor
            .decrypt(
                self.linear_key_id,
                &batch,
                LINEAR_ENCODING,
                noise,
                manifest,
                &req.idempotency_key,
            )
            .await
            .map_err(|e| e.to_status())?;
        let mut band_wh = vec![0i64; tariff.bands.len()];
        for (s, v) in sums.iter().zip(out.values) {
            band_wh[s.band] +=
                i64::try_from(v).map_err(|_| Status::internal("band total out of range"))?;
        }
        let mut report = Default::default();
        merge_report(&mut report, out.report);
        let extra = if demand_rate > 0 || !tiers.is_empty() {
            let (lines, r) = self
                .registers_part(&req, first_day, days, demand_rate, &tiers, program)
                .await?;
            merge_report(&mut report, r);
            lines
        } else {
            Vec::new()
        };
        let bill = price(&tariff, &band_wh, days, extra);
        Ok(BillResponse {
            meter_id: req.meter_id,
            period: Some(period),
            lines: bill
                .lines
                .into_iter()
                .map(|l| BillLine {
                    description: l.description,
                    energy_wh: l.energy_wh,
                    amount: l.amount,
                })
                .collect(),
            standing_charge: bill.standing_charge,
            subtotal: bill.subtotal,
            vat: bill.vat,
            total: bill.total,
            currency: tariff.currency,
            quorum: Some(report),
        })
    }

    /// The tfhe track's part of a bill: the demand charge (maximum of the daily peaks, as a
    /// tree) and the tiered charge (cost of the period total, the total itself never
    /// decrypted), squashed and threshold-decrypted together.
    async fn registers_part(
        &self,
        req: &BillRequest,
        first_day: i64,
        days: i64,
        demand_rate: i64,
        tiers: &[Tier],
        program: Vec<u8>,
    ) -> Result<(Vec<psm_core::tariff::Line>, QuorumReport), Status> {
        self.job.step("loading the tfhe server key", 25);
        let loaded = self.tfhe.loaded().await?;
        let meters = [req.meter_id.clone()];
        let regs = self
            .tfhe
            .registers(self.ingest.clone(), &meters, first_day, days)
            .await?;
        let inputs: Vec<InputRef> = regs.iter().map(|r| r.input.clone()).collect();
        self.job.step("waiting for the tfhe evaluator", 28);
        let turn = self.tfhe.turn().await?;
        let job = self.job;
        let tiers_owned = tiers.to_vec();
        let want_demand = demand_rate > 0;
        let parts = tokio::task::block_in_place(|| {
            let expanded = expand_all(&loaded, &regs, job, 30, 70)?;
            bill_registers(expanded, want_demand, &tiers_owned, &|step, p| {
                job.step(step, 70 + p / 5)
            })
            .map_err(|e| Status::internal(format!("tfhe evaluation: {e}")))
        })?;
        drop(turn); // decryption (and keyshares' re-execution) need not hold the evaluator
        self.job.step("decrypting the register results", 95);
        let manifest = manifest(
            ComputationKind::Bill,
            program,
            inputs,
            first_day,
            days,
            &req.reissue_reason,
        );
        let (values, out) = self
            .tfhe
            .decrypt(
                self.decryptor,
                parts,
                manifest,
                &format!("{}/registers", req.idempotency_key),
            )
            .await?;
        let mut lines = Vec::new();
        let mut it = values.into_iter();
        if want_demand {
            let peak = it.next().unwrap_or_default() as u64;
            lines.push(demand_line(peak, demand_rate));
        }
        if !tiers.is_empty() {
            lines.push(tier_line(it.next().unwrap_or_default(), tiers.len()));
        }
        Ok((lines, out.report))
    }
}
