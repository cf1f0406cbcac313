//! Three keyshare-svc processes over mutual TLS.
//!
//! tfhe track: a squashed result decrypted through them (also with one stopped), identical
//! answers on repeat, refusals with the right codes. Linear track, called directly as compute:
//! releases answered from the enrolled seeds alone (ingest holds no reading, no ciphertext is
//! read), one u128 per output for exactly the shares each keyshare holds, identical on repeat and
//! combined into the exact sums; unenrolled, unregistered and malformed releases refused; a
//! head-end-encrypted member named and not counted toward k-anonymity. The audit chain
//! (enrollment decisions included) verifies, then breaks when the database is edited.

use std::time::Duration;

use prost::Message;
use psm_core::ceremony::PublicBundle;
use psm_core::linear::{Channel, ENCODING, FLOOD_LOG2};
use psm_core::lwe::{words_from_le_bytes, SQUASHED_BLOCK};
use psm_core::squashed::uint_batch;
use psm_core::threshold::{combine_bodies, PartyResponse, Scheme, SharePartial};
use psm_core::wire::batch_to_proto;
use psm_e2e::{audit_log, enroll, enrollment_keys, Proc, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateProgram, AuditRecord, Cohort, ComputationKind, ComputationManifest, InputRef, KeyRef,
    LinearRelease, PartialDecryptRequest, ReleaseOutput, ReleaseRequest, ReleaseResponse,
    TimeRange, Track,
};
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheUint64};
use tonic::transport::Channel as GrpcChannel;
use tonic::{Code, Status};

const DAY: &str = "2026-02-02";
const EPOCH: u32 = 1;
/// The keyshares' cohort minimum.
const MIN: usize = 3;

fn day_number() -> i64 {
    psm_core::readings::parse_day(DAY).unwrap()
}

fn policy() -> String {
    format!("min_cohort = {MIN}\nallow_any_program = true\nmin_bill_days = 1\nmin_band_days = 1\nbilling_cycle = \"any\"\n")
}

/// A tfhe-track bill manifest for `meter` on DAY naming an input ingest does not hold: what a
/// compute node would send to have crafted ciphertexts decrypted.
fn tfhe_bill(meter: &str) -> ComputationManifest {
    tfhe_bill_under(meter, "")
}

/// As [`tfhe_bill`], under a flat demand-charge tariff in force until `effective_to` ("" =
/// open).
fn tfhe_bill_under(meter: &str, effective_to: &str) -> ComputationManifest {
    let program = psm_proto::v1::Tariff {
        name: "demand".into(),
        time_zone: "UTC".into(),
        bands: vec![psm_proto::v1::TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            ..Default::default()
        }],
        demand_rate_per_kw_milli: 10_000,
        currency: "EUR".into(),
        effective_to: effective_to.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let d = day_number() * 86_400;
    ComputationManifest {
        kind: ComputationKind::Bill as i32,
        program_hash: blake3::hash(&program).as_bytes().to_vec(),
        program,
        inputs: vec![InputRef {
            meter_id: meter.into(),
            day: DAY.into(),
            track: Track::Tfhe as i32,
            ciphertext_hash: vec![7; 32],
        }],
        range: Some(TimeRange {
            start_unix: d,
            end_unix: d + 86_400,
        }),
        ..Default::default()
    }
}

/// An hourly import aggregate of `cohort` (sorted) over day number `day`, asking for the
/// `hours`, as compute sends it.
fn aggregate(day: i64, cohort: &[&str], hours: &[u32]) -> LinearRelease {
    LinearRelease {
        kind: ComputationKind::Aggregate as i32,
        epoch: EPOCH,
        channel: psm_proto::v1::Channel::Import as i32,
        program: AggregateProgram {
            granularity_seconds: 3600,
        }
        .encode_to_vec(),
        range: Some(TimeRange {
            start_unix: day * 86_400,
            end_unix: (day + 1) * 86_400,
        }),
        cohorts: vec![Cohort {
            meter_ids: cohort.iter().map(|m| m.to_string()).collect(),
        }],
        outputs: hours
            .iter()
            .map(|h| ReleaseOutput {
                index: *h,
                cohort: 0,
            })
            .collect(),
        reissue_reason: String::new(),
    }
}

