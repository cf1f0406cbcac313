//! The tfhe track end to end: proven register lists verified by ingest before storage (wrong
//! metadata, another CRS and a truncated list are refused and nothing is stored); demand charges,
//! tiered charges and a histogram computed on ciphertexts by compute-svc, decrypted through the
//! keyshares, equal to the plaintext reference for random and edge inputs; progress via
//! WatchJob. Bills also release the linear track's band totals, so the billed meters enroll and
//! report (zero) interval readings too.

use std::future::Future;
use std::time::Duration;

use psm_core::ceremony::PublicBundle;
use psm_core::linear::Channel;
use psm_core::registers::{prove, Registers};
use psm_core::tfhe_program::{band_counts_clear, tiered_cost_clear};
use psm_e2e::{enroll, enrollment_keys, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    AnalyticsRequest, BillRequest, KeyRef, ReadingBatch, StreamReadingsRequest,
    SubmitReadingsRequest, Tariff, TariffBand, TariffTier, TimeRange, Track, WatchJobRequest,
};
use psm_tariff::{demand_line, tier_line, tiers};
use rand::{Rng, SeedableRng};
use tonic::{Code, Status};

const D0: &str = "2026-04-06";
/// The linear-track key epoch of the billed meters.
const EPOCH: u32 = 1;
/// tfhe evaluations take tens of seconds, more when the tests share the cores.
const LONG: Duration = Duration::from_secs(900);

fn day(offset: i64) -> String {
    psm_core::readings::format_day(psm_core::readings::parse_day(D0).unwrap() + offset)
}

fn range(days: i64) -> TimeRange {
    let d = psm_core::readings::parse_day(D0).unwrap() * 86_400;
    TimeRange {
        start_unix: d,
        end_unix: d + days * 86_400,
    }
}

fn day_number(offset: i64) -> i64 {
    psm_core::readings::parse_day(D0).unwrap() + offset
}

/// A day of hourly zero readings on the linear track (what a bill's energy lines are computed
/// from), encrypted by the meter's own key.
fn zero_day(m: &TestMeter, offset: i64) -> ReadingBatch {
    m.batch(day_number(offset), Channel::Import, 3600, 0, &[0; 24])
}

/// Keyshares pick up enrollments from ingest on their own schedule: retry a request refused for
/// "enrollment" for a while.
async fn settled<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, Status>
where
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    for _ in 0..40 {
        match call().await {
            Err(e)
                if e.code() == Code::FailedPrecondition && e.message().contains("enrollment") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            r => return r.map(tonic::Response::into_inner),
        }
    }
    call().await.map(tonic::Response::into_inner)
}

fn register_batch(key_id: &str, meter: &str, day: &str, list: Vec<u8>) -> ReadingBatch {
    ReadingBatch {
        meter_id: meter.into(),
        day: day.into(),
        track: Track::Tfhe as i32,
        key: Some(KeyRef {
            key_id: key_id.into(),
        }),
        interval_seconds: 0,
        count: 2,
        ciphertext_hash: blake3::hash(&list).as_bytes().to_vec(),
        ciphertext: list,
        ..Default::default()
    }
}

