//! The reading store on PostgreSQL against sled, in the same run (issue 15):
//!
//! 1. ingest throughput in meter-days per second (one linear batch of 96 15-minute readings per
//!    meter-day, 100 per request as a head-end sends them, every acknowledgement durable: sled
//!    flushed, PostgreSQL committed): sled in one process, PostgreSQL with one replica and with
//!    two (two stores with their own connection pools, as two ingest processes have);
//! 2. the store side of a 100,000-meter aggregate: reading one day of every meter back, from
//!    sled and from PostgreSQL.
//!
//! The server is a throwaway PostgreSQL from the Debian package on the same machine (psm-testpg,
//! default settings: fsync and synchronous_commit on). Calls go straight to the stores, without
//! gRPC, which costs both backends the same.
//!
//! Sized by PSM_BENCH_METERS [20000] (throughput runs), PSM_BENCH_AGG_METERS [100000] and
//! PSM_BENCH_WRITERS [4] (writer threads per replica).
//! Run: cargo bench -p psm-e2e --bench store

use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_svc::store::postgres::PgStore;
use ingest_svc::store::{ReadingStore, SledStore};
use psm_core::linear::Channel;
use psm_proto::v1::ReadingBatch;

const FIRST_DAY: i64 = 20_454;

/// One meter-day: 96 bodies of 15 minutes.
fn meter_day(meter: usize, day: i64) -> ReadingBatch {
    let bodies: Vec<u128> = (0..96u128)
        .map(|i| (meter as u128) << 64 | (day as u128) << 8 | i)
        .collect();
    psm_core::wire::linear_batch_to_proto(
        &format!("meter-{meter:06}"),
        day,
        1,
        Channel::Import,
        900,
        0,
        &bodies,
    )
}

/// Writes `meters` meter-days of `day` through `replicas` (each with `writers` threads), in
/// requests of 100; returns meter-days per second.
fn ingest(replicas: &[Arc<dyn ReadingStore>], writers: usize, meters: usize, day: i64) -> f64 {
    let requests: Vec<Vec<ReadingBatch>> = (0..meters)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| c.iter().map(|&m| meter_day(m, day)).collect())
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for store in replicas {
            for _ in 0..writers {
                let (store, requests, next) = (store.clone(), &requests, &next);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(r) = requests.get(i) else { return };
                    let out = store.put_all(r).expect("stored");
                    assert_eq!(out.stored as usize, r.len());
                });
            }
        }
    });
    meters as f64 / start.elapsed().as_secs_f64()
}

/// Reads one day of every meter with `threads` readers, `group` meters per read (1: `scan`,
/// more: `scan_many`, as StreamReadings reads a linear-track stream); returns (time, batches).
fn read_all(
    store: &Arc<dyn ReadingStore>,
    threads: usize,
    meters: usize,
    group: usize,
    day: &str,
) -> (Duration, usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let read = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (next, read) = (&next, &read);
            s.spawn(move || loop {
                let m = next.fetch_add(group, std::sync::atomic::Ordering::Relaxed);
                if m >= meters {
                    return;
                }
                let ids: Vec<String> = (m..(m + group).min(meters))
                    .map(|i| format!("meter-{i:06}"))
                    .collect();
                let got = if group == 1 {
                    store.scan(&ids[0], day, day).expect("scan")
                } else {
                    store
                        .scan_many(&ids, day, day, psm_proto::v1::Track::Linear as i32)
                        .expect("scan_many")
                };
                read.fetch_add(got.len(), std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    (start.elapsed(), read.into_inner())
}

fn main() {
    let meters = psm_e2e::bench_size("PSM_BENCH_METERS", 20_000);
    let agg = psm_e2e::bench_size("PSM_BENCH_AGG_METERS", 100_000);
    let writers = psm_e2e::bench_size("PSM_BENCH_WRITERS", 4);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = psm_testpg::TestPostgres::start().expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("temp dir");
    let sled: Arc<dyn ReadingStore> =
        Arc::new(SledStore::open(&dir.path().join("sled")).expect("sled"));
    let connect = || -> Arc<dyn ReadingStore> {
        let config = psm_pg::PgConfig {
            max_connections: Some(writers as u32 + 2),
            ..Default::default()
        };
        Arc::new(
            rt.block_on(PgStore::connect(&config, &pg.url("psm")))
                .expect("PostgreSQL store"),
        )
    };
    let (pg_a, pg_b) = (connect(), connect());

    println!("ingest: {meters} meter-days per run (96 readings each, 100 per request), {writers} writer threads per replica");
    let sled_rate = ingest(std::slice::from_ref(&sled), writers, meters, FIRST_DAY);
    println!("  sled, 1 process:           {sled_rate:>8.0} meter-days/s");
    let one = ingest(std::slice::from_ref(&pg_a), writers, meters, FIRST_DAY + 1);
    println!(
        "  PostgreSQL, 1 replica:     {one:>8.0} meter-days/s ({:.2}× sled)",
        one / sled_rate
    );
    let two = ingest(
        &[pg_a.clone(), pg_b.clone()],
        writers,
        meters,
        FIRST_DAY + 2,
    );
    println!(
        "  PostgreSQL, 2 replicas:    {two:>8.0} meter-days/s ({:.2}× sled)",
        two / sled_rate
    );

    println!("aggregate input: one day of {agg} meters");
    let day = FIRST_DAY + 3;
    let day_s = psm_core::readings::format_day(day);
    ingest(std::slice::from_ref(&sled), writers, agg, day);
    ingest(&[pg_a.clone(), pg_b.clone()], writers, agg, day);
    let group = ingest_svc::STREAM_GROUP_METER_DAYS;
    for (what, g) in [("one meter per read", 1), ("StreamReadings' groups", group)] {
        let (t_sled, n_sled) = read_all(&sled, writers, agg, g, &day_s);
        let (t_pg, n_pg) = read_all(&pg_a, writers, agg, g, &day_s);
        assert_eq!((n_sled, n_pg), (agg, agg));
        println!("  {what} ({g} meters):");
        println!(
            "    sled:        {:>8.2} s ({:.0} meter-days/s)",
            t_sled.as_secs_f64(),
            agg as f64 / t_sled.as_secs_f64()
        );
        println!(
            "    PostgreSQL:  {:>8.2} s ({:.0} meter-days/s, {:.2}× sled's time)",
            t_pg.as_secs_f64(),
            agg as f64 / t_pg.as_secs_f64(),
            t_pg.as_secs_f64() / t_sled.as_secs_f64()
        );
    }
    let size = pg
        .client(
            "psql",
            &[
                "-d",
                "psm",
                "-Atc",
                "SELECT pg_size_pretty(pg_database_size('psm'))",
            ],
        )
        .expect("size");
    println!(
        "  PostgreSQL database size after all runs: {}",
        String::from_utf8_lossy(&size).trim()
    );
}
