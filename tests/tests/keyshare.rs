//! Three keyshare-svc processes over mutual TLS: threshold decryption through them (also with
//! one stopped), refusals, deterministic answers, and the audit chain (verified, then broken by
//! editing the database).

use std::time::Duration;

use psm_core::ceremony::PublicBundle;
use psm_core::linear::LINEAR_ENCODING;
use psm_core::lwe::SQUASHED_BLOCK;
use psm_core::squashed::{recompose, uint_batch};
use psm_core::wire::batch_to_proto;
use psm_e2e::{Proc, TestPki};
use psm_net::Role;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{ComputationKind, ComputationManifest, KeyRef, PartialDecryptRequest};
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheUint64};
use tonic::Code;

fn manifest(kind: ComputationKind) -> ComputationManifest {
    ComputationManifest {
        kind: kind as i32,
        ..Default::default()
    }
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
    let mut ks = psm_e2e::start_keyshares(&pki, &keys).await;
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
    let readings = [1_500i64, -250, 0, 7_777];
    let linear = psm_core::linear::encrypt(&lpk, &readings);
    let tfhe_id = keys.manifest.tfhe_key_id.clone();
    let lin_id = keys.manifest.linear_key_id.clone();

    let out = decryptor
        .decrypt(
            &tfhe_id,
            &squashed,
            SQUASHED_BLOCK,
            70,
            manifest(ComputationKind::Bill),
            "t-1",
        )
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
            manifest(ComputationKind::Aggregate),
            "t-2",
        )
        .await
        .unwrap();
    assert_eq!(out.values, vec![1_500, -250, 0, 7_777]);

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
    let mut good = manifest(ComputationKind::Aggregate);
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
    wrong_output.manifest = Some(manifest(ComputationKind::Aggregate));
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
            manifest(ComputationKind::Aggregate),
            "t-3",
        )
        .await
        .unwrap();
    assert_eq!(out.values, vec![1_500, -250, 0, 7_777]);
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
    let k1 = Proc::start_keyshare(&pki, "keyshare-1", &keys, &[]).await;
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
