//! What the trust anchors cost (docs/trust-anchors.md), each against the same work without
//! co-holder confirmation, measured in the same run:
//!
//! 1. enrollment of N meters (device-signed, registry-checked) until every keyshare has activated
//!    them — each keyshare's fetch, open, check and store plus the keyshare-to-keyshare
//!    confirmations — against one keyshare's fetch, open, check and store of the same N from the
//!    same ingest, in this process, with no confirmation;
//! 2. a linear Release of an M-meter aggregate (one day, 96 buckets) at keyshare-1 as compute:
//!    confirmed by both co-holders, against the same release answered without them (co-holders
//!    stopped: keyshare-1 answers alone and records it) and the same admit, record and
//!    contributions in this process (no RPC at all); and what one ConfirmRelease costs at a
//!    co-holder.
//!
//! Sized by PSM_BENCH_ENROLL_METERS [10000], PSM_BENCH_METERS [1000] and PSM_BENCH_REPEATS [10].
//! Run: cargo build --release --bins && cargo bench -p psm-e2e --bench trust

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use psm_e2e::{registry_entry, Proc, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    confirm_release_request, AggregateProgram, Cohort, ComputationKind, ConfirmReleaseRequest,
    EnrollRequest, LinearRelease, ReleaseOutput, ReleaseRequest, TimeRange,
};
use rayon::prelude::*;

const FIRST_DAY: i64 = 20_454;
const POLICY: &str = "min_cohort = 5\nallow_any_program = true\nrate_limit_per_minute = 1000000\nbilling_cycle = \"any\"\n";

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn release(ids: &[String], day: i64) -> LinearRelease {
    LinearRelease {
        kind: ComputationKind::Aggregate as i32,
        epoch: 1,
        channel: psm_proto::v1::Channel::Import as i32,
        program: AggregateProgram {
            granularity_seconds: 900,
        }
        .encode_to_vec(),
        range: Some(TimeRange {
            start_unix: day * 86_400,
            end_unix: (day + 1) * 86_400,
        }),
        cohorts: vec![Cohort {
            meter_ids: ids.to_vec(),
        }],
        outputs: (0..96)
            .map(|i| ReleaseOutput {
                index: i,
                cohort: 0,
            })
            .collect(),
        reissue_reason: String::new(),
    }
}

