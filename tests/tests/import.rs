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
