//! Linear track end to end: durable ingest rate over mTLS (against the same batches put into a
//! sled store in-process, same run) and a meter-month bill through three keyshares (against
//! pricing the same clear readings in-process).
//!
//! Run: cargo build --release --bins && cargo bench -p psm-e2e --bench linear

use std::time::Instant;

use psm_e2e::{linear_batch, System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{BillRequest, SubmitReadingsRequest, Tariff, TariffBand, TimeRange};
use rayon::prelude::*;

const METER_DAYS: usize = 600;
const FIRST_DAY: i64 = 20_454; // 2026-01-01

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pki = TestPki::new("psm.bench");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start(&pki, &keys, "").await;
    let lpk = psm_core::ceremony::PublicBundle::open(&keys.public_dir)
        .unwrap()
        .linear_public_key()
        .unwrap();
    let kid = keys.manifest.linear_key_id.clone();
    let town = psm_core::simulate::town(20, 0, 3);
    let jobs: Vec<(usize, i64)> = (0..METER_DAYS)
        .map(|i| (i % 20, FIRST_DAY + (i / 20) as i64))
        .collect();
    let t = Instant::now();
    let batches: Vec<_> = jobs
        .par_iter()
        .map(|(m, d)| {
            linear_batch(
                &lpk,
                &kid,
                &town[*m].id,
                &psm_core::readings::format_day(*d),
                900,
                &town[*m].day(*d, 900),
            )
        })
        .collect();
    let encrypt_s = t.elapsed().as_secs_f64();

    // Baseline: the same batches into a sled store in-process (validation and network excluded).
    let dir = tempfile::tempdir().unwrap();
    let store = ingest_svc::store::SledStore::open(dir.path()).unwrap();
    let t = Instant::now();
    for chunk in batches.chunks(100) {
        ingest_svc::store::ReadingStore::put_all(&store, chunk).unwrap();
    }
    let local_s = t.elapsed().as_secs_f64();

    let mut headend =
        IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"));
    let t = Instant::now();
    for (n, chunk) in batches.chunks(100).enumerate() {
        headend
            .submit_readings(SubmitReadingsRequest {
                idempotency_key: format!("b{n}"),
                batches: chunk.to_vec(),
            })
            .await
            .unwrap();
    }
    let remote_s = t.elapsed().as_secs_f64();
    println!("| ingest {METER_DAYS} meter-days in requests of 100 | meter-days/s |");
    println!("|---|---|");
    println!(
        "| encrypting them (both cores, not part of ingest) | {:.0} |",
        METER_DAYS as f64 / encrypt_s
    );
    println!(
        "| sled put_all + flush in-process (baseline) | {:.0} |",
        METER_DAYS as f64 / local_s
    );
    println!(
        "| SubmitReadings over mTLS, validated and durable | {:.0} |",
        METER_DAYS as f64 / remote_s
    );

    // One meter-month (30 days) bill, time-of-use, through three keyshares.
    let band = |name: &str, mask: u32, s: u32, e: u32, imp: i64| TariffBand {
        name: name.into(),
        weekday_mask: mask,
        start_hour: s,
        end_hour: e,
        import_price_milli: imp,
        export_price_milli: 15_000,
    };
    let tariff = Tariff {
        name: "tou".into(),
        time_zone: "Europe/London".into(),
        bands: vec![
            band("peak", 0x1F, 16, 19, 42_000),
            band("day", 0x1F, 7, 16, 27_500),
            band("evening", 0x1F, 19, 24, 27_500),
            band("weekend", 0x60, 7, 24, 24_000),
            band("night", 0x7F, 0, 7, 11_000),
        ],
        standing_charge_per_day: 53,
        vat_basis_points: 500,
        currency: "GBP".into(),
        ..Default::default()
    };
    let meter = &town[0];
    let clear: Vec<(i64, Vec<i64>)> = (0..30)
        .map(|d| (FIRST_DAY + d, meter.day(FIRST_DAY + d, 900)))
        .collect();
    let core_tariff = psm_core::wire::tariff_from_proto(&tariff).unwrap();
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let mut fhe = Vec::new();
    let mut plain = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let b = op
            .bill(BillRequest {
                idempotency_key: format!("month-{i}"),
                meter_id: meter.id.clone(),
                period: Some(TimeRange {
                    start_unix: FIRST_DAY * 86_400,
                    end_unix: (FIRST_DAY + 30) * 86_400,
                }),
                tariff: Some(tariff.clone()),
                reissue_reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        fhe.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut band_wh = vec![0i64; 5];
        for (day, values) in &clear {
            for (j, v) in values.iter().enumerate() {
                band_wh[core_tariff.band_at(day * 86_400 + j as i64 * 900)] += v;
            }
        }
        let p = psm_core::tariff::price(&core_tariff, &band_wh, 30, Vec::new());
        plain.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(p.total, b.total);
    }
    fhe.sort_by(f64::total_cmp);
    plain.sort_by(f64::total_cmp);
    println!("\n| meter-month bill (30 days × 96 intervals, 5 bands) | median (ms) |\n|---|---|");
    println!(
        "| clear readings priced in-process (baseline) | {:.3} |",
        plain[5]
    );
    println!("| Bill over mTLS: stream 30 meter-days, per-band sums on ciphertexts, 3 keyshares | {:.1} |", fhe[5]);
}