/// Median time of one Release per day of `days` at `k`, as compute.
async fn time_releases(pki: &TestPki, k: &Proc, ids: &[String], days: &[i64]) -> Duration {
    let mut c = KeyshareClient::new(pki.channel(k.port, &k.name, Role::Compute, "compute"))
        .max_decoding_message_size(64 << 20);
    let mut times = Vec::new();
    for d in days {
        let t = Instant::now();
        c.release(ReleaseRequest {
            idempotency_key: format!("bench-{d}"),
            release: Some(release(ids, *d)),
        })
        .await
        .expect("release");
        times.push(t.elapsed());
    }
    median(times)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = psm_e2e::bench_size("PSM_BENCH_ENROLL_METERS", 10_000);
    let m = psm_e2e::bench_size("PSM_BENCH_METERS", 1_000).min(n).max(5);
    let reps = psm_e2e::bench_size("PSM_BENCH_REPEATS", 10).max(1);
    println!(
        "command: PSM_BENCH_ENROLL_METERS={n} PSM_BENCH_METERS={m} PSM_BENCH_REPEATS={reps} cargo bench -p psm-e2e --bench trust"
    );
    println!(
        "machine: {} cores; load average at start: {}",
        std::thread::available_parallelism().map_or(1, |c| c.get()),
        loadavg()
    );
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ids: Vec<String> = (0..n).map(|i| format!("bench-{i:06}")).collect();
    let registry: String = ids.iter().map(|id| registry_entry(id, "meter")).collect();
    let mut sys = System::start_with_registry(&pki, &keys, "", POLICY, &registry).await;
    let ekeys = psm_e2e::enrollment_keys(&pki, &sys.keyshares).await;

    // ------------------------------------------------------------ 1. enrollment of n meters
    let t = Instant::now();
    let meters: Vec<TestMeter> = ids.par_iter().map(|id| TestMeter::new(id, 1)).collect();
    let enrollments: Vec<_> = meters.par_iter().map(|m| m.enrollment(&ekeys)).collect();
    let seal_t = t.elapsed();
    let mut ingest = psm_proto::v1::ingest_client::IngestClient::new(pki.channel(
        sys.ingest.port,
        "ingest",
        Role::Headend,
        "headend-1",
    ))
    .max_encoding_message_size(64 << 20);
    let t = Instant::now();
    for (i, chunk) in enrollments.chunks(500).enumerate() {
        ingest
            .enroll(EnrollRequest {
                idempotency_key: format!("bench-enroll-{i}"),
                enrollments: chunk.to_vec(),
            })
            .await
            .expect("enroll");
    }
    let enroll_t = t.elapsed();
    drop(enrollments);
    let t = Instant::now();
    psm_e2e::wait_active(&pki, &sys.keyshares, &ids, 1, Duration::from_secs(3600)).await;
    let active_t = t.elapsed();

    // Baseline: keyshare-1's own decisions on the same enrollments, in this process, from the
    // same ingest with keyshare-1's certificate and enrollment key, without any confirmation.
    let base_dir = tempfile::tempdir().expect("tempdir");
    let releases = Arc::new(
        keyshare_svc::policy::Releases::open(&base_dir.path().join("releases")).expect("db"),
    );
    let secret = std::fs::read(
        pki.dir
            .path()
            .join("keyshare-1-data")
            .join("enrollment.key"),
    )
    .expect("enrollment key");
    let scheme = psm_core::threshold::Scheme::new(3, 2).expect("2-of-3");
    let tls = pki.tls(Role::Keyshare, "keyshare-1");
    let ingest_ch = psm_net::client::channel(
        &format!("https://127.0.0.1:{}", sys.ingest.port),
        "ingest",
        Some(Role::Ingest),
        &tls,
        &psm_net::client::ClientOptions::default(),
    )
    .expect("channel");
    let reg_path = base_dir.path().join("registry.toml");
    std::fs::write(&reg_path, &registry).expect("registry");
    let state = Arc::new(
        keyshare_svc::linear::LinearState::open(
            releases,
            keyshare_svc::linear::Party {
                scheme,
                index: 0,
                names: keys.manifest.party_names.clone(),
                flood_key: psm_core::threshold::FloodKey([7; 32]),
                enrollment_secret: psm_core::linear::envelope::EnrollmentSecret(secret),
            },
            psm_core::registry::Registry::load(Some(&reg_path)).expect("registry"),
            Some(ingest_ch),
        )
        .expect("state"),
    );
    let audit = keyshare_svc::audit::AuditLog::open(&base_dir.path().join("audit")).expect("audit");
    let t = Instant::now();
    let r = state.fetch_and_decide(&audit).await.expect("decide");
    let decide_t = t.elapsed();
    assert_eq!(r.accepted, n, "{r:?}");

    println!("\n### Enrollment of {n} meters\n");
    println!("| step | time | rate |\n|---|---|---|");
    println!(
        "| seal {n} enrollments in the bench (both cores; 6 X-Wing envelopes and a signature each) | {:.2} s | {:.0} meters/s |",
        seal_t.as_secs_f64(),
        n as f64 / seal_t.as_secs_f64()
    );
    println!(
        "| Ingest.Enroll, requests of 500 (registry and device signatures checked at ingest) | {:.2} s | {:.0} meters/s |",
        enroll_t.as_secs_f64(),
        n as f64 / enroll_t.as_secs_f64()
    );
    println!(
        "| **until active at all 3 keyshares**: each fetches, checks the signature, opens, stores; then confirms with both co-holders (GetReceipts triggers it) | **{:.2} s** | {:.0} meters/s |",
        active_t.as_secs_f64(),
        n as f64 / active_t.as_secs_f64()
    );
    println!(
        "| baseline: one keyshare's fetch, signature check, open and store of the same {n}, no confirmation (in the bench process) | {:.2} s | {:.0} meters/s |",
        decide_t.as_secs_f64(),
        n as f64 / decide_t.as_secs_f64()
    );

    // ------------------------------------------------ 2. release confirmation, m-meter aggregate
    let cohort: Vec<String> = ids[..m].to_vec();
    let days = |from: i64| (from..from + reps as i64).collect::<Vec<_>>();
    // Warm the cohort-key caches at every keyshare (first release of this cohort).
    time_releases(&pki, &sys.keyshares[0], &cohort, &[FIRST_DAY - 1]).await;
    let confirmed = time_releases(&pki, &sys.keyshares[0], &cohort, &days(FIRST_DAY)).await;

    // One ConfirmRelease at keyshare-2, asked as keyshare-3 (what keyshare-1 waits for, twice in
    // parallel).
    let mut as_peer = KeyshareClient::new(pki.channel(
        sys.keyshares[1].port,
        "keyshare-2",
        Role::Keyshare,
        "keyshare-3",
    ))
    .max_encoding_message_size(64 << 20);
    let mut confirm_times = Vec::new();
    for d in days(FIRST_DAY + 100) {
        let t = Instant::now();
        let r = as_peer
            .confirm_release(ConfirmReleaseRequest {
                release: Some(confirm_release_request::Release::Linear(release(
                    &cohort, d,
                ))),
                records_for_you: 0,
                nonce: vec![0; 32],
            })
            .await
            .expect("confirm")
            .into_inner();
        confirm_times.push(t.elapsed());
        assert!(r.admitted, "{r:?}");
    }
    let one_confirm = median(confirm_times);

    // In process: admit, record and contributions of the same release, no RPC.
    let limits = keyshare_svc::linear::Limits {
        min_cohort: 5,
        max_reissues: 1,
        min_bill_days: 1,
        min_band_hours_per_week: 4,
        min_band_days: 4,
        max_price_ratio: 8,
        billing_cycle: keyshare_svc::policy::BillingCycle::Any,
    };
    let mut local = Vec::new();
    for d in std::iter::once(FIRST_DAY + 199).chain(days(FIRST_DAY + 200)) {
        let t = Instant::now();
        let r = psm_core::linear::release::release_from_proto(&release(&cohort, d)).expect("ok");
        let a = state.admit(r, limits, |_| true).expect("admit");
        state.record(&a, limits).await.expect("record");
        let s = state.clone();
        tokio::task::spawn_blocking(move || s.contributions(&a).expect("contributions"))
            .await
            .expect("task");
        if d != FIRST_DAY + 199 {
            local.push(t.elapsed());
        }
    }
    let in_process = median(local);

    // Co-holders stopped (after contact): keyshare-1 answers alone and records each release.
    psm_e2e::wait_in_contact(&pki, &sys.keyshares).await;
    let k3 = sys.keyshares.pop().expect("k3");
    let k2 = sys.keyshares.pop().expect("k2");
    drop((k2, k3));
    let alone = time_releases(&pki, &sys.keyshares[0], &cohort, &days(FIRST_DAY + 300)).await;

    println!("\n### Release of a {m}-meter aggregate (one day, 96 buckets) at keyshare-1, median of {reps}\n");
    println!("| path | time |\n|---|---|");
    println!(
        "| **confirmed by both co-holders** (each judges and records it; in parallel) | **{}** |",
        ms(confirmed)
    );
    println!(
        "| baseline: the same release answered alone (co-holders stopped; a release record appended for each) | {} |",
        ms(alone)
    );
    println!(
        "| baseline: admit, record and contributions in the bench process, no RPC | {} |",
        ms(in_process)
    );
    println!(
        "| one ConfirmRelease at a co-holder (judge and record, over mTLS) | {} |",
        ms(one_confirm)
    );
    println!("\nload average at end: {}", loadavg());
}
