//! Trust that does not come from the utility (docs/trust-anchors.md), attacked with the utility's
//! powers over real processes and mTLS: head-end and compute certificates, an ingest of its own
//! per keyshare, copies of device keys (the utility provisioned the meters), and a corrupt
//! keyshare's share of the work. Every attack is refused, and the refusal is audited at the
//! honest keyshares.

use std::time::Duration;

use prost::Message;
use psm_core::linear::Channel;
use psm_core::signing::{AnchorFile, Anchors, SecretKey};
use psm_e2e::{
    audit_log, enroll, enrollment_keys, registry_entry, submit, Proc, System, TestMeter, TestPki,
    TEST_POLICY,
};
use psm_net::Role;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateProgram, Cohort, ComputationKind, EnrollmentState, GetReceiptsRequest, LinearRelease,
    ReceiptAnswer, ReleaseOutput, ReleaseRequest, TimeRange,
};
use tonic::transport::Channel as GrpcChannel;
use tonic::Code;

const DAY: i64 = 20_500;

fn readings(seed: i64) -> Vec<i64> {
    (0..96).map(|i| 100 + (seed * 37 + i * 11) % 400).collect()
}

fn as_compute(pki: &TestPki, k: &Proc) -> KeyshareClient<GrpcChannel> {
    KeyshareClient::new(pki.channel(k.port, &k.name, Role::Compute, "compute"))
}

/// A one-day aggregate release of `ids` in 15-minute buckets, as compute asks for it.
fn aggregate(ids: &[&str], day: i64, key: &str) -> ReleaseRequest {
    let mut ids: Vec<String> = ids.iter().map(|m| m.to_string()).collect();
    ids.sort();
    ReleaseRequest {
        idempotency_key: key.into(),
        release: Some(LinearRelease {
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
            cohorts: vec![Cohort { meter_ids: ids }],
            outputs: (0..96)
                .map(|i| ReleaseOutput {
                    index: i,
                    cohort: 0,
                })
                .collect(),
            reissue_reason: String::new(),
        }),
    }
}

/// What keyshare `k` says about `meters`' epoch-1 enrollments, asked as headend-1.
async fn receipts(pki: &TestPki, k: &Proc, meters: &[&str]) -> Vec<ReceiptAnswer> {
    KeyshareClient::new(pki.channel(k.port, &k.name, Role::Headend, "headend-1"))
        .get_receipts(GetReceiptsRequest {
            meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            epoch: 1,
        })
        .await
        .expect("receipts")
        .into_inner()
        .answers
}

/// Asks every keyshare for its receipts until none is pending any more (at most 20 s).
async fn settled_receipts(pki: &TestPki, ks: &[Proc], meters: &[&str]) -> Vec<Vec<ReceiptAnswer>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = Vec::new();
        for k in ks {
            all.push(receipts(pki, k, meters).await);
        }
        let pending = all
            .iter()
            .flatten()
            .any(|a| a.state == EnrollmentState::Pending as i32);
        if !pending || std::time::Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn anchors_of(pki: &TestPki, ks: &[Proc]) -> Anchors {
    let mut a = Anchors::default();
    for k in ks {
        let f = AnchorFile::read(
            &pki.dir
                .path()
                .join(format!("{}-data", k.name))
                .join("anchor.pub"),
        )
        .unwrap();
        a.0.insert(f.party.clone(), f.key().unwrap());
    }
    a
}

/// Starts keyshare `name` over `ingest` with `registry` and the test policy, its `[keyshare]`
/// section starting with the lines `extra` (what an attack changes: another ingest, another
/// anchor). Keyshares keep their address and data directory, so this also restarts one.
async fn start_keyshare_with(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    name: &str,
    ingest: &Proc,
    registry: &str,
    extra: &str,
) -> Proc {
    let cfg = psm_e2e::keyshare_config_with_registry(
        pki,
        name,
        Some(ingest),
        Some(keys.public_dir.as_path()),
        TEST_POLICY,
        registry,
    );
    let text = std::fs::read_to_string(&cfg[1]).unwrap();
    std::fs::write(
        &cfg[1],
        text.replacen("[keyshare]\n", &format!("[keyshare]\n{extra}"), 1),
    )
    .unwrap();
    Proc::start_keyshare(pki, name, keys, &[cfg[0].as_str(), cfg[1].as_str()]).await
}

