//! The linear track (per-meter keys, public slot masks, one u128 body per interval), each figure
//! against a baseline measured in the same run:
//!
//! 1. storage of one meter-day at 15 minutes, against the previous track's 67 KB and plaintext;
//! 2. head-end encryption of N meter-days (interval masks per day shared by all meters, one key
//!    per meter, rayon over meters), against summing the same plaintext values;
//! 3. keyshare-side costs in-process (cohort key shares, mask sums, inner products), against a
//!    plaintext sum of the same cohort;
//! 4. end to end through real processes over mTLS (ingest, compute, three keyshares): Aggregate
//!    of M meters for a day, cold and warm, against a plaintext sum in this process; one
//!    meter-month bill; bills per second for B meters on one tariff.
//!
//! Sized by environment variables (defaults in brackets): PSM_BENCH_ENC_METERS [1000] and
//! PSM_BENCH_ENC_DAYS [10] (encryption), PSM_BENCH_METERS [1000] (aggregate cohort),
//! PSM_BENCH_BILLS [100] and PSM_BENCH_BILL_CONCURRENCY [8] (bill throughput), PSM_BENCH_WARM
//! [5] (warm repetitions); PSM_BENCH_LOGS=<dir> copies the services' logs there at the end.
//!
//! Run: cargo build --release --bins && cargo bench -p psm-e2e --bench linear (the services run
//! from the release binaries next to the bench executable).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use psm_core::linear::encrypt::IntervalMasks;
use psm_core::linear::key::{cohort_share_key, MeterKey, MeterSeeds, Seed};
use psm_core::linear::mask::{mask_sum, SlotRun};
use psm_core::linear::{dot, Channel, ENCODING, SLOTS_PER_DAY};
use psm_core::threshold::Scheme;
use psm_e2e::{enrollment_keys, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    AggregateRequest, BillRequest, EnrollRequest, ReadingBatch, Tariff, TariffBand, TimeRange,
};
use rand::RngCore;
use rayon::prelude::*;

/// 2026-01-01 (a Thursday; Europe/London is on UTC in January).
const FIRST_DAY: i64 = 20_454;
const EPOCH: u32 = 1;
/// 15-minute intervals.
const INTERVAL: u32 = 900;
const PER_DAY: usize = 96;
const SLOTS_PER_INTERVAL: u64 = 3;
const BILL_DAYS: i64 = 30;
/// The previous track's stored meter-day: one compact list of 96 readings, 4,192 u128 words
/// (BENCHMARKS.md, "Linear-track summation (issue 4)").
const PREVIOUS_METER_DAY_BYTES: usize = 4_192 * 16;
const POLICY: &str = "min_cohort = 5\nallow_any_program = true\nrate_limit_per_minute = 100000\nbilling_cycle = \"any\"\n";
/// Sequential warm meter-month bills (after the first, cold one).
const WARM_BILLS: usize = 5;

fn fmt_s(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.2} µs", s * 1e6)
    }
}

fn fmt_d(d: Duration) -> String {
    fmt_s(d.as_secs_f64())
}

fn fmt_n(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// /proc/loadavg's first three fields (other work on the machine skews every figure).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// A plain aligned text table (also valid Markdown).
struct Table {
    title: String,
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: &str, head: &[&str]) -> Self {
        Table {
            title: title.into(),
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: &[String]) {
        self.rows.push(cells.to_vec());
    }

    fn print(&self) {
        let n = self.head.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([self.head[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let w: Vec<usize> = (0..n).map(width).collect();
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, wi) in w.iter().enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                let pad = wi - c.chars().count();
                s.push(' ');
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
                s.push_str(" |");
            }
            s
        };
        println!("\n{}\n", self.title);
        println!("{}", line(&self.head));
        let mut sep = String::from("|");
        for wi in &w {
            sep.push_str(&"-".repeat(wi + 2));
            sep.push('|');
        }
        println!("{sep}");
        for r in &self.rows {
            println!("{}", line(r));
        }
    }
}

/// Import readings of a simulated household (the simulator reports net energy; solar export
/// goes on the other channel, so import is its positive part).
fn import_day(sim: &psm_meterdata::simulate::SimMeter, day: i64) -> Vec<i64> {
    sim.day(day, INTERVAL)
        .into_iter()
        .map(|v| v.max(0))
        .collect()
}

fn day_masks(day: i64) -> IntervalMasks {
    IntervalMasks::new(
        EPOCH,
        day as u64 * SLOTS_PER_DAY as u64,
        SLOTS_PER_INTERVAL,
        PER_DAY,
    )
}

/// Encrypts `values[m][d]` (day `first_day + d`) of every meter as a head-end does: the
/// interval masks of each day once for all meters, each meter's key once, rayon over meters.
/// Returns the batches and the core time spent on (keys, bodies + encoding).
fn encrypt_all(
    ids: &[&str],
    seeds: &[&MeterSeeds],
    masks: &[IntervalMasks],
    first_day: i64,
    values: &[Vec<Vec<i64>>],
) -> (Vec<ReadingBatch>, Duration, Duration) {
    let key_ns = AtomicU64::new(0);
    let body_ns = AtomicU64::new(0);
    let batches: Vec<ReadingBatch> = (0..ids.len())
        .into_par_iter()
        .flat_map_iter(|m| {
            let t = Instant::now();
            let key = seeds[m].key(Channel::Import);
            key_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let t = Instant::now();
            let out: Vec<ReadingBatch> = values[m]
                .iter()
                .enumerate()
                .map(|(d, v)| {
                    let bodies = masks[d].encrypt(&key, 0, v).expect("readings in range");
                    psm_core::wire::linear_batch_to_proto(
                        ids[m],
                        first_day + d as i64,
                        EPOCH,
                        Channel::Import,
                        INTERVAL,
                        0,
                        &bodies,
                    )
                })
                .collect();
            body_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            out
        })
        .collect();
    (
        batches,
        Duration::from_nanos(key_ns.into_inner()),
        Duration::from_nanos(body_ns.into_inner()),
    )
}

fn random_seeds(n: usize) -> Vec<Seed> {
    let mut rng = rand::rngs::OsRng;
    (0..n)
        .map(|_| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            Seed(s)
        })
        .collect()
}

