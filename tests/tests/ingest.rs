//! ingest-svc SubmitReadings / Enroll / StreamReadings / StreamEnrollments over mTLS: identity
//! rules, validation before storage, idempotency, atomicity, one encryption per (meter, epoch,
//! channel, slot), enrollment before readings, durability across SIGKILL.
//!
//! Ingest never opens an envelope, so the enrollments here are sealed to keys made locally for
//! the key set's party names; no keyshare runs.

use std::time::Duration;

use psm_core::linear::Channel as Ch;
use psm_e2e::{Proc, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::service_names::INGEST;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    EnrollRequest, Enrollment, KeyRef, ReadingBatch, StreamEnrollmentsRequest,
    StreamReadingsRequest, SubmitReadingsRequest, TimeRange, Track,
};
use tonic::transport::Channel;
use tonic::Code;

const DAY1: i64 = 1_764_115_200; // 2025-11-26T00:00:00Z
/// Day number of DAY1.
const D1: i64 = DAY1 / 86_400;

type Client = IngestClient<Channel>;

fn client(pki: &TestPki, ingest: &Proc, role: Role, name: &str) -> Client {
    IngestClient::new(pki.channel(ingest.port, "ingest", role, name))
}

/// (party name, enrollment public key) for every party of the key set, made here: ingest only
/// checks the envelopes' shape.
fn local_enrollment_keys(keys: &psm_core::ceremony::CeremonyOutput) -> Vec<(String, Vec<u8>)> {
    keys.manifest
        .party_names
        .iter()
        .map(|n| (n.clone(), psm_core::linear::envelope::generate_keypair().1))
        .collect()
}

/// A day of 15-minute readings.
fn values(seed: i64) -> Vec<i64> {
    (0..96).map(|i| (i * 13 + seed * 7) % 500).collect()
}

fn submit(batches: Vec<ReadingBatch>) -> SubmitReadingsRequest {
    SubmitReadingsRequest {
        idempotency_key: "k-1".into(),
        batches,
    }
}

fn enrolling(enrollments: Vec<Enrollment>) -> EnrollRequest {
    EnrollRequest {
        idempotency_key: "e-1".into(),
        enrollments,
    }
}

async fn send(c: &mut Client, batches: Vec<ReadingBatch>) -> Result<(u32, u32), tonic::Status> {
    let r = c.submit_readings(submit(batches)).await?.into_inner();
    Ok((r.stored, r.duplicates))
}

async fn enroll(c: &mut Client, enrollments: Vec<Enrollment>) -> Result<(u32, u32), tonic::Status> {
    let r = c.enroll(enrolling(enrollments)).await?.into_inner();
    Ok((r.stored, r.duplicates))
}

/// The refusal of `r`, checked to carry `code`; its message.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) -> String {
    match r {
        Err(e) if e.code() == code => e.message().to_owned(),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Every stored batch of `meters` within ten days of DAY1, in store order.
async fn stored(c: &mut Client, meters: &[&str]) -> Vec<ReadingBatch> {
    let mut s = c
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
        out.push(b);
    }
    out
}

