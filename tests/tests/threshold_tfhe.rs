//! Squashed tfhe-rs ciphertexts (FheUint8/32/64, FheBool) decrypt through any t of n share files
//! written by the ceremony code, and not through t−1. (The linear track has no dealt key: its
//! releases are tested in psm-core/tests/threshold.rs and through the keyshares.)

use psm_core::ceremony::{decrypt_via_files, CeremonyError, PublicBundle};
use psm_core::keys::ShareFile;
use psm_core::lwe::{LweBatch, SQUASHED_BLOCK};
use psm_core::squashed::{bool_batch, recompose, uint_batch};
use psm_core::threshold::ThresholdError;
use tfhe::prelude::*;
use tfhe::{CompactCiphertextList, FheBool, FheUint32, FheUint64, FheUint8};

fn subsets(n: usize, size: usize) -> Vec<Vec<usize>> {
    (0u32..(1 << n))
        .filter(|m| m.count_ones() as usize == size)
        .map(|m| (0..n).filter(|p| m & (1 << p) != 0).collect())
        .collect()
}

/// Decrypts through the share files of parties `who` (0-based).
fn decrypt(
    shares: &[ShareFile],
    who: &[usize],
    key_id: &str,
    batch: &LweBatch,
) -> Result<Vec<i128>, CeremonyError> {
    let chosen: Vec<&ShareFile> = who.iter().map(|p| &shares[*p]).collect();
    decrypt_via_files(&chosen, key_id, batch, SQUASHED_BLOCK)
}

#[test]
fn squashed_integers_and_bools_through_any_quorum() {
    // One server key for all schemes: the shares differ, the keys do not.
    let first = psm_e2e::keys::key_set(3, 2);
    let bundle = PublicBundle::open(&first.public_dir).unwrap();
    tfhe::set_server_key(bundle.compressed_server_key().unwrap().decompress());
    let cpk = bundle.compact_public_key().unwrap();

    let list = CompactCiphertextList::builder(&cpk)
        .push(0xA5u8)
        .push(0xDEAD_BEEFu32)
        .push(u64::MAX - 12_345)
        .push(true)
        .push(0u8)
        .build();
    let ex = list.expand().unwrap();
    let a: FheUint8 = ex.get(0).unwrap().unwrap();
    let b: FheUint32 = ex.get(1).unwrap().unwrap();
    let c: FheUint64 = ex.get(2).unwrap().unwrap();
    let d: FheBool = ex.get(3).unwrap().unwrap();
    let z: FheUint8 = ex.get(4).unwrap().unwrap();
    // Computed values, not only fresh ones: a sum and a comparison.
    let sum = &a + &z; // 0xA5
    let b64: FheUint64 = b.clone().cast_into();
    let gt = c.gt(&b64); // true
    let cases: Vec<(LweBatch, u32, u128)> = vec![
        (uint_batch(&a.squash_noise().unwrap()), 8, 0xA5),
        (uint_batch(&b.squash_noise().unwrap()), 32, 0xDEAD_BEEF),
        (
            uint_batch(&c.squash_noise().unwrap()),
            64,
            u128::from(u64::MAX - 12_345),
        ),
        (uint_batch(&sum.squash_noise().unwrap()), 8, 0xA5),
        (uint_batch(&z.squash_noise().unwrap()), 8, 0),
        (bool_batch(&d.squash_noise().unwrap()), 1, 1),
        (bool_batch(&gt.squash_noise().unwrap()), 1, 1),
    ];
    assert_eq!(
        cases[2].0.len(),
        16,
        "an FheUint64 squashes to 16 packed blocks"
    );

    for (n, t) in [(3, 2), (3, 3), (5, 3)] {
        let out = psm_e2e::keys::key_set(n, t);
        let shares: Vec<ShareFile> = out
            .share_files
            .iter()
            .map(|p| ShareFile::read(p).unwrap())
            .collect();
        let tfhe_id = &out.manifest.tfhe_key_id;
        // A share file other users could read is refused, not used.
        {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            let open = dir.path().join("share.bin");
            std::fs::copy(&out.share_files[0], &open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
            let Err(e) = ShareFile::read(&open) else {
                panic!("a share file of mode 0644 was read");
            };
            assert!(e.to_string().contains("chmod 600"), "{e}");
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(ShareFile::read(&open).is_ok());
        }
        for s in &shares {
            let held: Vec<&str> = s.keys.iter().map(|k| k.key_id.as_str()).collect();
            assert_eq!(
                held,
                vec![tfhe_id.as_str()],
                "{}: only the tfhe key is dealt",
                s.party
            );
        }
        for who in subsets(n, t) {
            for (batch, bits, want) in &cases {
                let blocks = decrypt(&shares, &who, tfhe_id, batch).unwrap();
                let got = if *bits == 1 {
                    u128::from(blocks[0] != 0)
                } else {
                    recompose(&blocks, *bits)
                };
                assert_eq!(got, *want, "{t}-of-{n} {who:?} FheUint{bits}");
            }
        }
        for who in subsets(n, t - 1) {
            let err = decrypt(&shares, &who, tfhe_id, &cases[2].0).unwrap_err();
            assert!(
                matches!(err, CeremonyError::Threshold(ThresholdError::NoQuorum(_))),
                "{t}-of-{n} {who:?}: {err}"
            );
        }
    }
}
