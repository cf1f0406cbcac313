//! The keyshares' policy gate end to end: each rule refuses exactly its bad case and allows the
//! good neighbour; a single meter's reading passed off as an aggregate is caught by
//! re-execution; every decision is in the audit log, which `psm audit show` prints and verifies.

use prost::Message;
use psm_e2e::{linear_batch, System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateProgram, AggregateRequest, BillRequest, ComputationKind, ComputationManifest,
    InputRef, KeyRef, PartialDecryptRequest, ReadingBatch, SubmitReadingsRequest, Tariff,
    TariffBand, TimeRange, Track,
};
use tonic::{Code, Status};

const D1: &str = "2026-02-02";
const D2: &str = "2026-02-03";
const RATE: usize = 30;

fn day(d: &str) -> i64 {
    psm_core::readings::parse_day(d).unwrap() * 86_400
}

fn range(first: &str, days: i64) -> TimeRange {
    TimeRange {
        start_unix: day(first),
        end_unix: day(first) + days * 86_400,
    }
}

fn flat_tariff(name: &str, price: i64) -> Tariff {
    Tariff {
        name: name.into(),
        time_zone: "UTC".into(),
        bands: vec![TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: price,
            export_price_milli: price / 2,
        }],
        standing_charge_per_day: 40,
        vat_basis_points: 500,
        currency: "EUR".into(),
        ..Default::default()
    }
}

fn hash_hex(t: &Tariff) -> String {
    blake3::hash(&t.encode_to_vec()).to_hex().to_string()
}

