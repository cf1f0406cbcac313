//! The README's run command: `psm demo` brings all five services up healthy, ingests a
//! simulated town, shows the feeder load decrypted through the keyshares, and stops them.

use std::process::Command;

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
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Creating a dev PKI"), "{stdout}");
    assert!(stdout.contains("Reusing the key set"), "{stdout}");
    assert!(
        stdout.contains("All 5 services are up and healthy."),
        "{stdout}"
    );
    assert_eq!(stdout.matches("SERVING").count(), 5, "{stdout}");
    assert!(stdout.contains("Feeder load, 10 meters"), "{stdout}");
    // 10 meters × 2 days of interval readings, and the 2 businesses' registers.
    assert!(stdout.contains("24 meter-days stored"), "{stdout}");
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

    // Another town in the same data directory: the days already stored are kept (encryption is
    // randomized, so they cannot be resubmitted), the new household's are stored, and the
    // keyshares refuse a feeder that differs from the released one by one meter.
    let out = run_with("9");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "2 meter-days stored, 0 were already there, 24 kept as stored by an earlier run"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("Feeder load: refused by the keyshares (differencing:"),
        "{stdout}"
    );
    assert!(stdout.contains("(9 bills in"), "{stdout}");
}
