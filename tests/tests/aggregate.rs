//! Aggregate end to end: readings submitted to ingest, summed by compute-svc, decrypted through
//! three keyshare-svc processes; results equal the plaintext sums.

use std::collections::BTreeMap;

use psm_e2e::{linear_batch, System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{AggregateRequest, SubmitReadingsRequest, TimeRange};
use rand::{Rng, SeedableRng};
use tonic::Code;

const DAY0: i64 = 1_764_115_200; // 2025-11-26T00:00:00Z
const DAYS: [&str; 2] = ["2025-11-26", "2025-11-27"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohort_sums_match_plaintext() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    // Shards of at most 4 meters, so the keyshares (and compute) accept cohorts of 2.
    let sys = System::start_with_policy(
        &pki,
        &keys,
        "min_cohort = 2\nmax_shard_meters = 4",
        "min_cohort = 2\n",
    )
    .await;
    let (ingest, compute) = (&sys.ingest, &sys.compute);

    // 10 quarter-hourly meters and 2 hourly ones, two days, signed readings (some export).
    let lpk = psm_core::ceremony::PublicBundle::open(&keys.public_dir)
        .unwrap()
        .linear_public_key()
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut plain: BTreeMap<(String, usize), Vec<i64>> = BTreeMap::new();
    let mut batches = Vec::new();
    let meters: Vec<(String, u32)> = (0..10)
        .map(|i| (format!("m-{i:02}"), 900))
        .chain((0..2).map(|i| (format!("h-{i:02}"), 3600)))
        .collect();
    for (m, interval) in &meters {
        for (d, day) in DAYS.iter().enumerate() {
            let n = (86_400 / interval) as usize;
            let readings: Vec<i64> = (0..n).map(|_| rng.gen_range(-400..3_000)).collect();
            batches.push(linear_batch(
                &lpk,
                &keys.manifest.linear_key_id,
                m,
                day,
                *interval,
                &readings,
            ));
            plain.insert((m.clone(), d), readings);
        }
    }
    let mut headend =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Headend, "headend-1"));
    let r = headend
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "load".into(),
            batches,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stored, 24);

    // Plaintext reference: per output interval, the cohort's sum.
    let reference = |cohort: &[String], g: u32| -> Vec<i64> {
        let mut out = vec![0i64; (2 * 86_400 / g) as usize];
        for m in cohort {
            let interval = meters.iter().find(|(n, _)| n == m).unwrap().1;
            let k = (g / interval) as usize;
            for d in 0..2 {
                for (i, v) in plain[&(m.clone(), d)].iter().enumerate() {
                    out[d * (86_400 / g) as usize + i / k] += v;
                }
            }
        }
        out
    };
    let mut op =
        ComputeClient::new(pki.channel(compute.port, "compute", Role::Operator, "billing"));
    let req = |cohort: &[String], g: u32| AggregateRequest {
        idempotency_key: format!("agg-{g}-{}", cohort.len()),
        meter_ids: cohort.to_vec(),
        range: Some(TimeRange {
            start_unix: DAY0,
            end_unix: DAY0 + 2 * 86_400,
        }),
        granularity_seconds: g,
    };
    let quarter: Vec<String> = meters
        .iter()
        .filter(|m| m.1 == 900)
        .map(|m| m.0.clone())
        .collect();
    let everyone: Vec<String> = meters.iter().map(|m| m.0.clone()).collect();
    for (cohort, g) in [
        (&quarter, 900),
        (&quarter, 3600),
        (&everyone, 3600),
        (&everyone, 86_400),
    ] {
        let resp = op
            .aggregate(req(cohort, g))
            .await
            .unwrap_or_else(|e| panic!("g={g}: {e:?}"))
            .into_inner();
        assert_eq!(
            resp.energy_wh,
            reference(cohort, g),
            "cohort of {} at {g} s",
            cohort.len()
        );
        assert_eq!(
            resp.interval_start_unix[1] - resp.interval_start_unix[0],
            i64::from(g)
        );
        assert_eq!(resp.cohort_size as usize, cohort.len());
        assert!(resp.quorum.unwrap().faults.is_empty());
    }

    // Refusals.
    let e = op.aggregate(req(&quarter[..1], 900)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("minimum of 2"), "{}", e.message());
    let e = op.aggregate(req(&everyone, 900)).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "hourly meters cannot give 15-minute sums"
    );
    let mut longer = req(&quarter, 900);
    longer.range = Some(TimeRange {
        start_unix: DAY0,
        end_unix: DAY0 + 3 * 86_400,
    });
    let e = op.aggregate(longer).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("2025-11-28"), "{}", e.message());
    let mut unaligned = req(&quarter, 900);
    unaligned.range = Some(TimeRange {
        start_unix: DAY0 + 60,
        end_unix: DAY0 + 86_400,
    });
    assert_eq!(
        op.aggregate(unaligned).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut meter =
        ComputeClient::new(pki.channel(compute.port, "compute", Role::Meter, "meter-0001"));
    assert_eq!(
        meter
            .aggregate(req(&quarter, 900))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}
