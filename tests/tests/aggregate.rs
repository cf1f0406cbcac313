//! Aggregate end to end: meters enroll and submit through ingest, compute-svc sums bodies per
//! output interval over each interval's effective cohort, and three keyshare-svc processes
//! release their contributions. Every result equals the plaintext reference exactly: mixed
//! 5/15/30/60-minute meters, the export channel, missing readings (a member is left out of that
//! interval only; an interval below the minimum is withheld), and one keyshare down.

use std::future::Future;
use std::time::Duration;

use psm_core::linear::Channel;
use psm_e2e::{enroll, enrollment_keys, submit, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{AggregateRequest, AggregateResponse, ReadingBatch, TimeRange};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::{Code, Status};

const EPOCH: u32 = 1;
/// Cohort minimum of compute and the keyshares.
const MIN: usize = 3;

/// What the meters reported, in the clear, and the batches that carry it.
#[derive(Default)]
struct Readings {
    /// (meter, channel, first slot, slots, Wh) per interval reported.
    intervals: Vec<(String, Channel, u64, u64, i64)>,
    batches: Vec<ReadingBatch>,
}

impl Readings {
    /// A UTC day of `m`'s readings on `channel` at `interval` seconds, random Wh, without the
    /// intervals in `gaps`: one batch per run of consecutive intervals, and a new batch at each
    /// interval in `breaks` (a meter reporting its day in parts).
    #[allow(clippy::too_many_arguments)]
    fn day(
        &mut self,
        m: &TestMeter,
        interval: u32,
        day: i64,
        channel: Channel,
        gaps: &[u32],
        breaks: &[u32],
        rng: &mut StdRng,
    ) {
        let n = 86_400 / interval;
        let spi = u64::from(interval / 300);
        let mut run: (u32, Vec<i64>) = (0, Vec::new());
        for i in 0..=n {
            if i == n || gaps.contains(&i) || breaks.contains(&i) {
                if !run.1.is_empty() {
                    self.batches
                        .push(m.batch(day, channel, interval, run.0, &run.1));
                }
                run = (i, Vec::new());
            }
            if i == n || gaps.contains(&i) {
                run.0 = i + 1;
                continue;
            }
            let wh = rng.gen_range(0..2_500i64);
            self.intervals.push((
                m.id.clone(),
                channel,
                day as u64 * 288 + u64::from(i) * spi,
                spi,
                wh,
            ));
            run.1.push(wh);
        }
    }

    /// Per bucket of `g` seconds over [start, end): the energy and size of its effective cohort
    /// (the members whose intervals lie inside it and cover all of it), or (0, 0) when that is
    /// below the minimum.
    fn reference(
        &self,
        cohort: &[&str],
        channel: Channel,
        start: i64,
        end: i64,
        g: i64,
    ) -> (Vec<i64>, Vec<u32>) {
        let gs = (g / 300) as u64;
        let first = (start / 300) as u64;
        let buckets = ((end - start) / g) as u64;
        let mut energy = Vec::new();
        let mut sizes = Vec::new();
        for b in 0..buckets {
            let (bs, be) = (first + b * gs, first + (b + 1) * gs);
            let (mut sum, mut members) = (0i64, 0u32);
            for m in cohort {
                let ivs: Vec<&(String, Channel, u64, u64, i64)> = self
                    .intervals
                    .iter()
                    .filter(|(id, ch, s, n, _)| id == m && *ch == channel && *s < be && s + n > bs)
                    .collect();
                let inside = ivs.iter().all(|(_, _, s, n, _)| *s >= bs && s + n <= be);
                let slots: u64 = ivs.iter().map(|iv| iv.3).sum();
                if inside && slots == gs {
                    members += 1;
                    sum += ivs.iter().map(|iv| iv.4).sum::<i64>();
                }
            }
            if (members as usize) < MIN {
                energy.push(0);
                sizes.push(0);
            } else {
                energy.push(sum);
                sizes.push(members);
            }
        }
        (energy, sizes)
    }
}

/// Keyshares pick up enrollments from ingest on their own schedule: a release naming meters
/// enrolled a moment ago may be refused until they have; retry that for a while.
async fn settled<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, Status>
where
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    for _ in 0..60 {
        match call().await {
            Err(e)
                if e.code() == Code::FailedPrecondition && e.message().contains("enrollment") =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            r => return r.map(tonic::Response::into_inner),
        }
    }
    call().await.map(tonic::Response::into_inner)
}

