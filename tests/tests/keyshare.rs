//! Three keyshare-svc processes over mutual TLS: threshold decryption through them (also with
//! one stopped), refusals, deterministic answers, and the audit chain (verified, then broken by
//! editing the database).

use std::time::Duration;

use prost::Message;
use psm_core::ceremony::PublicBundle;
use psm_core::linear::LINEAR_ENCODING;
use psm_core::lwe::LweBatch;
use psm_core::lwe::SQUASHED_BLOCK;
use psm_core::squashed::{recompose, uint_batch};
use psm_core::wire::batch_to_proto;
use psm_e2e::{Proc, TestPki};
use psm_net::Role;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateProgram, ComputationKind, ComputationManifest, InputRef, KeyRef,
    PartialDecryptRequest, ReadingBatch, SubmitReadingsRequest, TimeRange, Track,
};
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheUint64};
use tonic::Code;

const DAY: &str = "2026-02-02";

fn day_range() -> TimeRange {
    let d = psm_core::readings::parse_day(DAY).unwrap() * 86_400;
    TimeRange {
        start_unix: d,
        end_unix: d + 86_400,
    }
}

/// A tfhe-track bill manifest for meter-1 on DAY (its register readings are not stored: these
/// keyshares do not re-execute tfhe-track requests).
fn tfhe_bill() -> ComputationManifest {
    let program = b"tariff".to_vec();
    ComputationManifest {
        kind: ComputationKind::Bill as i32,
        program_hash: blake3::hash(&program).as_bytes().to_vec(),
        program,
        inputs: vec![InputRef {
            meter_id: "meter-1".into(),
            day: DAY.into(),
            track: Track::Tfhe as i32,
            ciphertext_hash: vec![7; 32],
        }],
        range: Some(day_range()),
        ..Default::default()
    }
}

/// The release of one stored meter-day as an "aggregate" of one meter at its own granularity:
/// allowed only because these keyshares' cohort minimum is 1.
fn one_meter_aggregate(stored: &ReadingBatch) -> ComputationManifest {
    let program = AggregateProgram {
        granularity_seconds: 900,
    }
    .encode_to_vec();
    ComputationManifest {
        kind: ComputationKind::Aggregate as i32,
        program_hash: blake3::hash(&program).as_bytes().to_vec(),
        program,
        inputs: vec![InputRef {
            meter_id: stored.meter_id.clone(),
            day: stored.day.clone(),
            track: Track::Linear as i32,
            ciphertext_hash: stored.ciphertext_hash.clone(),
        }],
        range: Some(day_range()),
        ..Default::default()
    }
}

fn readings_i128(r: &[i64]) -> Vec<i128> {
    r.iter().map(|&v| i128::from(v)).collect()
}

