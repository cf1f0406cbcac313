//! Bill: one meter's energy per time-of-use band over a billing period. Each band's bodies are
//! summed per channel (import; export when the meter reports it), the keyshares release only the
//! band totals (deriving the bands' slots from the tariff themselves), and the totals are priced.
//! Demand charges and tiers come from the tfhe track's daily registers.

use crate::error::ComputeError;
use prost::Message;
use psm_core::linear::release::{release_from_proto, MAX_BILL_DAYS};
use psm_core::linear::{Channel, SLOT_SECONDS};
use psm_core::readings::{validate_meter_id, DAY_SECONDS};
use psm_core::tfhe_program::bill_registers;
use psm_core::wire::LinearBatch;
use psm_proto::v1::{
    BillLine, BillRequest, BillResponse, Cohort, ComputationKind, InputRef, LinearRelease,
    QuorumReport, ReleaseOutput, TimeRange,
};
use psm_tariff::{demand_line, price, tier_line, Tier};
use tonic::transport::Channel as GrpcChannel;

use crate::decrypt::{manifest, merge_report, ThresholdDecryptor};
use crate::inputs::{
    check_epoch, check_idempotency_key, check_range, checked_linear, covering_days, format_utc,
    next, stream_linear,
};
use crate::jobs::JobHandle;
use crate::tfhe::{expand_all, TfheEngine};

/// What a Bill needs besides the request.
pub struct Biller<'a> {
    pub ingest: GrpcChannel,
    pub decryptor: &'a ThresholdDecryptor,
    pub tfhe: &'a TfheEngine,
    pub job: &'a JobHandle,
}

/// One channel's release of a bill and what follows from it: the output and weight of every
/// slot, exactly as the keyshares derive them.
struct Plan {
    start_slot: u64,
    slot_outputs: Vec<usize>,
    slot_weights: Vec<i64>,
    /// Outputs with slots in the period, as the release asks for them.
    outputs: Vec<usize>,
    names: Vec<String>,
    release: LinearRelease,
}

impl Plan {
    fn bands<'a>(&'a self, meter: &'a str, epoch: u32) -> Bands<'a> {
        Bands {
            meter,
            epoch,
            start_slot: self.start_slot,
            slot_bands: &self.slot_outputs,
            slot_weights: &self.slot_weights,
            names: self.names.iter().map(String::as_str).collect(),
        }
    }
}

/// The bands of a period: the band (output) and weight of every slot (as the keyshares derive
/// them) and the outputs' names, for summing one channel's intervals per output.
pub struct Bands<'a> {
    pub meter: &'a str,
    pub epoch: u32,
    pub start_slot: u64,
    /// Output index of slot `start_slot + k`.
    pub slot_bands: &'a [usize],
    /// Weight of slot `start_slot + k`: 1, or its dynamic price.
    pub slot_weights: &'a [i64],
    pub names: Vec<&'a str>,
}

impl Bands<'_> {
    fn end_slot(&self) -> u64 {
        self.start_slot + self.slot_bands.len() as u64
    }

    /// The wrapping body sum per band of one channel's batches. Every slot of the period must be
    /// covered by exactly one interval that lies inside the period and inside one band.
    pub fn sums(
        &self,
        channel: Channel,
        batches: &[LinearBatch],
    ) -> Result<Vec<u128>, ComputeError> {
        let (start, end) = (self.start_slot, self.end_slot());
        let at = |slot: u64| format_utc(slot as i64 * SLOT_SECONDS);
        let ch = channel.name();
        let meter = self.meter;
        let mut covered = vec![false; self.slot_bands.len()];
        let mut sums = vec![0u128; self.names.len()];
        for b in batches {
            let spi = b.slots_per_interval;
            for (s, body) in b.intervals() {
                let e = s + spi;
                if e <= start || s >= end {
                    continue;
                }
                if s < start || e > end {
                    let edge = if s < start { start } else { end };
                    return Err(ComputeError::precondition(format!(
                        "meter {meter}'s {ch} interval {}..{} straddles the period's {} at {}: a bill's period must start and end on the meter's interval boundaries ({} minutes)",
                        at(s),
                        at(e),
                        if s < start { "start" } else { "end" },
                        at(edge),
                        spi * 5
                    )));
                }
                let first = (s - start) as usize;
                let slots = &mut covered[first..first + spi as usize];
                if let Some(k) = slots.iter().position(|c| *c) {
                    return Err(ComputeError::internal(format!(
                        "stored {ch} batches of meter {meter} overlap at {} (ingest refuses overlapping batches: the store is inconsistent)",
                        at(s + k as u64)
                    )));
                }
                slots.fill(true);
                let band = self.slot_bands[first];
                if let Some(other) = self.slot_bands[first..first + spi as usize]
                    .iter()
                    .find(|x| **x != band)
                {
                    return Err(ComputeError::precondition(format!(
                        "meter {meter}'s {ch} interval {}..{} spans tariff bands {:?} and {:?}: one reading cannot be split between bands; bill it on a tariff whose band edges fall on its interval boundaries",
                        at(s),
                        at(e),
                        self.names.get(band).unwrap_or(&"?"),
                        self.names.get(*other).unwrap_or(&"?")
                    )));
                }
                let weight = self.slot_weights[first];
                if self.slot_weights[first..first + spi as usize]
                    .iter()
                    .any(|w| *w != weight)
                {
                    return Err(ComputeError::precondition(format!(
                        "meter {meter}'s {ch} interval {}..{} has more than one dynamic price: one reading cannot be split between prices; bill it with a price series whose intervals are at least the meter's ({} minutes)",
                        at(s),
                        at(e),
                        spi * 5
                    )));
                }
                if let Some(acc) = sums.get_mut(band) {
                    // Σ w·b over Z_2^128 is a body of Σ w·m under the weighted mask sum the
                    // keyshares release against.
                    *acc = acc.wrapping_add(body.wrapping_mul(weight as u128));
                }
            }
        }
        if let Some(k) = covered.iter().position(|c| !c) {
            return Err(ComputeError::precondition(format!(
                "meter {meter} has no {ch} reading under epoch {} covering {}: a bill needs every 5-minute slot of its period covered",
                self.epoch,
                at(start + k as u64)
            )));
        }
        Ok(sums)
    }
}