fn request(
    key: &str,
    cohort: &[&str],
    channel: i32,
    start: i64,
    end: i64,
    g: u32,
) -> AggregateRequest {
    AggregateRequest {
        idempotency_key: key.into(),
        meter_ids: cohort.iter().map(|m| m.to_string()).collect(),
        range: Some(TimeRange {
            start_unix: start,
            end_unix: end,
        }),
        granularity_seconds: g,
        epoch: EPOCH,
        channel,
    }
}

fn check(
    resp: &AggregateResponse,
    want: &(Vec<i64>, Vec<u32>),
    cohort: usize,
    start: i64,
    g: i64,
    what: &str,
) {
    assert_eq!(resp.energy_wh, want.0, "{what}: energy");
    assert_eq!(
        resp.interval_cohort_size, want.1,
        "{what}: effective cohorts"
    );
    assert_eq!(resp.cohort_size as usize, cohort, "{what}: cohort size");
    let starts: Vec<i64> = (0..want.0.len() as i64).map(|i| start + i * g).collect();
    assert_eq!(resp.interval_start_unix, starts, "{what}: interval starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_equal_plaintext_references() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let policy = format!("{}min_cohort = {MIN}\n", psm_e2e::TEST_POLICY);
    let mut sys =
        System::start_with_policy(&pki, &keys, &format!("min_cohort = {MIN}"), &policy).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;

    // Eight meters of four interval lengths ("mix") and four quarter-hourly ones with gaps.
    let mix: Vec<(TestMeter, u32)> = [300u32, 900, 1800, 3600]
        .iter()
        .flat_map(|i| {
            (0..2).map(move |k| (TestMeter::new(&format!("mix-{}-{k}", i / 60), EPOCH), *i))
        })
        .collect();
    let gap: Vec<TestMeter> = (0..4)
        .map(|k| TestMeter::new(&format!("gap-{k}"), EPOCH))
        .collect();
    let all: Vec<&TestMeter> = mix.iter().map(|(m, _)| m).chain(gap.iter()).collect();
    let r = enroll(&pki, &sys.ingest, &all, &ekeys).await.unwrap();
    assert_eq!(r.stored, 12);

    let d0 = psm_core::readings::parse_day("2025-11-26").unwrap();
    let day = |d: i64| (d0 + d) * 86_400;
    let mut rng = StdRng::seed_from_u64(7);
    let mut clear = Readings::default();
    for (m, interval) in &mix {
        clear.day(m, *interval, d0, Channel::Import, &[], &[], &mut rng);
        clear.day(m, *interval, d0 + 1, Channel::Import, &[], &[], &mut rng);
        clear.day(m, *interval, d0 + 1, Channel::Export, &[], &[], &mut rng);
    }
    // Day 2, quarter-hours: gap-0 misses 02:30-02:45 and 20:00-21:00, gap-1 misses 10:00-11:00
    // and 20:00-21:00 (so hour 20 has two members, below the minimum), gap-2 reports its day in
    // three batches (split inside hours 7 and 20).
    let g0: [u32; 5] = [10, 80, 81, 82, 83];
    let g1: [u32; 8] = [40, 41, 42, 43, 80, 81, 82, 83];
    clear.day(&gap[0], 900, d0 + 2, Channel::Import, &g0, &[], &mut rng);
    clear.day(&gap[1], 900, d0 + 2, Channel::Import, &g1, &[], &mut rng);
    clear.day(
        &gap[2],
        900,
        d0 + 2,
        Channel::Import,
        &[],
        &[30, 81],
        &mut rng,
    );
    clear.day(&gap[3], 900, d0 + 2, Channel::Import, &[], &[], &mut rng);
    let batches = std::mem::take(&mut clear.batches);
    let n = batches.len() as u32;
    assert_eq!(submit(&pki, &sys.ingest, batches).await.unwrap().stored, n);

    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let mix_ids: Vec<&str> = mix.iter().map(|(m, _)| m.id.as_str()).collect();
    let gap_ids: Vec<&str> = gap.iter().map(|m| m.id.as_str()).collect();
    let import = Channel::Import.to_proto() as i32;
    let export = Channel::Export.to_proto() as i32;

    // Mixed interval lengths: hourly and daily sums of all eight; quarter-hourly sums hold only
    // the 5- and 15-minute meters (longer intervals cannot be split).
    for (key, ch, d, g, members) in [
        ("mix-hourly", import, 0, 3600, 8u32),
        ("mix-daily", import, 0, 86_400, 8),
        ("mix-quarter", import, 1, 900, 4),
        ("mix-export", export, 1, 3600, 8),
    ] {
        let resp = settled(|| {
            let mut c = op.clone();
            let r = request(key, &mix_ids, ch, day(d), day(d + 1), g);
            async move { c.aggregate(r).await }
        })
        .await
        .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        let channel = if ch == export {
            Channel::Export
        } else {
            Channel::Import
        };
        let want = clear.reference(&mix_ids, channel, day(d), day(d + 1), i64::from(g));
        assert!(want.1.iter().all(|s| *s == members), "{key}: {:?}", want.1);
        check(&resp, &want, 8, day(d), i64::from(g), key);
        let q = resp.quorum.unwrap();
        assert!(q.faults.is_empty(), "{key}: {:?}", q.faults);
        assert!(q.used.len() >= 2, "{key}: {:?}", q.used);
    }

    // Missing readings: each member is left out only of the hours it does not cover; hour 20
    // (two members) is withheld. The channel left unspecified means import.
    let resp = settled(|| {
        let mut c = op.clone();
        let r = request("gaps", &gap_ids, 0, day(2), day(3), 3600);
        async move { c.aggregate(r).await }
    })
    .await
    .unwrap_or_else(|e| panic!("gaps: {e:?}"));
    let want = clear.reference(&gap_ids, Channel::Import, day(2), day(3), 3600);
    assert_eq!((want.1[2], want.1[10], want.1[20], want.1[0]), (3, 3, 0, 4));
    check(&resp, &want, 4, day(2), 3600, "gaps");
    assert_eq!(resp.energy_wh[20], 0);

    // The members with every reading of that day are then billed for it (cohort-bills: each
    // cohort they were aggregated in holds both, and the members left out of an hour are not
    // billed), each bill exact.
    let flat = psm_proto::v1::Tariff {
        name: "flat".into(),
        time_zone: "UTC".into(),
        bands: vec![psm_proto::v1::TariffBand {
            name: "all".into(),
            weekday_mask: 0x7f,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 25_000,
            ..Default::default()
        }],
        currency: "EUR".into(),
        ..Default::default()
    };
    for m in ["gap-3", "gap-2"] {
        let resp = settled(|| {
            let mut c = op.clone();
            let r = psm_proto::v1::BillRequest {
                idempotency_key: format!("bill-{m}"),
                meter_id: m.into(),
                period: Some(TimeRange {
                    start_unix: day(2),
                    end_unix: day(3),
                }),
                tariff: Some(flat.clone()),
                reissue_reason: String::new(),
                epoch: EPOCH,
            };
            async move { c.bill(r).await }
        })
        .await
        .unwrap_or_else(|e| panic!("bill of {m}: {e:?}"));
        let want: i64 = clear
            .intervals
            .iter()
            .filter(|(id, ch, s, _, _)| {
                id == m
                    && *ch == Channel::Import
                    && (day(2) / 300..day(3) / 300).contains(&(*s as i64))
            })
            .map(|iv| iv.4)
            .sum();
        let got: i64 = resp.lines.iter().map(|l| l.energy_wh).sum();
        assert_eq!(got, want, "bill of {m}");
    }

    // Refusals.
    let mut no_epoch = request("no-epoch", &mix_ids, import, day(0), day(1), 3600);
    no_epoch.epoch = 0;
    let e = op.aggregate(no_epoch).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("epoch is required"), "{}", e.message());
    let e = op
        .aggregate(request(
            "small",
            &mix_ids[..2],
            import,
            day(0),
            day(1),
            3600,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("minimum of 3"), "{}", e.message());
    let mut other_epoch = request("epoch-2", &mix_ids, import, day(0), day(1), 3600);
    other_epoch.epoch = 2;
    let e = op.aggregate(other_epoch).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = op
        .aggregate(request(
            "unaligned",
            &mix_ids,
            import,
            day(0) + 300,
            day(1),
            900,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = op
        .aggregate(request("long", &mix_ids, import, day(0), day(32), 3600))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = op
        .aggregate(request(
            "odd-granularity",
            &mix_ids,
            import,
            day(0),
            day(1),
            700,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut meter =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Meter, "meter-0001"));
    assert_eq!(
        meter
            .aggregate(request("role", &mix_ids, import, day(0), day(1), 3600))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // One keyshare down: two still release, exactly.
    let down = sys.keyshares.pop().unwrap();
    assert_eq!(down.name, "keyshare-3");
    drop(down);
    let resp = op
        .aggregate(request("one-down", &mix_ids, export, day(1), day(2), 3600))
        .await
        .unwrap_or_else(|e| panic!("one keyshare down: {e:?}"))
        .into_inner();
    let want = clear.reference(&mix_ids, Channel::Export, day(1), day(2), 3600);
    check(&resp, &want, 8, day(1), 3600, "one keyshare down");
    let mut used = resp.quorum.unwrap().used;
    used.sort();
    assert_eq!(used, ["keyshare-1", "keyshare-2"]);
}