fn release_request(key: &str, release: &LinearRelease) -> ReleaseRequest {
    ReleaseRequest {
        idempotency_key: key.into(),
        release: Some(release.clone()),
    }
}

fn as_compute(pki: &TestPki, k: &Proc) -> KeyshareClient<GrpcChannel> {
    KeyshareClient::new(pki.channel(k.port, &k.name, Role::Compute, "compute"))
}

/// Keyshares fetch enrollments from ingest every few seconds and when a release names a meter
/// they have not enrolled; retry a release refused for "enrollment" for a while.
async fn release_settled(
    client: &mut KeyshareClient<GrpcChannel>,
    req: ReleaseRequest,
) -> Result<ReleaseResponse, Status> {
    for _ in 0..40 {
        match client.release(req.clone()).await {
            Err(e)
                if e.code() == Code::FailedPrecondition
                    && e.message().starts_with("enrollment") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            r => return r.map(tonic::Response::into_inner),
        }
    }
    client.release(req).await.map(tonic::Response::into_inner)
}

/// A release answer as the combiner takes it.
fn party_response(r: &ReleaseResponse) -> PartyResponse {
    PartyResponse {
        party: r.party_index as usize - 1,
        shares: r
            .shares
            .iter()
            .map(|s| SharePartial {
                share_index: s.share_index as usize,
                values: words_from_le_bytes(&s.partials).unwrap(),
            })
            .collect(),
    }
}

fn refused(r: Result<impl Sized, Status>, code: Code, prefix: &str) -> Status {
    let e = r
        .err()
        .unwrap_or_else(|| panic!("expected a {prefix:?} refusal"));
    assert_eq!(e.code(), code, "{prefix}: {}", e.message());
    assert!(
        e.message().starts_with(prefix),
        "expected {prefix:?}: {}",
        e.message()
    );
    e
}