/// Keyshare `name` over `ingest`'s ingest (a keyshare may be shown an ingest of the utility's
/// choosing).
async fn start_keyshare_on(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    name: &str,
    ingest: &Proc,
    registry: &str,
) -> Proc {
    let extra = format!("ingest_server_name = {:?}\n", ingest.name);
    start_keyshare_with(pki, keys, name, ingest, registry, &extra).await
}

/// The utility shows the holders of one share different enrollments of meter V: keyshare-1 and
/// keyshare-2 fetch from one ingest, which holds V's own enrollment; keyshare-3 from another,
/// which holds an enrollment of seeds the utility chose, signed with its copy of V's device key
/// (the utility provisioned the meter). Each holder's checks pass on what it saw; the
/// co-holders' comparison of the signed manifest refuses V everywhere, audited. A front-run
/// enrollment without any device key is refused as `device-signature`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_view_of_an_enrollment_is_refused_by_every_holder() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let registry = registry_entry("victim", "meter") + &registry_entry("front", "meter");
    // Both ingests are the utility's; neither checks signatures (no registry of their own).
    let dev = psm_e2e::DEV_REGISTRY;
    let ingest_a = psm_e2e::start_ingest_named(&pki, &keys, "ingest", dev).await;
    let ingest_b = psm_e2e::start_ingest_named(&pki, &keys, "ingest-b", dev).await;
    let ks = vec![
        start_keyshare_on(&pki, &keys, "keyshare-1", &ingest_a, &registry).await,
        start_keyshare_on(&pki, &keys, "keyshare-2", &ingest_a, &registry).await,
        start_keyshare_on(&pki, &keys, "keyshare-3", &ingest_b, &registry).await,
    ];
    let ek = enrollment_keys(&pki, &ks).await;

    let real = TestMeter::new("victim", 1);
    let chosen = TestMeter::new("victim", 1); // the utility's seeds, same device key
    enroll(&pki, &ingest_a, &[&real], &ek).await.unwrap();
    enroll(&pki, &ingest_b, &[&chosen], &ek).await.unwrap();
    // A head-end front-running meter "front" with seeds of its own, signed by a key of its own.
    let mut front = TestMeter::new("front", 1);
    front.device = SecretKey::generate();
    enroll(&pki, &ingest_a, &[&front], &ek).await.unwrap();
    enroll(&pki, &ingest_b, &[&front], &ek).await.unwrap();

    let answers = settled_receipts(&pki, &ks, &["victim", "front"]).await;
    for (k, a) in ks.iter().zip(&answers) {
        assert_eq!(
            a[0].state,
            EnrollmentState::Refused as i32,
            "{}: {:?}",
            k.name,
            a[0]
        );
        assert!(a[0].receipt.is_none());
        assert_eq!(a[1].state, EnrollmentState::Unknown as i32, "{:?}", a[1]);
        assert!(a[1].reason.contains("device signature"), "{:?}", a[1]);
    }
    // Every holder audited why: the manifests differ between co-holders.
    for k in &ks {
        let log = audit_log(&pki, k).await;
        assert!(
            log.iter().any(|r| r.rule == "co-holder"
                && r.decision == "refuse"
                && r.reason.contains("meter victim epoch 1")
                && (r.reason.contains("different manifest") || r.reason.contains("refused it"))),
            "{}: {log:#?}",
            k.name
        );
        assert!(
            log.iter().any(|r| r.rule == "device-signature"
                && r.decision == "refuse"
                && r.reason.contains("meter front")),
            "{}: {log:#?}",
            k.name
        );
    }
    // And no release uses V.
    let r = as_compute(&pki, &ks[0])
        .release(aggregate(&["victim"], DAY, "victim"))
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::FailedPrecondition, "{r:?}");
}