impl Biller<'_> {
    pub async fn run(&self, req: BillRequest) -> Result<BillResponse, ComputeError> {
        check_idempotency_key(&req.idempotency_key)?;
        validate_meter_id(&req.meter_id).map_err(|e| ComputeError::invalid(e.to_string()))?;
        let epoch = check_epoch(req.epoch)?;
        let proto_tariff = req
            .tariff
            .clone()
            .ok_or_else(|| ComputeError::invalid("a tariff is required"))?;
        let tariff = psm_tariff::from_proto(&proto_tariff)
            .map_err(|e| ComputeError::invalid(e.to_string()))?;
        let (demand_rate, tiers) = (tariff.demand_rate_per_kw_milli, tariff.tiers.clone());
        let period = check_range(
            req.period.as_ref(),
            SLOT_SECONDS,
            MAX_BILL_DAYS * DAY_SECONDS,
            "period",
        )?;
        let registers = demand_rate > 0 || !tiers.is_empty();
        if registers && (period.start_unix % DAY_SECONDS != 0 || period.end_unix % DAY_SECONDS != 0)
        {
            return Err(ComputeError::invalid(
                "this tariff has a demand charge or tiers, which are computed from the meter's daily registers: its billing period must be whole UTC days (00:00 UTC to 00:00 UTC)",
            ));
        }
        let program = proto_tariff.encode_to_vec();

        // Per channel the release, and from it the output (band, or the dynamic import sum)
        // and weight of every slot exactly as the keyshares derive them.
        let plan = |channel: Channel| -> Result<Plan, ComputeError> {
            let mut release = LinearRelease {
                kind: ComputationKind::Bill as i32,
                epoch,
                channel: channel.to_proto() as i32,
                program: program.clone(),
                range: Some(period),
                cohorts: vec![Cohort {
                    meter_ids: vec![req.meter_id.clone()],
                }],
                outputs: vec![ReleaseOutput {
                    index: 0,
                    cohort: 0,
                }],
                reissue_reason: req.reissue_reason.clone(),
            };
            let spec = release_from_proto(&release)
                .map_err(|e| ComputeError::invalid(e.to_string()))?
                .spec;
            let slot_outputs = spec.slot_outputs();
            let mut in_period = vec![false; spec.output_count()];
            for b in &slot_outputs {
                if let Some(x) = in_period.get_mut(*b) {
                    *x = true;
                }
            }
            let outputs: Vec<usize> = (0..in_period.len()).filter(|b| in_period[*b]).collect();
            release.outputs = outputs
                .iter()
                .map(|b| ReleaseOutput {
                    index: *b as u32,
                    cohort: 0,
                })
                .collect();
            let names = if spec.prices().is_some() {
                vec!["dynamic prices".to_owned()]
            } else {
                tariff.bands.iter().map(|b| b.name.clone()).collect()
            };
            Ok(Plan {
                start_slot: spec.start_slot,
                slot_weights: spec.slot_weights(),
                slot_outputs,
                outputs,
                names,
                release,
            })
        };
        let import_plan = plan(Channel::Import)?;
        let export_plan = plan(Channel::Export)?;

        self.job.step("summing interval readings per band", 5);
        let (import, export) = self.batches(&req.meter_id, epoch, &period).await?;
        let import_sums = import_plan
            .bands(&req.meter_id, epoch)
            .sums(Channel::Import, &import)?;
        let export_sums = if export.is_empty() {
            None
        } else {
            Some(
                export_plan
                    .bands(&req.meter_id, epoch)
                    .sums(Channel::Export, &export)?,
            )
        };

        self.job.step("releasing band totals", 15);
        let mut report = crate::decrypt::empty_report();
        let import_released = self
            .release(
                &import_plan.release,
                Channel::Import,
                &import_plan.outputs,
                &import_sums,
                &req.idempotency_key,
                &mut report,
            )
            .await?;
        let export_wh = match &export_sums {
            Some(sums) => {
                self.release(
                    &export_plan.release,
                    Channel::Export,
                    &export_plan.outputs,
                    sums,
                    &format!("{}/export", req.idempotency_key),
                    &mut report,
                )
                .await?
            }
            None => Vec::new(),
        };
        // Dynamic prices: the one released import value is Σ price × Wh, a line of its own.
        let (import_wh, mut extra) = match &tariff.import_prices {
            Some(p) => {
                let prices = p
                    .over(period.start_unix, period.end_unix)
                    .map(|_| ((period.end_unix - period.start_unix) / p.interval_seconds) as usize)
                    .unwrap_or(0);
                let weighted = import_released.first().copied().unwrap_or(0);
                (
                    Vec::new(),
                    vec![psm_tariff::dynamic_import_line(
                        i128::from(weighted),
                        prices,
                    )],
                )
            }
            None => (import_released, Vec::new()),
        };

        if registers {
            let first_day = period.start_unix / DAY_SECONDS;
            let days = (period.end_unix - period.start_unix) / DAY_SECONDS;
            let (lines, r) = self
                .registers_part(&req, first_day, days, demand_rate, &tiers, program)
                .await?;
            merge_report(&mut report, r);
            extra.extend(lines);
        }
        let bill = price(
            &tariff,
            &import_wh,
            &export_wh,
            (period.start_unix, period.end_unix),
            extra,
        );
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

    /// The meter's checked batches of `epoch` overlapping the period: (import, export).
    async fn batches(
        &self,
        meter: &str,
        epoch: u32,
        period: &TimeRange,
    ) -> Result<(Vec<LinearBatch>, Vec<LinearBatch>), ComputeError> {
        let (start, end) = (
            (period.start_unix / SLOT_SECONDS) as u64,
            (period.end_unix / SLOT_SECONDS) as u64,
        );
        let mut stream = stream_linear(
            self.ingest.clone(),
            vec![meter.to_owned()],
            covering_days(period.start_unix, period.end_unix),
        )
        .await?;
        let (mut import, mut export) = (Vec::new(), Vec::new());
        while let Some(b) = next(&mut stream).await? {
            if b.meter_id != meter || b.epoch != epoch {
                continue;
            }
            let lb = checked_linear(&b)?;
            if lb.end_slot() <= start || lb.first_slot >= end {
                continue;
            }
            match lb.channel {
                Channel::Import => import.push(lb),
                Channel::Export => export.push(lb),
            }
        }
        Ok((import, export))
    }

    /// Releases one channel's band totals; returns Wh per band of the tariff (0 for bands
    /// without a slot in the period).
    async fn release(
        &self,
        template: &LinearRelease,
        channel: Channel,
        outputs: &[usize],
        band_sums: &[u128],
        idempotency_key: &str,
        report: &mut QuorumReport,
    ) -> Result<Vec<i64>, ComputeError> {
        let mut release = template.clone();
        release.channel = channel.to_proto() as i32;
        let sums: Vec<u128> = outputs.iter().map(|b| band_sums[*b]).collect();
        let out = self
            .decryptor
            .release(release, &sums, idempotency_key)
            .await
            .map_err(ComputeError::from)?;
        merge_report(report, out.report);
        if out.values.len() != outputs.len() {
            return Err(ComputeError::internal(format!(
                "{} values released for {} bands",
                out.values.len(),
                outputs.len()
            )));
        }
        let mut wh = vec![0i64; band_sums.len()];
        for (b, v) in outputs.iter().zip(out.values) {
            wh[*b] = i64::try_from(v)
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ComputeError::internal(format!(
                        "the released {} total of band {b} is {v} Wh: the stored readings are not what a meter encrypts",
                        channel.name()
                    ))
                })?;
        }
        Ok(wh)
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
    ) -> Result<(Vec<psm_tariff::Line>, QuorumReport), ComputeError> {
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
            .map_err(|e| ComputeError::internal(format!("tfhe evaluation: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    const D0: u64 = 20_000 * 288;

    fn batch(channel: Channel, first: u64, spi: u64, n: usize) -> LinearBatch {
        LinearBatch {
            meter_id: "m".into(),
            day: 20_000,
            epoch: 1,
            channel,
            interval_seconds: (spi * 300) as u32,
            first_slot: first,
            slots_per_interval: spi,
            bodies: (0..n as u128).map(|i| 1 << i.min(100)).collect(),
        }
    }

    const ONES: [i64; 288] = [1; 288];

    /// Two bands: slots before 06:00 are band 0, the rest band 1 (a day from D0).
    fn bands(slot_bands: &[usize]) -> Bands<'_> {
        Bands {
            meter: "m",
            epoch: 1,
            start_slot: D0,
            slot_bands,
            slot_weights: &ONES[..slot_bands.len()],
            names: vec!["night", "day"],
        }
    }

    #[test]
    fn dynamic_prices_weigh_each_interval() {
        // One output over the day, the price of hour h being h + 1 (per 5-minute slot).
        let sb = vec![0usize; 288];
        let weights: Vec<i64> = (0..288).map(|s| s / 12 + 1).collect();
        let b = Bands {
            slot_weights: &weights,
            ..bands(&sb)
        };
        let sums = b
            .sums(Channel::Import, &[batch(Channel::Import, D0, 12, 24)])
            .unwrap();
        assert_eq!(
            sums[0],
            (0..24u128).map(|h| (h + 1) * (1u128 << h)).sum::<u128>()
        );
        // Half-hourly prices under hourly readings: a reading cannot be split between prices.
        let half: Vec<i64> = (0..288).map(|s| s / 6 + 1).collect();
        let e = tonic::Status::from(
            Bands {
                slot_weights: &half,
                ..bands(&sb)
            }
            .sums(Channel::Import, &[batch(Channel::Import, D0, 12, 24)])
            .unwrap_err(),
        );
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("more than one dynamic price"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn bands_sum_intervals_and_require_full_coverage() {
        let sb: Vec<usize> = (0..288).map(|s| usize::from(s >= 72)).collect();
        let b = bands(&sb);
        // Hourly: 6 intervals at night, 18 by day.
        let sums = b
            .sums(Channel::Import, &[batch(Channel::Import, D0, 12, 24)])
            .unwrap();
        assert_eq!(sums[0], (0..6).map(|i| 1u128 << i).sum::<u128>());
        assert_eq!(sums[1], (6..24).map(|i| 1u128 << i).sum::<u128>());
        // Two batches of different lengths tiling the day.
        let sums = b
            .sums(
                Channel::Import,
                &[
                    batch(Channel::Import, D0, 3, 24),
                    batch(Channel::Import, D0 + 72, 1, 216),
                ],
            )
            .unwrap();
        assert_eq!(sums[0], (0..24).map(|i| 1u128 << i).sum::<u128>());
        // A missing interval names the first uncovered time.
        let e = tonic::Status::from(
            b.sums(Channel::Import, &[batch(Channel::Import, D0, 3, 95)])
                .unwrap_err(),
        );
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("T23:45Z"), "{}", e.message());
        assert!(e.message().contains("import"), "{}", e.message());
    }

    #[test]
    fn intervals_across_bands_or_edges_are_refused() {
        // A band edge at 06:30: hourly readings cannot be split.
        let sb: Vec<usize> = (0..288).map(|s| usize::from(s >= 78)).collect();
        let e = tonic::Status::from(
            bands(&sb)
                .sums(Channel::Export, &[batch(Channel::Export, D0, 12, 24)])
                .unwrap_err(),
        );
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message()
                .contains("spans tariff bands \"night\" and \"day\""),
            "{}",
            e.message()
        );
        // A period starting at 00:15 cuts the first hourly interval.
        let sb = vec![0usize; 285];
        let p = Bands {
            start_slot: D0 + 3,
            ..bands(&sb)
        };
        let e = tonic::Status::from(
            p.sums(Channel::Import, &[batch(Channel::Import, D0, 12, 24)])
                .unwrap_err(),
        );
        assert!(
            e.message().contains("straddles the period's start"),
            "{}",
            e.message()
        );
        // Overlapping stored batches are a store error.
        let sb = vec![0usize; 288];
        let e = tonic::Status::from(
            bands(&sb)
                .sums(
                    Channel::Import,
                    &[
                        batch(Channel::Import, D0, 3, 96),
                        batch(Channel::Import, D0 + 3, 3, 1),
                    ],
                )
                .unwrap_err(),
        );
        assert_eq!(e.code(), tonic::Code::Internal);
    }
}