/// The enrollment decisions in `k`'s audit log once there are at least `n` (they are written by
/// the keyshare's enrollment sync, on its own schedule).
async fn enrollment_records(pki: &TestPki, k: &Proc, n: usize) -> Vec<AuditRecord> {
    for _ in 0..80 {
        let records: Vec<AuditRecord> = audit_log(pki, k)
            .await
            .into_iter()
            .filter(|r| r.rule == "enrollment" && r.caller.starts_with("ingest"))
            .collect();
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{}: fewer than {n} enrollment decisions audited", k.name);
}

fn psm_audit_verify(pki: &TestPki, port: u16) -> std::process::Output {
    psm_e2e::psm_output(psm_e2e::audit_args("verify", port, pki.dir.path()))
}

/// A day of readings of the test meters: (meter, interval seconds, bodies, Wh per interval).
struct Day(Vec<(String, u32, Vec<u128>, Vec<i64>)>);

impl Day {
    /// compute's part of a release: per hour, the wrapping sum of the cohort's bodies over it;
    /// and the plaintext reference.
    fn sums(&self, cohort: &[&str], hours: &[u32]) -> (Vec<u128>, Vec<i128>) {
        hours
            .iter()
            .map(|h| {
                let (mut body, mut wh) = (0u128, 0i128);
                for (id, interval, bodies, values) in &self.0 {
                    if !cohort.contains(&id.as_str()) {
                        continue;
                    }
                    let per = (3600 / interval) as usize;
                    for i in *h as usize * per..(*h as usize + 1) * per {
                        body = body.wrapping_add(bodies[i]);
                        wh += i128::from(values[i]);
                    }
                }
                (body, wh)
            })
            .unzip()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_and_release_through_three_keyshares_and_audit() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let scheme = Scheme::new(3, 2).unwrap();
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let policy = policy();
    let mut ks = psm_e2e::start_keyshares(&pki, &keys, Some(&ingest), &policy).await;
    // A long grace: every live keyshare answers (and records) each request, so the audit
    // records below do not depend on timing; a dead one fails at once and does not hold it up.
    let decryptor = psm_e2e::decryptor(&pki, &keys, &ks, Duration::from_secs(20));

    // tfhe track: a crafted squashed FheUint64 (16 blocks) sent as a bill's output. With
    // re-execution switched off this was decrypted — and crafted masks (2^k·e_j) would have
    // yielded a party's shares of the squash key. Re-execution is mandatory: the named input is
    // not at ingest, so every keyshare refuses. Nothing is enrolled yet, so the first audit
    // records of keyshare-1 are exactly these decisions.
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
    assert_eq!(squashed.len(), 16);
    let tfhe_id = keys.manifest.tfhe_key_id.clone();
    let err = Status::from(
        decryptor
            .decrypt(
                &tfhe_id,
                &squashed,
                SQUASHED_BLOCK,
                70,
                tfhe_bill("meter-1"),
                "t-1",
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("re-execution"), "{}", err.message());
    // A compute that bills under a tariff no longer in force is refused before anything is
    // re-executed (compute itself refuses it first; this is a compute that does not).
    let err = Status::from(
        decryptor
            .decrypt(
                &tfhe_id,
                &squashed,
                SQUASHED_BLOCK,
                70,
                tfhe_bill_under("meter-1", "2026-01-01"),
                "t-expired",
            )
            .await
            .unwrap_err(),
    );
    assert!(
        err.message().contains("manifest") && err.message().contains("in force until 2026-01-01"),
        "{err:?}"
    );

    // Status: the tfhe key only (the linear track has no dealt key) and the enrollment key.
    let mut client = as_compute(&pki, &ks[0]);
    let st = client
        .status(psm_proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (st.party.as_str(), st.party_index, st.parties, st.threshold),
        ("keyshare-1", 1, 3, 2)
    );
    let held: Vec<(String, Vec<u32>)> = st
        .keys
        .iter()
        .map(|k| (k.key_id.clone(), k.share_indices.clone()))
        .collect();
    assert_eq!(
        held,
        vec![(tfhe_id.clone(), vec![1, 2])],
        "only the tfhe key; party 1 holds the shares of the subsets {{2}} and {{3}}"
    );
    assert_eq!(
        st.enrollment_public_key.len(),
        psm_core::linear::envelope::PUBLIC_KEY_BYTES
    );
    assert_eq!(st.enrollment_public_key.len(), 1216, "an X-Wing public key");
    assert_eq!(
        st.audit_len, 3,
        "the registry at start (development_allow_all) and two refusals so far"
    );
    assert_eq!(st.anchor_public_key.len(), 32);
    let anchor = psm_core::signing::AnchorFile::read(
        &pki.dir.path().join("keyshare-1-data").join("anchor.pub"),
    )
    .unwrap();
    assert_eq!(anchor.key().unwrap().to_vec(), st.anchor_public_key);
    let mut anchors = psm_core::signing::Anchors::default();
    anchors.0.insert("keyshare-1".into(), anchor.key().unwrap());
    anchors
        .verify_enrollment_key(
            "keyshare-1",
            "X-Wing",
            &st.enrollment_public_key,
            &st.enrollment_key_signature,
        )
        .unwrap();
    assert_eq!(st.audit_head.len(), 32);

    // Direct PartialDecrypt as compute, exactly what the decryptor sent: refused again.
    let mut bill = tfhe_bill("meter-1");
    bill.output_hash = squashed.hash().to_vec();
    let req = PartialDecryptRequest {
        idempotency_key: "repeat".into(),
        key: Some(KeyRef {
            key_id: tfhe_id.clone(),
        }),
        batch: Some(batch_to_proto(&squashed, SQUASHED_BLOCK, 70)),
        manifest: Some(bill.clone()),
    };
    let e = refused(
        client.partial_decrypt(req.clone()).await,
        Code::FailedPrecondition,
        "re-execution",
    );
    assert!(
        e.message().contains("not stored at ingest"),
        "{}",
        e.message()
    );
    // Restating the noise bound (which once fed the flooding PRF) buys no fresh, independent
    // flooding of the same ciphertext: the key's noise bound is fixed.
    let mut restated = req.clone();
    restated.batch = Some(batch_to_proto(&squashed, SQUASHED_BLOCK, 71));
    let e = refused(
        client.partial_decrypt(restated).await,
        Code::InvalidArgument,
        "well-formed",
    );
    assert!(e.message().contains("2^70 only"), "{}", e.message());

    // Refusals (audit records 3..=8).
    let mut no_kind = req.clone();
    no_kind.manifest = Some(ComputationManifest {
        output_hash: squashed.hash().to_vec(),
        ..Default::default()
    });
    refused(
        client.partial_decrypt(no_kind).await,
        Code::FailedPrecondition,
        "manifest-required",
    );
    let mut wrong_output = req.clone();
    wrong_output.manifest = Some(tfhe_bill("meter-1"));
    let e = refused(
        client.partial_decrypt(wrong_output).await,
        Code::FailedPrecondition,
        "output-hash",
    );
    assert!(e.message().contains("output_hash"), "{}", e.message());
    // Another meter's bill asking for a noise bound whose flooding would not decode.
    let mut too_noisy = req.clone();
    too_noisy.batch = Some(batch_to_proto(&squashed, SQUASHED_BLOCK, 85));
    let mut other = tfhe_bill("meter-2");
    other.output_hash = squashed.hash().to_vec();
    too_noisy.manifest = Some(other);
    let e = refused(
        client.partial_decrypt(too_noisy).await,
        Code::InvalidArgument,
        "well-formed",
    );
    assert!(e.message().contains("2^70 only"), "{}", e.message());
    let mut unknown = req.clone();
    unknown.key = Some(KeyRef {
        key_id: "tfhe-0000".into(),
    });
    refused(
        client.partial_decrypt(unknown).await,
        Code::NotFound,
        "known-key",
    );
    let mut truncated = req.clone();
    if let Some(psm_proto::v1::lwe_ciphertext_batch::Payload::List(l)) =
        truncated.batch.as_mut().and_then(|b| b.payload.as_mut())
    {
        l.words.truncate(l.words.len() - 16);
    }
    refused(
        client.partial_decrypt(truncated).await,
        Code::InvalidArgument,
        "well-formed",
    );
    // PartialDecrypt serves squashed blocks only: the linear encoding is refused.
    let mut linear_encoding = req.clone();
    linear_encoding.batch = Some(batch_to_proto(&squashed, ENCODING, 70));
    refused(
        client.partial_decrypt(linear_encoding).await,
        Code::InvalidArgument,
        "well-formed",
    );

    // Linear track. The keyshares publish their enrollment keys; four meters of four interval
    // lengths enroll through ingest (as head-end headend-1). None of their readings is stored.
    let ekeys = enrollment_keys(&pki, &ks).await;
    let names: Vec<&str> = ekeys.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["keyshare-1", "keyshare-2", "keyshare-3"]);
    assert_eq!(ekeys[0].1, st.enrollment_public_key);
    assert!(ekeys.iter().all(|(_, k)| k.len() == 1216));
    assert!(ekeys[0].1 != ekeys[1].1 && ekeys[1].1 != ekeys[2].1 && ekeys[0].1 != ekeys[2].1);
    let meters: Vec<(TestMeter, u32)> = [900u32, 300, 3600, 1800]
        .iter()
        .enumerate()
        .map(|(k, i)| (TestMeter::new(&format!("lin-{k}"), EPOCH), *i))
        .collect();
    let refs: Vec<&TestMeter> = meters.iter().map(|(m, _)| m).collect();
    let r = enroll(&pki, &ingest, &refs, &ekeys).await.unwrap();
    assert_eq!((r.stored, r.duplicates), (4, 0));

    // What compute would hold: a day of each meter's bodies (never sent anywhere).
    let d = day_number();
    let readings = Day(meters
        .iter()
        .enumerate()
        .map(|(k, (m, interval))| {
            let values: Vec<i64> = (0..(86_400 / interval) as usize)
                .map(|i| ((k * 131 + i * 17) % 1_000) as i64)
                .collect();
            let b = m.batch(d, Channel::Import, *interval, 0, &values);
            (
                m.id.clone(),
                *interval,
                words_from_le_bytes(&b.ciphertext).unwrap(),
                values,
            )
        })
        .collect());

    // A release of four enrolled meters (≥ min_cohort), three hours: every keyshare answers one
    // u128 per output for exactly the shares it holds.
    let cohort = ["lin-0", "lin-1", "lin-2", "lin-3"];
    let hours = [0u32, 7, 23];
    let release = aggregate(d, &cohort, &hours);
    let mut answers = Vec::new();
    for (p, k) in ks.iter().enumerate() {
        let r = release_settled(&mut as_compute(&pki, k), release_request("lin-1", &release))
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", k.name));
        assert_eq!(
            (r.party.as_str(), r.party_index as usize),
            (k.name.as_str(), p + 1)
        );
        let held: Vec<usize> = r.shares.iter().map(|s| s.share_index as usize).collect();
        assert_eq!(held, scheme.held_by(p), "{}: the shares it holds", k.name);
        assert!(
            r.shares
                .iter()
                .all(|s| s.partials.len() == hours.len() * 16),
            "{}: one u128 per output",
            k.name
        );
        assert!(r.headend_encrypted.is_empty());
        answers.push(r);
    }
    // The same release again: identical bytes.
    let again = client
        .release(release_request("lin-1-again", &release))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.shares, answers[0].shares);
    assert!(again.audit_seq > answers[0].audit_seq);
    // Any two answers, subtracted from the body sums compute holds: the exact sums.
    let (bodies, want) = readings.sums(&cohort, &hours);
    for who in [[0usize, 1], [0, 2], [1, 2]] {
        let resp: Vec<PartyResponse> = who.iter().map(|p| party_response(&answers[*p])).collect();
        let out = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &resp).unwrap();
        assert_eq!(out.values, want, "keyshares {who:?}");
    }
    let all: Vec<PartyResponse> = answers.iter().map(party_response).collect();
    let out = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &all).unwrap();
    assert_eq!(out.values, want);
    assert!(out.faulty.is_empty(), "{:?}", out.faulty);

    // A member that never enrolled (another day: nothing to difference against).
    let e = refused(
        client
            .release(release_request(
                "lin-x",
                &aggregate(d + 1, &["lin-0", "lin-1", "lin-2", "lin-3", "lin-x"], &[0]),
            ))
            .await,
        Code::FailedPrecondition,
        "enrollment: ",
    );
    assert!(e.message().contains("lin-x"), "{}", e.message());
    // Malformed releases.
    let e = refused(
        client
            .release(release_request(
                "unsorted",
                &aggregate(d, &["lin-1", "lin-0", "lin-2"], &[0]),
            ))
            .await,
        Code::InvalidArgument,
        "release: ",
    );
    assert!(e.message().contains("ascending"), "{}", e.message());
    let e = refused(
        client
            .release(release_request("beyond", &aggregate(d, &cohort, &[24])))
            .await,
        Code::InvalidArgument,
        "release: ",
    );
    assert!(e.message().contains("does not exist"), "{}", e.message());
    refused(
        client
            .release(ReleaseRequest {
                idempotency_key: "empty".into(),
                release: None,
            })
            .await,
        Code::InvalidArgument,
        "release: ",
    );

    // Every enrollment decision is audited.
    let enrolled = enrollment_records(&pki, &ks[0], 4).await;
    assert_eq!(enrolled.len(), 4, "{enrolled:?}");
    for (k, (m, _)) in meters.iter().enumerate() {
        assert!(
            enrolled.iter().any(|r| r.decision == "allow"
                && r.reason.contains(&format!("meter {} epoch {EPOCH}", m.id))),
            "lin-{k}: {enrolled:?}"
        );
    }

    // One keyshare down: 2-of-3 still decrypts and releases, and the dead one is named.
    let mut dead = ks.remove(1);
    dead.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("killed");
    let released = decryptor
        .release(release.clone(), &bodies, "lin-3")
        .await
        .unwrap();
    assert_eq!(released.values, want);
    let mut used = released.report.used.clone();
    used.sort();
    assert_eq!(
        used,
        vec!["keyshare-1".to_string(), "keyshare-3".to_string()]
    );
    assert!(
        released
            .report
            .faults
            .iter()
            .any(|f| f.party == "keyshare-2"),
        "{:?}",
        released.report
    );
    assert!(released.headend_encrypted.is_empty());

    // The audit log holds every decision, allowed and refused, and verifies.
    let records = audit_log(&pki, &ks[0]).await;
    let count = |rule: &str, decision: &str| {
        records
            .iter()
            .filter(|r| r.rule == rule && r.decision == decision)
            .count()
    };
    // Two linear releases and the repeat of one; nothing on the tfhe track. Each was also
    // judged for the co-holders that asked keyshare-1 to confirm it (keyshare-2 and -3 for
    // the first, keyshare-3 for the one keyshare-2 was down for).
    let from = |caller: &str| {
        records
            .iter()
            .filter(|r| r.rule == "allowed" && r.caller.contains(caller))
            .count()
    };
    assert_eq!(from("/compute/"), 3, "{records:?}");
    assert_eq!(from("(co-holder confirmation)"), 3, "{records:?}");
    // Each enrollment accepted here, then activated once both co-holders confirmed it.
    assert_eq!(count("enrollment", "allow"), 8);
    assert!(records
        .iter()
        .any(|r| r.reason.contains("answered without keyshare-2")));
    assert_eq!(count("release", "refuse"), 3);
    for rule in ["manifest-required", "output-hash", "known-key"] {
        assert_eq!(count(rule, "refuse"), 1, "{rule}");
    }
    assert_eq!(count("re-execution", "refuse"), 2);
    assert_eq!(count("well-formed", "refuse"), 4);
    assert!(count("enrollment", "refuse") >= 1, "lin-x");
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..records.len() as u64).collect::<Vec<_>>());
    let verified = psm_audit_verify(&pki, ks[0].port);
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        stdout.contains(&format!("chain of {} records verified", records.len())),
        "{stdout}"
    );

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
            .map(|kv| AuditRecord::decode(kv.unwrap().1.as_ref()).unwrap())
            .find(|r| r.decision == "refuse")
            .expect("a refusal was recorded");
        assert_eq!(
            rec.seq, 1,
            "the crafted bill comes first, after the registry record of the start"
        );
        assert_eq!(rec.rule, "re-execution");
        rec.decision = "allow".into();
        tree.insert(rec.seq.to_be_bytes(), rec.encode_to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let cfg = psm_e2e::keyshare_config(
        &pki,
        "keyshare-1",
        Some(&ingest),
        Some(keys.public_dir.as_path()),
        &policy,
    );
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
    assert!(stderr.contains("audit record 1"), "{stderr}");
}

