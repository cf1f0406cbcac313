//! The keyshares' policy gate end to end, through compute: meters enroll and submit through
//! ingest, the operator asks compute for aggregates and bills, and each rule the keyshares apply
//! to linear releases refuses exactly its case and allows its neighbour — k-anonymity,
//! differencing, one bill per period (with at most one re-issue), allowed programs (a tariff
//! allowed after a restart with its hash added: the ledger survives the restart) and the rate
//! limit. compute passes the keyshares' status code and reasons through, and each keyshare's
//! reason starts with its rule's name. Every decision is in the audit log, which verifies.

use std::future::Future;
use std::time::Duration;

use prost::Message;
use psm_core::linear::Channel;
use psm_e2e::{enroll, enrollment_keys, submit, System, TestMeter, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    AggregateRequest, BillRequest, BillResponse, ReleaseRequest, Tariff, TariffBand, TimeRange,
};
use tonic::transport::Channel as GrpcChannel;
use tonic::{Code, Status};

const D1: &str = "2026-02-02";
const D2: &str = "2026-02-03";
const EPOCH: u32 = 1;
/// The keyshares' cohort minimum (compute's is 1: the keyshares decide).
const MIN: usize = 5;
/// Requests per minute per caller at each keyshare.
const RATE: usize = 40;

fn day(d: &str) -> i64 {
    psm_core::readings::parse_day(d).unwrap() * 86_400
}

fn range(first: &str, days: i64) -> TimeRange {
    TimeRange {
        start_unix: day(first),
        end_unix: day(first) + days * 86_400,
    }
}

fn band(name: &str, start_hour: u32, end_hour: u32, price: i64) -> TariffBand {
    TariffBand {
        name: name.into(),
        weekday_mask: 0x7F,
        start_hour,
        end_hour,
        import_price_milli: price,
        export_price_milli: price / 2,
        month_mask: 0,
    }
}

fn tariff(name: &str, bands: Vec<TariffBand>) -> Tariff {
    Tariff {
        name: name.into(),
        time_zone: "UTC".into(),
        bands,
        standing_charge_per_day: 40,
        vat_basis_points: 500,
        currency: "EUR".into(),
        ..Default::default()
    }
}

/// What keyshares allow a tariff by: BLAKE3 of its encoding, hex.
fn hash_hex(t: &Tariff) -> String {
    blake3::hash(&t.encode_to_vec()).to_hex().to_string()
}

fn policy(allowed: &[&Tariff]) -> String {
    let list: Vec<String> = allowed
        .iter()
        .map(|t| format!("{:?}", hash_hex(t)))
        .collect();
    format!(
        "min_cohort = {MIN}\nallowed_programs = [{}]\nrate_limit_per_minute = {RATE}\nmax_reissues = 1\nmin_bill_days = 1\nmin_band_days = 1\nbilling_cycle = \"any\"\n",
        list.join(", ")
    )
}

/// A refusal by the keyshares, passed through by compute: `code`, and the keyshares' reasons
/// (each "<Code>: <rule>: ...") in the message.
fn refused(r: Result<tonic::Response<impl Sized>, Status>, code: Code, rule: &str) -> Status {
    let e = r
        .err()
        .unwrap_or_else(|| panic!("expected a {rule} refusal"));
    assert_eq!(e.code(), code, "{rule}: {}", e.message());
    let from_keyshare = format!("{code:?}: {rule}: ");
    assert!(
        e.message().contains(&from_keyshare),
        "expected a keyshare reason starting with {rule:?}: {}",
        e.message()
    );
    e
}

