//! The binary explains every flag, and a bad configuration is a clear error, not a panic.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ingest-svc");

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--health-listen",
        "--trust-domain",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--data-dir",
        "--max-request-bytes",
        "--shutdown-grace-secs",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

#[test]
fn missing_certificate_is_a_clear_error() {
    let out = Command::new(BIN)
        .env_clear()
        .args(["--trust-domain", "psm.test"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unknown_config_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:1\"\nlistne = 2\n").unwrap();
    let out = Command::new(BIN)
        .env_clear()
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listne"), "{err}");
}
