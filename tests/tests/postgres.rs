//! Ingest replicas over one real PostgreSQL server (started per test by psm-testpg): two
//! ingest processes writing the same and conflicting meter-days at once lose nothing and store
//! no conflict; a replica killed with SIGKILL mid-stream loses no acknowledged batch; a database
//! restored from a `pg_dump` backup bills the same; and the `/metrics` counters on the health
//! ports move by exactly what the test did.

use std::time::Duration;

use psm_core::linear::Channel;
use psm_e2e::{
    enroll, enrollment_keys, metric, scrape, start_ingest_with, Proc, System, TestMeter, TestPki,
    DEV_REGISTRY, TEST_POLICY,
};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{
    BillRequest, BillResponse, ReadingBatch, SubmitReadingsRequest, Tariff, TariffBand, TimeRange,
};
use tonic::Code;

const EPOCH: u32 = 1;
/// 2026-01-01.
const DAY: i64 = 20_454;

fn store_section(url: &str) -> String {
    format!("[ingest.store]\nbackend = \"postgres\"\nurl = {url:?}\nmax_connections = 4\n")
}

async fn ingest_on(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    name: &str,
    url: &str,
    health: u16,
) -> Proc {
    let health = format!("127.0.0.1:{health}");
    start_ingest_with(
        pki,
        keys,
        name,
        DEV_REGISTRY,
        &store_section(url),
        &["--health-listen", &health],
    )
    .await
}

fn headend(pki: &TestPki, p: &Proc) -> IngestClient<tonic::transport::Channel> {
    IngestClient::new(pki.channel(p.port, &p.name, Role::Headend, "headend-1"))
}

/// Hourly readings of one meter for `DAY`: value `base + hour`.
fn day_of(m: &TestMeter, base: i64) -> (Vec<ReadingBatch>, i64) {
    let values: Vec<i64> = (0..24).map(|h| base + h).collect();
    // Four batches of six hours: the unit both replicas race on.
    let batches = (0..4)
        .map(|q| {
            m.batch(
                DAY,
                Channel::Import,
                3600,
                q * 6,
                &values[q as usize * 6..][..6],
            )
        })
        .collect();
    (batches, values.iter().sum())
}

fn flat_tariff() -> Tariff {
    Tariff {
        name: "flat".into(),
        time_zone: "UTC".into(),
        bands: vec![TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 30_000,
            export_price_milli: 0,
            month_mask: 0,
        }],
        currency: "GBP".into(),
        ..Default::default()
    }
}

fn bill_request(key: &str, meter: &str) -> BillRequest {
    BillRequest {
        idempotency_key: key.into(),
        meter_id: meter.into(),
        period: Some(TimeRange {
            start_unix: DAY * 86_400,
            end_unix: (DAY + 1) * 86_400,
        }),
        tariff: Some(flat_tariff()),
        reissue_reason: String::new(),
        epoch: EPOCH,
    }
}

