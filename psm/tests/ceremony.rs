//! `psm ceremony` end to end: keys generated, split, written with the right modes, self-checked.

use std::process::Command;

const PSM: &str = env!("CARGO_BIN_EXE_psm");

#[test]
fn ceremony_writes_shares_and_bundle_and_self_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let run = |extra: &[&str]| {
        Command::new(PSM)
            .args(["ceremony", "--parties", "3", "--threshold", "2", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let res = run(&[]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(stdout.contains("self-check: tfhe track"), "{stdout}");
    assert!(stdout.contains("Key set ready (2-of-3)"), "{stdout}");
    let manifest = std::fs::read_to_string(out.join("public/manifest.toml")).unwrap();
    for item in ["server_key", "tfhe_public_key", "crs"] {
        assert!(
            manifest.contains(&format!("name = \"{item}\"")),
            "{manifest}"
        );
    }
    // The linear track has no dealt key: nothing of it in the bundle or the output.
    assert!(!manifest.contains("linear"), "{manifest}");
    assert!(!stdout.contains("linear key"), "{stdout}");
    for p in 1..=3 {
        let share = out.join(format!("shares/keyshare-{p}.share"));
        let file = psm_core::keys::ShareFile::read(&share).unwrap();
        assert_eq!(file.party_index, p);
        assert_eq!(file.keys.len(), 1, "the tfhe key only");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&share).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", share.display());
        }
    }
    // A second run refuses to overwrite the key set.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn ceremony_refuses_an_impossible_scheme() {
    let dir = tempfile::tempdir().unwrap();
    for (n, t) in [("3", "4"), ("8", "2"), ("3", "1"), ("4", "2")] {
        let res = Command::new(PSM)
            .args(["ceremony", "--parties", n, "--threshold", t, "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!res.status.success(), "{t}-of-{n} accepted");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains("need 2 <= t <= n <= 7"), "{err}");
    }
}