/// The release split: compute shows keyshare-2 an aggregate over C and keyshare-3 the same over
/// C ∖ {V}; with the corrupt keyshare-1's shares of V, the difference of the two honest answers
/// for the share keyshare-1 lacks would give V's readings. Keyshare-2 has keyshare-3 judge and
/// record C before it answers, so keyshare-3 refuses C ∖ {V} as `differencing` — in either order,
/// and when both arrive at once at most one is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_view_of_a_release_is_refused_by_the_co_holder() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ids: Vec<String> = (0..6).map(|i| format!("home-{i}")).collect();
    let registry: String = ids.iter().map(|m| registry_entry(m, "meter")).collect();
    let sys = System::start_with_registry(&pki, &keys, "", TEST_POLICY, &registry).await;
    let ek = enrollment_keys(&pki, &sys.keyshares).await;
    let homes: Vec<TestMeter> = ids.iter().map(|m| TestMeter::new(m, 1)).collect();
    enroll(&pki, &sys.ingest, &homes.iter().collect::<Vec<_>>(), &ek)
        .await
        .unwrap();
    let mut batches = Vec::new();
    for (i, h) in homes.iter().enumerate() {
        for d in 0..2 {
            batches.push(h.batch(DAY + d, Channel::Import, 900, 0, &readings(i as i64)));
        }
    }
    submit(&pki, &sys.ingest, batches).await.unwrap();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let without_v = &all[..5];
    let (k2, k3) = (&sys.keyshares[1], &sys.keyshares[2]);
    // Activate every enrollment first (each keyshare's receipts).
    let answers = settled_receipts(&pki, &sys.keyshares, &all).await;
    assert!(answers
        .iter()
        .flatten()
        .all(|a| a.state == EnrollmentState::Active as i32));

    // Sequential: C to keyshare-2 is answered (confirmed by both co-holders) …
    let ok = as_compute(&pki, k2)
        .release(aggregate(&all, DAY, "c-to-2"))
        .await
        .expect("the full cohort is released");
    assert_eq!(ok.into_inner().shares.len(), 2);
    // … and C ∖ {V} to keyshare-3 is refused: keyshare-3 recorded C when it confirmed it.
    let e = as_compute(&pki, k3)
        .release(aggregate(without_v, DAY, "cv-to-3"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().starts_with("differencing:"), "{}", e.message());
    let log3 = audit_log(&pki, k3).await;
    assert!(
        log3.iter()
            .any(|r| r.decision == "allow"
                && r.caller.contains("keyshare-2 (co-holder confirmation)")),
        "{log3:#?}"
    );
    assert!(
        log3.iter()
            .any(|r| r.decision == "refuse" && r.rule == "differencing"),
        "{log3:#?}"
    );

    // At once, on the next day: never both.
    let (a, b) = tokio::join!(
        async {
            as_compute(&pki, k2)
                .release(aggregate(&all, DAY + 1, "c-to-2-b"))
                .await
        },
        async {
            as_compute(&pki, k3)
                .release(aggregate(without_v, DAY + 1, "cv-to-3-b"))
                .await
        }
    );
    assert!(
        !(a.is_ok() && b.is_ok()),
        "both sides of a split view were answered"
    );
    for r in [&a, &b] {
        if let Err(e) = r {
            assert!(
                e.message().starts_with("differencing:") || e.message().starts_with("co-holder:"),
                "{}",
                e.message()
            );
        }
    }
}

