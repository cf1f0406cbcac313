//! Threshold decryption latency, 2-of-3, of the tfhe track: a squashed FheUint64 through three
//! keyshare-svc processes over loopback mTLS (all three asked, result once a quorum agreed)
//! against the same partial decryptions and combine done in-process, in the same run.
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
use psm_e2e::TestPki;
use psm_proto::v1::{ComputationKind, ComputationManifest, InputRef, TimeRange, Track};
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheUint64};

const ITERS: usize = 30;
const DAY: &str = "2026-02-02";

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
    let pki = TestPki::new("psm.bench");
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
    let d0 = psm_core::readings::parse_day(DAY).unwrap() * 86_400;
    // The squashed value as a tfhe-track bill (not re-executed: reexecute_tfhe is off).
    let tariff = b"bench tariff".to_vec();
    let bill = ComputationManifest {
        kind: ComputationKind::Bill as i32,
        program_hash: blake3::hash(&tariff).as_bytes().to_vec(),
        program: tariff,
        inputs: vec![InputRef {
            meter_id: "meter-0".into(),
            day: DAY.into(),
            track: Track::Tfhe as i32,
            ciphertext_hash: vec![1; 32],
        }],
        range: Some(TimeRange {
            start_unix: d0,
            end_unix: d0 + 86_400,
        }),
        ..Default::default()
    };

    let policy =
        "allow_any_program = true\nreexecute_tfhe = \"off\"\nrate_limit_per_minute = 100000\n";
    let procs = psm_e2e::start_keyshares(&pki, &keys, None, policy).await;
    let dec = psm_e2e::decryptor(&pki, &keys, &procs, Duration::from_millis(300));

    let key_id = &keys.manifest.tfhe_key_id;
    println!("| batch | in-process median / p90 (ms) | 3 keyshares over mTLS median / p90 (ms) |");
    println!("|---|---|---|");
    let want = in_process(&shares, key_id, &squashed, SQUASHED_BLOCK);
    let mut local = Vec::new();
    for _ in 0..ITERS {
        let t = Instant::now();
        let got = in_process(&shares, key_id, &squashed, SQUASHED_BLOCK);
        local.push(t.elapsed());
        assert_eq!(got, want);
    }
    let mut remote = Vec::new();
    for i in 0..ITERS {
        let m = bill.clone();
        let t = Instant::now();
        let out = dec
            .decrypt(
                key_id,
                &squashed,
                SQUASHED_BLOCK,
                70,
                m,
                &format!("bench-{i}"),
            )
            .await
            .unwrap();
        remote.push(t.elapsed());
        assert_eq!(out.values, want);
        assert_eq!(out.report.used.len(), 2);
    }
    let (lm, lp) = stats(local);
    let (rm, rp) = stats(remote);
    println!("| squashed FheUint64 (16 blocks) | {lm:.2} / {lp:.2} | {rm:.2} / {rp:.2} |");
}