fn bucket_runs(day: i64) -> Vec<SlotRun> {
    let s0 = day as u64 * SLOTS_PER_DAY as u64;
    (0..PER_DAY as u64)
        .map(|b| SlotRun {
            start: s0 + b * SLOTS_PER_INTERVAL,
            end: s0 + (b + 1) * SLOTS_PER_INTERVAL,
            weight: 1,
        })
        .collect()
}

/// Per-bucket plaintext sums of one day of every meter.
fn plain_buckets(values: &[Vec<i64>]) -> Vec<i64> {
    let mut sums = vec![0i64; PER_DAY];
    for v in values {
        for (s, x) in sums.iter_mut().zip(v) {
            *s += x;
        }
    }
    sums
}

/// Bytes under `dir` (recursively).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn two_band_tariff() -> Tariff {
    let band = |name: &str, s: u32, e: u32, imp: i64| TariffBand {
        name: name.into(),
        weekday_mask: 0x7F,
        start_hour: s,
        end_hour: e,
        import_price_milli: imp,
        export_price_milli: 15_000,
        month_mask: 0,
    };
    Tariff {
        name: "two-band".into(),
        time_zone: "Europe/London".into(),
        bands: vec![band("day", 7, 24, 27_500), band("night", 0, 7, 11_000)],
        standing_charge_per_day: 53,
        vat_basis_points: 500,
        currency: "GBP".into(),
        ..Default::default()
    }
}

/// The bill a plaintext system would compute from the same readings.
fn plain_bill(t: &psm_tariff::Tariff, month: &[Vec<i64>]) -> i64 {
    let mut band_wh = vec![0i64; t.bands.len()];
    for (d, values) in month.iter().enumerate() {
        let day0 = (FIRST_DAY + d as i64) * 86_400;
        for (j, v) in values.iter().enumerate() {
            band_wh[t.band_at(FIRST_DAY * 86_400, day0 + j as i64 * i64::from(INTERVAL))] += v;
        }
    }
    let start = FIRST_DAY * 86_400;
    psm_tariff::price(
        t,
        &band_wh,
        &[],
        (start, start + BILL_DAYS * 86_400),
        Vec::new(),
    )
    .total
}

fn bill_request(key: &str, meter: &str, tariff: &Tariff) -> BillRequest {
    BillRequest {
        idempotency_key: key.into(),
        meter_id: meter.into(),
        period: Some(TimeRange {
            start_unix: FIRST_DAY * 86_400,
            end_unix: (FIRST_DAY + BILL_DAYS) * 86_400,
        }),
        tariff: Some(tariff.clone()),
        reissue_reason: String::new(),
        epoch: EPOCH,
    }
}

