//! The README's run command: `psm demo` brings all five services up healthy, enrolls a
//! simulated town's meters with the keyshares and ingests its readings, shows the feeder load
//! released by the keyshares, and stops them.

use std::process::Command;

/// Households of the demo's town (seed 1) that export on one of its 2 days (2026-01-05..06):
/// each of those sends an export batch for both days.
fn exporting(households: usize) -> usize {
    let day0 = psm_core::readings::parse_day("2026-01-05").unwrap();
    psm_meterdata::simulate::town(households, 2, 1)
        .iter()
        .filter(|m| (0..2).any(|d| m.day(day0 + d, 900).iter().any(|v| *v < 0)))
        .count()
}

#[test]
fn demo_check_starts_and_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("psm-data");
    // Use the tests' cached key set instead of a fresh ceremony (the ceremony has its own test).
    let keys = psm_e2e::keys::key_set(3, 2);
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(keys.public_dir.parent().unwrap(), data.join("keys")).unwrap();
    // Below the ephemeral port range (outgoing connections cannot take these), all five free.
    let base = (0..500u16)
        .map(|i| 20_000 + (std::process::id() as u16 % 500 + i) % 500 * 20)
        .find(|b| {
            [1u16, 2, 11, 12, 13]
                .iter()
                .all(|o| std::net::TcpListener::bind(("127.0.0.1", b + o)).is_ok())
        })
        .expect("a free block of ports");
    let run_with = |households: &str| {
        Command::new(psm_e2e::bin("psm"))
            .args(["demo", "--check", "--households", households, "--days", "2"])
            .args(["--base-port", &base.to_string(), "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
    };
    let run = || run_with("8");
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Creating a dev PKI"), "{stdout}");
    assert!(stdout.contains("Reusing the key set"), "{stdout}");
    assert!(
        stdout.contains("All 5 services are up and healthy."),
        "{stdout}"
    );
    assert_eq!(stdout.matches("SERVING").count(), 5, "{stdout}");
    // Every meter enrolled its own keys before sending anything; its seeds stay with it.
    assert!(
        stderr.contains("10 meters enrolled for epoch 1 (10 new, 0 already enrolled)"),
        "{stderr}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let seeds = data.join("meter-keys/meter-0001.e1.seeds");
        let mode = std::fs::metadata(&seeds).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", seeds.display());
    }
    let registry = std::fs::read_to_string(data.join("registry.toml")).unwrap();
    assert!(registry.contains("id = \"shop-02\""), "{registry}");
    assert!(stdout.contains("Feeder load, 10 meters"), "{stdout}");
    assert!(
        stdout.contains("effective cohort: all 10 meters in every hour"),
        "{stdout}"
    );
    // 10 meters × 2 days of import readings, export readings of the households with solar, and
    // the 2 businesses' registers.
    let e8 = exporting(8);
    assert!(
        stdout.contains(&format!(
            "{} batches stored, 0 were already there",
            20 + 2 * e8 + 4
        )),
        "{stdout}"
    );
    assert!(stdout.contains("Bills, 2 days"), "{stdout}");
    assert!(stdout.contains("(8 bills in"), "{stdout}");
    assert_eq!(stdout.matches("demand charge, peak").count(), 2, "{stdout}");
    for k in ["keyshare-1", "keyshare-2", "keyshare-3"] {
        assert!(stdout.contains(&format!("{k}: ")), "{stdout}");
    }
    assert_eq!(
        stdout.matches("chain verified, head ").count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout.contains("refused by the keyshares\n  (differencing:"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("refused: differencing ×1").count(),
        3,
        "{stdout}"
    );
    // The second run reuses the PKI.
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Reusing the dev PKI"), "{stdout}");
    assert!(
        stdout.contains("reusing the readings ingested by an earlier run"),
        "{stdout}"
    );
    assert!(stdout.contains("Feeder load, 10 meters"), "{stdout}");
    // Identical bills and releases again are retries, not new releases: all allowed.
    assert!(stdout.contains("(8 bills in"), "{stdout}");
    assert_eq!(stdout.matches("demand charge, peak").count(), 2, "{stdout}");

    // Another town in the same data directory: the meters already enrolled keep their seeds,
    // the slots already stored are kept (each is encrypted once per epoch), the new
    // household's are stored, and the keyshares refuse a feeder that differs from the released
    // one by one meter.
    let out = run_with("9");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("11 meters enrolled for epoch 1 (1 new, 10 already enrolled)"),
        "{stderr}"
    );
    let new_exports = exporting(9) - e8;
    assert!(
        stdout.contains(&format!(
            "{} batches stored, 0 were already there, {} kept as stored by an earlier run",
            2 + 2 * new_exports,
            20 + 2 * e8 + 4
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("Feeder load: refused by the keyshares (differencing:"),
        "{stdout}"
    );
    assert!(stdout.contains("(9 bills in"), "{stdout}");
}
