//! Bill end to end: meters enroll and submit through ingest, compute-svc sums each band's bodies
//! per channel, the keyshares release only the band totals (deriving the bands from the tariff
//! themselves), and compute prices them. Bills equal the plaintext computation exactly: local
//! weeks across daylight-saving changes in London and New York (periods that are not whole UTC
//! days), mixed interval lengths, export credited per band, and one keyshare down.

use std::future::Future;
use std::time::Duration;

use chrono::TimeZone;
use psm_core::linear::Channel;
use psm_e2e::{enroll, enrollment_keys, submit, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{BillRequest, BillResponse, ReadingBatch, Tariff, TariffBand, TimeRange};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::{Code, Status};

const EPOCH: u32 = 1;
/// 2026-03-23 00:00 GMT to 2026-03-30 00:00 BST: London springs forward on the 29th (167 h).
const LONDON_WEEK: (i64, i64) = (1_774_224_000, 1_774_825_200);
/// 2026-10-26 00:00 EDT to 2026-11-02 00:00 EST: New York falls back on 1 November (169 h).
const NEW_YORK_WEEK: (i64, i64) = (1_792_987_200, 1_793_595_600);

fn band(name: &str, mask: u32, s: u32, e: u32, imp: i64, exp: i64) -> TariffBand {
    TariffBand {
        name: name.into(),
        weekday_mask: mask,
        start_hour: s,
        end_hour: e,
        import_price_milli: imp,
        export_price_milli: exp,
        month_mask: 0,
    }
}

fn tariff(name: &str, tz: &str, bands: Vec<TariffBand>) -> Tariff {
    Tariff {
        name: name.into(),
        time_zone: tz.into(),
        bands,
        standing_charge_per_day: 53,
        vat_basis_points: 500,
        currency: "GBP".into(),
        ..Default::default()
    }
}

fn london() -> Tariff {
    tariff(
        "peak/off-peak",
        "Europe/London",
        vec![
            band("peak", 0x1F, 16, 19, 41_250, 5_500),
            band("day", 0x1F, 7, 16, 27_000, 6_500),
            band("evening", 0x1F, 19, 24, 27_000, 5_500),
            band("night", 0x7F, 0, 7, 9_999, 4_000),
            band("weekend", 0x60, 7, 24, 20_000, 7_000),
        ],
    )
}

fn new_york() -> Tariff {
    tariff(
        "solar",
        "America/New_York",
        vec![
            band("midday", 0x7F, 10, 16, 18_000, 9_000),
            band("rest", 0x7F, 0, 10, 22_000, 9_000),
            band("late", 0x7F, 16, 24, 30_000, 9_000),
        ],
    )
}

/// Half-hour offset: hourly UTC intervals straddle its local hours.
fn kolkata() -> Tariff {
    tariff(
        "india",
        "Asia/Kolkata",
        vec![
            band("early", 0x7F, 0, 6, 5_000, 1_000),
            band("day", 0x7F, 6, 18, 8_000, 1_000),
            band("late", 0x7F, 18, 24, 6_000, 1_000),
        ],
    )
}

/// One meter's readings in the clear, and the batches that carry them.
#[derive(Default)]
struct Readings {
    /// (channel, start unix, seconds, Wh) per interval.
    intervals: Vec<(Channel, i64, i64, i64)>,
    batches: Vec<ReadingBatch>,
}

impl Readings {
    /// UTC days `days` of readings on `channel` at `interval` seconds without the intervals
    /// starting at the instants in `gaps`; `wh` gives each interval's Wh from its start.
    #[allow(clippy::too_many_arguments)]
    fn days(
        &mut self,
        m: &TestMeter,
        channel: Channel,
        interval: u32,
        days: std::ops::Range<i64>,
        gaps: &[i64],
        wh: &mut impl FnMut(i64) -> i64,
    ) {
        let step = i64::from(interval);
        for day in days {
            let mut run: (u32, Vec<i64>) = (0, Vec::new());
            let n = (86_400 / step) as u32;
            for i in 0..=n {
                let start = day * 86_400 + i64::from(i) * step;
                if i == n || gaps.contains(&start) {
                    if !run.1.is_empty() {
                        self.batches
                            .push(m.batch(day, channel, interval, run.0, &run.1));
                    }
                    run = (i + 1, Vec::new());
                    continue;
                }
                let v = wh(start);
                self.intervals.push((channel, start, step, v));
                run.1.push(v);
            }
        }
    }

    /// The bill a plaintext computation gives over [start, end): per band and channel the sum
    /// of the intervals starting in the period, priced.
    fn reference(&self, t: &Tariff, (start, end): (i64, i64)) -> psm_tariff::Bill {
        let mut import = vec![0i64; t.bands.len()];
        let mut export = vec![0i64; t.bands.len()];
        let mut exports = false;
        for (ch, s, _, v) in &self.intervals {
            if *s < start || *s >= end {
                continue;
            }
            let b = psm_e2e::band_of(t, start, *s);
            match ch {
                Channel::Import => import[b] += v,
                Channel::Export => {
                    exports = true;
                    export[b] += v
                }
            }
        }
        let core = psm_tariff::from_proto(t).unwrap();
        let export = if exports { export } else { Vec::new() };
        psm_tariff::price(&core, &import, &export, (start, end), Vec::new())
    }
}

fn request(key: &str, meter: &str, (start, end): (i64, i64), t: &Tariff) -> BillRequest {
    BillRequest {
        idempotency_key: key.into(),
        meter_id: meter.into(),
        period: Some(TimeRange {
            start_unix: start,
            end_unix: end,
        }),
        tariff: Some(t.clone()),
        reissue_reason: String::new(),
        epoch: EPOCH,
    }
}

fn check(resp: &BillResponse, want: &psm_tariff::Bill, what: &str) {
    let got: Vec<(&str, i64, i64)> = resp
        .lines
        .iter()
        .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
        .collect();
    let expected: Vec<(&str, i64, i64)> = want
        .lines
        .iter()
        .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
        .collect();
    assert_eq!(got, expected, "{what}: lines");
    assert_eq!(resp.standing_charge, want.standing_charge, "{what}");
    assert_eq!(resp.subtotal, want.subtotal, "{what}");
    assert_eq!(resp.vat, want.vat, "{what}");
    assert_eq!(resp.total, want.total, "{what}");
}

/// Keyshares pick up enrollments from ingest on their own schedule: a release naming a meter
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bills_equal_plaintext_references() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let mut sys = System::start(&pki, &keys, "").await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;

    // London: home-1 (15-minute import), solar-1 (30-minute import, 15-minute export in daylight
    // hours), gap-1 (15-minute import missing 2026-03-24 10:15-10:30 UTC). New York: ny-1
    // (hourly import).
    let home = TestMeter::new("home-1", EPOCH);
    let solar = TestMeter::new("solar-1", EPOCH);
    let gap = TestMeter::new("gap-1", EPOCH);
    let ny = TestMeter::new("ny-1", EPOCH);
    let r = enroll(&pki, &sys.ingest, &[&home, &solar, &gap, &ny], &ekeys)
        .await
        .unwrap();
    assert_eq!(r.stored, 4);

    let utc_days = |(s, e): (i64, i64)| s.div_euclid(86_400)..(e + 86_399).div_euclid(86_400);
    let mut rng = StdRng::seed_from_u64(11);
    let mut noise = |hi: i64| rng.gen_range(0..hi);
    let mut clear = std::collections::BTreeMap::<&str, Readings>::new();
    {
        let r = clear.entry("home-1").or_default();
        r.days(
            &home,
            Channel::Import,
            900,
            utc_days(LONDON_WEEK),
            &[],
            &mut |_| noise(1_200),
        );
    }
    {
        let r = clear.entry("solar-1").or_default();
        r.days(
            &solar,
            Channel::Import,
            1800,
            utc_days(LONDON_WEEK),
            &[],
            &mut |_| noise(900),
        );
        r.days(
            &solar,
            Channel::Export,
            900,
            utc_days(LONDON_WEEK),
            &[],
            &mut |s| {
                // Export only between 08:00 and 17:00 UTC.
                let hour = s.rem_euclid(86_400) / 3600;
                if (8..17).contains(&hour) {
                    noise(700)
                } else {
                    0
                }
            },
        );
    }
    let gap_at = psm_core::readings::parse_day("2026-03-24").unwrap() * 86_400 + 10 * 3600 + 900;
    {
        let r = clear.entry("gap-1").or_default();
        r.days(
            &gap,
            Channel::Import,
            900,
            utc_days(LONDON_WEEK),
            &[gap_at],
            &mut |_| noise(1_000),
        );
    }
    {
        let r = clear.entry("ny-1").or_default();
        r.days(
            &ny,
            Channel::Import,
            3600,
            utc_days(NEW_YORK_WEEK),
            &[],
            &mut |_| noise(3_000),
        );
    }
    let batches: Vec<ReadingBatch> = clear
        .values_mut()
        .flat_map(|r| std::mem::take(&mut r.batches))
        .collect();
    let n = batches.len() as u32;
    assert_eq!(submit(&pki, &sys.ingest, batches).await.unwrap().stored, n);

    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));

    // A London week across the spring change (not whole UTC days: it ends at 23:00 UTC) and a
    // New York week across the autumn change (04:00 to 05:00 UTC); 7 local days each.
    for (key, meter, t, week) in [
        ("home-week", "home-1", london(), LONDON_WEEK),
        ("ny-week", "ny-1", new_york(), NEW_YORK_WEEK),
    ] {
        let resp = settled(|| {
            let mut c = op.clone();
            let r = request(key, meter, week, &t);
            async move { c.bill(r).await }
        })
        .await
        .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        let want = clear[meter].reference(&t, week);
        check(&resp, &want, key);
        assert_eq!(resp.standing_charge, 53 * 7);
        assert!(
            resp.lines.iter().all(|l| l.energy_wh >= 0),
            "{key}: no export"
        );
        assert_eq!(
            resp.lines.len(),
            t.bands.len(),
            "{key}: one import line per band"
        );
        assert_eq!(resp.period.unwrap().end_unix, week.1);
        assert!(resp.quorum.unwrap().faults.is_empty(), "{key}");
    }

    // Refusals.
    let e = op
        .bill(request("gap", "gap-1", LONDON_WEEK, &london()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("2026-03-24T10:15Z"), "{}", e.message());
    let e = op
        .bill(request(
            "kolkata",
            "ny-1",
            (NEW_YORK_WEEK.0 + 86_400, NEW_YORK_WEEK.0 + 2 * 86_400),
            &kolkata(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("spans tariff bands"),
        "{}",
        e.message()
    );
    let e = op
        .bill(request(
            "mid-interval",
            "ny-1",
            (NEW_YORK_WEEK.0 + 900, NEW_YORK_WEEK.1),
            &new_york(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("straddles"), "{}", e.message());
    let mut no_epoch = request("no-epoch", "home-1", LONDON_WEEK, &london());
    no_epoch.epoch = 0;
    let e = op.bill(no_epoch).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("epoch is required"), "{}", e.message());
    let e = op
        .bill(request(
            "unaligned",
            "home-1",
            (LONDON_WEEK.0 + 60, LONDON_WEEK.1),
            &london(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = op
        .bill(request(
            "long",
            "home-1",
            (LONDON_WEEK.0, LONDON_WEEK.0 + 63 * 86_400),
            &london(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut demand = london();
    demand.demand_rate_per_kw_milli = 5;
    let e = op
        .bill(request("demand", "home-1", LONDON_WEEK, &demand))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("whole UTC days"), "{}", e.message());
    let mut gappy = london();
    gappy.bands.pop();
    let e = op
        .bill(request("bad-tariff", "home-1", LONDON_WEEK, &gappy))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no band covers"), "{}", e.message());
    let mut zone = london();
    zone.time_zone = "Europe/Atlantis".into();
    assert_eq!(
        op.bill(request("bad-zone", "home-1", LONDON_WEEK, &zone))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mut meter =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Meter, "meter-0001"));
    assert_eq!(
        meter
            .bill(request("role", "home-1", LONDON_WEEK, &london()))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // One keyshare down: solar-1's import and export are still released exactly, by the other
    // two; export is credited per band at the band's export price.
    let down = sys.keyshares.pop().unwrap();
    assert_eq!(down.name, "keyshare-3");
    drop(down);
    let resp = settled(|| {
        let mut c = op.clone();
        let r = request("solar-week", "solar-1", LONDON_WEEK, &london());
        async move { c.bill(r).await }
    })
    .await
    .unwrap_or_else(|e| panic!("one keyshare down: {e:?}"));
    let want = clear["solar-1"].reference(&london(), LONDON_WEEK);
    check(&resp, &want, "solar-1 with one keyshare down");
    assert!(
        resp.lines
            .iter()
            .any(|l| l.energy_wh < 0 && l.description.ends_with("export") && l.amount < 0),
        "{:?}",
        resp.lines
    );
    let mut used = resp.quorum.unwrap().used;
    used.sort();
    assert_eq!(used, ["keyshare-1", "keyshare-2"]);
}

/// The example rate sheet (seasons, holidays, fixed and minimum monthly charges), as a file.
const SEASONAL_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/tariffs/us-seasonal-tou.toml"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_billing_cycles_with_seasons_holidays_and_both_channels() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    // The keyshares allow the tariff by its file and bill on the registry's cycles (the
    // default): this meter's start on the 15th.
    let policy = format!("allowed_tariffs = [{SEASONAL_FILE:?}]\n");
    let registry = psm_e2e::registry_entry("cycle-1", "meter") + "billing_day = 15\n";
    let sys = System::start_with_registry(&pki, &keys, "", &policy, &registry).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    let meter = TestMeter::new("cycle-1", EPOCH);
    enroll(&pki, &sys.ingest, &[&meter], &ekeys).await.unwrap();

    let file = psm_tariff::file::load(std::path::Path::new(SEASONAL_FILE)).unwrap();
    let t = file.wire.clone();
    let tz: chrono_tz::Tz = t.time_zone.parse().unwrap();
    let midnight = |y, m, d| tz.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp();
    // Four cycles: over the spring change (8 March; 27 days and 23 hours, 28 local days), over
    // Memorial Day (25 May, a holiday) and into June (a bill keeps the season of its first
    // day: winter here), in summer, and over the autumn change (1 November).
    let cycles = [
        ("spring", midnight(2026, 2, 15), midnight(2026, 3, 15)),
        ("season", midnight(2026, 5, 15), midnight(2026, 6, 15)),
        ("summer", midnight(2026, 7, 15), midnight(2026, 8, 15)),
        ("autumn", midnight(2026, 10, 15), midnight(2026, 11, 15)),
    ];
    assert_eq!((cycles[0].2 - cycles[0].1) % 86_400, 86_400 - 3600);
    let mut rng = StdRng::seed_from_u64(5);
    let mut clear = Readings::default();
    for (_, start, end) in cycles {
        // The UTC days the local cycle touches and two more on each side: readings outside
        // the cycle, which periods off the cycle would reach.
        let days = start.div_euclid(86_400) - 2..(end + 86_399).div_euclid(86_400) + 2;
        clear.days(
            &meter,
            Channel::Import,
            3600,
            days.clone(),
            &[],
            &mut |_| rng.gen_range(0..2_500),
        );
        clear.days(&meter, Channel::Export, 900, days, &[], &mut |s| {
            let hour = s.rem_euclid(86_400) / 3600;
            if (14..21).contains(&hour) {
                rng.gen_range(0..600)
            } else {
                0
            }
        });
    }
    let batches = std::mem::take(&mut clear.batches);
    let n = batches.len() as u32;
    assert_eq!(submit(&pki, &sys.ingest, batches).await.unwrap().stored, n);
    let op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let bill = |key: &str, period: (i64, i64), t: &Tariff| {
        let (c, r) = (op.clone(), request(key, "cycle-1", period, t));
        async move {
            settled(|| {
                let (mut c, r) = (c.clone(), r.clone());
                async move { c.bill(r).await }
            })
            .await
        }
    };

    // Periods other than a registered cycle are refused by the keyshares before anything is
    // released: the UTC month, the cycle moved by an hour, half a cycle, and a cycle of
    // another billing day.
    let (_, s0, e0) = cycles[0];
    let utc = (
        psm_core::readings::parse_day("2026-02-15").unwrap() * 86_400,
        psm_core::readings::parse_day("2026-03-15").unwrap() * 86_400,
    );
    for (what, period) in [
        ("utc month", utc),
        ("one hour later", (s0 + 3600, e0 + 3600)),
        (
            "the cycle of the 16th",
            (midnight(2026, 2, 16), midnight(2026, 3, 16)),
        ),
        // Two weeks: too short first (min_bill_days, 28 local days by default).
        ("half a cycle", (s0, midnight(2026, 3, 1))),
    ] {
        let e = bill(&format!("off-{}", what.replace(' ', "-")), period, &t)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        let m = e.message();
        assert!(
            (m.contains("billing-cycle") && m.contains("billed on day 15"))
                || (what == "half a cycle" && m.contains("bill-period")),
            "{what}: {m}"
        );
    }
    let e = bill("off-utc-again", utc, &t).await.unwrap_err();
    assert!(
        e.message()
            .contains("nearest cycle is 2026-02-15 00:00 EST .. 2026-03-15 00:00 EDT"),
        "{}",
        e.message()
    );
    // A tariff the keyshares were not given (one price changed) is not allowed.
    let mut other = t.clone();
    other.bands[0].import_price_milli += 1;
    let e = bill("other-tariff", (s0, e0), &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Each registered cycle bills, both channels, equal to the plaintext computation from the
    // readings: bands by local month, holiday and hour; the fixed monthly charge; VAT.
    let mut bills = Vec::new();
    for (what, start, end) in cycles {
        let resp = bill(&format!("cycle-{what}"), (start, end), &t)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let mut import = vec![0i64; t.bands.len()];
        let mut export = vec![0i64; t.bands.len()];
        for (ch, s, _, v) in &clear.intervals {
            if (start..end).contains(s) {
                let b = psm_e2e::band_of(&t, start, *s);
                match ch {
                    Channel::Import => import[b] += v,
                    Channel::Export => export[b] += v,
                }
            }
        }
        let want = psm_tariff::price(&file.tariff, &import, &export, (start, end), Vec::new());
        check(&resp, &want, what);
        assert!(
            resp.lines
                .iter()
                .any(|l| l.description == "fixed charge, 1 month" && l.amount == 1_250),
            "{what}: {:?}",
            resp.lines
        );
        assert!(
            resp.lines.iter().any(|l| l.energy_wh < 0),
            "{what}: export credited"
        );
        bills.push(resp);
    }

    // The CLI: `psm tariff check` prints the hash the keyshares allowed the file by, and
    // `psm bill --json` (local dates, its own idempotency key) gives the same bill.
    let checked = psm_e2e::psm(["tariff", "check", SEASONAL_FILE]);
    assert!(
        checked.contains(&format!("hash {}", hex::encode(file.hash))),
        "{checked}"
    );
    let endpoint = format!("https://127.0.0.1:{}", sys.compute.port);
    let pki_dir = pki.dir.path().to_str().unwrap().to_owned();
    let cli_bill = |json: bool| {
        let mut args = vec![
            "bill",
            "--endpoint",
            &endpoint,
            "--server-name",
            "compute",
            "--pki",
            &pki_dir,
            "--meter",
            "cycle-1",
            "--tariff",
            SEASONAL_FILE,
            "--from",
            "2026-02-15",
            "--to",
            "2026-03-15",
        ];
        if json {
            args.push("--json");
        }
        psm_e2e::psm(&args)
    };
    let json = cli_bill(true);
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let grpc = &bills[0];
    let lines: Vec<(String, i64, i64)> = v["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["description"].as_str().unwrap().to_owned(),
                l["energy_wh"].as_i64().unwrap(),
                l["amount"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, i64, i64)> = grpc
        .lines
        .iter()
        .map(|l| (l.description.clone(), l.energy_wh, l.amount))
        .collect();
    assert_eq!(lines, want);
    for (k, x) in [
        ("standing_charge", grpc.standing_charge),
        ("subtotal", grpc.subtotal),
        ("vat", grpc.vat),
        ("total", grpc.total),
    ] {
        assert_eq!(v[k].as_i64(), Some(x), "{k}");
    }
    assert_eq!(v["period"]["start_unix"].as_i64(), Some(s0));
    assert_eq!(v["period"]["end_unix"].as_i64(), Some(e0));
    assert_eq!(v["period"]["start_local"], "2026-02-15 00:00 EST");
    assert_eq!(v["currency"], "USD");
    assert_eq!(v["tariff_hash"], hex::encode(file.hash));
    assert_eq!(v["meter_id"], "cycle-1");
    assert!(v["quorum"]["used"].as_array().unwrap().len() >= 2);
    // The table form prints the same total.
    let table = cli_bill(false);
    assert!(
        table.contains(&format!("{}.{:02}", grpc.total / 100, grpc.total % 100)),
        "{table}"
    );
    // The May-June cycle bills June's days in May's (winter) bands, the Memorial Day holiday
    // in the holiday band; the summer cycle in summer bands.
    let summer_wh = |b: &BillResponse| {
        b.lines
            .iter()
            .filter(|l| l.description.starts_with("summer"))
            .map(|l| l.energy_wh.abs())
            .sum::<i64>()
    };
    assert_eq!(summer_wh(&bills[1]), 0);
    assert!(summer_wh(&bills[2]) > 0);
    let (_, s1, e1) = cycles[1];
    let holiday_band = t
        .bands
        .iter()
        .position(|b| b.name == "winter weekend and holiday")
        .unwrap();
    assert!(clear
        .intervals
        .iter()
        .any(|(_, s, _, _)| (s1..e1).contains(s)
            && psm_e2e::band_of(&t, s1, *s) == holiday_band
            && tz
                .timestamp_opt(*s, 0)
                .unwrap()
                .format("%Y-%m-%d")
                .to_string()
                == "2026-05-25"));

    // The billed cycle again under another tariff (here: renamed) is not allowed either.
    let mut again = request("cycle-spring-again", "cycle-1", (s0, e0), &t);
    again.tariff.as_mut().unwrap().name = "renamed".into();
    let e = op.clone().bill(again).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a renamed tariff is another tariff"
    );

    // Every keyshare audited the refusals under the rule.
    for k in &sys.keyshares {
        let log = psm_e2e::audit_log(&pki, k).await;
        let cycle_refusals = log
            .iter()
            .filter(|r| r.decision == "refuse" && r.rule == "billing-cycle")
            .count();
        assert!(cycle_refusals >= 1, "{}: {cycle_refusals}", k.name);
    }
}

/// A dynamic-price tariff file in `dir` named `name`, its hourly prices from `prices` (UTC
/// hour start → milli-minor units per kWh).
fn dynamic_tariff(dir: &std::path::Path, name: &str, prices: &[(i64, i64)]) -> std::path::PathBuf {
    let mut csv = String::from("start,price\n");
    for (start, milli) in prices {
        csv.push_str(&format!("{start},{}.{:03}\n", milli / 1000, milli % 1000));
    }
    std::fs::write(dir.join(format!("{name}.csv")), csv).unwrap();
    let toml = format!(
        "name = {name:?}\ntime_zone = \"Europe/London\"\ncurrency = \"GBP\"\nstanding_charge_per_day = 48\nvat_percent = 5\nimport_prices = \"{name}.csv\"\n[[band]]\nname = \"all day\"\ndays = [\"all\"]\nhours = [0, 24]\nimport_price = 0\nexport_price = 15\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_prices_bill_the_weighted_sum_and_only_when_approved_in_time() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let dir = tempfile::tempdir().unwrap();
    // February 2026 in London is GMT: the cycle of billing day 1 is the UTC month.
    let (start, end) = (1_769_904_000i64, 1_772_323_200i64); // 2026-02-01 .. 2026-03-01
    let hours: Vec<i64> = (start / 3600 - 24..end / 3600 + 24)
        .map(|h| h * 3600)
        .collect();
    let agile: Vec<(i64, i64)> = hours
        .iter()
        .map(|s| (*s, 10_500 + (s / 3600 % 24) * 750))
        .collect();
    let good = dynamic_tariff(dir.path(), "agile", &agile);
    // The same prices approved only after the period began.
    let late = dynamic_tariff(dir.path(), "agile-late", &agile);
    // A spike: 100 times the lowest price in one hour.
    let mut spiky = agile.clone();
    spiky[40].1 = 1_000_000;
    let spike = dynamic_tariff(dir.path(), "spiky", &spiky);
    let policy = format!(
        "allowed_tariffs = [{{ file = {good:?}, approved = \"2026-01-20T00:00:00Z\" }}, {{ file = {late:?}, approved = \"2026-02-10T00:00:00Z\" }}, {{ file = {spike:?}, approved = \"2026-01-20T00:00:00Z\" }}]\n"
    );
    let registry = psm_e2e::registry_entry("dyn-1", "meter");
    let sys = System::start_with_registry(&pki, &keys, "", &policy, &registry).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;
    let meter = TestMeter::new("dyn-1", EPOCH);
    enroll(&pki, &sys.ingest, &[&meter], &ekeys).await.unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut clear = Readings::default();
    let days = start / 86_400 - 1..end / 86_400 + 1;
    clear.days(
        &meter,
        Channel::Import,
        3600,
        days.clone(),
        &[],
        &mut |_| rng.gen_range(0..3_000),
    );
    clear.days(&meter, Channel::Export, 1800, days, &[], &mut |s| {
        if (10..15).contains(&(s.rem_euclid(86_400) / 3600)) {
            rng.gen_range(0..800)
        } else {
            0
        }
    });
    let batches = std::mem::take(&mut clear.batches);
    let n = batches.len() as u32;
    assert_eq!(submit(&pki, &sys.ingest, batches).await.unwrap().stored, n);
    let op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let bill = |key: &str, file: &std::path::Path| {
        let t = psm_tariff::file::load(file).unwrap().wire;
        let (c, r) = (op.clone(), request(key, "dyn-1", (start, end), &t));
        async move {
            settled(|| {
                let (mut c, r) = (c.clone(), r.clone());
                async move { c.bill(r).await }
            })
            .await
        }
    };

    let resp = bill("dynamic", &good).await.unwrap();
    // The plaintext reference from the readings and the price file: Σ price × Wh, and export
    // per band at 15.0.
    let price_of: std::collections::HashMap<i64, i64> = agile.iter().copied().collect();
    let (mut weighted, mut exported) = (0i128, 0i64);
    for (ch, s, _, v) in &clear.intervals {
        if (start..end).contains(s) {
            match ch {
                Channel::Import => {
                    weighted += i128::from(price_of[&(s / 3600 * 3600)]) * i128::from(*v)
                }
                Channel::Export => exported += v,
            }
        }
    }
    let file = psm_tariff::file::load(&good).unwrap();
    let want = psm_tariff::price(
        &file.tariff,
        &[],
        &[exported],
        (start, end),
        vec![psm_tariff::dynamic_import_line(weighted, 672)],
    );
    check(&resp, &want, "dynamic");
    assert_eq!(
        resp.lines.last().map(|l| l.description.as_str()),
        Some("import at dynamic prices (672 prices)")
    );
    assert!(
        resp.lines
            .iter()
            .all(|l| l.description == "all day export" || l.energy_wh == 0),
        "no import energy is released under dynamic prices: {:?}",
        resp.lines
    );

    for (what, file, needle) in [
        ("late", &late, "after the period starts"),
        ("spike", &spike, "max_price_ratio"),
    ] {
        let e = bill(what, file).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("price-series") && e.message().contains(needle),
            "{what}: {}",
            e.message()
        );
    }

    // `psm tariff check` counts the price levels the keyshares judge as bands, and says when a
    // feed has more than a bill may (a new price every hour).
    let distinct: Vec<(i64, i64)> = hours
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, 10_000 + i as i64))
        .collect();
    let hourly = dynamic_tariff(dir.path(), "hourly", &distinct);
    let check = |args: &[&str], file: &std::path::Path| {
        let mut all: Vec<std::ffi::OsString> = vec!["tariff".into(), "check".into()];
        all.extend(args.iter().map(|a| a.into()));
        all.push(file.into());
        psm_e2e::psm(all)
    };
    let v: serde_json::Value = serde_json::from_str(&check(&["--json"], &good)).unwrap();
    assert_eq!(v["import_prices"]["levels"].as_u64(), Some(24));
    let text = check(&[], &spike);
    assert!(
        text.contains("25 price levels\n") && !text.contains("refuse"),
        "{text}"
    );
    let text = check(&[], &hourly);
    assert!(
        text.contains(&format!("{} price levels; keyshares refuse", hours.len())),
        "{text}"
    );
}
