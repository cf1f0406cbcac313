//! `psm meter import` of the Green Button samples into a running system: each meter's seeds are
//! made and enrolled with the keyshares first, complete and incomplete UTC days are submitted,
//! and the imported readings bill to the sums of the file's values.

use std::path::{Path, PathBuf};
use std::process::Output;

use psm_e2e::{Proc, System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{BillRequest, BillResponse, Tariff, TariffBand, TimeRange};

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/greenbutton");

/// `psm meter import` against the system's ingest as headend-1, with the enrollment keys of
/// `keyshares` and meter seeds under the test's directory.
fn import(pki: &TestPki, sys: &System, keyshares: &[Proc], extra: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(psm_e2e::bin("psm"));
    cmd.args(["meter", "import", "--server-name", "ingest", "--endpoint"])
        .arg(format!("https://127.0.0.1:{}", sys.ingest.port))
        .arg("--pki")
        .arg(pki.dir.path())
        .arg("--meter-keys")
        .arg(pki.dir.path().join("meter-keys"));
    for k in keyshares {
        cmd.arg("--enrollment-key").arg(enrollment_pub(pki, k));
        cmd.arg("--anchor")
            .arg(enrollment_pub(pki, k).with_file_name("anchor.pub"));
        cmd.arg("--keyshare")
            .arg(format!("{}=https://127.0.0.1:{}", k.name, k.port));
    }
    cmd.args(extra).output().unwrap()
}

/// Where a test keyshare publishes its enrollment key (its data directory).
fn enrollment_pub(pki: &TestPki, k: &Proc) -> PathBuf {
    pki.dir
        .path()
        .join(format!("{}-data", k.name))
        .join("enrollment.pub")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn flat(time_zone: &str, currency: &str) -> Tariff {
    Tariff {
        name: "flat".into(),
        time_zone: time_zone.into(),
        bands: vec![TariffBand {
            name: "all".into(),
            weekday_mask: 0x7F,
            start_hour: 0,
            end_hour: 24,
            import_price_milli: 10_000,
            export_price_milli: 0,
            month_mask: 0,
        }],
        currency: currency.into(),
        ..Default::default()
    }
}

/// (imported, exported) Wh of a bill: import lines are positive, export lines negative.
fn billed(b: &BillResponse) -> (i64, i64) {
    let import = b
        .lines
        .iter()
        .filter(|l| l.energy_wh > 0)
        .map(|l| l.energy_wh)
        .sum();
    let export = b
        .lines
        .iter()
        .filter(|l| l.energy_wh < 0)
        .map(|l| -l.energy_wh)
        .sum();
    (import, export)
}

fn file_path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_button_import_then_bill() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start(&pki, &keys, "").await;
    let file = format!("{SAMPLES}/15minLP_15Days.xml");
    let parsed =
        psm_meterdata::import::parse_green_button(&std::fs::read_to_string(&file).unwrap(), "gb")
            .unwrap();
    let imported = psm_meterdata::import::to_days(&parsed);
    let (complete, partial, skipped) = imported.counts();
    assert_eq!((complete, skipped), (13, 0));
    assert!(partial > 0, "the sample starts and ends mid-day");
    let runs = &imported.days;
    let days: Vec<&psm_meterdata::import::MeterDay> =
        runs.iter().filter(|d| d.is_complete()).collect();
    // The sample's register is delivered energy (flowDirection 1): one import batch per day or
    // run.
    assert!(runs
        .iter()
        .all(|r| r.flow == psm_meterdata::import::Flow::Import));
    let batches = runs.len();

    let out = tokio::task::block_in_place(|| import(&pki, &sys, &sys.keyshares, &[&file]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "1 meters: 13 complete, {partial} partial and 0 skipped meter-days, 1340 readings: {batches} batches stored, 0 were already there"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 meters enrolled for epoch 1 (1 new, 0 already enrolled)"),
        "{stderr}"
    );
    assert!(stderr.contains("Partial, "), "{stderr}");
    // The meter's seeds were kept, readable by their owner only.
    let seeds = pki.dir.path().join("meter-keys/gb-9b6c7063-01.e1.seeds");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&seeds).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", seeds.display());
    }
    let before = std::fs::read(&seeds).unwrap();

    // Importing the same file again: the seeds and the enrollment are reused, and every slot
    // stays as it was first stored (a slot is encrypted once per epoch).
    let out = tokio::task::block_in_place(|| import(&pki, &sys, &sys.keyshares, &[&file]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "0 batches stored, 0 were already there, {batches} kept as stored by an earlier run"
        )),
        "{stdout}"
    );
    assert!(stderr.contains("(0 new, 1 already enrolled)"), "{stderr}");
    assert_eq!(std::fs::read(&seeds).unwrap(), before, "seeds rewritten");

    // Without every keyshare's enrollment key nothing is sent.
    let out = tokio::task::block_in_place(|| import(&pki, &sys, &sys.keyshares[..2], &[&file]));
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("no enrollment key for keyshare keyshare-3"),
        "{stderr}"
    );

    // The utility swaps its own HPKE key into keyshare-3's published enrollment key (it relays
    // the keyshares' material): the anchor's signature does not cover it, and the meter side
    // refuses to seal anything. A fresh meter id, so nothing is enrolled for it already.
    let published = enrollment_pub(&pki, &sys.keyshares[2]);
    let mut swapped = psm_core::linear::envelope::PublishedKey::read(&published).unwrap();
    swapped.public_key = hex::encode(psm_core::linear::envelope::generate_keypair().1);
    let swapped_path = pki.dir.path().join("swapped-enrollment.pub");
    std::fs::write(&swapped_path, toml::to_string(&swapped).unwrap()).unwrap();
    let mut cmd = std::process::Command::new(psm_e2e::bin("psm"));
    cmd.args(["meter", "import", "--server-name", "ingest", "--endpoint"])
        .arg(format!("https://127.0.0.1:{}", sys.ingest.port))
        .arg("--pki")
        .arg(pki.dir.path())
        .arg("--meter-keys")
        .arg(pki.dir.path().join("meter-keys-swapped"))
        .args(["--prefix", "swapped"]);
    for (i, k) in sys.keyshares.iter().enumerate() {
        let key = if i == 2 {
            swapped_path.clone()
        } else {
            enrollment_pub(&pki, k)
        };
        cmd.arg("--enrollment-key").arg(key);
        cmd.arg("--anchor")
            .arg(enrollment_pub(&pki, k).with_file_name("anchor.pub"));
        cmd.arg("--keyshare")
            .arg(format!("{}=https://127.0.0.1:{}", k.name, k.port));
    }
    let out = tokio::task::block_in_place(|| cmd.arg(&file).output().unwrap());
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("enrollment key of keyshare keyshare-3 is not signed by its anchor"),
        "{stderr}"
    );
    let sealed = std::fs::read_dir(pki.dir.path().join("meter-keys-swapped"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "enrollment"))
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(sealed, 0, "nothing was sealed");

    // A utility's Green Button CSV export: one UTC day of hourly kWh for a meter named on the
    // command line.
    let mut csv =
        String::from("Name,Jane\n\nTYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES\n");
    for h in 0..24 {
        csv.push_str(&format!(
            "Electric usage,2026-02-02,{h:02}:00,{h:02}:59,0.{h:02},kWh,$0.01,\n"
        ));
    }
    let csv_path = pki.dir.path().join("usage.csv");
    std::fs::write(&csv_path, csv).unwrap();
    let out = tokio::task::block_in_place(|| {
        import(
            &pki,
            &sys,
            &sys.keyshares,
            &[
                "--meter",
                "home-9",
                "--time-zone",
                "UTC",
                file_path(&csv_path),
            ],
        )
    });
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(
            "1 meters: 1 complete, 0 partial and 0 skipped meter-days, 24 readings: 1 batches stored, 0 were already there"
        ),
        "{stdout}"
    );

    // Bill one imported UTC day with a flat tariff: the energy is the sum of that day's values.
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let imported = |v: &[i64]| v.iter().map(|x| (*x).max(0)).sum::<i64>();
    let exported = |v: &[i64]| v.iter().map(|x| (-*x).max(0)).sum::<i64>();
    let bill = |key: &str, meter: &str, start_unix: i64, end_unix: i64| BillRequest {
        idempotency_key: key.into(),
        meter_id: meter.into(),
        period: Some(TimeRange {
            start_unix,
            end_unix,
        }),
        tariff: Some(flat("America/New_York", "USD")),
        reissue_reason: String::new(),
        epoch: 1,
    };
    let day = days[1];
    let b = op
        .bill(bill(
            "gb-1",
            &day.meter_id,
            day.day * 86_400,
            (day.day + 1) * 86_400,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(billed(&b), (imported(&day.values), exported(&day.values)));

    // The incomplete first day was submitted too: from its first reading through the next
    // (complete) day, the bill is the sum of both days' values.
    let run = &runs[0];
    assert!(!run.is_complete());
    assert_eq!(
        run.first_interval as usize + run.values.len(),
        run.intervals_per_day(),
        "the sample's first day runs to midnight"
    );
    let next = days[0];
    assert_eq!(next.day, run.day + 1);
    let start = run.day * 86_400 + i64::from(run.first_interval) * i64::from(run.interval_seconds);
    let b = op
        .bill(bill(
            "gb-partial",
            &run.meter_id,
            start,
            (next.day + 1) * 86_400,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        billed(&b),
        (
            imported(&run.values) + imported(&next.values),
            exported(&run.values) + exported(&next.values)
        )
    );
}

/// A seasonal tariff with a holiday for the Green Button sample's April (New York).
const APRIL_TARIFF: &str = r#"
name = "April test"
time_zone = "America/New_York"
currency = "USD"
fixed_charge_per_month = 900
vat_percent = 4
holidays = ["2012-04-06"]
[seasons]
spring = ["apr", "may"]
rest = [1, 2, 3, 6, 7, 8, 9, 10, 11, 12]
[[band]]
name = "spring peak"
season = "spring"
days = ["weekdays"]
hours = [16, 21]
import_price = 25.5
[[band]]
name = "spring off-peak"
season = "spring"
days = ["weekdays"]
hours = [0, 16]
import_price = 11
[[band]]
name = "spring late"
season = "spring"
days = ["weekdays"]
hours = [21, 24]
import_price = 11
[[band]]
name = "spring weekend and holiday"
season = "spring"
days = ["weekend", "holidays"]
hours = [0, 24]
import_price = 9.25
[[band]]
name = "rest"
season = "rest"
days = ["all"]
hours = [0, 24]
import_price = 15
"#;

/// Brisbane (AEST all year, as NEM12 market time), import and export priced per band.
const BRISBANE_TARIFF: &str = r#"
name = "QLD TOU test"
time_zone = "Australia/Brisbane"
currency = "AUD"
standing_charge_per_day = 110
vat_percent = 10
[[band]]
name = "peak"
days = ["all"]
hours = [16, 21]
import_price = 41.2
export_price = 3.5
[[band]]
name = "shoulder"
days = ["all"]
hours = [0, 16]
import_price = 22.0
export_price = 6.0
[[band]]
name = "late"
days = ["all"]
hours = [21, 24]
import_price = 22.0
export_price = 3.5
"#;

/// (import, export) Wh per interval start of NMI `nmi` in a NEM12 file, read straight from its
/// 200 and 300 records (market time UTC+10): the plaintext reference.
fn nem12_reference(text: &str, nmi: &str) -> std::collections::BTreeMap<(bool, i64), i64> {
    let mut out = std::collections::BTreeMap::new();
    let mut export = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        match f[0] {
            "200" => export = (f[1] == nmi).then(|| f[4].starts_with('B')),
            "300" => {
                let Some(export) = export else { continue };
                let quality = f[2 + 48];
                if quality == "N" {
                    continue;
                }
                let date = chrono::NaiveDate::parse_from_str(f[1], "%Y%m%d").unwrap();
                let start = date.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() - 36_000;
                for (k, v) in f[2..50].iter().enumerate() {
                    let wh = (v.parse::<f64>().unwrap() * 1000.0).round() as i64;
                    out.insert((export, start + k as i64 * 1800), wh);
                }
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_bill_local_months_against_references_from_the_files() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    // Billing cycles as registered (the 1st of each month for every meter here).
    let sys = System::start_with_policy(&pki, &keys, "", "allow_any_program = true\n").await;
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));

    // Five usage points of hourly data, 2012-04-01 00:00 EDT to 2012-05-03: the report as JSON.
    let file = format!("{SAMPLES}/1hrLP_32DaysFiveUsagePoints_M.xml");
    let out =
        tokio::task::block_in_place(|| import(&pki, &sys, &sys.keyshares, &["--json", &file]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["meters"], 5);
    assert_eq!(report["readings_stored"], 3840);
    assert_eq!(report["meter_days"]["skipped"], 0);
    let days = report["days"].as_array().unwrap();
    assert!(days.iter().all(|d| d["flow"] == "import"));
    assert!(
        days.iter().any(|d| d["status"] == "partial"),
        "the file starts at 04:00 UTC"
    );

    let tariff = psm_tariff::file::check(APRIL_TARIFF).unwrap();
    let t = tariff.wire.clone();
    let ny: chrono_tz::Tz = "America/New_York".parse().unwrap();
    use chrono::TimeZone;
    let april = (
        ny.with_ymd_and_hms(2012, 4, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
        ny.with_ymd_and_hms(2012, 5, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
    );
    let parsed =
        psm_meterdata::import::parse_green_button(&std::fs::read_to_string(&file).unwrap(), "gb")
            .unwrap();
    for s in &parsed.series {
        let mut import = vec![0i64; t.bands.len()];
        for r in &s.readings {
            if (april.0..april.1).contains(&r.start) {
                import[psm_e2e::band_of(&t, april.0, r.start)] += r.wh;
            }
        }
        let want = psm_tariff::price(&tariff.tariff, &import, &[], april, Vec::new());
        let req = BillRequest {
            idempotency_key: format!("april-{}", s.meter_id),
            meter_id: s.meter_id.clone(),
            period: Some(TimeRange {
                start_unix: april.0,
                end_unix: april.1,
            }),
            tariff: Some(t.clone()),
            reissue_reason: String::new(),
            epoch: 1,
        };
        let b = op.bill(req).await.unwrap().into_inner();
        let got: Vec<(&str, i64, i64)> = b
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
            .collect();
        let expected: Vec<(&str, i64, i64)> = want
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
            .collect();
        assert_eq!(got, expected, "{}", s.meter_id);
        assert_eq!(
            (b.subtotal, b.vat, b.total),
            (want.subtotal, want.vat, want.total)
        );
        assert!(b
            .lines
            .iter()
            .any(|l| l.description == "fixed charge, 1 month"));
    }
    // `psm aggregate --json` over the five meters for a local day: the same values as the
    // Aggregate RPC with the same request.
    let ids: Vec<String> = parsed.series.iter().map(|s| s.meter_id.clone()).collect();
    let endpoint = format!("https://127.0.0.1:{}", sys.compute.port);
    let pki_dir = pki.dir.path().to_str().unwrap().to_owned();
    let out = tokio::task::block_in_place(|| {
        let mut cmd = std::process::Command::new(psm_e2e::bin("psm"));
        cmd.args([
            "aggregate",
            "--endpoint",
            &endpoint,
            "--server-name",
            "compute",
        ])
        .args([
            "--pki",
            &pki_dir,
            "--from",
            "2012-04-02",
            "--to",
            "2012-04-03",
        ])
        .args([
            "--time-zone",
            "America/New_York",
            "--granularity",
            "3600",
            "--json",
        ]);
        for id in &ids {
            cmd.args(["--meter", id]);
        }
        cmd.output().unwrap()
    });
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let agg: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let day = (april.0 + 86_400, april.0 + 2 * 86_400);
    let mut sorted = ids.clone();
    sorted.sort();
    let grpc = op
        .aggregate(psm_proto::v1::AggregateRequest {
            idempotency_key: "april-2-aggregate".into(),
            meter_ids: sorted,
            range: Some(TimeRange {
                start_unix: day.0,
                end_unix: day.1,
            }),
            granularity_seconds: 3600,
            epoch: 1,
            channel: psm_proto::v1::Channel::Import as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let intervals = agg["intervals"].as_array().unwrap();
    assert_eq!(intervals.len(), 24);
    for (i, iv) in intervals.iter().enumerate() {
        assert_eq!(iv["start_unix"].as_i64(), Some(grpc.interval_start_unix[i]));
        assert_eq!(iv["energy_wh"].as_i64(), Some(grpc.energy_wh[i]));
        assert_eq!(
            iv["cohort"].as_u64(),
            Some(u64::from(grpc.interval_cohort_size[i]))
        );
        // And the plaintext sum of the file's readings in that hour.
        let hour = grpc.interval_start_unix[i];
        let want: i64 = parsed
            .series
            .iter()
            .flat_map(|s| &s.readings)
            .filter(|r| r.start == hour)
            .map(|r| r.wh)
            .sum();
        assert_eq!(grpc.energy_wh[i], want, "hour {i}");
    }
    assert_eq!(agg["intervals"][0]["start_local"], "2012-04-02 00:00 EDT");

    // A month from the 2nd is not these meters' billing cycle.
    let e = op
        .bill(BillRequest {
            idempotency_key: "april-from-the-2nd".into(),
            meter_id: parsed.series[0].meter_id.clone(),
            period: Some(TimeRange {
                start_unix: april.0 + 86_400,
                end_unix: april.1 + 86_400,
            }),
            tariff: Some(t.clone()),
            reissue_reason: String::new(),
            epoch: 1,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("billing-cycle"), "{e:?}");

    // NEM12: import and export streams, a day with null intervals and a null export day, then
    // January (Brisbane) billed against sums read straight from the file's records.
    let nem = format!("{SAMPLES}/../nem12/net-30min.csv");
    let out = tokio::task::block_in_place(|| import(&pki, &sys, &sys.keyshares, &["--json", &nem]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["format"], "nem12");
    assert_eq!(report["readings_stored"], 33 * 48 - 4 + 32 * 48);
    let notes: Vec<String> = report["days"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["notes"].as_array().unwrap().iter())
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("intervals 21..24")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("null data (quality N) on line")),
        "{notes:?}"
    );

    let tariff = psm_tariff::file::check(BRISBANE_TARIFF).unwrap();
    let t = tariff.wire.clone();
    let bne: chrono_tz::Tz = "Australia/Brisbane".parse().unwrap();
    let january = (
        bne.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
        bne.with_ymd_and_hms(2026, 2, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
    );
    let reference = nem12_reference(&std::fs::read_to_string(&nem).unwrap(), "QB00000001");
    let mut import = vec![0i64; t.bands.len()];
    let mut export = vec![0i64; t.bands.len()];
    for ((is_export, start), wh) in &reference {
        if (january.0..january.1).contains(start) {
            let b = psm_e2e::band_of(&t, january.0, *start);
            if *is_export {
                export[b] += wh;
            } else {
                import[b] += wh;
            }
        }
    }
    let want = psm_tariff::price(&tariff.tariff, &import, &export, january, Vec::new());
    let b = op
        .bill(BillRequest {
            idempotency_key: "nem12-january".into(),
            meter_id: "QB00000001".into(),
            period: Some(TimeRange {
                start_unix: january.0,
                end_unix: january.1,
            }),
            tariff: Some(t),
            reissue_reason: String::new(),
            epoch: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, i64, i64)> = b
        .lines
        .iter()
        .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
        .collect();
    let expected: Vec<(&str, i64, i64)> = want
        .lines
        .iter()
        .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
        .collect();
    assert_eq!(got, expected);
    assert_eq!((b.standing_charge, b.total), (31 * 110, want.total));
    assert!(b
        .lines
        .iter()
        .any(|l| l.description == "peak export" && l.energy_wh < 0));
}
