//! `psm meter import` of the Green Button samples into a running system; the imported readings
//! bill to the sums of the file's values.

use psm_e2e::{System, TestPki};
use psm_net::Role;
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{BillRequest, Tariff, TariffBand, TimeRange};

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/greenbutton");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_button_import_then_bill() {
    let pki = TestPki::new("psm.test");
    let keys = psm_e2e::keys::key_set(3, 2);
    let sys = System::start(&pki, &keys, "").await;
    let file = format!("{SAMPLES}/15minLP_15Days.xml");
    let out = tokio::task::spawn_blocking({
        let (port, dir) = (sys.ingest.port, pki.dir.path().to_owned());
        let file = file.clone();
        move || {
            std::process::Command::new(psm_e2e::bin("psm"))
                .args([
                    "meter",
                    "import",
                    &file,
                    "--server-name",
                    "ingest",
                    "--endpoint",
                ])
                .arg(format!("https://127.0.0.1:{port}"))
                .arg("--pki")
                .arg(dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 meters, 13 complete meter-days: 13 meter-days stored"),
        "{stdout}"
    );

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
    let out = std::process::Command::new(psm_e2e::bin("psm"))
        .args([
            "meter",
            "import",
            "--meter",
            "home-9",
            "--time-zone",
            "UTC",
            "--server-name",
            "ingest",
        ])
        .arg(&csv_path)
        .arg("--endpoint")
        .arg(format!("https://127.0.0.1:{}", sys.ingest.port))
        .arg("--pki")
        .arg(pki.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 meters, 1 complete meter-days: 1 meter-days stored"),
        "{stdout}"
    );

    // Bill one imported UTC day with a flat tariff: the energy is the sum of that day's values.
    let series =
        psm_core::import::parse_green_button(&std::fs::read_to_string(&file).unwrap(), "gb")
            .unwrap();
    let (days, _) = psm_core::import::to_days(&series).unwrap();
    let day = &days[0];
    let mut op =
        ComputeClient::new(pki.channel(sys.compute.port, "compute", Role::Operator, "billing"));
    let bill = op
        .bill(BillRequest {
            idempotency_key: "gb-1".into(),
            meter_id: day.meter_id.clone(),
            period: Some(TimeRange {
                start_unix: day.day * 86_400,
                end_unix: (day.day + 1) * 86_400,
            }),
            tariff: Some(Tariff {
                name: "flat".into(),
                time_zone: "America/New_York".into(),
                bands: vec![TariffBand {
                    name: "all".into(),
                    weekday_mask: 0x7F,
                    start_hour: 0,
                    end_hour: 24,
                    import_price_milli: 10_000,
                    export_price_milli: 0,
                }],
                currency: "USD".into(),
                ..Default::default()
            }),
            reissue_reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bill.lines[0].energy_wh, day.values.iter().sum::<i64>());
}