/// Each keyshare's own registry decides which meters exist and who encrypts for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refuses_strangers_and_headend_members_do_not_count() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let scheme = Scheme::new(3, 2).unwrap();
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let mut registry = psm_e2e::registry_entry("he-0", "headend");
    for m in ["reg-0", "reg-1", "reg-2"] {
        registry.push_str(&psm_e2e::registry_entry(m, "meter"));
    }
    let ks =
        psm_e2e::start_keyshares_with_registry(&pki, &keys, Some(&ingest), &policy(), &registry)
            .await;
    let ekeys = enrollment_keys(&pki, &ks).await;
    // Ingest stores every enrollment the head-end sends, "stranger" included: the keyshares
    // decide.
    let meters: Vec<TestMeter> = ["he-0", "reg-0", "reg-1", "reg-2", "stranger"]
        .iter()
        .map(|id| TestMeter::new(id, EPOCH))
        .collect();
    let refs: Vec<&TestMeter> = meters.iter().collect();
    let r = enroll(&pki, &ingest, &refs, &ekeys).await.unwrap();
    assert_eq!(r.stored, 5);
    let d = day_number();
    let mut client = as_compute(&pki, &ks[0]);

    // A meter that is not on the registry.
    let e = refused(
        client
            .release(release_request(
                "stranger",
                &aggregate(d, &["reg-0", "reg-1", "reg-2", "stranger"], &[0]),
            ))
            .await,
        Code::FailedPrecondition,
        "registry: ",
    );
    assert!(e.message().contains("stranger"), "{}", e.message());
    // Exactly min_cohort members, one of them head-end-encrypted: too few count.
    let e = refused(
        client
            .release(release_request(
                "headend-three",
                &aggregate(d, &["he-0", "reg-0", "reg-1"], &[0]),
            ))
            .await,
        Code::FailedPrecondition,
        "k-anonymity: ",
    );
    assert!(e.message().contains("head-end"), "{}", e.message());
    // The tfhe track judges cohorts by the same registry: a histogram with a stranger is
    // refused, and one whose min_cohort members include a head-end-encrypted one is too few.
    let histogram = |meters: &[&str]| {
        let d0 = d * 86_400;
        let range = TimeRange {
            start_unix: d0,
            end_unix: d0 + 86_400,
        };
        let program = psm_proto::v1::AnalyticsRequest {
            range: Some(range),
            band_edges_wh: vec![0, 1_000],
            ..Default::default()
        }
        .encode_to_vec();
        let batch = psm_core::lwe::LweBatch::List {
            dimension: 4096,
            words: vec![1u128; 4097],
        };
        PartialDecryptRequest {
            idempotency_key: "histogram".into(),
            key: Some(KeyRef {
                key_id: keys.manifest.tfhe_key_id.clone(),
            }),
            batch: Some(batch_to_proto(&batch, SQUASHED_BLOCK, 70)),
            manifest: Some(ComputationManifest {
                kind: ComputationKind::Analytics as i32,
                program_hash: blake3::hash(&program).as_bytes().to_vec(),
                program,
                inputs: meters
                    .iter()
                    .map(|m| InputRef {
                        meter_id: (*m).into(),
                        day: DAY.into(),
                        track: Track::Tfhe as i32,
                        ciphertext_hash: vec![7; 32],
                    })
                    .collect(),
                output_hash: batch.hash().to_vec(),
                range: Some(range),
                reissue_reason: String::new(),
            }),
        }
    };
    let e = refused(
        client
            .partial_decrypt(histogram(&["reg-0", "reg-1", "stranger"]))
            .await,
        Code::FailedPrecondition,
        "registry: ",
    );
    assert!(e.message().contains("stranger"), "{}", e.message());
    let e = refused(
        client
            .partial_decrypt(histogram(&["he-0", "reg-0", "reg-1"]))
            .await,
        Code::FailedPrecondition,
        "k-anonymity: ",
    );
    assert!(e.message().contains("head-end"), "{}", e.message());

    // min_cohort meter-encrypted members plus the head-end one: released by every keyshare,
    // which names the head-end-encrypted member.
    let release = aggregate(d, &["he-0", "reg-0", "reg-1", "reg-2"], &[0, 1]);
    for (p, k) in ks.iter().enumerate() {
        let r = release_settled(&mut as_compute(&pki, k), release_request("four", &release))
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", k.name));
        assert_eq!(r.headend_encrypted, vec!["he-0".to_string()], "{}", k.name);
        let held: Vec<usize> = r.shares.iter().map(|s| s.share_index as usize).collect();
        assert_eq!(held, scheme.held_by(p));
        assert!(r.shares.iter().all(|s| s.partials.len() == 2 * 16));
    }

    // The registry's enrollment decisions are audited: four accepted (he-0 marked as
    // head-end-encrypted), the stranger refused.
    let enrolled = enrollment_records(&pki, &ks[0], 5).await;
    assert_eq!(enrolled.len(), 5, "{enrolled:?}");
    let allowed: Vec<&AuditRecord> = enrolled.iter().filter(|r| r.decision == "allow").collect();
    assert_eq!(allowed.len(), 4, "{enrolled:?}");
    assert!(
        allowed
            .iter()
            .any(|r| r.reason.contains("meter he-0") && r.reason.contains("head-end-encrypted")),
        "{enrolled:?}"
    );
    let stranger = enrolled
        .iter()
        .find(|r| r.decision == "refuse")
        .expect("the stranger's enrollment is refused");
    assert!(
        stranger.reason.contains("stranger") && stranger.reason.contains("registry"),
        "{}",
        stranger.reason
    );
    // The release's own record says whose readings are plaintext to the utility.
    let records = audit_log(&pki, &ks[0]).await;
    assert!(
        records.iter().any(|r| r.rule == "allowed"
            && r.reason.contains("head-end-encrypted")
            && r.reason.contains("he-0")),
        "{records:?}"
    );
    assert!(records
        .iter()
        .any(|r| r.rule == "registry" && r.decision == "refuse"));
    assert!(records
        .iter()
        .any(|r| r.rule == "k-anonymity" && r.decision == "refuse"));
}