#[tokio::main]
async fn main() {
    let enc_meters = psm_e2e::bench_size("PSM_BENCH_ENC_METERS", 1_000);
    let enc_days = psm_e2e::bench_size("PSM_BENCH_ENC_DAYS", 10);
    let agg_meters = psm_e2e::bench_size("PSM_BENCH_METERS", 1_000);
    let bills = psm_e2e::bench_size("PSM_BENCH_BILLS", 100);
    let concurrency = psm_e2e::bench_size("PSM_BENCH_BILL_CONCURRENCY", 8).max(1);
    let warm_reps = psm_e2e::bench_size("PSM_BENCH_WARM", 5).max(1);
    assert!(
        agg_meters >= 5,
        "PSM_BENCH_METERS must be at least the cohort minimum (5)"
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "command: PSM_BENCH_ENC_METERS={enc_meters} PSM_BENCH_ENC_DAYS={enc_days} PSM_BENCH_METERS={agg_meters} PSM_BENCH_BILLS={bills} PSM_BENCH_BILL_CONCURRENCY={concurrency} PSM_BENCH_WARM={warm_reps} cargo bench -p psm-e2e --bench linear"
    );
    println!(
        "machine: {cores} cores (std::thread::available_parallelism); rayon threads: {}",
        rayon::current_num_threads()
    );
    println!("load average at start: {}", loadavg());
    let scheme = Scheme::new(3, 2).expect("2-of-3");

    // ---------------------------------------------------------------- 2. head-end encryption
    let t = Instant::now();
    let enc_sims = psm_meterdata::simulate::town(enc_meters, 0, 11);
    let enc_values: Vec<Vec<Vec<i64>>> = enc_sims
        .par_iter()
        .map(|s| {
            (0..enc_days as i64)
                .map(|d| import_day(s, FIRST_DAY + d))
                .collect()
        })
        .collect();
    let enc_seeds: Vec<MeterSeeds> = (0..enc_meters)
        .map(|_| MeterSeeds::generate(scheme, EPOCH))
        .collect();
    let enc_ids: Vec<String> = (0..enc_meters).map(|i| format!("enc-{i:06}")).collect();
    eprintln!("encryption inputs prepared in {}", fmt_d(t.elapsed()));

    let t_all = Instant::now();
    let masks: Vec<IntervalMasks> = (0..enc_days as i64)
        .map(|d| day_masks(FIRST_DAY + d))
        .collect();
    let masks_t = t_all.elapsed();
    let ids: Vec<&str> = enc_ids.iter().map(String::as_str).collect();
    let seeds: Vec<&MeterSeeds> = enc_seeds.iter().collect();
    let (enc_batches, key_core, body_core) =
        encrypt_all(&ids, &seeds, &masks, FIRST_DAY, &enc_values);
    let enc_t = t_all.elapsed();
    drop(masks);
    let meter_days = enc_meters * enc_days;
    assert_eq!(enc_batches.len(), meter_days);
    let t = Instant::now();
    let plain_total: i64 = enc_values
        .par_iter()
        .map(|m| m.iter().map(|d| d.iter().sum::<i64>()).sum::<i64>())
        .sum();
    let plain_t = t.elapsed();
    std::hint::black_box(plain_total);

    // ---------------------------------------------------------------- 1. storage
    let one = &enc_batches[0];
    let ct_bytes = one.ciphertext.len();
    let encoded = one.encoded_len();
    let plain_bytes = PER_DAY * 8;
    let mut storage = Table::new(
        "Storage of one meter-day, 15-minute intervals (96 readings)",
        &["what", "bytes", "vs plaintext (96 × 8 B)"],
    );
    storage.row(&[
        "linear track: ReadingBatch ciphertext (96 u128 bodies)".into(),
        fmt_n(ct_bytes as f64),
        format!("{:.1}×", ct_bytes as f64 / plain_bytes as f64),
    ]);
    storage.row(&[
        format!(
            "linear track: whole ReadingBatch, protobuf-encoded (meter id {:?})",
            one.meter_id
        ),
        fmt_n(encoded as f64),
        format!("{:.1}×", encoded as f64 / plain_bytes as f64),
    ]);
    storage.row(&[
        "previous track (BENCHMARKS.md): compact list, 4,192 u128 words".into(),
        fmt_n(PREVIOUS_METER_DAY_BYTES as f64),
        format!(
            "{:.1}×",
            PREVIOUS_METER_DAY_BYTES as f64 / plain_bytes as f64
        ),
    ]);
    storage.row(&[
        "baseline: plaintext, 96 × 8-byte readings".into(),
        fmt_n(plain_bytes as f64),
        "1.0×".into(),
    ]);

    let mut enc = Table::new(
        &format!(
            "Head-end encryption of {} meter-days ({enc_meters} meters × {enc_days} days, 15-minute, all cores)",
            fmt_n(meter_days as f64)
        ),
        &["step", "time", "meter-days/s"],
    );
    enc.row(&[
        format!(
            "interval masks of the {enc_days} days (96 × 3 slot masks each, shared by all meters)"
        ),
        fmt_d(masks_t),
        String::new(),
    ]);
    enc.row(&[
        format!(
            "keys (once per meter) + bodies + ReadingBatch encoding; core time: keys {}, bodies {}",
            fmt_d(key_core),
            fmt_d(body_core)
        ),
        fmt_d(enc_t - masks_t),
        String::new(),
    ]);
    enc.row(&[
        "total (masks + keys + encryption)".into(),
        fmt_d(enc_t),
        fmt_n(meter_days as f64 / enc_t.as_secs_f64()),
    ]);
    enc.row(&[
        "per meter-day, core time (keys + bodies)".into(),
        fmt_s((key_core + body_core).as_secs_f64() / meter_days as f64),
        String::new(),
    ]);
    enc.row(&[
        "baseline: plaintext sum of the same values (all cores)".into(),
        fmt_d(plain_t),
        fmt_n(meter_days as f64 / plain_t.as_secs_f64().max(1e-9)),
    ]);
    drop(enc_batches);
    drop(enc_values);
    storage.print();
    enc.print();

    // ---------------------------------------------------------------- 3. keyshare side
    let mut ks = Table::new(
        "Keyshare-side costs in-process (one party holds 2 of the 3 shares in 2-of-3)",
        &["step", "time", "note"],
    );
    for n in [1_000usize, 100_000] {
        let seeds = random_seeds(n);
        let refs: Vec<&Seed> = seeds.iter().collect();
        let t = Instant::now();
        let k = cohort_share_key(&refs, Channel::Import);
        let d = t.elapsed();
        std::hint::black_box(&k);
        let gb = n as f64 * 65_536.0 / 1e9;
        ks.row(&[
            format!(
                "cohort key share of {} seeds (cohort_share_key, all cores)",
                fmt_n(n as f64)
            ),
            fmt_d(d),
            format!("{:.2} GB/s of PRG output", gb / d.as_secs_f64()),
        ]);
        // Baseline: the plaintext a non-private system sums for that cohort's day.
        let plain: Vec<i64> = (0..n * PER_DAY).map(|i| (i % 977) as i64).collect();
        let t = Instant::now();
        let mut sums = [0i64; PER_DAY];
        for c in plain.chunks_exact(PER_DAY) {
            for (s, x) in sums.iter_mut().zip(c) {
                *s += x;
            }
        }
        let pd = t.elapsed();
        std::hint::black_box(sums);
        ks.row(&[
            format!(
                "baseline: plaintext 96-bucket sum of {} meter-days",
                fmt_n(n as f64)
            ),
            fmt_d(pd),
            String::new(),
        ]);
    }
    let runs = bucket_runs(FIRST_DAY);
    let t = Instant::now();
    let day_masks_seq: Vec<Vec<u128>> = runs
        .iter()
        .map(|r| mask_sum(EPOCH, std::slice::from_ref(r)))
        .collect();
    let mask_seq = t.elapsed();
    let t = Instant::now();
    let day_masks_par: Vec<Vec<u128>> = runs
        .par_iter()
        .map(|r| mask_sum(EPOCH, std::slice::from_ref(r)))
        .collect();
    let mask_par = t.elapsed();
    assert_eq!(day_masks_seq, day_masks_par);
    ks.row(&[
        "mask sums of a day's 96 buckets, one mask_sum per bucket in turn (as keyshare-svc does)"
            .into(),
        fmt_d(mask_seq),
        "288 slot masks, 18 MB of XOF".into(),
    ]);
    ks.row(&[
        "the same 96 mask sums, buckets in parallel (par_iter)".into(),
        fmt_d(mask_par),
        String::new(),
    ]);
    let key_a = cohort_share_key(
        &random_seeds(64).iter().collect::<Vec<_>>(),
        Channel::Import,
    );
    let key_b = cohort_share_key(
        &random_seeds(64).iter().collect::<Vec<_>>(),
        Channel::Import,
    );
    let t = Instant::now();
    let mut acc = 0u128;
    for _ in 0..10 {
        for m in &day_masks_seq {
            acc = acc
                .wrapping_add(dot(m, &key_a.0))
                .wrapping_add(dot(m, &key_b.0));
        }
    }
    let dots = t.elapsed() / 10;
    std::hint::black_box(acc);
    ks.row(&[
        "inner products of a day: 96 outputs × 2 shares, 4,096 u128 each (one core)".into(),
        fmt_d(dots),
        format!("{} per inner product", fmt_s(dots.as_secs_f64() / 192.0)),
    ]);

    ks.print();

    // ---------------------------------------------------------------- 4. end to end
    let pki = TestPki::new("psm.bench");
    let keys = psm_e2e::keys::key_set(3, 2);
    let t = Instant::now();
    let sys = System::start_with_policy(&pki, &keys, "", POLICY).await;
    eprintln!("system started in {}", fmt_d(t.elapsed()));
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;

    let bill_meters = bills + 1 + WARM_BILLS;
    let t = Instant::now();
    let sims = psm_meterdata::simulate::town(agg_meters + bill_meters, 0, 7);
    let agg: Vec<TestMeter> = (0..agg_meters)
        .map(|i| TestMeter::new(&format!("agg-{i:06}"), EPOCH))
        .collect();
    let billed: Vec<TestMeter> = (0..bill_meters)
        .map(|i| TestMeter::new(&format!("bill-{i:06}"), EPOCH))
        .collect();
    let agg_values: Vec<Vec<Vec<i64>>> = sims[..agg_meters]
        .par_iter()
        .map(|s| vec![import_day(s, FIRST_DAY)])
        .collect();
    let bill_values: Vec<Vec<Vec<i64>>> = sims[agg_meters..]
        .par_iter()
        .map(|s| {
            (0..BILL_DAYS)
                .map(|d| import_day(s, FIRST_DAY + d))
                .collect()
        })
        .collect();
    eprintln!("e2e inputs prepared in {}", fmt_d(t.elapsed()));
    let all: Vec<&TestMeter> = agg.iter().chain(&billed).collect();

    // Enrollment (one-off): seal here on every core, send, wait for every keyshare to decide.
    eprintln!("enrolling {} meters", all.len());
    let t = Instant::now();
    let enrollments: Vec<psm_proto::v1::Enrollment> =
        all.par_iter().map(|m| m.enrollment(&ekeys)).collect();
    let seal_t = t.elapsed();
    let enrollment_bytes = enrollments[0].encoded_len();
    let mut ingest_he =
        IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"))
            .max_encoding_message_size(64 << 20);
    let t = Instant::now();
    let mut stored = 0u32;
    for (i, chunk) in enrollments.chunks(500).enumerate() {
        stored += ingest_he
            .enroll(EnrollRequest {
                idempotency_key: format!("bench-enroll-{i}"),
                enrollments: chunk.to_vec(),
            })
            .await
            .expect("enroll")
            .into_inner()
            .stored;
    }
    let enroll_rpc_t = t.elapsed();
    assert_eq!(stored as usize, all.len());
    drop(enrollments);
    let t = Instant::now();
    let ids: Vec<String> = all.iter().map(|m| m.id.clone()).collect();
    psm_e2e::wait_active(&pki, &sys.keyshares, &ids, EPOCH, Duration::from_secs(3600)).await;
    let sync_t = t.elapsed();

    // Readings (one-off): encrypt and submit.
    eprintln!(
        "enrollments decided by all keyshares after {}; encrypting and submitting",
        fmt_d(sync_t)
    );
    let t = Instant::now();
    let masks: Vec<IntervalMasks> = (0..BILL_DAYS).map(|d| day_masks(FIRST_DAY + d)).collect();
    let e2e_masks_t = t.elapsed();
    let t = Instant::now();
    let a_ids: Vec<&str> = agg.iter().map(|m| m.id.as_str()).collect();
    let a_seeds: Vec<&MeterSeeds> = agg.iter().map(|m| &m.seeds).collect();
    let (agg_batches, _, _) = encrypt_all(&a_ids, &a_seeds, &masks[..1], FIRST_DAY, &agg_values);
    let agg_enc_t = t.elapsed();
    let t = Instant::now();
    let b_ids: Vec<&str> = billed.iter().map(|m| m.id.as_str()).collect();
    let b_seeds: Vec<&MeterSeeds> = billed.iter().map(|m| &m.seeds).collect();
    let (bill_batches, _, _) = encrypt_all(&b_ids, &b_seeds, &masks, FIRST_DAY, &bill_values);
    let bill_enc_t = t.elapsed();
    drop(masks);
    let ingest_dir = pki.dir.path().join("ingest-data");
    let disk_before = dir_bytes(&ingest_dir);
    let t = Instant::now();
    let r = psm_e2e::submit(&pki, &sys.ingest, agg_batches.clone())
        .await
        .expect("submit aggregate day");
    let agg_submit_t = t.elapsed();
    assert_eq!(r.stored as usize, agg_meters);
    let t = Instant::now();
    let r = psm_e2e::submit(&pki, &sys.ingest, bill_batches)
        .await
        .expect("submit bill months");
    let bill_submit_t = t.elapsed();
    assert_eq!(r.stored as usize, bill_meters * BILL_DAYS as usize);
    let disk_after = dir_bytes(&ingest_dir);
    let stored_days = agg_meters + bill_meters * BILL_DAYS as usize;

    // Baselines in this process: the plaintext sum, compute's own summation, and the release's
    // cryptography as one keyshare computes it (no network, no policy, no ledger).
    let day_vals: Vec<Vec<i64>> = agg_values.iter().map(|m| m[0].clone()).collect();
    let t = Instant::now();
    let want = plain_buckets(&day_vals);
    let plain_agg_t = t.elapsed();
    let s0 = FIRST_DAY as u64 * SLOTS_PER_DAY as u64;
    // compute's arithmetic: check every batch (shape, BLAKE3) on every core and add its bodies
    // into the day's 96 buckets (wrapping u128).
    let t = Instant::now();
    let sums: Vec<u128> = agg_batches
        .par_iter()
        .fold(
            || vec![0u128; PER_DAY],
            |mut acc, b| {
                let lb = psm_core::wire::linear_batch(b).expect("valid batch");
                for (s, body) in lb.intervals() {
                    let k = ((s - s0) / SLOTS_PER_INTERVAL) as usize;
                    acc[k] = acc[k].wrapping_add(body);
                }
                acc
            },
        )
        .reduce(
            || vec![0u128; PER_DAY],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x = x.wrapping_add(*y);
                }
                a
            },
        );
    let sum_t = t.elapsed();
    let held = scheme.held_by(0);
    let t = Instant::now();
    let share_keys: Vec<MeterKey> = held
        .iter()
        .map(|u| {
            let refs: Vec<&Seed> = agg.iter().map(|m| &m.seeds.seeds[*u]).collect();
            cohort_share_key(&refs, Channel::Import)
        })
        .collect();
    let party_keys_t = t.elapsed();
    let t = Instant::now();
    let party_masks: Vec<Vec<u128>> = runs
        .iter()
        .map(|r| mask_sum(EPOCH, std::slice::from_ref(r)))
        .collect();
    let party_masks_t = t.elapsed();
    let t = Instant::now();
    let mut party_d = vec![0u128; PER_DAY];
    for k in &share_keys {
        for (d, m) in party_d.iter_mut().zip(&party_masks) {
            *d = d.wrapping_add(dot(m, &k.0));
        }
    }
    let party_dots_t = t.elapsed();
    // The third share (held by the other parties) completes an in-process decryption.
    let missing: Vec<usize> = (0..scheme.share_count())
        .filter(|u| !held.contains(u))
        .collect();
    for u in missing {
        let refs: Vec<&Seed> = agg.iter().map(|m| &m.seeds.seeds[u]).collect();
        let k = cohort_share_key(&refs, Channel::Import);
        for (d, m) in party_d.iter_mut().zip(&party_masks) {
            *d = d.wrapping_add(dot(m, &k.0));
        }
    }
    let in_process: Vec<i64> = sums
        .iter()
        .zip(&party_d)
        .map(|(s, d)| ENCODING.decode(s.wrapping_sub(*d)) as i64)
        .collect();
    assert_eq!(
        in_process, want,
        "in-process decryption equals the plaintext sum"
    );
    drop((share_keys, party_masks, agg_batches));

    // Aggregate through the system.
    eprintln!("aggregating");
    let op = ComputeClient::new(pki.channel_with_timeout(
        sys.compute.port,
        "compute",
        Role::Operator,
        "billing",
        Duration::from_secs(1800),
    ))
    .max_encoding_message_size(64 << 20)
    .max_decoding_message_size(64 << 20);
    let agg_req = |key: &str| AggregateRequest {
        idempotency_key: key.into(),
        meter_ids: agg.iter().map(|m| m.id.clone()).collect(),
        range: Some(TimeRange {
            start_unix: FIRST_DAY * 86_400,
            end_unix: (FIRST_DAY + 1) * 86_400,
        }),
        granularity_seconds: INTERVAL,
        epoch: EPOCH,
        channel: psm_proto::v1::Channel::Import as i32,
    };
    let request_bytes = agg_req("agg-cold").encoded_len();
    let t = Instant::now();
    let cold = op
        .clone()
        .aggregate(agg_req("agg-cold"))
        .await
        .expect("cold aggregate")
        .into_inner();
    let cold_t = t.elapsed();
    assert_eq!(
        cold.energy_wh, want,
        "cold aggregate equals the plaintext sum"
    );
    let used = cold.quorum.as_ref().map_or(0, |q| q.used.len());
    let mut warm = Vec::new();
    for i in 0..warm_reps {
        let t = Instant::now();
        let r = op
            .clone()
            .aggregate(agg_req(&format!("agg-warm-{i}")))
            .await
            .expect("warm aggregate")
            .into_inner();
        warm.push(t.elapsed());
        assert_eq!(r.energy_wh, want, "warm aggregate equals the plaintext sum");
    }
    let warm_min = *warm.iter().min().unwrap();
    let warm_med = median(warm);
    // The keyshares' part alone: the same release asked for directly with compute's
    // certificate (ThresholdDecryptor, as compute-svc does), from the body sums computed above.
    let dec = psm_e2e::decryptor(&pki, &keys, &sys.keyshares, Duration::from_millis(300));
    let release = psm_proto::v1::LinearRelease {
        kind: psm_proto::v1::ComputationKind::Aggregate as i32,
        epoch: EPOCH,
        channel: psm_proto::v1::Channel::Import as i32,
        program: psm_proto::v1::AggregateProgram {
            granularity_seconds: INTERVAL,
        }
        .encode_to_vec(),
        range: agg_req("").range,
        cohorts: vec![psm_proto::v1::Cohort {
            meter_ids: agg.iter().map(|m| m.id.clone()).collect(),
        }],
        outputs: (0..PER_DAY as u32)
            .map(|index| psm_proto::v1::ReleaseOutput { index, cohort: 0 })
            .collect(),
        reissue_reason: String::new(),
    };
    let mut direct = Vec::new();
    for i in 0..warm_reps {
        let t = Instant::now();
        let r = dec
            .release(release.clone(), &sums, &format!("direct-release-{i}"))
            .await
            .expect("direct release");
        direct.push(t.elapsed());
        let got: Vec<i64> = r.values.iter().map(|v| *v as i64).collect();
        assert_eq!(got, want, "a direct release equals the plaintext sum");
    }
    let direct_med = median(direct);

    let mut e2e = Table::new(
        &format!(
            "End to end over mTLS (ingest, compute, 3 keyshare processes on this machine): Aggregate of {} meters for one day, 15-minute buckets",
            fmt_n(agg_meters as f64)
        ),
        &["step", "time", "note"],
    );
    e2e.row(&[
        format!(
            "one-off: seal {} enrollments in the bench process (all cores)",
            fmt_n(all.len() as f64)
        ),
        fmt_d(seal_t),
        format!(
            "{} B per enrollment (3 seeds × 2 holders, X-Wing)",
            fmt_n(enrollment_bytes as f64)
        ),
    ]);
    e2e.row(&[
        "one-off: Ingest.Enroll, requests of 500".into(),
        fmt_d(enroll_rpc_t),
        format!(
            "{} meters/s",
            fmt_n(all.len() as f64 / enroll_rpc_t.as_secs_f64())
        ),
    ]);
    e2e.row(&[
        "one-off: until all 3 keyshares fetched, opened, stored, audited and confirmed them with each other (receipts)".into(),
        fmt_d(sync_t),
        "GetReceipts triggers the sync".into(),
    ]);
    e2e.row(&[
        format!("one-off: interval masks of the {BILL_DAYS} days used below (all cores)"),
        fmt_d(e2e_masks_t),
        String::new(),
    ]);
    e2e.row(&[
        format!(
            "one-off: encrypt the day of the {} meters (all cores)",
            fmt_n(agg_meters as f64)
        ),
        fmt_d(agg_enc_t),
        String::new(),
    ]);
    e2e.row(&[
        format!(
            "one-off: SubmitReadings of {} meter-days, requests of 1,000",
            fmt_n(agg_meters as f64)
        ),
        fmt_d(agg_submit_t),
        format!(
            "{} meter-days/s",
            fmt_n(agg_meters as f64 / agg_submit_t.as_secs_f64())
        ),
    ]);
    e2e.row(&[
        format!(
            "ingest's data directory (sled) grew by {} B per meter-day stored",
            fmt_n(disk_after.saturating_sub(disk_before) as f64 / stored_days as f64)
        ),
        String::new(),
        format!(
            "{} → {} bytes over {} meter-days (aggregate and bill readings; sled allocates in segments)",
            fmt_n(disk_before as f64),
            fmt_n(disk_after as f64),
            fmt_n(stored_days as f64)
        ),
    ]);
    e2e.row(&[
        "Aggregate, cold (first request: keyshares build cohort keys and mask sums)".into(),
        fmt_d(cold_t),
        format!(
            "request {} B; {used} keyshares' answers combined",
            fmt_n(request_bytes as f64)
        ),
    ]);
    e2e.row(&[
        format!("Aggregate, warm (same cohort, new idempotency key), median of {warm_reps}"),
        fmt_d(warm_med),
        format!("min {}", fmt_d(warm_min)),
    ]);
    e2e.row(&[
        format!("of which the keyshares: the same release asked for directly (Keyshare.Release via ThresholdDecryptor, 3 keyshares), warm, median of {warm_reps}"),
        fmt_d(direct_med),
        "the rest of a warm Aggregate is compute streaming and checking the batches from ingest".into(),
    ]);
    e2e.row(&[
        "in-process: compute's arithmetic (check every batch, add bodies into 96 buckets, all cores)".into(),
        fmt_d(sum_t),
        String::new(),
    ]);
    e2e.row(&[
        "in-process: one keyshare's release, cold (2 cohort key shares + 96 mask sums + 192 inner products)".into(),
        fmt_d(party_keys_t + party_masks_t + party_dots_t),
        format!(
            "keys {}, masks {}, inner products {}",
            fmt_d(party_keys_t),
            fmt_d(party_masks_t),
            fmt_d(party_dots_t)
        ),
    ]);
    e2e.row(&[
        "in-process: one keyshare's release, warm (192 inner products)".into(),
        fmt_d(party_dots_t),
        String::new(),
    ]);
    e2e.row(&[
        "baseline: plaintext 96-bucket sum of the same readings in this process".into(),
        fmt_d(plain_agg_t),
        String::new(),
    ]);

    e2e.print();

    // Bills.
    eprintln!("billing");
    let tariff = two_band_tariff();
    let core_tariff = psm_tariff::from_proto(&tariff).expect("tariff");
    let t = Instant::now();
    let plain_totals: Vec<i64> = bill_values
        .iter()
        .map(|m| plain_bill(&core_tariff, m))
        .collect();
    let plain_bills_t = t.elapsed();
    let t = Instant::now();
    let first = op
        .clone()
        .bill(bill_request("bill-cold", &billed[0].id, &tariff))
        .await
        .expect("cold bill")
        .into_inner();
    let bill_cold_t = t.elapsed();
    assert_eq!(
        first.total, plain_totals[0],
        "bill equals the plaintext bill"
    );
    let mut warm_bills = Vec::new();
    for i in 1..=WARM_BILLS {
        let t = Instant::now();
        let b = op
            .clone()
            .bill(bill_request(
                &format!("bill-warm-{i}"),
                &billed[i].id,
                &tariff,
            ))
            .await
            .expect("warm bill")
            .into_inner();
        warm_bills.push(t.elapsed());
        assert_eq!(b.total, plain_totals[i], "bill equals the plaintext bill");
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    let t = Instant::now();
    for i in (1 + WARM_BILLS)..bill_meters {
        let (sem, mut op) = (sem.clone(), op.clone());
        let req = bill_request(&format!("bill-{i}"), &billed[i].id, &tariff);
        let want = plain_totals[i];
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let t = Instant::now();
            let b = op.bill(req).await.expect("bill").into_inner();
            assert_eq!(b.total, want, "bill equals the plaintext bill");
            t.elapsed()
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = set.join_next().await {
        lat.push(r.expect("bill task"));
    }
    let bills_t = t.elapsed();

    let mut bt = Table::new(
        "End to end over mTLS: bills (30 days × 96 intervals of one meter, two-band tariff in Europe/London)",
        &["step", "time", "note"],
    );
    bt.row(&[
        format!(
            "one-off: encrypt {} meter-months (all cores)",
            fmt_n(bill_meters as f64)
        ),
        fmt_d(bill_enc_t),
        String::new(),
    ]);
    bt.row(&[
        format!(
            "one-off: SubmitReadings of {} meter-days",
            fmt_n((bill_meters as i64 * BILL_DAYS) as f64)
        ),
        fmt_d(bill_submit_t),
        String::new(),
    ]);
    bt.row(&[
        "meter-month bill, cold (first bill of this period: keyshares derive the bands' mask sums)"
            .into(),
        fmt_d(bill_cold_t),
        String::new(),
    ]);
    bt.row(&[
        format!("meter-month bill, warm (other meters, same period), median of {WARM_BILLS}"),
        fmt_d(median(warm_bills)),
        String::new(),
    ]);
    bt.row(&[
        format!("{bills} bills, one per meter, {concurrency} at a time"),
        fmt_d(bills_t),
        format!(
            "{:.1} bills/s; latency median {}, p90 {}",
            bills as f64 / bills_t.as_secs_f64(),
            fmt_d(median(lat.clone())),
            fmt_d(pct(lat, 90))
        ),
    ]);
    bt.row(&[
        format!(
            "baseline: price the same {} meter-months from clear readings in-process",
            fmt_n(bill_meters as f64)
        ),
        fmt_d(plain_bills_t),
        format!(
            "{} per bill; {} bills/s",
            fmt_s(plain_bills_t.as_secs_f64() / bill_meters as f64),
            fmt_n(bill_meters as f64 / plain_bills_t.as_secs_f64())
        ),
    ]);

    bt.print();
    println!("\nload average at end: {}", loadavg());
    if let Ok(dir) = std::env::var("PSM_BENCH_LOGS") {
        std::fs::create_dir_all(&dir).expect("log dir");
        for p in sys.keyshares.iter().chain([&sys.ingest, &sys.compute]) {
            std::fs::write(format!("{dir}/{}.log", p.name), p.log_text()).expect("copy log");
        }
    }
    println!(
        "\ncommand: PSM_BENCH_ENC_METERS={enc_meters} PSM_BENCH_ENC_DAYS={enc_days} PSM_BENCH_METERS={agg_meters} PSM_BENCH_BILLS={bills} PSM_BENCH_BILL_CONCURRENCY={concurrency} PSM_BENCH_WARM={warm_reps} cargo bench -p psm-e2e --bench linear"
    );
}
