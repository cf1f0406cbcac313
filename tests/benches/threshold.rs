//! Threshold decryption latency of the tfhe track, in-process: a squashed FheUint64 decrypted
//! from exactly t = 2 of 3 share files (not cross-checked) against all 3 (every share from two
//! parties, cross-checked), in the same run. Through the keyshares every tfhe-track decryption is
//! preceded by each keyshare's mandatory re-execution of the program, which dominates; that path
//! runs end to end in tests/tests/tfhe_track.rs.
//!
//! The linear track has no dealt key and no partial decryptions any more: its releases
//! (Keyshare.Release) are measured by `cargo bench -p psm-e2e --bench linear`.
//!
//! Run: cargo build --release --bins && cargo bench -p psm-e2e --bench threshold

use std::time::{Duration, Instant};

use psm_core::ceremony::{decrypt_via_files, PublicBundle};
use psm_core::keys::ShareFile;
use psm_core::lwe::{Encoding, LweBatch, SQUASHED_BLOCK};
use psm_core::squashed::uint_batch;
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheUint64};

const ITERS: usize = 30;

fn stats(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    (ms(d[d.len() / 2]), ms(d[d.len() * 9 / 10]))
}

fn in_process(shares: &[&ShareFile], key_id: &str, batch: &LweBatch, enc: Encoding) -> Vec<i128> {
    decrypt_via_files(shares, key_id, batch, enc).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = psm_e2e::keys::key_set(3, 2);
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let files: Vec<ShareFile> = keys
        .share_files
        .iter()
        .map(|p| ShareFile::read(p).unwrap())
        .collect();
    let shares: Vec<&ShareFile> = files.iter().collect();

    let sk = bundle.compressed_server_key().unwrap().decompress();
    let cpk = bundle.compact_public_key().unwrap();
    let squashed = tokio::task::spawn_blocking(move || {
        tfhe::set_server_key(sk);
        let ex = CompactCiphertextList::builder(&cpk)
            .push(0xFEED_FACE_CAFE_BEEFu64)
            .build()
            .expand()
            .unwrap();
        let x: FheUint64 = ex.get(0).unwrap().unwrap();
        uint_batch(&x.squash_noise().unwrap())
    })
    .await
    .unwrap();
    let key_id = &keys.manifest.tfhe_key_id;
    println!("| batch | 2 of 3 share files median / p90 (ms) | all 3, cross-checked, median / p90 (ms) |");
    println!("|---|---|---|");
    let want = in_process(&shares[..2], key_id, &squashed, SQUASHED_BLOCK);
    let mut two = Vec::new();
    let mut three = Vec::new();
    for _ in 0..ITERS {
        let t = Instant::now();
        assert_eq!(
            in_process(&shares[..2], key_id, &squashed, SQUASHED_BLOCK),
            want
        );
        two.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(in_process(&shares, key_id, &squashed, SQUASHED_BLOCK), want);
        three.push(t.elapsed());
    }
    let (am, ap) = stats(two);
    let (bm, bp) = stats(three);
    println!("| squashed FheUint64 (16 blocks) | {am:.2} / {ap:.2} | {bm:.2} / {bp:.2} |");
}
