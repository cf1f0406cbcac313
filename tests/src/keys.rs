//! The tests' shared key set: generated once (about 30 s) on first use and cached under
//! `target/psm-test-keys/`, never one per test. Key sets for any t-of-n are split from the
//! cached dealer material once and cached too.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use psm_core::ceremony::{
    default_party_names, generate, write_bundle, CeremonyOutput, KeyMaterial,
};
use psm_core::threshold::Scheme;

/// Bump when the cached format or the key parameters change.
const CACHE_VERSION: &str = "v2";

static LOCK: Mutex<()> = Mutex::new(());

/// `target/psm-test-keys/<version>` (next to the running test executable's profile directory).
pub fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    target.join("psm-test-keys").join(CACHE_VERSION)
}

fn words_to_bytes(w: &[u128]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_words(b: &[u8]) -> Vec<u128> {
    b.chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect()
}

/// Loads the dealer material, generating and caching it first if needed. Safe across threads
/// (a mutex) and across test processes (a file lock).
pub fn material() -> KeyMaterial {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    fs::create_dir_all(&dir).expect("create key cache dir");
    let lock = fs::File::create(dir.join(".lock")).expect("lock file");
    lock.lock().expect("lock key cache");
    let files = ["tfhe_secret", "server_key", "tfhe_public_key", "crs"];
    if !dir.join("complete").exists() {
        eprintln!(
            "generating the shared test key set in {} (once, ~30 s)",
            dir.display()
        );
        let m = generate(&mut |s| eprintln!("  {s}")).expect("key generation");
        let data = [
            words_to_bytes(&m.tfhe_secret),
            m.server_key.clone(),
            m.tfhe_public_key.clone(),
            m.crs.clone(),
        ];
        for (f, d) in files.iter().zip(data) {
            fs::write(dir.join(f), d).expect("write key cache");
        }
        fs::write(dir.join("complete"), b"").expect("write key cache");
    }
    let read = |f: &str| fs::read(dir.join(f)).expect("read key cache");
    KeyMaterial {
        tfhe_secret: bytes_to_words(&read(files[0])),
        server_key: read(files[1]),
        tfhe_public_key: read(files[2]),
        crs: read(files[3]),
    }
}

/// The cached t-of-n key set (share files + public bundle), split from the cached material on
/// first use and reused by every test after.
pub fn key_set(n: usize, t: usize) -> CeremonyOutput {
    let dir = cache_dir().join("sets").join(format!("{t}-of-{n}"));
    let names = default_party_names(n);
    {
        let _guard = SETS.lock().unwrap_or_else(|e| e.into_inner());
        fs::create_dir_all(&dir).expect("create key set dir");
        let lock = fs::File::create(dir.join(".lock")).expect("lock file");
        lock.lock().expect("lock key set");
        if !dir.join("complete").exists() {
            let m = material();
            let scheme = Scheme::new(n, t).expect("scheme");
            write_bundle(&m, scheme, &names, &dir).expect("write key set");
            fs::write(dir.join("complete"), b"").expect("mark key set");
        }
    }
    let public_dir = dir.join("public");
    let manifest = psm_core::ceremony::PublicBundle::open(&public_dir)
        .expect("cached bundle")
        .manifest;
    CeremonyOutput {
        share_files: names
            .iter()
            .map(|n| dir.join("shares").join(format!("{n}.share")))
            .collect(),
        public_dir,
        manifest,
    }
}

static SETS: Mutex<()> = Mutex::new(());