/// Bills `meter`, retrying while the keyshares have not yet picked up its enrollment.
async fn bill(
    pki: &TestPki,
    sys: &System,
    key: &str,
    meter: &str,
) -> Result<BillResponse, tonic::Status> {
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    for _ in 0..80 {
        match op.bill(bill_request(key, meter)).await {
            Err(e)
                if e.code() == Code::FailedPrecondition && e.message().contains("enrollment") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            r => return r.map(tonic::Response::into_inner),
        }
    }
    op.bill(bill_request(key, meter))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_replicas_share_one_postgres_database() {
    let pg = psm_testpg::TestPostgres::start().unwrap();
    let url = pg.create_database("ingest").unwrap();
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let (health_a, health_b) = (psm_e2e::free_port(), psm_e2e::free_port());
    let a = ingest_on(&pki, &keys, "ingest", &url, health_a).await;
    let b = ingest_on(&pki, &keys, "ingest-b", &url, health_b).await;
    let sys = System::start_over(&pki, &keys, "", TEST_POLICY, DEV_REGISTRY, a).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;

    // Enrollments through both replicas at once; the keyshares read them all through A.
    let meters: Vec<TestMeter> = (0..8)
        .map(|i| TestMeter::new(&format!("pg-{i}"), EPOCH))
        .collect();
    let (left, right) = meters.split_at(4);
    let (left, right): (Vec<&TestMeter>, Vec<&TestMeter>) =
        (left.iter().collect(), right.iter().collect());
    let (ra, rb) = tokio::join!(
        enroll(&pki, &sys.ingest, &left, &ekeys),
        enroll(&pki, &b, &right, &ekeys),
    );
    assert_eq!(ra.unwrap().stored + rb.unwrap().stored, 8);

    // Every meter's day through both replicas at the same time, in opposite orders. Meters 6
    // and 7 are contested: A and B carry different readings for the same slots.
    let mut expected = Vec::new();
    let mut via_a = Vec::new();
    let mut via_b = Vec::new();
    let mut unique = 0;
    for (i, m) in meters.iter().enumerate() {
        let (mine, sum) = day_of(m, 100 * i as i64);
        if i >= 6 {
            let (theirs, other) = day_of(m, 10_000 + 100 * i as i64);
            expected.push((m.id.clone(), vec![sum, other]));
            via_a.push(vec![
                mine[0].clone(),
                mine[1].clone(),
                mine[2].clone(),
                mine[3].clone(),
            ]);
            via_b.push(theirs);
            unique += 4;
        } else {
            expected.push((m.id.clone(), vec![sum]));
            let mut rev = mine.clone();
            rev.reverse();
            via_a.push(mine);
            via_b.push(rev);
            unique += 4;
        }
    }
    let send = |p: &Proc, reqs: Vec<Vec<ReadingBatch>>, tag: &'static str| {
        let mut c = headend(&pki, p);
        async move {
            let mut out = Vec::new();
            for (i, batches) in reqs.into_iter().enumerate() {
                // One request per meter-day: all of it or none of it.
                let r = c
                    .submit_readings(SubmitReadingsRequest {
                        idempotency_key: format!("{tag}-{i}"),
                        batches,
                    })
                    .await;
                out.push(r.map(tonic::Response::into_inner));
            }
            out
        }
    };
    let (out_a, out_b) = tokio::join!(send(&sys.ingest, via_a, "a"), send(&b, via_b, "b"));
    let mut stored = 0;
    let mut conflicts = 0;
    for (i, (ra, rb)) in out_a.iter().zip(&out_b).enumerate() {
        if i >= 6 {
            // Exactly one replica wins a contested meter-day, whole; the other is refused.
            let refused: Vec<&tonic::Status> =
                [ra, rb].iter().filter_map(|r| r.as_ref().err()).collect();
            assert_eq!(refused.len(), 1, "meter {i}: {ra:?} {rb:?}");
            assert_eq!(refused[0].code(), Code::AlreadyExists, "{:?}", refused[0]);
            assert!(refused[0]
                .message()
                .contains("nothing from this request was stored"));
            conflicts += 1;
            stored += [ra, rb]
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.stored)
                .sum::<u32>();
        } else {
            let (ra, rb) = (ra.as_ref().unwrap(), rb.as_ref().unwrap());
            assert_eq!(ra.stored + rb.stored, 4, "meter {i}");
            assert_eq!(ra.duplicates + rb.duplicates, 4, "meter {i}");
            stored += ra.stored + rb.stored;
        }
    }
    assert_eq!(stored, unique);

    // Bills read through A what either replica stored: each meter's day whole, the contested
    // ones exactly one replica's readings, never a mix.
    let mut bills = Vec::new();
    for (meter, sums) in &expected {
        let resp = bill(&pki, &sys, &format!("bill-{meter}"), meter)
            .await
            .unwrap_or_else(|e| panic!("{meter}: {e:?}"));
        let energy = resp.lines[0].energy_wh;
        assert!(
            sums.contains(&energy),
            "{meter}: billed {energy} Wh, stored {sums:?}"
        );
        bills.push(resp);
    }

    // Each keyshare's metrics agree with its audit log: the log's length, and one decision
    // counted per record (all since start), among them the bills' releases.
    for k in &sys.keyshares {
        let before = psm_e2e::audit_log(&pki, k).await.len() as f64;
        let text = scrape(k.health_port).await;
        let after = psm_e2e::audit_log(&pki, k).await.len() as f64;
        for (name, labels) in [
            ("psm_keyshare_audit_records", &[][..]),
            ("psm_keyshare_decisions_total", &[][..]),
        ] {
            let v = metric(&text, name, labels);
            assert!(
                before <= v && v <= after,
                "{} {name}: {v} not in {before}..={after}",
                k.name
            );
        }
        let allowed = metric(
            &text,
            "psm_keyshare_decisions_total",
            &[("decision", "allow")],
        );
        assert!(
            allowed >= bills.len() as f64,
            "{}: {allowed} allowed",
            k.name
        );
    }

    // What the metrics say the two replicas did.
    let (ma, mb) = (scrape(health_a).await, scrape(health_b).await);
    let both =
        |name: &str, labels: &[(&str, &str)]| metric(&ma, name, labels) + metric(&mb, name, labels);
    assert_eq!(
        both("psm_ingest_batches_total", &[("outcome", "stored")]),
        f64::from(unique)
    );
    assert_eq!(
        both("psm_ingest_refusals_total", &[("reason", "conflict")]),
        f64::from(conflicts)
    );
    assert_eq!(
        both(
            "psm_rpc_requests_total",
            &[
                ("service", "psm.v1.Ingest"),
                ("method", "SubmitReadings"),
                ("code", "ALREADY_EXISTS")
            ]
        ),
        f64::from(conflicts)
    );
    assert_eq!(
        both(
            "psm_rpc_requests_total",
            &[
                ("service", "psm.v1.Ingest"),
                ("method", "SubmitReadings"),
                ("code", "OK")
            ]
        ),
        16.0 - f64::from(conflicts)
    );
    assert_eq!(
        metric(
            &mb,
            "psm_ingest_enrollments_total",
            &[("outcome", "stored")]
        ),
        4.0
    );
    assert!(
        metric(
            &ma,
            "psm_rpc_duration_seconds_count",
            &[("method", "SubmitReadings")]
        ) >= 8.0
    );

    // SIGKILL of replica B in the middle of a stream of submissions: every batch B
    // acknowledged is in the database, byte for byte.
    let streamer = TestMeter::new("pg-0", EPOCH);
    let stream: Vec<ReadingBatch> = (1..=400)
        // Earlier days: days after tomorrow are refused.
        .map(|d| streamer.batch(DAY - d, Channel::Import, 3600, 0, &[1; 24]))
        .collect();
    let mut c = headend(&pki, &b);
    // The kill comes once 50 batches are acknowledged (a fixed delay raced a fast machine).
    let (started, mid_stream) = tokio::sync::oneshot::channel::<()>();
    let acked = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut started = Some(started);
        for (i, batch) in stream.into_iter().enumerate() {
            let r = c
                .submit_readings(SubmitReadingsRequest {
                    idempotency_key: format!("stream-{i}"),
                    batches: vec![batch.clone()],
                })
                .await;
            match r {
                Ok(_) => acked.push(batch),
                Err(_) => break,
            }
            if acked.len() == 50 {
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            }
        }
        acked
    });
    tokio::time::timeout(Duration::from_secs(60), mid_stream)
        .await
        .expect("50 batches acknowledged within a minute")
        .expect("the stream ran");
    b.signal(libc::SIGKILL);
    let acked = acked.await.unwrap();
    assert!(
        !acked.is_empty() && acked.len() < 400,
        "the kill came mid-stream: {} acknowledged",
        acked.len()
    );
    let store = ingest_svc::store::postgres::PgStore::connect(&Default::default(), &url)
        .await
        .unwrap();
    let store = std::sync::Arc::new(store);
    let check = store.clone();
    let missing = tokio::task::spawn_blocking(move || {
        use ingest_svc::store::ReadingStore;
        acked
            .iter()
            .filter(|b| !check.scan(&b.meter_id, &b.day, &b.day).unwrap().contains(b))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(missing, 0, "acknowledged batches missing after SIGKILL");

    // Backup and restore: dump the database, lose its rows, restore the dump; the same bills
    // come out of the restored data (and none while it is gone).
    let dump = pg.path().join("ingest.dump");
    let dump_s = dump.to_str().unwrap().to_owned();
    pg.client("pg_dump", &["-d", "ingest", "-Fc", "-f", &dump_s])
        .unwrap();
    pg.client(
        "psql",
        &[
            "-d",
            "ingest",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "TRUNCATE batches, meters, enrollments",
        ],
    )
    .unwrap();
    let gone = bill(&pki, &sys, "bill-pg-1", "pg-1").await;
    let gone = gone.expect_err("billed from an empty database");
    assert!(
        gone.code() == Code::FailedPrecondition && gone.message().contains("has no import reading"),
        "{gone:?}"
    );
    pg.client(
        "pg_restore",
        &[
            "-d",
            "ingest",
            "--data-only",
            "--disable-triggers",
            "-t",
            "batches",
            "-t",
            "meters",
            "-t",
            "enrollments",
            &dump_s,
        ],
    )
    .unwrap();
    for ((meter, _), before) in expected.iter().zip(&bills) {
        let after = bill(&pki, &sys, &format!("bill-{meter}"), meter)
            .await
            .unwrap();
        assert_eq!(after.lines, before.lines, "{meter}");
        assert_eq!(after.total, before.total, "{meter}");
    }
}

/// Two compute replicas share their jobs in PostgreSQL (the database ingest uses too): a
/// replica killed with SIGKILL in the middle of a bill leaves the job to the other, which
/// finishes it from the stored request once the lease runs out; WatchJob on the survivor
/// reports it, and the same key there returns the same bill without running it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_replica_killed_mid_job_leaves_it_to_the_other() {
    use psm_proto::v1::WatchJobRequest;
    let pg = psm_testpg::TestPostgres::start().unwrap();
    let url = pg.url("psm");
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let ingest = ingest_on(&pki, &keys, "ingest", &url, psm_e2e::free_port()).await;
    let jobs = format!(
        "[compute.jobs]\nbackend = \"postgres\"\nurl = {url:?}\nlease_secs = 2\nreplica = \"compute-a\"\n"
    );
    let sys = System::start_over(&pki, &keys, &jobs, TEST_POLICY, DEV_REGISTRY, ingest).await;
    // Replica B: the same configuration under its own name and certificate.
    let config = std::fs::read_to_string(pki.dir.path().join("compute.toml"))
        .unwrap()
        .replace("replica = \"compute-a\"", "replica = \"compute-b\"");
    let config_b = pki.dir.path().join("compute-b.toml");
    std::fs::write(&config_b, config).unwrap();
    let health_b = psm_e2e::free_port();
    let b = Proc::start(
        &pki,
        "compute-svc",
        Role::Compute,
        "compute-b",
        psm_proto::service_names::COMPUTE,
        &[
            "--config",
            config_b.to_str().unwrap(),
            "--health-listen",
            &format!("127.0.0.1:{health_b}"),
        ],
    )
    .await;

    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    let (warm, target) = (
        TestMeter::new("warm-1", EPOCH),
        TestMeter::new("kill-1", EPOCH),
    );
    enroll(&pki, &sys.ingest, &[&warm, &target], &ekeys)
        .await
        .unwrap();
    let (w, _) = day_of(&warm, 5);
    let (t, sum) = day_of(&target, 7);
    psm_e2e::submit(&pki, &sys.ingest, [w, t].concat())
        .await
        .unwrap();
    // Once this bill is answered, the keyshares know both enrollments.
    bill(&pki, &sys, "warm", "warm-1").await.unwrap();

    // Ingest stopped: replica A claims the job and then waits on its readings; kill A there.
    sys.ingest.signal(libc::SIGSTOP);
    let mut a =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let call = tokio::spawn(async move { a.bill(bill_request("killed", "kill-1")).await });
    let mut watcher =
        ComputeClient::new(pki.channel(b.port, "compute-b", Role::Operator, "billing"));
    let mut seen = None;
    for _ in 0..100 {
        if let Ok(r) = watcher
            .watch_job(WatchJobRequest {
                idempotency_key: "killed".into(),
            })
            .await
        {
            seen = Some(r.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut progress = seen.expect("the job never appeared in the shared table");
    let owner = pg
        .client(
            "psql",
            &[
                "-d",
                "psm",
                "-Atc",
                "SELECT replica, state FROM compute_jobs WHERE idempotency_key = 'killed'",
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner).trim(), "compute-a|running");
    sys.compute.signal(libc::SIGKILL);
    assert!(call.await.unwrap().is_err(), "the killed replica answered");
    sys.ingest.signal(libc::SIGCONT);

    // WatchJob on B follows the job to its end, which B reaches once A's lease ran out.
    let mut last = None;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(p) = progress.message().await.unwrap() {
            last = Some(p);
        }
    })
    .await;
    assert!(ended.is_ok(), "WatchJob did not end: last {last:?}");
    let last = last.unwrap();
    assert!(
        last.done && last.percent == 100 && !last.step.starts_with("failed"),
        "{last:?}"
    );
    let row = pg
        .client("psql", &["-d", "psm", "-Atc", "SELECT replica, state, attempts FROM compute_jobs WHERE idempotency_key = 'killed'"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&row).trim(), "compute-b|done|2");

    // The same key on B: the stored bill, the whole day's energy.
    let resp = watcher
        .bill(bill_request("killed", "kill-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.lines[0].energy_wh, sum);
    // The key names that request only.
    let mut other = bill_request("killed", "warm-1");
    other.epoch = EPOCH;
    let e = watcher.bill(other).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    let m = scrape(health_b).await;
    assert_eq!(metric(&m, "psm_compute_jobs_taken_over_total", &[]), 1.0);
    assert_eq!(
        metric(
            &m,
            "psm_compute_jobs_total",
            &[("kind", "bill"), ("outcome", "ok")]
        ),
        1.0
    );
}
