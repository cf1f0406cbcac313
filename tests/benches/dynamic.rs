//! A dynamic-price meter-month bill end to end (issue 14), against the plaintext computation and
//! the same meter-month under a two-band time-of-use tariff, in the same run: PSM_BENCH_METERS
//! [10] meters × 31 days of 15-minute readings, half-hourly prices (Agile-like) in a tariff file
//! the keyshares allow with an approval date; real processes over mTLS.
//!
//! Run: cargo bench -p psm-e2e --bench dynamic

use std::time::{Duration, Instant};

use psm_core::linear::Channel;
use psm_e2e::{enroll, enrollment_keys, submit, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{BillRequest, TimeRange};

/// 2026-01-01, a Thursday.
const FIRST_DAY: i64 = 20_454;
const DAYS: i64 = 31;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wh(meter: usize, slot: i64) -> i64 {
    ((meter as i64 * 131 + slot * 977) % 400).abs()
}

#[tokio::main]
async fn main() {
    let meters = psm_e2e::bench_size("PSM_BENCH_METERS", 10).max(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let (start, end) = (FIRST_DAY * 86_400, (FIRST_DAY + DAYS) * 86_400);
    let prices: Vec<(i64, i64)> = (0..DAYS * 48)
        .map(|k| (start + k * 1800, 12_000 + (k % 48) / 2 * 500))
        .collect();
    let mut csv = String::from("start,price\n");
    for (s, p) in &prices {
        csv.push_str(&format!("{s},{}.{:03}\n", p / 1000, p % 1000));
    }
    std::fs::write(dir.path().join("agile.csv"), csv).expect("prices");
    let head = "time_zone = \"UTC\"\ncurrency = \"GBP\"\nstanding_charge_per_day = 48\n";
    let band = "[[band]]\nname = \"day\"\ndays = [\"all\"]\nhours = [7, 24]\nimport_price = 27.5\nexport_price = 15\n[[band]]\nname = \"night\"\ndays = [\"all\"]\nhours = [0, 7]\nimport_price = 11\nexport_price = 15\n";
    let dynamic = dir.path().join("agile.toml");
    std::fs::write(
        &dynamic,
        format!("name = \"agile\"\n{head}import_prices = \"agile.csv\"\n{band}"),
    )
    .expect("tariff");
    let tou = dir.path().join("tou.toml");
    std::fs::write(&tou, format!("name = \"two-band\"\n{head}{band}")).expect("tariff");
    let dynamic_t = psm_tariff::file::load(&dynamic).expect("dynamic tariff");
    let tou_t = psm_tariff::file::load(&tou).expect("tou tariff");

    let pki = TestPki::new("psm.bench");
    let keys = psm_e2e::keys::key_set(3, 2);
    let policy = format!(
        "rate_limit_per_minute = 100000\nallowed_tariffs = [{{ file = {dynamic:?}, approved = \"2025-12-01T00:00:00Z\" }}, {tou:?}]\n"
    );
    let sys = System::start_with_policy(&pki, &keys, "", &policy).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    let ms: Vec<TestMeter> = (0..meters)
        .map(|i| TestMeter::new(&format!("dyn-{i:04}"), 1))
        .collect();
    enroll(&pki, &sys.ingest, &ms.iter().collect::<Vec<_>>(), &ekeys)
        .await
        .expect("enroll");
    let mut batches = Vec::new();
    for (i, m) in ms.iter().enumerate() {
        for d in 0..DAYS {
            let values: Vec<i64> = (0..96).map(|k| wh(i, d * 96 + k)).collect();
            batches.push(m.batch(FIRST_DAY + d, Channel::Import, 900, 0, &values));
        }
    }
    for chunk in batches.chunks(900) {
        submit(&pki, &sys.ingest, chunk.to_vec())
            .await
            .expect("submit");
    }
    let op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let request = |key: String, meter: &str, t: &psm_tariff::file::Checked| BillRequest {
        idempotency_key: key,
        meter_id: meter.into(),
        period: Some(TimeRange {
            start_unix: start,
            end_unix: end,
        }),
        tariff: Some(t.wire.clone()),
        reissue_reason: String::new(),
        epoch: 1,
    };

    // Plaintext: Σ price × Wh per meter, priced as a bill.
    let price_at = |s: i64| prices[((s - start) / 1800) as usize].1;
    let t = Instant::now();
    let plain: Vec<i64> = (0..meters)
        .map(|i| {
            let weighted: i128 = (0..DAYS * 96)
                .map(|k| i128::from(price_at(start + k * 900)) * i128::from(wh(i, k)))
                .sum();
            psm_tariff::price(
                &dynamic_t.tariff,
                &[],
                &[],
                (start, end),
                vec![psm_tariff::dynamic_import_line(
                    weighted,
                    (DAYS * 48) as usize,
                )],
            )
            .total
        })
        .collect();
    let plain_t = t.elapsed() / meters as u32;

    let mut times = Vec::new();
    let mut tou_times = Vec::new();
    // The time-of-use bills use the meters' import channel too: one meter each, so that no
    // meter is billed twice for the month.
    let half = meters / 2;
    for (i, m) in ms.iter().enumerate() {
        let mut c = op.clone();
        let t = Instant::now();
        if i < half {
            let b = c
                .bill(request(format!("dyn-{i}"), &m.id, &dynamic_t))
                .await
                .expect("dynamic bill")
                .into_inner();
            times.push(t.elapsed());
            assert_eq!(
                b.total, plain[i],
                "the dynamic bill equals the plaintext one"
            );
        } else {
            c.bill(request(format!("tou-{i}"), &m.id, &tou_t))
                .await
                .expect("tou bill");
            tou_times.push(t.elapsed());
        }
    }
    println!("dynamic-price meter-month bill, 31 days × 96 readings, 1,488 half-hourly prices in 24 levels (January 2026, the meters' billing cycle)");
    println!("| | time |\n|---|---|");
    println!(
        "| first dynamic bill of the period (cold) | {:.1} ms |",
        times[0].as_secs_f64() * 1e3
    );
    println!(
        "| dynamic bills after it, median of {} | {:.1} ms |",
        times.len() - 1,
        median(times[1..].to_vec()).as_secs_f64() * 1e3
    );
    println!(
        "| first two-band bill of the period (cold) | {:.1} ms |",
        tou_times[0].as_secs_f64() * 1e3
    );
    println!(
        "| two-band bills after it, median of {} | {:.1} ms |",
        tou_times.len() - 1,
        median(tou_times[1..].to_vec()).as_secs_f64() * 1e3
    );
    println!(
        "| baseline: plaintext Σ price × Wh and pricing, per meter | {:.3} ms |",
        plain_t.as_secs_f64() * 1e3
    );
}
