//! Bill end to end: per-band totals summed on ciphertexts, decrypted through the keyshares and
//! priced; equal to the plaintext computation for several tariffs, across both daylight-saving
//! changes of Europe/London, with net export.

use chrono::{Datelike, TimeZone, Timelike};
use psm_e2e::{linear_batch, System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{BillRequest, SubmitReadingsRequest, Tariff, TariffBand, TimeRange};
use rand::{Rng, SeedableRng};
use tonic::Code;

/// (UTC day number, readings of that day).
type DayReadings = (i64, Vec<i64>);

fn band(name: &str, mask: u32, s: u32, e: u32, imp: i64, exp: i64) -> TariffBand {
    TariffBand {
        name: name.into(),
        weekday_mask: mask,
        start_hour: s,
        end_hour: e,
        import_price_milli: imp,
        export_price_milli: exp,
    }
}

fn tariffs() -> Vec<Tariff> {
    let base = |name: &str, tz: &str, bands: Vec<TariffBand>| Tariff {
        name: name.into(),
        time_zone: tz.into(),
        bands,
        standing_charge_per_day: 53,
        vat_basis_points: 500,
        currency: "GBP".into(),
        ..Default::default()
    };
    vec![
        base(
            "flat",
            "Europe/London",
            vec![band("all day", 0x7F, 0, 24, 24_500, 15_000)],
        ),
        base(
            "peak/off-peak",
            "Europe/London",
            vec![
                band("peak", 0x1F, 16, 19, 41_250, 5_500),
                band("day", 0x1F, 7, 16, 27_000, 5_500),
                band("evening", 0x1F, 19, 24, 27_000, 5_500),
                band("night", 0x7F, 0, 7, 9_999, 5_500),
                band("weekend", 0x60, 7, 24, 20_000, 5_500),
            ],
        ),
        base(
            "solar",
            "America/New_York",
            vec![
                band("midday", 0x7F, 10, 16, 18_000, 9_000),
                band("rest", 0x7F, 0, 10, 22_000, 9_000),
                band("late", 0x7F, 16, 24, 30_000, 9_000),
            ],
        ),
    ]
}

/// The plaintext reference: same band rule (local weekday/hour of each interval's start),
/// same pricing, computed here from the clear readings.
fn reference(t: &Tariff, readings: &[DayReadings], interval: i64) -> (Vec<i64>, i64) {
    let core = psm_compute_reference(t);
    let tz: chrono_tz::Tz = t.time_zone.parse().unwrap();
    let mut band_wh = vec![0i64; t.bands.len()];
    for (day, values) in readings {
        for (i, v) in values.iter().enumerate() {
            let local = tz
                .timestamp_opt(day * 86_400 + i as i64 * interval, 0)
                .unwrap();
            let (wd, h) = (local.weekday().num_days_from_monday(), local.hour());
            let b = t
                .bands
                .iter()
                .position(|b| {
                    b.weekday_mask & (1 << wd) != 0 && (b.start_hour..b.end_hour).contains(&h)
                })
                .unwrap();
            band_wh[b] += v;
        }
    }
    let bill = psm_core::tariff::price(&core, &band_wh, readings.len() as i64, Vec::new());
    (band_wh, bill.total)
}

fn psm_compute_reference(t: &Tariff) -> psm_core::tariff::Tariff {
    psm_core::wire::tariff_from_proto(t).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bills_match_plaintext_across_dst_and_export() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start(&pki, &keys, "").await;
    let lpk = psm_core::ceremony::PublicBundle::open(&keys.public_dir)
        .unwrap()
        .linear_public_key()
        .unwrap();
    let kid = keys.manifest.linear_key_id.clone();

    // Two meters, 15-minute readings: 2026-03-28..=30 (London springs forward on the 29th) and
    // 2026-10-24..=26 (falls back on the 25th). "solar-1" exports more than it imports.
    let periods = [("2026-03-28", 3), ("2026-10-24", 3)];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut clear: std::collections::BTreeMap<(String, usize), Vec<DayReadings>> =
        Default::default();
    let mut batches = Vec::new();
    for meter in ["home-1", "solar-1"] {
        for (p, (start, n)) in periods.iter().enumerate() {
            let d0 = psm_core::readings::parse_day(start).unwrap();
            for d in d0..d0 + n {
                let values: Vec<i64> = (0..96)
                    .map(|_| {
                        if meter == "solar-1" {
                            rng.gen_range(-900..300)
                        } else {
                            rng.gen_range(0..1_200)
                        }
                    })
                    .collect();
                batches.push(linear_batch(
                    &lpk,
                    &kid,
                    meter,
                    &psm_core::readings::format_day(d),
                    900,
                    &values,
                ));
                clear
                    .entry((meter.to_string(), p))
                    .or_default()
                    .push((d, values));
            }
        }
    }
    let mut headend =
        IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"));
    headend
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "load".into(),
            batches,
        })
        .await
        .unwrap();

    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let mut n = 0;
    for (ti, t) in tariffs().into_iter().enumerate() {
        for meter in ["home-1", "solar-1"] {
            for (p, (start, days)) in periods.iter().enumerate() {
                let d0 = psm_core::readings::parse_day(start).unwrap();
                n += 1;
                let resp = op
                    .bill(BillRequest {
                        idempotency_key: format!("bill-{n}"),
                        meter_id: meter.into(),
                        period: Some(TimeRange {
                            start_unix: d0 * 86_400,
                            end_unix: (d0 + days) * 86_400,
                        }),
                        tariff: Some(t.clone()),
                        // Keyshares release one bill per meter and period unless re-issued.
                        reissue_reason: if ti == 0 {
                            String::new()
                        } else {
                            format!("tariff comparison: {}", t.name)
                        },
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{} {meter} {start}: {e:?}", t.name))
                    .into_inner();
                let (band_wh, total) = reference(&t, &clear[&(meter.to_string(), p)], 900);
                let got: Vec<i64> = resp.lines.iter().map(|l| l.energy_wh).collect();
                assert_eq!(got, band_wh, "{} {meter} {start}", t.name);
                assert_eq!(resp.total, total, "{} {meter} {start}", t.name);
                assert_eq!(resp.standing_charge, 53 * days);
                if meter == "solar-1" {
                    assert!(
                        resp.lines.iter().any(|l| l.energy_wh < 0
                            && l.description.ends_with("export")
                            && l.amount < 0),
                        "{:?}",
                        resp.lines
                    );
                }
            }
        }
    }

    // Refusals: a tariff with a gap, an unknown zone, a missing day, demand charges, wrong role.
    let ok = |t: Tariff, start: i64, days: i64| BillRequest {
        idempotency_key: "bad".into(),
        meter_id: "home-1".into(),
        period: Some(TimeRange {
            start_unix: start * 86_400,
            end_unix: (start + days) * 86_400,
        }),
        tariff: Some(t),
        reissue_reason: String::new(),
    };
    let d0 = psm_core::readings::parse_day("2026-03-28").unwrap();
    let mut gap = tariffs()[1].clone();
    gap.bands.pop();
    let e = op.bill(ok(gap, d0, 3)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no band covers"), "{}", e.message());
    let mut zone = tariffs()[0].clone();
    zone.time_zone = "Europe/Atlantis".into();
    assert_eq!(
        op.bill(ok(zone, d0, 3)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let e = op.bill(ok(tariffs()[0].clone(), d0, 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("2026-03-31"), "{}", e.message());
    let mut demand = tariffs()[0].clone();
    demand.demand_rate_per_kw_milli = 5;
    assert_eq!(
        op.bill(ok(demand, d0, 3)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let mut meter =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Meter, "meter-0001"));
    assert_eq!(
        meter
            .bill(ok(tariffs()[0].clone(), d0, 3))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}
