//! The whole system as separate processes: a billing cycle of enrolled meters that survives a
//! keyshare killed in the middle of it (2-of-3), ingest killed with SIGKILL during a stream of
//! submissions and restarted with every acknowledged batch intact, and a meter certificate
//! refused on Bill, Release and PartialDecrypt.

use std::time::Duration;

use psm_core::linear::Channel;
use psm_e2e::{System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateRequest, BillRequest, PartialDecryptRequest, ReleaseRequest, StreamReadingsRequest,
    SubmitReadingsRequest, Tariff, TariffBand, TimeRange, Track,
};
use tonic::Code;

const D1: &str = "2026-03-02";

fn day1() -> i64 {
    psm_core::readings::parse_day(D1).unwrap()
}

fn range(days: i64) -> TimeRange {
    let d = day1() * 86_400;
    TimeRange {
        start_unix: d,
        end_unix: d + days * 86_400,
    }
}

fn tariff() -> Tariff {
    Tariff {
        name: "flat".into(),
        time_zone: "UTC".into(),
        bands: vec![TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 25_000,
            export_price_milli: 10_000,
            month_mask: 0,
        }],
        standing_charge_per_day: 50,
        vat_basis_points: 0,
        currency: "EUR".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_cycle_survives_a_keyshare_killed_mid_run() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let mut sys = System::start(&pki, &keys, "").await;
    // Six meters enroll their own keys (epoch 1) with the keyshares, then send two days each.
    let homes: Vec<TestMeter> = (0..6)
        .map(|i| TestMeter::new(&format!("home-{i}"), 1))
        .collect();
    let meters: Vec<String> = homes.iter().map(|m| m.id.clone()).collect();
    let ekeys = psm_e2e::enrollment_keys(&pki, &sys.keyshares).await;
    let enrolled = psm_e2e::enroll(&pki, &sys.ingest, &homes.iter().collect::<Vec<_>>(), &ekeys)
        .await
        .unwrap();
    assert_eq!(enrolled.stored, 6);
    let mut batches = Vec::new();
    for (m, home) in homes.iter().enumerate() {
        for d in 0..2 {
            let values: Vec<i64> = (0..96).map(|i| (m as i64 + 1) * 10 + i % 7).collect();
            batches.push(home.batch(day1() + d, Channel::Import, 900, 0, &values));
        }
    }
    let r = psm_e2e::submit(&pki, &sys.ingest, batches).await.unwrap();
    assert_eq!(r.stored, 12);
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let bill = |m: usize| BillRequest {
        idempotency_key: format!("cycle-{m}"),
        meter_id: meters[m].clone(),
        period: Some(range(2)),
        tariff: Some(tariff()),
        reissue_reason: String::new(),
        epoch: 1,
    };
    // Energy on a bill: its import lines (the meters export nothing).
    let billed = |b: &psm_proto::v1::BillResponse| -> i64 {
        assert!(b.lines.iter().all(|l| l.energy_wh >= 0), "{:?}", b.lines);
        b.lines.iter().map(|l| l.energy_wh).sum()
    };
    // Plaintext: 192 readings of (m+1)·10 + i mod 7 Wh.
    let energy = |m: usize| -> i64 { (0..192).map(|i| (m as i64 + 1) * 10 + (i % 96) % 7).sum() };

    for m in 0..3 {
        let b = op.bill(bill(m)).await.unwrap().into_inner();
        assert_eq!(billed(&b), energy(m));
    }
    // keyshare-2 dies in the middle of the cycle; the other two carry it.
    let mut dead = sys.keyshares.remove(1);
    dead.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("keyshare-2 killed");
    for (m, id) in meters.iter().enumerate().skip(3) {
        let b = op.bill(bill(m)).await.unwrap().into_inner();
        assert_eq!(billed(&b), energy(m), "{id}");
        assert_eq!(b.total, (energy(m) * 25 + 500) / 1000 + 100);
        let q = b.quorum.unwrap();
        assert_eq!(q.used, ["keyshare-1", "keyshare-3"]);
        assert!(q.faults.iter().any(|f| f.party == "keyshare-2"), "{q:?}");
    }
    let agg = op
        .aggregate(AggregateRequest {
            idempotency_key: "cycle-feeder".into(),
            meter_ids: meters.clone(),
            range: Some(range(2)),
            granularity_seconds: 86_400,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        agg.energy_wh.iter().sum::<i64>(),
        (0..6).map(energy).sum::<i64>()
    );
    assert_eq!(agg.interval_cohort_size, [6, 6]);
    assert!(agg.headend_encrypted.is_empty(), "{agg:?}");

    // A meter certificate may call neither Bill, Release nor PartialDecrypt.
    let mut meter =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Meter, "home-0"));
    let e = meter.bill(bill(0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("operator"), "{}", e.message());
    let mut meter_ks = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Meter,
        "home-0",
    ));
    let e = meter_ks
        .partial_decrypt(PartialDecryptRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("compute"), "{}", e.message());
    let e = meter_ks
        .release(ReleaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("compute"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_during_submissions_keeps_every_acknowledged_batch() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let mut ingest = psm_e2e::start_ingest(&pki, &keys).await;
    // 40 meters enroll (ingest checks an enrollment's shape only, so keys made here for the
    // deployment's party names stand in for the keyshares'), then 40 meter-days are submitted
    // one request each by a head-end, as fast as ingest acknowledges.
    let ekeys: Vec<(String, Vec<u8>)> = keys
        .manifest
        .party_names
        .iter()
        .map(|n| (n.clone(), psm_core::linear::envelope::generate_keypair().1))
        .collect();
    let meters: Vec<TestMeter> = (0..40)
        .map(|m| TestMeter::new(&format!("meter-{m:02}"), 1))
        .collect();
    let enrolled = psm_e2e::enroll(&pki, &ingest, &meters.iter().collect::<Vec<_>>(), &ekeys)
        .await
        .unwrap();
    assert_eq!(enrolled.stored, 40);
    let batches: Vec<_> = meters
        .iter()
        .zip(0i64..)
        .map(|(meter, m)| {
            let values: Vec<i64> = (0..24).map(|i| m * 100 + i).collect();
            meter.batch(day1(), Channel::Import, 3600, 0, &values)
        })
        .collect();
    let channel = pki.channel(ingest.port, "ingest", Role::Headend, "headend-1");
    let (tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    let submitter = tokio::spawn({
        let batches = batches.clone();
        async move {
            let mut client = IngestClient::new(channel);
            for (i, b) in batches.into_iter().enumerate() {
                let r = client
                    .submit_readings(SubmitReadingsRequest {
                        idempotency_key: format!("stream-{i}"),
                        batches: vec![b],
                    })
                    .await;
                match r {
                    Ok(_) => tx.send(i).unwrap(),
                    Err(_) => return i,
                }
            }
            usize::MAX
        }
    });
    // Kill it after the 10th acknowledgement, while submissions are still arriving.
    let mut got = Vec::new();
    while got.len() < 10 {
        got.push(acked.recv().await.expect("submissions acknowledged"));
    }
    ingest
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .expect("ingest killed");
    let failed_at = submitter.await.unwrap();
    while let Ok(i) = acked.try_recv() {
        got.push(i);
    }
    assert!(
        failed_at < batches.len(),
        "the stream of submissions was cut by the kill"
    );

    // Restarted on the same data directory: every acknowledged batch is there, byte for byte.
    let ingest = psm_e2e::start_ingest(&pki, &keys).await;
    let mut compute =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Compute, "compute"));
    let mut stream = compute
        .stream_readings(StreamReadingsRequest {
            meter_ids: Vec::new(),
            range: Some(range(1)),
            track: Track::Linear as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut stored = std::collections::BTreeMap::new();
    while let Some(b) = stream.message().await.unwrap() {
        stored.insert(b.meter_id.clone(), b.ciphertext_hash);
    }
    for i in &got {
        let b = &batches[*i];
        assert_eq!(
            stored.get(&b.meter_id),
            Some(&b.ciphertext_hash),
            "acknowledged batch {} lost",
            b.meter_id
        );
    }
    // Nothing that was never sent appears, and the head-end can resubmit the rest.
    assert!(stored.len() <= failed_at + 1, "{} stored", stored.len());
    let mut headend =
        IngestClient::new(pki.channel(ingest.port, "ingest", Role::Headend, "headend-1"));
    let r = headend
        .submit_readings(SubmitReadingsRequest {
            idempotency_key: "resume".into(),
            batches: batches.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stored as usize + r.duplicates as usize, batches.len());
    assert_eq!(r.duplicates as usize, stored.len());
}