/// Keyshares pick up enrollments from ingest on their own schedule: retry a request refused for
/// "enrollment" for a while.
async fn settled<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, Status>
where
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    for _ in 0..40 {
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

/// Meter `m`'s reading of 15-minute interval `i` of each day, Wh.
fn value(m: usize, i: usize) -> i64 {
    (m + 10 * i) as i64
}

/// The plaintext bill of meter `m` on a UTC tariff over `days` whole days: every 15-minute
/// interval's Wh in the band of its hour.
fn reference(t: &Tariff, m: usize, days: i64) -> psm_tariff::Bill {
    let mut import = vec![0i64; t.bands.len()];
    for _ in 0..days {
        for i in 0..96 {
            let hour = (i / 4) as u32;
            let b = t
                .bands
                .iter()
                .position(|b| (b.start_hour..b.end_hour).contains(&hour))
                .unwrap();
            import[b] += value(m, i);
        }
    }
    let core = psm_tariff::from_proto(t).unwrap();
    // A UTC tariff with no monthly charges: only the number of days matters.
    psm_tariff::price(&core, &import, &[], (0, days * 86_400), Vec::new())
}

fn check_bill(resp: &BillResponse, want: &psm_tariff::Bill, what: &str) {
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
    assert_eq!(got, expected, "{what}");
    assert_eq!(resp.total, want.total, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_refuses_its_case_and_allows_its_neighbour() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    // Tariffs with different band layouts: a bill on another layout releases other sums.
    let standard = tariff("standard", vec![band("all", 0, 24, 30_000)]);
    let green = tariff(
        "green",
        vec![band("night", 0, 7, 12_000), band("day", 7, 24, 28_000)],
    );
    let evening = tariff(
        "evening",
        vec![
            band("daytime", 0, 17, 25_000),
            band("evening", 17, 24, 35_000),
        ],
    );
    let unapproved = tariff("unapproved", vec![band("all", 0, 24, 90_000)]);
    let approved = [&standard, &green, &evening];
    // Compute itself would release cohorts of 1: the keyshares decide.
    let sys = System::start_with_policy(&pki, &keys, "min_cohort = 1", &policy(&approved)).await;
    let ekeys = enrollment_keys(&pki, &sys.keyshares).await;

    // 12 meters enroll, then report two days of 15-minute readings: meter m reads m + 10·i Wh
    // in interval i.
    let meters: Vec<TestMeter> = (0..12)
        .map(|m| TestMeter::new(&format!("m-{m:02}"), EPOCH))
        .collect();
    let refs: Vec<&TestMeter> = meters.iter().collect();
    assert_eq!(
        enroll(&pki, &sys.ingest, &refs, &ekeys)
            .await
            .unwrap()
            .stored,
        12
    );
    let mut batches = Vec::new();
    for (mi, m) in meters.iter().enumerate() {
        let values: Vec<i64> = (0..96).map(|i| value(mi, i)).collect();
        for d in [D1, D2] {
            let n = psm_core::readings::parse_day(d).unwrap();
            batches.push(m.batch(n, Channel::Import, 900, 0, &values));
        }
    }
    assert_eq!(submit(&pki, &sys.ingest, batches).await.unwrap().stored, 24);
    let ids: Vec<String> = meters.iter().map(|m| m.id.clone()).collect();
    let operator = |sys: &System| {
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"))
    };
    let mut op = operator(&sys);
    let agg = |n: usize, first: &str, key: &str| AggregateRequest {
        idempotency_key: format!("agg-{n}-{first}-{key}"),
        meter_ids: ids[..n].to_vec(),
        range: Some(range(first, 1)),
        granularity_seconds: 3600,
        epoch: EPOCH,
        channel: psm_proto::v1::Channel::Import as i32,
    };
    let bill = |meter: &str, t: &Tariff, first: &str, days: i64, reason: &str| BillRequest {
        idempotency_key: format!("bill-{meter}-{}-{first}-{days}-{}", t.name, reason.len()),
        meter_id: meter.into(),
        period: Some(range(first, days)),
        tariff: Some(t.clone()),
        reissue_reason: reason.into(),
        epoch: EPOCH,
    };

    // k-anonymity: 4 meters refused, 5 released (and exact).
    refused(
        op.aggregate(agg(MIN - 1, D1, "a")).await,
        Code::FailedPrecondition,
        "k-anonymity",
    );
    let five = settled(|| {
        let mut op = op.clone();
        let req = agg(MIN, D1, "a");
        async move { op.aggregate(req).await }
    })
    .await
    .unwrap();
    let want: Vec<i64> = (0..24)
        .map(|h| {
            (0..MIN)
                .flat_map(|m| (4 * h..4 * h + 4).map(move |i| value(m, i)))
                .sum()
        })
        .collect();
    assert_eq!(five.energy_wh, want);
    assert_eq!(five.interval_cohort_size, vec![MIN as u32; 24]);

    // Differencing: over the same slots, released cohorts must be equal or disjoint. 6 meters
    // on the same day overlap the 5 (refused), and so do all 10 (a superset: refused, or the 5
    // and the 10 would difference into the other five); a disjoint five is allowed; the same 5
    // again is no new information (allowed); 6 on the other day overlap no release (allowed).
    refused(
        op.aggregate(agg(MIN + 1, D1, "a")).await,
        Code::FailedPrecondition,
        "differencing",
    );
    refused(
        op.aggregate(agg(2 * MIN, D1, "a")).await,
        Code::FailedPrecondition,
        "differencing",
    );
    let mut disjoint = agg(MIN, D1, "disjoint");
    disjoint.meter_ids = ids[MIN..2 * MIN].to_vec();
    op.aggregate(disjoint).await.unwrap();
    let again = op
        .aggregate(agg(MIN, D1, "again"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.energy_wh, want);
    op.aggregate(agg(MIN + 1, D2, "a")).await.unwrap();

    // One bill per (meter, period): an identical repeat is the same release; an overlapping bill
    // is refused; the same period on another tariff needs a reason, and is re-issued at most once.
    let first = settled(|| {
        let mut op = op.clone();
        let req = bill("m-00", &standard, D1, 2, "");
        async move { op.bill(req).await }
    })
    .await
    .unwrap();
    check_bill(&first, &reference(&standard, 0, 2), "first bill");
    let repeat = op
        .bill(bill("m-00", &standard, D1, 2, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat.lines, first.lines);
    assert_eq!(repeat.total, first.total);
    refused(
        op.bill(bill("m-00", &standard, D2, 1, "")).await,
        Code::FailedPrecondition,
        "one-bill-per-period",
    );
    refused(
        op.bill(bill("m-00", &green, D1, 2, "")).await,
        Code::FailedPrecondition,
        "one-bill-per-period",
    );
    // Even with a reason: a re-issue covers the same period under the same tariff (two band
    // layouts over one period would difference into the readings between their edges); a
    // correction goes under a new epoch (the keyshare unit tests cover re-issue counting).
    let e = refused(
        op.bill(bill(
            "m-00",
            &green,
            D1,
            2,
            "customer moved to the green tariff",
        ))
        .await,
        Code::FailedPrecondition,
        "one-bill-per-period",
    );
    assert!(e.message().contains("another tariff"), "{}", e.message());
    let _ = &evening;
    // m-01 shares an aggregated cohort with m-00, billed D1..D3: a bill of D1 alone would leave
    // the two bills a day apart inside the cohort's aggregate.
    let e = refused(
        op.bill(bill("m-01", &standard, D1, 1, "")).await,
        Code::FailedPrecondition,
        "cohort-bills",
    );
    assert!(e.message().contains("same period"), "{}", e.message());
    // Adjacent periods are separate bills (m-11 was in no aggregate).
    settled(|| {
        let mut op = op.clone();
        let req = bill("m-11", &standard, D1, 1, "");
        async move { op.bill(req).await }
    })
    .await
    .unwrap();
    op.bill(bill("m-11", &standard, D2, 1, "")).await.unwrap();

    // A bill of one 15-minute slot would be one reading: shorter than min_bill_days, refused by
    // the keyshares (compute itself accepts 5-minute aligned periods).
    let mut one_slot = bill("m-03", &standard, D2, 1, "");
    if let Some(p) = one_slot.period.as_mut() {
        p.end_unix = p.start_unix + 900;
    }
    refused(
        op.bill(one_slot).await,
        Code::FailedPrecondition,
        "bill-period",
    );

    // Allowed programs: a tariff whose hash is not listed.
    refused(
        op.bill(bill("m-10", &unapproved, D1, 1, "")).await,
        Code::PermissionDenied,
        "allowed-program",
    );

    // The regulator adds its hash: the whole system restarts with the new policy and keeps its
    // state (readings, enrollments, the keyshares' ledgers and audit logs).
    drop(op);
    drop(sys);
    let sys = System::start_with_policy(
        &pki,
        &keys,
        "min_cohort = 1",
        &policy(&[&standard, &green, &evening, &unapproved]),
    )
    .await;
    let mut op = operator(&sys);
    let allowed = settled(|| {
        let mut op = op.clone();
        let req = bill("m-10", &unapproved, D1, 1, "");
        async move { op.bill(req).await }
    })
    .await
    .unwrap();
    check_bill(
        &allowed,
        &reference(&unapproved, 10, 1),
        "newly allowed tariff",
    );
    // The differencing ledger survived the restart.
    refused(
        op.aggregate(agg(MIN + 1, D1, "b")).await,
        Code::FailedPrecondition,
        "differencing",
    );

    // Rate limit per caller: compute asks again and again (the same, allowed release) until the
    // keyshares throttle it.
    let mut throttled = None;
    for i in 0..3 * RATE {
        match op.aggregate(agg(MIN, D1, &format!("flood-{i}"))).await {
            Ok(r) => assert_eq!(r.into_inner().energy_wh, want),
            Err(e) => {
                refused(
                    Err::<tonic::Response<()>, _>(e),
                    Code::ResourceExhausted,
                    "rate-limit",
                );
                throttled = Some(i);
                break;
            }
        }
    }
    let i = throttled.expect("compute was never throttled");
    assert!(
        i + 4 >= RATE,
        "throttled after {i} requests; the limit is {RATE} a minute"
    );
    // A throttled caller flooding the keyshare directly does not flood its audit log: the
    // refusal that started the throttling was recorded, the next ones are only counted (and
    // summarized in that caller's next record).
    let mut direct: KeyshareClient<GrpcChannel> = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Compute,
        "compute",
    ));
    let audit_len = |mut c: KeyshareClient<GrpcChannel>| async move {
        c.status(psm_proto::v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .audit_len
    };
    let before = audit_len(direct.clone()).await;
    let mut limited = 0u64;
    for k in 0..25 {
        let e = direct
            .release(ReleaseRequest {
                idempotency_key: format!("burst-{k}"),
                release: None,
            })
            .await
            .unwrap_err();
        limited += u64::from(e.code() == Code::ResourceExhausted);
    }
    // A token may refill during the burst: that request is judged and recorded, with the
    // count of the refusals before it (two records). Each refusal its own record would be 25.
    let grown = audit_len(direct.clone()).await - before;
    assert!(limited >= 20, "only {limited} of 25 were throttled");
    assert!(
        grown <= 2 * (25 - limited),
        "{limited} rate-limited refusals appended {grown} records"
    );
    // Another caller is not throttled: its (malformed) request is judged.
    let mut other: KeyshareClient<GrpcChannel> = KeyshareClient::new(pki.channel(
        sys.keyshares[0].port,
        "keyshare-1",
        Role::Compute,
        "compute-2",
    ));
    let e = other
        .release(ReleaseRequest {
            idempotency_key: "other".into(),
            release: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().starts_with("release: "), "{}", e.message());

    // The audit log names every rule that decided, and its chain verifies.
    let port = sys.keyshares[0].port;
    let text = psm_e2e::psm(psm_e2e::audit_args("show", port, pki.dir.path()));
    for rule in [
        "k-anonymity",
        "differencing",
        "one-bill-per-period",
        "allowed-program",
        "rate-limit",
        "release",
        "enrollment",
        "bill-period",
        "allowed",
    ] {
        assert!(text.contains(rule), "{rule} missing from\n{text}");
    }
    assert!(text.contains("another tariff"), "{text}");
    assert!(text.contains("verified"), "{text}");
}