async fn stored_tfhe(ch: tonic::transport::Channel, meters: &[&str]) -> usize {
    let mut s = IngestClient::new(ch)
        .stream_readings(StreamReadingsRequest {
            meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            range: Some(range(7)),
            track: Track::Tfhe as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_proofs_are_checked_before_anything_is_stored() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let (cpk, crs) = (bundle.compact_public_key().unwrap(), bundle.crs().unwrap());
    let kid = keys.manifest.tfhe_key_id.clone();
    let r = Registers {
        peak_w: 4_200,
        total_wh: 31_000,
    };
    let (good, for_other_meter, other_crs_list) = tokio::task::spawn_blocking({
        let kid = kid.clone();
        move || {
            let good = prove(&cpk, &crs, &kid, "meter-a", &day(0), r).unwrap();
            let other = prove(&cpk, &crs, &kid, "meter-b", &day(0), r).unwrap();
            let other_crs =
                tfhe::zk::CompactPkeCrs::from_config(psm_core::ceremony::tfhe_config(), 64)
                    .unwrap();
            let forged = prove(&cpk, &other_crs, &kid, "meter-a", &day(1), r).unwrap();
            (good, other, forged)
        }
    })
    .await
    .unwrap();
    let mut headend =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Headend, "headend-1"));
    let submit = |batches: Vec<ReadingBatch>| SubmitReadingsRequest {
        idempotency_key: "r".into(),
        batches,
    };
    let ok = register_batch(&kid, "meter-a", &day(0), good.clone());

    // Each bad list rides along with a good one: the whole request is refused.
    let wrong_metadata = register_batch(&kid, "meter-a", &day(1), for_other_meter.clone());
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 100);
    let truncated = register_batch(&kid, "meter-a", &day(2), truncated);
    let other_crs = register_batch(&kid, "meter-a", &day(1), other_crs_list);
    let mut wrong_count = ok.clone();
    wrong_count.count = 3;
    wrong_count.day = day(3);
    for (what, bad) in [
        ("proof for another meter", wrong_metadata),
        ("truncated list", truncated),
        ("proof under another CRS", other_crs),
        ("wrong register count", wrong_count),
    ] {
        let e = headend
            .submit_readings(submit(vec![ok.clone(), bad]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
        assert!(
            e.message().contains("nothing was stored"),
            "{what}: {}",
            e.message()
        );
    }
    let ch = || pki.channel(ingest.port, "ingest", Role::Compute, "compute");
    assert_eq!(stored_tfhe(ch(), &["meter-a", "meter-b"]).await, 0);

    // The good list alone is stored, once.
    let r = headend
        .submit_readings(submit(vec![ok.clone()]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().stored, 1);
    let r = headend.submit_readings(submit(vec![ok])).await.unwrap();
    assert_eq!(r.into_inner().duplicates, 1);
    assert_eq!(stored_tfhe(ch(), &["meter-a", "meter-b"]).await, 1);
}

fn flat(name: &str, demand: i64, tiers: &[(u64, i64)]) -> Tariff {
    Tariff {
        name: name.into(),
        time_zone: "UTC".into(),
        bands: vec![TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 0,
            export_price_milli: 0,
            month_mask: 0,
        }],
        standing_charge_per_day: 100,
        vat_basis_points: 0,
        demand_rate_per_kw_milli: demand,
        tiers: tiers
            .iter()
            .map(|(u, p)| TariffTier {
                up_to_kwh: *u,
                price_milli: *p,
            })
            .collect(),
        currency: "EUR".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_tiers_and_histogram_match_plaintext() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start(&pki, &keys, "").await;
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let tid = keys.manifest.tfhe_key_id.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // shop-1: three random days; shop-2: one day at the maximum; shop-3: two days with equal
    // peaks and zero energy; home-1..6: one day each for the histogram (one exactly on an edge).
    let mut plan: Vec<(String, Vec<Registers>)> = vec![
        (
            "shop-1".into(),
            (0..3)
                .map(|_| Registers {
                    peak_w: rng.gen_range(1_000..80_000),
                    total_wh: rng.gen_range(10_000..900_000),
                })
                .collect(),
        ),
        (
            "shop-2".into(),
            vec![Registers {
                peak_w: u32::MAX,
                total_wh: u32::MAX,
            }],
        ),
        (
            "shop-3".into(),
            vec![
                Registers {
                    peak_w: 7_777,
                    total_wh: 0,
                };
                2
            ],
        ),
    ];
    let home_totals = [0u32, 4_999, 5_000, 12_000, 9_999, 250_000];
    for (i, t) in home_totals.iter().enumerate() {
        plan.push((
            format!("home-{i}"),
            vec![Registers {
                peak_w: 1_000,
                total_wh: *t,
            }],
        ));
    }
    let (cpk, crs) = (bundle.compact_public_key().unwrap(), bundle.crs().unwrap());
    let mut batches = tokio::task::spawn_blocking({
        let plan = plan.clone();
        let tid = tid.clone();
        move || {
            let mut out = Vec::new();
            for (m, days) in &plan {
                for (d, r) in days.iter().enumerate() {
                    let list = prove(&cpk, &crs, &tid, m, &day(d as i64), *r).unwrap();
                    out.push(register_batch(&tid, m, &day(d as i64), list));
                }
            }
            out
        }
    })
    .await
    .unwrap();
    // Bills also need the linear track's interval readings (zero here): each meter enrolls its
    // own keys first, and keeps them for the whole test.
    let meters: Vec<TestMeter> = plan.iter().map(|(m, _)| TestMeter::new(m, EPOCH)).collect();
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    let refs: Vec<&TestMeter> = meters.iter().collect();
    let enrolled = enroll(&pki, &sys.ingest, &refs, &ekeys).await.unwrap();
    assert_eq!(enrolled.stored as usize, plan.len());
    for (m, (_, days)) in meters.iter().zip(&plan) {
        for d in 0..days.len() {
            batches.push(zero_day(m, d as i64));
        }
    }
    IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"))
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "load".into(),
            batches,
        })
        .await
        .unwrap();
    let mut op = ComputeClient::new(pki.channel_with_timeout(
        sys.compute.port,
        "compute",
        Role::Operator,
        "billing",
        LONG,
    ));

    let tier_spec = [(100u64, 10_000i64), (400, 20_000), (0, 35_000)];
    let bill_tariff = flat("demand and tiers", 9_500, &tier_spec);
    let demand_only = flat("demand only", 12_000, &[]);
    for (meter, tariff) in [
        ("shop-1", &bill_tariff),
        ("shop-2", &bill_tariff),
        ("shop-3", &demand_only),
    ] {
        let regs = &plan.iter().find(|p| p.0 == meter).unwrap().1;
        let req = BillRequest {
            idempotency_key: format!("bill-{meter}"),
            meter_id: meter.into(),
            period: Some(range(regs.len() as i64)),
            tariff: Some(tariff.clone()),
            reissue_reason: String::new(),
            epoch: EPOCH,
        };
        let resp = settled(|| {
            let mut op = op.clone();
            let req = req.clone();
            async move { op.bill(req).await }
        })
        .await
        .unwrap_or_else(|e| panic!("{meter}: {e:?}"));
        let peak = regs.iter().map(|r| u64::from(r.peak_w)).max().unwrap();
        let want = demand_line(peak, tariff.demand_rate_per_kw_milli);
        let got = resp
            .lines
            .iter()
            .find(|l| l.description.starts_with("demand charge"))
            .unwrap_or_else(|| panic!("{meter}: {:?}", resp.lines));
        assert_eq!(
            (got.description.as_str(), got.amount),
            (want.description.as_str(), want.amount),
            "{meter}"
        );
        let mut expected_total = want.amount + 100 * regs.len() as i64;
        if !tariff.tiers.is_empty() {
            let t = tiers(&tier_spec).unwrap();
            let total: u64 = regs.iter().map(|r| u64::from(r.total_wh)).sum();
            let want = tier_line(tiered_cost_clear(total, &t), t.len());
            let got = resp
                .lines
                .iter()
                .find(|l| l.description.starts_with("tiered"))
                .unwrap();
            assert_eq!(got.amount, want.amount, "{meter}");
            expected_total += want.amount;
        }
        assert_eq!(resp.total, expected_total, "{meter}: {:?}", resp.lines);
    }

    // Histogram of the six homes' totals, watched while it runs. Edges on whole kWh, so that
    // `psm analytics` (which takes kWh) can ask for the same histogram below.
    let edges = vec![0u64, 5_000, 10_000, 4_000_000_000];
    let homes: Vec<String> = (0..home_totals.len())
        .map(|i| format!("home-{i}"))
        .collect();
    let req = AnalyticsRequest {
        idempotency_key: "histogram".into(),
        meter_ids: homes.clone(),
        range: Some(range(1)),
        band_edges_wh: edges.clone(),
    };
    let running = tokio::spawn({
        let mut op = op.clone();
        async move { op.analytics(req).await }
    });
    let mut progress = Vec::new();
    for _ in 0..200 {
        match op
            .watch_job(WatchJobRequest {
                idempotency_key: "histogram".into(),
            })
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                while let Some(p) = s.message().await.unwrap() {
                    progress.push(p);
                }
                break;
            }
            Err(e) if e.code() == Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let hist = running.await.unwrap().unwrap().into_inner();
    let totals: Vec<u64> = home_totals.iter().map(|t| u64::from(*t)).collect();
    assert_eq!(hist.counts, band_counts_clear(&totals, &edges));
    assert_eq!(hist.counts, vec![2, 2, 2]);
    let last = progress.last().expect("progress was reported");
    assert!(last.done && last.percent == 100, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0].percent <= w[1].percent),
        "{progress:?}"
    );

    // `psm analytics` under the same key builds exactly the request above (a different one
    // under that key would be ALREADY_EXISTS), so compute answers from the stored job; its
    // `--json` and its table show the released counts.
    let endpoint = format!("https://127.0.0.1:{}", sys.compute.port);
    let pki_dir = pki.dir.path().to_str().unwrap().to_owned();
    let cohort = homes.join(",");
    let (from, to) = (day(0), day(1));
    let cli = |json: bool| {
        let mut args = vec![
            "analytics",
            "--endpoint",
            &endpoint,
            "--server-name",
            "compute",
            "--pki",
            &pki_dir,
            "--meter",
            &cohort,
            "--from",
            &from,
            "--to",
            &to,
            "--edges-kwh",
            "0,5,10,4000000",
            "--key",
            "histogram",
        ];
        if json {
            args.push("--json");
        }
        psm_e2e::psm(&args)
    };
    let json = cli(true);
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["cohort_size"].as_u64(), Some(u64::from(hist.cohort_size)));
    let bands = v["bands"].as_array().unwrap();
    let counts: Vec<u32> = bands
        .iter()
        .map(|b| u32::try_from(b["count"].as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(counts, hist.counts);
    assert_eq!(bands[1]["from_wh"].as_u64(), Some(5_000));
    assert_eq!(bands[2]["to_wh"].as_u64(), Some(4_000_000_000));
    let table = cli(false);
    assert!(table.contains("5 to 10 kWh"), "{table}");
    assert!(table.contains("period totals of 6 meters"), "{table}");

    // A histogram of fewer meters than the minimum is refused before any work.
    let e = op
        .analytics(AnalyticsRequest {
            idempotency_key: "small".into(),
            meter_ids: homes[..3].to_vec(),
            range: Some(range(1)),
            band_edges_wh: edges,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyshares_re_execute_tfhe_programs() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start_with_policy(
        &pki,
        &keys,
        "",
        "allow_any_program = true\nmin_bill_days = 1\nmin_band_days = 1\nbilling_cycle = \"any\"\n",
    )
    .await;
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let (cpk, crs) = (bundle.compact_public_key().unwrap(), bundle.crs().unwrap());
    let tid = keys.manifest.tfhe_key_id.clone();
    let shop = TestMeter::new("shop-9", EPOCH);
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    assert_eq!(
        enroll(&pki, &sys.ingest, &[&shop], &ekeys)
            .await
            .unwrap()
            .stored,
        1
    );
    let r = Registers {
        peak_w: 23_456,
        total_wh: 120_000,
    };
    let list = tokio::task::spawn_blocking({
        let tid = tid.clone();
        move || prove(&cpk, &crs, &tid, "shop-9", &day(0), r).unwrap()
    })
    .await
    .unwrap();
    let registers = register_batch(&tid, "shop-9", &day(0), list);
    IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"))
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "load".into(),
            batches: vec![registers.clone(), zero_day(&shop, 0)],
        })
        .await
        .unwrap();

    // An honest bill: every keyshare repeats the evaluation and gets the same ciphertexts.
    let tariff = flat("demand", 10_000, &[]);
    let op = ComputeClient::new(pki.channel_with_timeout(
        sys.compute.port,
        "compute",
        Role::Operator,
        "billing",
        LONG,
    ));
    let req = BillRequest {
        idempotency_key: "honest".into(),
        meter_id: "shop-9".into(),
        period: Some(range(1)),
        tariff: Some(tariff.clone()),
        reissue_reason: String::new(),
        epoch: EPOCH,
    };
    let bill = settled(|| {
        let mut op = op.clone();
        let req = req.clone();
        async move { op.bill(req).await }
    })
    .await
    .unwrap();
    let want = demand_line(23_456, 10_000);
    assert!(
        bill.lines
            .iter()
            .any(|l| l.amount == want.amount && l.description == want.description),
        "{:?}",
        bill.lines
    );

    // A compute node sending other ciphertexts under the same manifest is refused.
    let program = prost::Message::encode_to_vec(&tariff);
    let forged = psm_core::lwe::LweBatch::List {
        dimension: 4096,
        words: (0..8 * 4097u128)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect(),
    };
    let req = psm_proto::v1::PartialDecryptRequest {
        idempotency_key: "forged".into(),
        key: Some(KeyRef {
            key_id: tid.clone(),
        }),
        batch: Some(psm_core::wire::batch_to_proto(
            &forged,
            psm_core::lwe::SQUASHED_BLOCK,
            70,
        )),
        manifest: Some(psm_proto::v1::ComputationManifest {
            kind: psm_proto::v1::ComputationKind::Bill as i32,
            program_hash: blake3::hash(&program).as_bytes().to_vec(),
            program,
            inputs: vec![psm_proto::v1::InputRef {
                meter_id: "shop-9".into(),
                day: day(0),
                track: Track::Tfhe as i32,
                ciphertext_hash: registers.ciphertext_hash.clone(),
            }],
            output_hash: forged.hash().to_vec(),
            range: Some(range(1)),
            reissue_reason: "forged".into(),
        }),
    };
    let e = psm_proto::v1::keyshare_client::KeyshareClient::new(pki.channel_with_timeout(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Compute,
        "compute",
        LONG,
    ))
    .partial_decrypt(req)
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().starts_with("re-execution"), "{}", e.message());
}
