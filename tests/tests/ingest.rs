//! ingest-svc SubmitReadings / StreamReadings over mTLS: identity rules, validation before
//! storage, idempotency, atomicity, durability across SIGKILL.

use std::time::Duration;

use psm_core::linear::LINEAR_DIMENSION;
use psm_core::lwe::{words_to_le_bytes, LweBatch};
use psm_e2e::{Proc, TestPki};
use psm_net::Role;
use psm_proto::service_names::INGEST;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    KeyRef, ReadingBatch, StreamReadingsRequest, SubmitReadingsRequest, TimeRange, Track,
};
use tonic::transport::Channel;
use tonic::Code;

const DAY1: i64 = 1_764_115_200; // 2025-11-26T00:00:00Z

fn batch(
    lpk: &psm_core::linear::LinearPublicKey,
    key_id: &str,
    meter: &str,
    day: &str,
    seed: i64,
) -> ReadingBatch {
    let readings: Vec<i64> = (0..96).map(|i| (i * 13 + seed * 7) % 500 - 60).collect();
    let LweBatch::Compact { words, .. } = psm_core::linear::encrypt(lpk, &readings) else {
        unreachable!()
    };
    let ciphertext = words_to_le_bytes(&words);
    assert_eq!(ciphertext.len(), (LINEAR_DIMENSION + 96) * 16);
    ReadingBatch {
        meter_id: meter.into(),
        day: day.into(),
        track: Track::Linear as i32,
        key: Some(KeyRef {
            key_id: key_id.into(),
        }),
        interval_seconds: 900,
        count: 96,
        ciphertext_hash: blake3::hash(&ciphertext).as_bytes().to_vec(),
        ciphertext,
    }
}

fn submit(batches: Vec<ReadingBatch>) -> SubmitReadingsRequest {
    SubmitReadingsRequest {
        idempotency_key: "k-1".into(),
        batches,
    }
}

async fn stored(client: &mut IngestClient<Channel>, meters: &[&str]) -> Vec<(String, String)> {
    let mut s = client
        .stream_readings(StreamReadingsRequest {
            meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            range: Some(TimeRange {
                start_unix: DAY1 - 86_400 * 10,
                end_unix: DAY1 + 86_400 * 10,
            }),
            track: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(b) = s.message().await.unwrap() {
        out.push((b.meter_id, b.day));
    }
    out
}

#[tokio::test]
async fn submissions_are_checked_idempotent_atomic_and_durable() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let lpk = psm_core::ceremony::PublicBundle::open(&keys.public_dir)
        .unwrap()
        .linear_public_key()
        .unwrap();
    let kid = keys.manifest.linear_key_id.clone();
    let cfg = pki.dir.path().join("ingest.toml");
    std::fs::write(
        &cfg,
        "[ingest.headends]\n\"headend-1\" = [\"meter-00*\", \"shop-7\"]\n",
    )
    .unwrap();
    let public = keys.public_dir.to_str().unwrap().to_owned();
    let args = [
        "--public-dir",
        public.as_str(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    let mut ingest = Proc::start(&pki, "ingest-svc", Role::Ingest, "ingest", INGEST, &args).await;

    let mut meter =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Meter, "meter-0001"));
    let mut headend =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Headend, "headend-1"));
    let mut compute =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Compute, "compute"));

    let d1 = batch(&lpk, &kid, "meter-0001", "2025-11-26", 1);
    let d2 = batch(&lpk, &kid, "meter-0001", "2025-11-27", 2);
    let r = meter
        .submit_readings(submit(vec![d1.clone(), d2.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, r.duplicates), (2, 0));
    // The same bytes again: OK, nothing new.
    let r = meter
        .submit_readings(submit(vec![d1.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, r.duplicates), (0, 1));

    // Different bytes for a stored meter-day: ALREADY_EXISTS, and the new day beside it is not stored.
    let other = batch(&lpk, &kid, "meter-0001", "2025-11-26", 99);
    let d3 = batch(&lpk, &kid, "meter-0001", "2025-11-28", 3);
    let e = meter
        .submit_readings(submit(vec![d3.clone(), other]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("2025-11-26"), "{}", e.message());

    // A meter certificate submitting for another meter.
    let e = meter
        .submit_readings(submit(vec![batch(
            &lpk,
            &kid,
            "meter-0002",
            "2025-11-26",
            4,
        )]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A head-end: on its list yes, off its list no.
    let h = headend
        .submit_readings(submit(vec![
            batch(&lpk, &kid, "meter-0042", "2025-11-26", 5),
            batch(&lpk, &kid, "shop-7", "2025-11-26", 6),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.stored, 2);
    let e = headend
        .submit_readings(submit(vec![batch(&lpk, &kid, "shop-8", "2025-11-26", 7)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Malformed batches: INVALID_ARGUMENT naming the problem; nothing stored.
    let mut truncated = d3.clone();
    truncated
        .ciphertext
        .truncate(truncated.ciphertext.len() - 16);
    truncated.ciphertext_hash = blake3::hash(&truncated.ciphertext).as_bytes().to_vec();
    let mut wrong_dim = d3.clone();
    wrong_dim.ciphertext = vec![0u8; (2048 + 96) * 16];
    wrong_dim.ciphertext_hash = blake3::hash(&wrong_dim.ciphertext).as_bytes().to_vec();
    let mut wrong_key = d3.clone();
    wrong_key.key = Some(KeyRef {
        key_id: "linear-deadbeef".into(),
    });
    let mut bad_hash = d3.clone();
    bad_hash.ciphertext[100] ^= 1;
    let mut bad_day = d3.clone();
    bad_day.day = "2025-02-30".into();
    let mut bad_interval = d3.clone();
    bad_interval.interval_seconds = 600;
    for (what, b, needle) in [
        ("truncated", truncated, "ciphertext"),
        ("wrong dimension", wrong_dim, "dimension 4096"),
        ("wrong key", wrong_key, "key id"),
        ("bad hash", bad_hash, "ciphertext_hash"),
        ("bad day", bad_day, "day"),
        ("bad interval", bad_interval, "interval_seconds"),
    ] {
        let e = meter
            .submit_readings(submit(vec![d3.clone(), b]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: {}", e.message());
    }
    let too_many = vec![ReadingBatch::default(); 1001];
    let e = meter.submit_readings(submit(too_many)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    let want = vec![
        ("meter-0001".to_string(), "2025-11-26".to_string()),
        ("meter-0001".to_string(), "2025-11-27".to_string()),
    ];
    assert_eq!(
        stored(&mut compute, &["meter-0001"]).await,
        want,
        "a refused request stored something"
    );
    assert_eq!(stored(&mut compute, &[]).await.len(), 4);

    // Acknowledged batches survive SIGKILL.
    ingest
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("killed");
    let ingest = Proc::start(&pki, "ingest-svc", Role::Ingest, "ingest", INGEST, &args).await;
    let mut compute =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Compute, "compute"));
    assert_eq!(stored(&mut compute, &["meter-0001"]).await, want);
    let mut keyshare =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Keyshare, "keyshare-1"));
    let e = keyshare
        .stream_readings(StreamReadingsRequest {
            meter_ids: vec![],
            range: Some(TimeRange {
                start_unix: DAY1,
                end_unix: DAY1 + 1,
            }),
            track: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}