fn refused(r: Result<tonic::Response<impl Sized>, Status>, code: Code, rule: &str) {
    let e = r
        .err()
        .unwrap_or_else(|| panic!("expected a {rule} refusal"));
    assert_eq!(e.code(), code, "{rule}: {}", e.message());
    assert!(e.message().contains(rule), "{rule}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_refuses_its_case_and_allows_its_neighbour() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let (t1, t2, t3) = (
        flat_tariff("standard", 30_000),
        flat_tariff("unapproved", 90_000),
        flat_tariff("green", 28_000),
    );
    let policy = format!(
        "min_cohort = 5\nallowed_programs = [\"{}\", \"{}\"]\nrate_limit_per_minute = {RATE}\nreexecute_tfhe = \"off\"\n",
        hash_hex(&t1),
        hash_hex(&t3)
    );
    // Compute itself would release cohorts of 1: the keyshares decide.
    let sys = System::start_with_policy(&pki, &keys, "min_cohort = 1", &policy).await;
    let lpk = psm_core::ceremony::PublicBundle::open(&keys.public_dir)
        .unwrap()
        .linear_public_key()
        .unwrap();
    let kid = keys.manifest.linear_key_id.clone();

    // 12 meters, two days of 15-minute readings: meter i reads i + 10·interval Wh.
    let meters: Vec<String> = (0..12).map(|i| format!("m-{i:02}")).collect();
    let value = |m: usize, i: usize| (m + 10 * i) as i64;
    let mut stored: Vec<ReadingBatch> = Vec::new();
    for (mi, m) in meters.iter().enumerate() {
        for d in [D1, D2] {
            let values: Vec<i64> = (0..96).map(|i| value(mi, i)).collect();
            stored.push(linear_batch(&lpk, &kid, m, d, 900, &values));
        }
    }
    IngestClient::new(pki.channel(sys.ingest.port, "ingest", Role::Headend, "headend-1"))
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "load".into(),
            batches: stored.clone(),
        })
        .await
        .unwrap();
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let agg = |n: usize, first: &str| AggregateRequest {
        idempotency_key: format!("agg-{n}-{first}"),
        meter_ids: meters[..n].to_vec(),
        range: Some(range(first, 1)),
        granularity_seconds: 3600,
    };

    // k-anonymity: 4 meters refused, 5 released (and correct).
    refused(
        op.aggregate(agg(4, D1)).await,
        Code::FailedPrecondition,
        "k-anonymity",
    );
    let five = op.aggregate(agg(5, D1)).await.unwrap().into_inner();
    let want: Vec<i64> = (0..24)
        .map(|h| {
            (0..5)
                .flat_map(|m| (4 * h..4 * h + 4).map(move |i| value(m, i)))
                .sum()
        })
        .collect();
    assert_eq!(five.energy_wh, want);

    // Differencing: 6 meters on the same day differ from the 5 by one meter; 10 differ by 5.
    // The 6 on the other day overlap no release.
    refused(
        op.aggregate(agg(6, D1)).await,
        Code::FailedPrecondition,
        "differencing",
    );
    op.aggregate(agg(10, D1)).await.unwrap();
    op.aggregate(agg(6, D2)).await.unwrap();
    // The same release again is not new information.
    op.aggregate(agg(5, D1)).await.unwrap();

    // Bills: one per (meter, period) unless re-issued with a reason; an identical repeat is the
    // same release; adjacent periods are separate bills; only allowed tariffs.
    let bill = |meter: &str, t: &Tariff, first: &str, days: i64, reason: &str| BillRequest {
        idempotency_key: format!("bill-{meter}-{}-{first}-{days}-{}", t.name, reason.len()),
        meter_id: meter.into(),
        period: Some(range(first, days)),
        tariff: Some(t.clone()),
        reissue_reason: reason.into(),
    };
    let first = op
        .bill(bill("m-00", &t1, D1, 2, ""))
        .await
        .unwrap()
        .into_inner();
    let again = op
        .bill(bill("m-00", &t1, D1, 2, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.total, again.total);
    refused(
        op.bill(bill("m-00", &t3, D1, 2, "")).await,
        Code::FailedPrecondition,
        "one-bill-per-period",
    );
    refused(
        op.bill(bill("m-00", &t1, D2, 1, "")).await,
        Code::FailedPrecondition,
        "one-bill-per-period",
    );
    op.bill(bill(
        "m-00",
        &t3,
        D1,
        2,
        "customer moved to the green tariff",
    ))
    .await
    .unwrap();
    op.bill(bill("m-01", &t1, D1, 1, "")).await.unwrap();
    op.bill(bill("m-01", &t1, D2, 1, "")).await.unwrap();
    refused(
        op.bill(bill("m-02", &t2, D1, 2, "")).await,
        Code::PermissionDenied,
        "allowed-program",
    );
    op.bill(bill("m-02", &t1, D1, 2, "")).await.unwrap();

    // A compute node passing one meter's stored reading off as the 5-meter aggregate: the
    // manifest names the released cohort, but re-execution gives a different output.
    let mut ks1 = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Compute,
        "compute",
    ));
    let m06 = stored
        .iter()
        .find(|b| b.meter_id == "m-06" && b.day == D1)
        .unwrap();
    let words = psm_core::lwe::words_from_le_bytes(&m06.ciphertext).unwrap();
    let lone = psm_core::lwe::LweBatch::Compact {
        dimension: psm_core::linear::LINEAR_DIMENSION,
        count: 96,
        words,
    };
    let program = AggregateProgram {
        granularity_seconds: 900,
    }
    .encode_to_vec();
    let input = |b: &ReadingBatch| InputRef {
        meter_id: b.meter_id.clone(),
        day: b.day.clone(),
        track: Track::Linear as i32,
        ciphertext_hash: b.ciphertext_hash.clone(),
    };
    let cohort_inputs: Vec<InputRef> = stored
        .iter()
        .filter(|b| b.day == D1 && meters[..5].contains(&b.meter_id))
        .map(input)
        .collect();
    let request = |inputs: Vec<InputRef>| PartialDecryptRequest {
        idempotency_key: "forged".into(),
        key: Some(KeyRef {
            key_id: kid.clone(),
        }),
        batch: Some(psm_core::wire::batch_to_proto(
            &lone,
            psm_core::linear::LINEAR_ENCODING,
            43,
        )),
        manifest: Some(ComputationManifest {
            kind: ComputationKind::Aggregate as i32,
            program_hash: blake3::hash(&program).as_bytes().to_vec(),
            program: program.clone(),
            inputs,
            output_hash: lone.hash().to_vec(),
            range: Some(range(D1, 1)),
            reissue_reason: String::new(),
        }),
    };
    refused(
        ks1.partial_decrypt(request(cohort_inputs.clone())).await,
        Code::FailedPrecondition,
        "re-execution",
    );
    refused(
        ks1.partial_decrypt(request(vec![input(m06)])).await,
        Code::FailedPrecondition,
        "k-anonymity",
    );
    let mut tampered = cohort_inputs.clone();
    tampered[0].ciphertext_hash = m06.ciphertext_hash.clone();
    let e = ks1.partial_decrypt(request(tampered)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("does not match the reading stored"),
        "{}",
        e.message()
    );

    // Rate limit per caller: a second compute identity floods keyshare-1 with empty requests;
    // the first RATE are judged (malformed), then it is throttled. The main compute is not.
    let mut flood = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Compute,
        "compute-2",
    ));
    let empty = PartialDecryptRequest {
        idempotency_key: "empty".into(),
        ..Default::default()
    };
    for i in 0..RATE {
        let e = flood.partial_decrypt(empty.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "request {i}: {}", e.message());
    }
    refused(
        flood.partial_decrypt(empty.clone()).await,
        Code::ResourceExhausted,
        "rate-limit",
    );
    op.aggregate(agg(5, D1)).await.unwrap();

    // The audit log names every rule that decided, and its chain verifies.
    let out = std::process::Command::new(psm_e2e::bin("psm"))
        .args(["audit", "show", "--server-name", "keyshare-1", "--endpoint"])
        .arg(format!("https://127.0.0.1:{}", sys.keyshares[0].port))
        .arg("--pki")
        .arg(pki.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rule in [
        "k-anonymity",
        "differencing",
        "one-bill-per-period",
        "allowed-program",
        "re-execution",
        "rate-limit",
        "known-key",
        "allowed",
    ] {
        assert!(text.contains(rule), "{rule} missing from\n{text}");
    }
    assert!(text.contains("re-issued: customer moved"), "{text}");
    assert!(text.contains("verified"), "{text}");
}