async fn enrollments(
    c: &mut Client,
    after_seq: u64,
    meters: &[&str],
) -> Result<Vec<Enrollment>, tonic::Status> {
    let mut s = c
        .stream_enrollments(StreamEnrollmentsRequest {
            meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            after_seq,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await? {
        out.push(e);
    }
    Ok(out)
}

fn seqs(es: &[Enrollment]) -> Vec<(u64, &str, u32)> {
    es.iter()
        .map(|e| (e.seq, e.meter_id.as_str(), e.epoch))
        .collect()
}

#[tokio::test]
async fn submissions_are_checked_idempotent_atomic_and_durable() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ekeys = local_enrollment_keys(&keys);
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

    let mut meter = client(&pki, &ingest, Role::Meter, "meter-0001");
    let mut headend = client(&pki, &ingest, Role::Headend, "headend-1");
    // headend-2 has no list: it may submit and enroll for nobody.
    let mut headend2 = client(&pki, &ingest, Role::Headend, "headend-2");
    let mut compute = client(&pki, &ingest, Role::Compute, "compute");

    // A meter enrolls itself, then submits.
    let m1 = TestMeter::new("meter-0001", 1);
    assert_eq!(
        enroll(&mut meter, vec![m1.enrollment(&ekeys)])
            .await
            .unwrap(),
        (1, 0)
    );
    let d1 = m1.batch(D1, Ch::Import, 900, 0, &values(1));
    let d2 = m1.batch(D1 + 1, Ch::Import, 900, 0, &values(2));
    assert_eq!(
        send(&mut meter, vec![d1.clone(), d2.clone()])
            .await
            .unwrap(),
        (2, 0)
    );
    // The same bytes again: OK, nothing new.
    assert_eq!(send(&mut meter, vec![d1.clone()]).await.unwrap(), (0, 1));

    // The same readings encrypted again (fresh noise, other bytes) for a stored day:
    // ALREADY_EXISTS, and the new day beside it is not stored.
    let again = m1.batch(D1, Ch::Import, 900, 0, &values(1));
    assert_ne!(again.ciphertext, d1.ciphertext);
    let d3 = m1.batch(D1 + 2, Ch::Import, 900, 0, &values(3));
    let m = refused(
        send(&mut meter, vec![d3.clone(), again]).await,
        Code::AlreadyExists,
    );
    for needle in ["meter-0001", "2025-11-26", "epoch 1", "new epoch"] {
        assert!(m.contains(needle), "{needle}: {m}");
    }

    // A meter certificate for another meter.
    let m2 = TestMeter::new("meter-0002", 1);
    refused(
        send(
            &mut meter,
            vec![m2.batch(D1, Ch::Import, 900, 0, &values(4))],
        )
        .await,
        Code::PermissionDenied,
    );
    refused(
        enroll(&mut meter, vec![m2.enrollment(&ekeys)]).await,
        Code::PermissionDenied,
    );
    // A head-end: on its list yes, off its list no.
    let m42 = TestMeter::new("meter-0042", 1);
    let shop7 = TestMeter::new("shop-7", 1);
    let shop8 = TestMeter::new("shop-8", 1);
    assert_eq!(
        enroll(
            &mut headend,
            vec![m42.enrollment(&ekeys), shop7.enrollment(&ekeys)]
        )
        .await
        .unwrap(),
        (2, 0)
    );
    assert_eq!(
        send(
            &mut headend,
            vec![
                m42.batch(D1, Ch::Import, 900, 0, &values(5)),
                shop7.batch(D1, Ch::Import, 900, 0, &values(6)),
            ]
        )
        .await
        .unwrap(),
        (2, 0)
    );
    let m = refused(
        enroll(&mut headend, vec![shop8.enrollment(&ekeys)]).await,
        Code::PermissionDenied,
    );
    assert!(m.contains("shop-8"), "{m}");
    refused(
        send(
            &mut headend,
            vec![shop8.batch(D1, Ch::Import, 900, 0, &values(7))],
        )
        .await,
        Code::PermissionDenied,
    );
    refused(
        enroll(&mut headend2, vec![m1.enrollment(&ekeys)]).await,
        Code::PermissionDenied,
    );
    refused(
        send(&mut headend2, vec![d3.clone()]).await,
        Code::PermissionDenied,
    );

    // Malformed batches: INVALID_ARGUMENT naming the problem; nothing stored.
    let mut truncated = d3.clone();
    truncated
        .ciphertext
        .truncate(truncated.ciphertext.len() - 16);
    truncated.ciphertext_hash = blake3::hash(&truncated.ciphertext).as_bytes().to_vec();
    let mut keyed = d3.clone();
    keyed.key = Some(KeyRef {
        key_id: keys.manifest.tfhe_key_id.clone(),
    });
    let mut bad_hash = d3.clone();
    bad_hash.ciphertext[100] ^= 1;
    let mut bad_day = d3.clone();
    bad_day.day = "2025-02-30".into();
    let mut non_canonical = d3.clone();
    non_canonical.day = "2026-01-+1".into();
    let mut bad_interval = d3.clone();
    bad_interval.interval_seconds = 600;
    let mut no_channel = d3.clone();
    no_channel.channel = 0;
    let mut epoch0 = d3.clone();
    epoch0.epoch = 0;
    let mut past_day = d3.clone();
    past_day.first_interval = 1;
    let mut no_track = d3.clone();
    no_track.track = 0;
    let junk = vec![7u8; 64];
    let tfhe = |key_id: &str| ReadingBatch {
        meter_id: "meter-0001".into(),
        day: "2025-11-28".into(),
        track: Track::Tfhe as i32,
        key: Some(KeyRef {
            key_id: key_id.into(),
        }),
        interval_seconds: 0,
        count: 2,
        ciphertext_hash: blake3::hash(&junk).as_bytes().to_vec(),
        ciphertext: junk.clone(),
        ..Default::default()
    };
    for (what, b, needle) in [
        ("truncated", truncated, "ciphertext"),
        ("a key id", keyed, "key"),
        ("bad hash", bad_hash, "ciphertext_hash"),
        ("bad day", bad_day, "day"),
        ("non-canonical day", non_canonical, "day"),
        ("bad interval", bad_interval, "interval_seconds"),
        ("no channel", no_channel, "channel"),
        ("epoch 0", epoch0, "epoch"),
        ("past the day", past_day, "count"),
        ("no track", no_track, "track"),
        ("tfhe, wrong key", tfhe("tfhe-deadbeef"), "key id"),
        (
            "tfhe, no proof",
            tfhe(&keys.manifest.tfhe_key_id),
            "batch 1",
        ),
    ] {
        let m = refused(
            send(&mut meter, vec![d3.clone(), b]).await,
            Code::InvalidArgument,
        );
        assert!(m.contains(needle), "{what}: {m}");
        assert!(m.contains("nothing was stored"), "{what}: {m}");
    }
    // An epoch the meter has not enrolled.
    let m = refused(
        send(
            &mut meter,
            vec![TestMeter::new("meter-0001", 2).batch(D1 + 2, Ch::Import, 900, 0, &values(8))],
        )
        .await,
        Code::FailedPrecondition,
    );
    assert!(
        m.contains("meter-0001") && m.contains("epoch 2") && m.contains("Ingest.Enroll"),
        "{m}"
    );
    // Sizes.
    refused(
        send(&mut meter, vec![ReadingBatch::default(); 1001]).await,
        Code::ResourceExhausted,
    );
    refused(
        enroll(&mut meter, vec![m1.enrollment(&ekeys); 1001]).await,
        Code::ResourceExhausted,
    );

    let want = vec![d1.clone(), d2.clone()];
    assert_eq!(
        stored(&mut compute, &["meter-0001"]).await,
        want,
        "a refused request stored something"
    );
    assert_eq!(stored(&mut compute, &[]).await.len(), 4);

    // Acknowledged batches and enrollments survive SIGKILL.
    ingest
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("killed");
    let ingest = Proc::start(&pki, "ingest-svc", Role::Ingest, "ingest", INGEST, &args).await;
    let mut compute = client(&pki, &ingest, Role::Compute, "compute");
    assert_eq!(stored(&mut compute, &["meter-0001"]).await, want);
    let mut keyshare = client(&pki, &ingest, Role::Keyshare, "keyshare-1");
    assert_eq!(
        seqs(&enrollments(&mut keyshare, 0, &[]).await.unwrap()),
        [(1, "meter-0001", 1), (2, "meter-0042", 1), (3, "shop-7", 1)]
    );
    let mut meter = client(&pki, &ingest, Role::Meter, "meter-0001");
    assert_eq!(send(&mut meter, vec![d3]).await.unwrap(), (1, 0));
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

#[tokio::test]
async fn each_slot_is_encrypted_once_and_enrollments_are_immutable() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ekeys = local_enrollment_keys(&keys);
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let mut headend = client(&pki, &ingest, Role::Headend, "headend-1");
    let mut headend2 = client(&pki, &ingest, Role::Headend, "headend-2");
    let mut compute = client(&pki, &ingest, Role::Compute, "compute");
    let mut keyshare = client(&pki, &ingest, Role::Keyshare, "keyshare-2");

    let a = TestMeter::new("meter-a", 1);
    let b = TestMeter::new("meter-b", 1);
    let vals = values(1);

    // Readings before the enrollment: FAILED_PRECONDITION.
    let m = refused(
        psm_e2e::submit(&pki, &ingest, vec![a.batch(D1, Ch::Import, 900, 0, &vals)]).await,
        Code::FailedPrecondition,
    );
    assert!(m.contains("meter-a") && m.contains("epoch 1"), "{m}");

    // Enrollment: stored once; the same bytes again are a duplicate.
    let ea = a.enrollment(&ekeys);
    let eb = b.enrollment(&ekeys);
    assert_eq!(
        enroll(&mut headend, vec![ea.clone(), eb.clone()])
            .await
            .unwrap(),
        (2, 0)
    );
    assert_eq!(
        enroll(&mut headend, vec![ea.clone(), eb.clone()])
            .await
            .unwrap(),
        (0, 2)
    );
    // Other envelopes for an enrolled (meter, epoch) — the same seeds sealed again, or other
    // seeds — are refused, with nothing of the request stored.
    let c = TestMeter::new("meter-c", 1);
    for other in [
        a.enrollment(&ekeys),
        TestMeter::new("meter-a", 1).enrollment(&ekeys),
    ] {
        let m = refused(
            enroll(&mut headend, vec![c.enrollment(&ekeys), other]).await,
            Code::AlreadyExists,
        );
        for needle in ["meter-a", "epoch 1", "rotation"] {
            assert!(m.contains(needle), "{needle}: {m}");
        }
    }
    let m = refused(
        psm_e2e::enroll(&pki, &ingest, &[&TestMeter::new("meter-b", 1)], &ekeys).await,
        Code::AlreadyExists,
    );
    assert!(m.contains("meter-b"), "{m}");
    // A new epoch is a rotation.
    let a2 = TestMeter::new("meter-a", 2);
    assert_eq!(
        psm_e2e::enroll(&pki, &ingest, &[&a2], &ekeys)
            .await
            .unwrap()
            .stored,
        1
    );
    // Malformed enrollments: INVALID_ARGUMENT.
    let mut missing = c.enrollment(&ekeys);
    missing.envelopes.pop();
    let wrong_scheme = TestMeter::with_scheme(
        "meter-c",
        1,
        psm_core::threshold::Scheme::new(3, 3).unwrap(),
    )
    .enrollment(&ekeys);
    let mut stranger = c.enrollment(&ekeys);
    stranger.envelopes[0].recipient = "keyshare-9".into();
    let mut short = c.enrollment(&ekeys);
    short.commitments[0].truncate(16);
    for (what, e) in [
        ("an envelope missing", missing),
        ("wrong scheme", wrong_scheme),
        ("unknown recipient", stranger),
        ("short commitment", short),
    ] {
        let m = refused(enroll(&mut headend, vec![e]).await, Code::InvalidArgument);
        assert!(m.contains("meter-c"), "{what}: {m}");
    }
    let m = refused(
        enroll(
            &mut headend,
            vec![c.enrollment(&ekeys), c.enrollment(&ekeys)],
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("meter-c"), "{m}");
    // A head-end not allowed for the meter.
    refused(
        enroll(&mut headend2, vec![c.enrollment(&ekeys)]).await,
        Code::PermissionDenied,
    );

    // StreamEnrollments: role keyshare only; store order; after_seq pages; a meter filter.
    for (role, name) in [
        (Role::Compute, "compute"),
        (Role::Headend, "headend-1"),
        (Role::Operator, "billing"),
    ] {
        let mut other = client(&pki, &ingest, role, name);
        refused(
            enrollments(&mut other, 0, &[]).await,
            Code::PermissionDenied,
        );
    }
    let all = enrollments(&mut keyshare, 0, &[]).await.unwrap();
    assert_eq!(
        seqs(&all),
        [(1, "meter-a", 1), (2, "meter-b", 1), (3, "meter-a", 2)],
        "a refused enrollment was stored"
    );
    let mut want = ea.clone();
    want.seq = 1;
    assert_eq!(all[0], want);
    assert_eq!(
        seqs(&enrollments(&mut keyshare, 1, &[]).await.unwrap()),
        [(2, "meter-b", 1), (3, "meter-a", 2)]
    );
    assert!(enrollments(&mut keyshare, 3, &[]).await.unwrap().is_empty());
    assert_eq!(
        seqs(
            &enrollments(&mut keyshare, 0, &["meter-a", "meter-z"])
                .await
                .unwrap()
        ),
        [(1, "meter-a", 1), (3, "meter-a", 2)]
    );
    assert_eq!(
        seqs(&enrollments(&mut keyshare, 1, &["meter-a"]).await.unwrap()),
        [(3, "meter-a", 2)]
    );
    refused(
        enrollments(&mut keyshare, 0, &["no such/meter"]).await,
        Code::InvalidArgument,
    );

    // A partial day, then the full day over it: ALREADY_EXISTS.
    let partial = a.batch(D1, Ch::Import, 900, 0, &vals[..40]);
    assert_eq!(
        send(&mut headend, vec![partial.clone()]).await.unwrap(),
        (1, 0)
    );
    let full = a.batch(D1, Ch::Import, 900, 0, &vals);
    let m = refused(send(&mut headend, vec![full]).await, Code::AlreadyExists);
    for needle in [
        "meter-a",
        "2025-11-26",
        "epoch 1",
        "import",
        "00:00–10:00",
        "new epoch",
    ] {
        assert!(m.contains(needle), "{needle}: {m}");
    }
    // An overlapping batch (hourly, 09:00–11:00).
    let m = refused(
        send(
            &mut headend,
            vec![a.batch(D1, Ch::Import, 3600, 9, &[500, 600])],
        )
        .await,
        Code::AlreadyExists,
    );
    assert!(m.contains("09:00–10:00"), "{m}");
    // A re-encrypted retry of the same intervals (same readings, fresh noise).
    let reencrypted = a.batch(D1, Ch::Import, 900, 0, &vals[..40]);
    assert_ne!(reencrypted.ciphertext, partial.ciphertext);
    refused(
        send(&mut headend, vec![reencrypted]).await,
        Code::AlreadyExists,
    );
    // The identical retry is a duplicate.
    assert_eq!(
        send(&mut headend, vec![partial.clone()]).await.unwrap(),
        (0, 1)
    );
    // Disjoint partial batches of one day are both stored; the export channel is its own key.
    let rest = a.batch(D1, Ch::Import, 900, 40, &vals[40..]);
    let export = a.batch(D1, Ch::Export, 900, 0, &vals[..10]);
    assert_eq!(
        psm_e2e::submit(&pki, &ingest, vec![rest.clone(), export.clone()])
            .await
            .unwrap()
            .stored,
        2
    );
    let b5 = b.batch(D1, Ch::Import, 300, 0, &[1; 288]);
    assert_eq!(send(&mut headend, vec![b5.clone()]).await.unwrap(), (1, 0));

    // Two batches of one request over the same slots: INVALID_ARGUMENT.
    let m = refused(
        send(
            &mut headend,
            vec![
                b.batch(D1 + 1, Ch::Import, 900, 0, &vals[..8]),
                b.batch(D1 + 1, Ch::Import, 1800, 3, &[1, 2]),
            ],
        )
        .await,
        Code::InvalidArgument,
    );
    assert!(m.contains("batch 0") && m.contains("batch 1"), "{m}");
    // An epoch the meter has not enrolled.
    let m = refused(
        send(
            &mut headend,
            vec![TestMeter::new("meter-b", 3).batch(D1 + 1, Ch::Import, 900, 0, &vals)],
        )
        .await,
        Code::FailedPrecondition,
    );
    assert!(
        m.contains("meter-b") && m.contains("epoch 3") && m.contains("Ingest.Enroll"),
        "{m}"
    );
    // The non-canonical day.
    let mut non_canonical = b.batch(D1 + 1, Ch::Import, 900, 0, &vals);
    non_canonical.day = "2026-01-+1".into();
    let m = refused(
        send(&mut headend, vec![non_canonical]).await,
        Code::InvalidArgument,
    );
    assert!(m.contains("day"), "{m}");
    // A head-end not allowed for the meter.
    refused(
        send(
            &mut headend2,
            vec![b.batch(D1 + 1, Ch::Import, 900, 0, &vals)],
        )
        .await,
        Code::PermissionDenied,
    );

    assert_eq!(
        stored(&mut compute, &["meter-a"]).await,
        [partial, rest, export],
        "a refused request stored something"
    );
    assert_eq!(stored(&mut compute, &["meter-b"]).await, [b5]);
    // meter-c never got in.
    assert!(stored(&mut compute, &["meter-c"]).await.is_empty());
}
