//! `psm registry` and `psm anchor` on the command line: the file they write is what keyshares and
//! ingest load, refusals leave it as it was, and secrets are private.

use std::path::Path;
use std::process::{Command, Output};

const PSM: &str = env!("CARGO_BIN_EXE_psm");

fn psm(args: &[&str], file: &Path) -> Output {
    Command::new(PSM)
        .args(args)
        .arg("--file")
        .arg(file)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn registry_add_change_remove_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.toml");
    let keys = dir.path().join("meter-keys");
    ok(&psm(&["registry", "init"], &file));
    assert!(
        !psm(&["registry", "init"], &file).status.success(),
        "no overwrite"
    );
    let device = hex::encode(psm_core::signing::SecretKey::generate().public());
    let out = ok(&psm(
        &[
            "registry",
            "add",
            "--meter",
            "m-1",
            "--billing-day",
            "5",
            "--device-key",
            &device,
        ],
        &file,
    ));
    assert!(out.starts_with("added m-1"), "{out}");
    // Device keys made for simulated meters, kept private next to their seeds.
    let keys_s = keys.to_str().unwrap();
    let out = ok(&psm(
        &[
            "registry",
            "add",
            "--meter",
            "m-2",
            "--meter",
            "h-1",
            "--encryption",
            "headend",
            "--meter-keys",
            keys_s,
        ],
        &file,
    ));
    assert_eq!(out.lines().count(), 2, "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("m-2.device"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let before = std::fs::read_to_string(&file).unwrap();
    // Refusals change nothing: a listed meter without --replace, a bad key, a bad billing day,
    // removing a meter that is not there.
    for args in [
        vec![
            "registry",
            "add",
            "--meter",
            "m-1",
            "--device-key",
            device.as_str(),
        ],
        vec!["registry", "add", "--meter", "m-9", "--device-key", "00ff"],
        vec![
            "registry",
            "add",
            "--meter",
            "m-9",
            "--billing-day",
            "31",
            "--device-key",
            device.as_str(),
        ],
        vec!["registry", "remove", "--meter", "m-9"],
    ] {
        let out = psm(&args, &file);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), before, "{args:?}");
    }
    let out = ok(&psm(
        &[
            "registry",
            "add",
            "--meter",
            "m-1",
            "--encryption",
            "headend",
            "--billing-day",
            "5",
            "--device-key",
            &device,
            "--replace",
        ],
        &file,
    ));
    assert!(out.starts_with("changed m-1"), "{out}");
    ok(&psm(&["registry", "remove", "--meter", "m-2"], &file));
    let r = psm_core::registry::Registry::load(Some(&file)).unwrap();
    assert_eq!(r.len(), 2);
    let m1 = r.entry("m-1").unwrap();
    assert_eq!(
        (m1.encryption, m1.billing_day),
        (psm_core::registry::Encryption::Headend, 5)
    );
    let json = ok(&psm(&["registry", "list", "--json"], &file));
    assert!(json.contains("\"id\":\"h-1\""), "{json}");
    let table = ok(&psm(&["registry", "list"], &file));
    assert!(table.contains("2 meter(s)"), "{table}");
}

#[test]
fn anchor_init_makes_a_private_key_and_its_public_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(PSM)
        .args(["anchor", "init", "--party", "keyshare-2", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    ok(&out);
    let f = psm_core::signing::AnchorFile::read(&dir.path().join("keyshare-2.pub")).unwrap();
    assert_eq!(f.party, "keyshare-2");
    let key = psm_core::signing::SecretKey::read(&dir.path().join("keyshare-2.key")).unwrap();
    assert_eq!(f.key().unwrap(), key.public());
    // Again: the key is kept.
    let again = Command::new(PSM)
        .args(["anchor", "init", "--party", "keyshare-2", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(ok(&again).starts_with("kept"));
    assert!(!Command::new(PSM)
        .args(["anchor", "init", "--party", "bad name", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap()
        .status
        .success());
}