fn psm_audit_verify(pki: &TestPki, port: u16) -> std::process::Output {
    std::process::Command::new(psm_e2e::bin("psm"))
        .args([
            "audit",
            "verify",
            "--server-name",
            "keyshare-1",
            "--endpoint",
        ])
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--pki")
        .arg(pki.dir.path())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_through_three_keyshares_and_audit() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let policy = "min_cohort = 1\nallow_any_program = true\nreexecute_tfhe = \"off\"\n";
    let mut ks = psm_e2e::start_keyshares(&pki, &keys, Some(&ingest), policy).await;
    // A long grace: every live keyshare answers (and records) each request, so the audit
    // counts below do not depend on timing; a dead one fails at once and does not hold it up.
    let decryptor = psm_e2e::decryptor(&pki, &keys, &ks, Duration::from_secs(20));

    // A squashed FheUint64 (16 blocks) and a linear sum.
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let sk = bundle.compressed_server_key().unwrap().decompress();
    let cpk = bundle.compact_public_key().unwrap();
    let value = 0x0123_4567_89AB_CDEFu64;
    let squashed = tokio::task::spawn_blocking(move || {
        tfhe::set_server_key(sk);
        let ex = CompactCiphertextList::builder(&cpk)
            .push(value)
            .build()
            .expand()
            .unwrap();
        let x: FheUint64 = ex.get(0).unwrap().unwrap();
        uint_batch(&x.squash_noise().unwrap())
    })
    .await
    .unwrap();
    let lpk = bundle.linear_public_key().unwrap();
    let readings: Vec<i64> = (0..96).map(|i| i * 100 - 2_000).collect();
    let stored = psm_e2e::linear_batch(
        &lpk,
        &keys.manifest.linear_key_id,
        "meter-1",
        DAY,
        900,
        &readings,
    );
    IngestClient::new(pki.channel(ingest.port, "ingest", Role::Headend, "headend-1"))
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "one-day".into(),
            batches: vec![stored.clone()],
        })
        .await
        .unwrap();
    let linear = LweBatch::Compact {
        dimension: psm_core::linear::LINEAR_DIMENSION,
        count: 96,
        words: psm_core::lwe::words_from_le_bytes(&stored.ciphertext).unwrap(),
    };
    let tfhe_id = keys.manifest.tfhe_key_id.clone();
    let lin_id = keys.manifest.linear_key_id.clone();

    let out = decryptor
        .decrypt(&tfhe_id, &squashed, SQUASHED_BLOCK, 70, tfhe_bill(), "t-1")
        .await
        .unwrap();
    assert_eq!(recompose(&out.values, 64), u128::from(value));
    assert!(out.report.faults.is_empty(), "{:?}", out.report);
    assert!(out.report.used.len() >= 2);
    let out = decryptor
        .decrypt(
            &lin_id,
            &linear,
            LINEAR_ENCODING,
            40,
            one_meter_aggregate(&stored),
            "t-2",
        )
        .await
        .unwrap();
    assert_eq!(out.values, readings_i128(&readings));

    // Direct calls as compute: identical answers on repeat; refusals with the right codes.
    let mut client =
        KeyshareClient::new(pki.channel(ks[0].port, "keyshare-1", Role::Compute, "compute"));
    let st = client
        .status(psm_proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (st.party.as_str(), st.party_index, st.parties, st.threshold),
        ("keyshare-1", 1, 3, 2)
    );
    let mut held: Vec<(String, Vec<u32>)> = st
        .keys
        .iter()
        .map(|k| (k.key_id.clone(), k.share_indices.clone()))
        .collect();
    held.sort();
    let mut want = vec![(lin_id.clone(), vec![1, 2]), (tfhe_id.clone(), vec![1, 2])];
    want.sort();
    assert_eq!(
        held, want,
        "party 1 holds the shares of the subsets {{2}} and {{3}}"
    );
    assert_eq!(st.audit_len, 2, "two decryptions so far");
    assert_eq!(st.audit_head.len(), 32);
    let mut good = one_meter_aggregate(&stored);
    good.output_hash = linear.hash().to_vec();
    let req = PartialDecryptRequest {
        idempotency_key: "repeat".into(),
        key: Some(KeyRef {
            key_id: lin_id.clone(),
        }),
        batch: Some(batch_to_proto(&linear, LINEAR_ENCODING, 40)),
        manifest: Some(good.clone()),
    };
    let a = client
        .partial_decrypt(req.clone())
        .await
        .unwrap()
        .into_inner();
    let b = client
        .partial_decrypt(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.shares, b.shares);
    assert_eq!(b.audit_seq, a.audit_seq + 1);

    let mut no_kind = req.clone();
    no_kind.manifest = Some(ComputationManifest {
        output_hash: linear.hash().to_vec(),
        ..Default::default()
    });
    let e = client.partial_decrypt(no_kind).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut wrong_output = req.clone();
    wrong_output.manifest = Some(one_meter_aggregate(&stored));
    let e = client.partial_decrypt(wrong_output).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("output_hash"), "{}", e.message());
    let mut too_noisy = req.clone();
    too_noisy.batch = Some(batch_to_proto(&linear, LINEAR_ENCODING, 60));
    let e = client.partial_decrypt(too_noisy).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("invariant"), "{}", e.message());
    let mut unknown = req.clone();
    unknown.key = Some(KeyRef {
        key_id: "linear-0000".into(),
    });
    assert_eq!(
        client.partial_decrypt(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut truncated = req.clone();
    if let Some(psm_proto::v1::lwe_ciphertext_batch::Payload::Compact(c)) =
        truncated.batch.as_mut().and_then(|b| b.payload.as_mut())
    {
        c.words.truncate(c.words.len() - 16);
    }
    assert_eq!(
        client.partial_decrypt(truncated).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // One keyshare down: 2-of-3 still decrypts, and the dead one is named.
    let mut dead = ks.remove(1);
    dead.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("killed");
    let out = decryptor
        .decrypt(
            &lin_id,
            &linear,
            LINEAR_ENCODING,
            40,
            one_meter_aggregate(&stored),
            "t-3",
        )
        .await
        .unwrap();
    assert_eq!(out.values, readings_i128(&readings));
    assert_eq!(
        out.report.used,
        vec!["keyshare-1".to_string(), "keyshare-3".to_string()]
    );
    assert!(
        out.report.faults.iter().any(|f| f.party == "keyshare-2"),
        "{:?}",
        out.report
    );

    // The audit log holds every decision, allowed and refused, and verifies.
    let verified = psm_audit_verify(&pki, ks[0].port);
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(stdout.contains("chain of 10 records verified"), "{stdout}");

    // Edit a record in the database while the keyshare is stopped: verification now fails.
    let mut k1 = ks.remove(0);
    assert!(k1
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .is_some_and(|s| s.success()));
    {
        let db = sled::open(pki.dir.path().join("keyshare-1-data").join("audit")).unwrap();
        let tree = db.open_tree("audit").unwrap();
        // Turn the first refusal into an "allow".
        let mut rec = tree
            .iter()
            .map(|kv| {
                <psm_proto::v1::AuditRecord as prost::Message>::decode(kv.unwrap().1.as_ref())
                    .unwrap()
            })
            .find(|r| r.decision == "refuse")
            .expect("a refusal was recorded");
        assert_eq!(rec.seq, 4, "two decryptions and two repeats come first");
        rec.decision = "allow".into();
        tree.insert(rec.seq.to_be_bytes(), prost::Message::encode_to_vec(&rec))
            .unwrap();
        db.flush().unwrap();
    }
    let cfg = psm_e2e::keyshare_config(&pki, "keyshare-1", Some(&ingest), None, policy);
    let k1 = Proc::start_keyshare(
        &pki,
        "keyshare-1",
        &keys,
        &[cfg[0].as_str(), cfg[1].as_str()],
    )
    .await;
    assert!(
        k1.log_text().contains("AUDIT CHAIN BROKEN"),
        "{}",
        k1.log_text()
    );
    let broken = psm_audit_verify(&pki, k1.port);
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("audit record 4"), "{stderr}");
}