/// Ingest with the regulators' registry: a front-run enrollment (not the device's signature), a
/// body altered in transit, an unsigned batch and a meter not on the registry are refused
/// PERMISSION_DENIED with nothing stored; the meter's own are stored. The keyshares' receipts
/// verify under their anchors — and a receipt signed by any other key, or moved to another
/// keyshare's name, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_unsigned_input_and_receipts_need_the_anchors() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let registry = registry_entry("home-0", "meter") + &registry_entry("home-1", "meter");
    let sys = System::start_with_registry(&pki, &keys, "", TEST_POLICY, &registry).await;
    let ek = enrollment_keys(&pki, &sys.keyshares).await;

    let mut forged = TestMeter::new("home-0", 1);
    forged.device = SecretKey::generate();
    let e = enroll(&pki, &sys.ingest, &[&forged], &ek)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("device key"), "{}", e.message());
    let stranger = TestMeter::new("stranger", 1);
    let e = enroll(&pki, &sys.ingest, &[&stranger], &ek)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("registry"), "{}", e.message());

    // The meter's own enrollment with one envelope altered in transit: the signature covers the
    // envelopes, so it is refused at the door and does not block the genuine one.
    let home = TestMeter::new("home-0", 1);
    let mut tampered = home.enrollment(&ek);
    tampered.envelopes[3].ciphertext[0] ^= 1;
    let mut he = psm_proto::v1::ingest_client::IngestClient::new(pki.channel(
        sys.ingest.port,
        "ingest",
        Role::Headend,
        "headend-1",
    ));
    let e = he
        .enroll(psm_proto::v1::EnrollRequest {
            idempotency_key: "tampered".into(),
            enrollments: vec![tampered],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    enroll(&pki, &sys.ingest, &[&home], &ek).await.unwrap();
    let good = home.batch(DAY, Channel::Import, 900, 0, &readings(1));
    let mut altered = good.clone();
    altered.ciphertext[0] ^= 1;
    altered.ciphertext_hash = blake3::hash(&altered.ciphertext).as_bytes().to_vec();
    let e = submit(&pki, &sys.ingest, vec![altered]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not signed"), "{}", e.message());
    let mut unsigned = good.clone();
    unsigned.device_signature.clear();
    let e = submit(&pki, &sys.ingest, vec![unsigned]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let r = submit(&pki, &sys.ingest, vec![good]).await.unwrap();
    assert_eq!(r.stored, 1, "nothing of the refused requests was stored");

    // Receipts: every keyshare's verifies under its anchor; nothing else does.
    let anchors = anchors_of(&pki, &sys.keyshares);
    let answers = settled_receipts(&pki, &sys.keyshares, &["home-0"]).await;
    let mut first: Option<psm_proto::v1::EnrollmentReceipt> = None;
    for a in answers.iter().map(|a| &a[0]) {
        let r = a.receipt.clone().expect("active with a receipt");
        let h: [u8; 32] = r.manifest_hash.clone().try_into().unwrap();
        anchors.verify_receipt(&r, "home-0", 1, &h).unwrap();
        if let Some(f) = &first {
            assert_eq!(
                f.manifest_hash, r.manifest_hash,
                "every keyshare activated one manifest"
            );
        }
        first.get_or_insert(r);
    }
    let r = first.unwrap();
    let h: [u8; 32] = r.manifest_hash.clone().try_into().unwrap();
    let mut forged = r.clone();
    forged.signature = SecretKey::generate()
        .sign(&psm_core::signing::receipt_message(
            &r.party, "home-0", 1, &h,
        ))
        .to_vec();
    assert!(anchors.verify_receipt(&forged, "home-0", 1, &h).is_err());
    let mut moved = r.clone();
    moved.party = "keyshare-2".into();
    assert!(anchors.verify_receipt(&moved, "home-0", 1, &h).is_err());
    // A meter certificate asks for its own receipts only.
    let e = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Meter,
        "home-1",
    ))
    .get_receipts(GetReceiptsRequest {
        meter_ids: vec!["home-0".into()],
        epoch: 1,
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// One keyshare down (2-of-3): an enrollment waits (it needs every holder), releases go on —
/// each answering keyshare records them for the one that is down — and the keyshare imports
/// those records when it is back, so it refuses what would difference against them. A keyshare
/// that restarts while a co-holder is still down withholds the share it holds with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keyshare_down_enrollment_waits_releases_go_on_and_records_are_imported() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ids: Vec<String> = (0..7).map(|i| format!("home-{i}")).collect();
    let registry: String = ids.iter().map(|m| registry_entry(m, "meter")).collect();
    let mut sys = System::start_with_registry(&pki, &keys, "", TEST_POLICY, &registry).await;
    let ek = enrollment_keys(&pki, &sys.keyshares).await;
    let homes: Vec<TestMeter> = ids.iter().map(|m| TestMeter::new(m, 1)).collect();
    let (early, late) = homes.split_at(6);
    enroll(&pki, &sys.ingest, &early.iter().collect::<Vec<_>>(), &ek)
        .await
        .unwrap();
    let mut batches = Vec::new();
    for (i, h) in early.iter().enumerate() {
        batches.push(h.batch(DAY, Channel::Import, 900, 0, &readings(i as i64)));
    }
    submit(&pki, &sys.ingest, batches).await.unwrap();
    let all: Vec<&str> = ids[..6].iter().map(String::as_str).collect();
    settled_receipts(&pki, &sys.keyshares, &all).await;
    psm_e2e::wait_in_contact(&pki, &sys.keyshares).await;

    let mut k3 = sys.keyshares.pop().unwrap();
    assert!(k3
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .is_some_and(|s| s.success()));

    // A new meter's enrollment stays pending: keyshare-3 holds shares of it too.
    enroll(&pki, &sys.ingest, &[&late[0]], &ek).await.unwrap();
    let a = receipts(&pki, &sys.keyshares[0], &["home-6"]).await;
    assert_eq!(a[0].state, EnrollmentState::Pending as i32, "{:?}", a[0]);

    // Releases go on with keyshare-1 and keyshare-2, each recording them for keyshare-3.
    for k in &sys.keyshares {
        let r = as_compute(&pki, k)
            .release(aggregate(&all, DAY, "while-down"))
            .await
            .expect("answered with one keyshare down");
        assert_eq!(r.into_inner().shares.len(), 2);
    }
    let log1 = audit_log(&pki, &sys.keyshares[0]).await;
    assert!(
        log1.iter()
            .any(|r| r.reason.contains("answered without keyshare-3")
                && r.reason.contains("release record 1")),
        "{log1:#?}"
    );

    // keyshare-1 restarts while keyshare-3 is still down: it cannot know what keyshare-3 may
    // have answered alone meanwhile, so it answers nothing for the share they hold together.
    let mut k1 = sys.keyshares.remove(0);
    assert!(k1
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .is_some_and(|s| s.success()));
    k1 = start_keyshare_with(&pki, &keys, "keyshare-1", &sys.ingest, &registry, "").await;
    let r = as_compute(&pki, &k1)
        .release(aggregate(&all, DAY, "while-down"))
        .await
        .expect("the share held with keyshare-2 is answered")
        .into_inner();
    let held: Vec<u32> = r.shares.iter().map(|s| s.share_index).collect();
    assert_eq!(held, vec![2], "the share held with keyshare-3 is withheld");
    let log1 = audit_log(&pki, &k1).await;
    assert!(
        log1.iter()
            .any(|r| r.reason.contains("keyshare-3 cannot be reached")
                && r.reason
                    .contains("has not been reached since this keyshare started")),
        "{log1:#?}"
    );
    sys.keyshares.insert(0, k1);

    // keyshare-3 comes back (same address and data), imports both records, and then refuses
    // the differencing release that its own ledger alone would have answered.
    k3 = start_keyshare_with(&pki, &keys, "keyshare-3", &sys.ingest, &registry, "").await;
    psm_e2e::wait_in_contact(&pki, std::slice::from_ref(&k3)).await;
    let log3 = audit_log(&pki, &k3).await;
    for from in ["keyshare-1", "keyshare-2"] {
        assert!(
            log3.iter().any(|r| r.rule == "co-holder"
                && r.decision == "allow"
                && r.reason.contains(&format!("release record 1 of {from}"))),
            "{log3:#?}"
        );
    }
    let e = as_compute(&pki, &k3)
        .release(aggregate(&all[..5], DAY, "difference-after"))
        .await
        .unwrap_err();
    assert!(e.message().starts_with("differencing:"), "{}", e.message());
    // The waiting enrollment completes now that every holder is up.
    let answers = settled_receipts(
        &pki,
        &[sys.keyshares.remove(0), sys.keyshares.remove(0), k3],
        &["home-6"],
    )
    .await;
    assert!(
        answers
            .iter()
            .all(|a| a[0].state == EnrollmentState::Active as i32),
        "{answers:?}"
    );
}

/// The utility stands in for a co-holder with a certificate from its own CA (a keyshare-1
/// process with an anchor of its own, at keyshare-1's address), and a co-holder that hangs
/// (SIGSTOP: its port still accepts connections) is not "unreachable": neither makes keyshare-2
/// answer alone. Keyshare-2 withholds the share it holds with that co-holder and audits why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_or_a_hung_co_holder_is_a_refusal_not_an_absence() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ids: Vec<String> = (0..5).map(|i| format!("home-{i}")).collect();
    let registry: String = ids.iter().map(|m| registry_entry(m, "meter")).collect();
    let mut sys = System::start_with_registry(&pki, &keys, "", TEST_POLICY, &registry).await;
    let ek = enrollment_keys(&pki, &sys.keyshares).await;
    let homes: Vec<TestMeter> = ids.iter().map(|m| TestMeter::new(m, 1)).collect();
    enroll(&pki, &sys.ingest, &homes.iter().collect::<Vec<_>>(), &ek)
        .await
        .unwrap();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let answers = settled_receipts(&pki, &sys.keyshares, &all).await;
    assert!(answers
        .iter()
        .flatten()
        .all(|a| a.state == EnrollmentState::Active as i32));
    psm_e2e::wait_in_contact(&pki, &sys.keyshares).await;

    // keyshare-3 hangs: keyshare-1 gives only the share it holds with keyshare-2.
    sys.keyshares[2].signal(libc::SIGSTOP);
    let t = std::time::Instant::now();
    let r = as_compute(&pki, &sys.keyshares[0])
        .release(aggregate(&all, DAY, "hung"))
        .await;
    sys.keyshares[2].signal(libc::SIGCONT);
    let r = r
        .expect("the share held with keyshare-2 is answered")
        .into_inner();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        t.elapsed()
    );
    let held: Vec<u32> = r.shares.iter().map(|s| s.share_index).collect();
    assert_eq!(
        held,
        vec![2],
        "only the share keyshare-1 holds with keyshare-2"
    );
    let log1 = audit_log(&pki, &sys.keyshares[0]).await;
    assert!(
        log1.iter()
            .any(|r| r.reason.contains("keyshare-3 did not confirm")
                && r.reason.contains("withheld")),
        "{log1:#?}"
    );
    assert!(!log1.iter().any(|r| r.reason.contains("answered without")));

    // An impostor keyshare-1: the real process stops, one with another anchor takes its
    // address. Keyshare-2 refuses its word and withholds the share it holds with keyshare-1.
    let mut k1 = sys.keyshares.remove(0);
    assert!(k1
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .is_some_and(|s| s.success()));
    let impostor_key = pki.dir.path().join("impostor-anchor.key");
    let extra = format!("anchor_key = {:?}\n", impostor_key.to_str().unwrap());
    let _impostor =
        start_keyshare_with(&pki, &keys, "keyshare-1", &sys.ingest, &registry, &extra).await;
    let r = as_compute(&pki, &sys.keyshares[0])
        .release(aggregate(&all, DAY + 1, "impostor"))
        .await
        .expect("the share held with keyshare-3 is answered")
        .into_inner();
    let held: Vec<u32> = r.shares.iter().map(|s| s.share_index).collect();
    assert_eq!(
        held,
        vec![0],
        "only the share keyshare-2 holds with keyshare-3"
    );
    let log2 = audit_log(&pki, &sys.keyshares[0]).await;
    assert!(
        log2.iter()
            .any(|r| r.reason.contains("keyshare-1 is not signed by its anchor")),
        "{log2:#?}"
    );
}
