//! `psm pki` on the command line: files, SPIFFE ids, key permissions, refusals.

use std::process::Command;

const PSM: &str = env!("CARGO_BIN_EXE_psm");

#[test]
fn pki_init_and_issue() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = Command::new(PSM)
        .args(["pki", "init", "--trust-domain", "utility.example", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for id in [
        "spiffe://utility.example/keyshare/keyshare-3",
        "spiffe://utility.example/operator/billing",
        "spiffe://utility.example/auditor/regulator",
    ] {
        assert!(stdout.contains(id), "{id} missing:\n{stdout}");
    }
    assert!(pki.join("ingest/ingest.crt").exists());

    // A second init refuses to overwrite the CA.
    let again = Command::new(PSM)
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let out = Command::new(PSM)
        .args(["pki", "issue", "--role", "meter", "--name", "m-77", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://utility.example/meter/m-77"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(pki.join("meter/m-77.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    for bad in [
        ["--role", "wizard", "--name", "x"],
        ["--role", "meter", "--name", "../x"],
    ] {
        let out = Command::new(PSM)
            .args(["pki", "issue"])
            .args(bad)
            .arg("--dir")
            .arg(&pki)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

#[test]
fn roles_prints_the_table() {
    let out = Command::new(PSM).arg("roles").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("`/psm.v1.Keyshare/PartialDecrypt` | compute"),
        "{s}"
    );
}
