//! Linear-track sums: compact lists of many meters added word by word (mask and bodies), then
//! optionally coarsened into output buckets, with the noise bound each result carries.

use rayon::prelude::*;

use crate::linear::{LINEAR_ENCODING, LINEAR_FRESH_NOISE_LOG2};
use crate::lwe::LweBatch;
use crate::threshold::{check_invariants, flood_log2_for, Scheme};

/// Adds compact lists of the same shape word by word (wrapping), using every core.
pub fn sum_words(lists: &[&[u128]]) -> Vec<u128> {
    let len = lists.first().map_or(0, |l| l.len());
    let mut acc = vec![0u128; len];
    acc.par_chunks_mut(256).enumerate().for_each(|(c, chunk)| {
        let off = c * 256;
        let n = chunk.len();
        for l in lists {
            for (a, w) in chunk.iter_mut().zip(&l[off..off + n]) {
                *a = a.wrapping_add(*w);
            }
        }
    });
    acc
}

/// Adds each run of `k` consecutive ciphertexts of a batch: one output ciphertext per bucket.
pub fn bucket(batch: &LweBatch, k: usize) -> LweBatch {
    let dim = batch.dimension();
    let words = batch.expand();
    let mut out = Vec::with_capacity(words.len() / k.max(1));
    for group in words.chunks(k * (dim + 1)) {
        let mut acc = vec![0u128; dim + 1];
        for ct in group.chunks_exact(dim + 1) {
            for (a, w) in acc.iter_mut().zip(ct) {
                *a = a.wrapping_add(*w);
            }
        }
        out.extend_from_slice(&acc);
    }
    LweBatch::List {
        dimension: dim,
        words: out,
    }
}

/// Noise bound (log2) of a sum of `summands` fresh linear ciphertexts: the worst case, each
/// summand's noise at its bound.
pub fn noise_log2(summands: usize) -> u32 {
    LINEAR_FRESH_NOISE_LOG2
        + (summands.max(1) as u64)
            .next_power_of_two()
            .trailing_zeros()
}

/// The most fresh ciphertexts one decrypted sum may contain so that the flooding invariants hold
/// for `scheme` (2-of-3: 512). Larger sums are decrypted in shards whose clear sums are added.
pub fn max_summands(scheme: Scheme) -> usize {
    let mut best = 1;
    for extra in 0..40 {
        let n = LINEAR_FRESH_NOISE_LOG2 + extra;
        if check_invariants(scheme, LINEAR_ENCODING, n, flood_log2_for(n)).is_ok() {
            best = 1usize << extra;
        } else {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_invariants() {
        assert_eq!(max_summands(Scheme::new(3, 2).unwrap()), 512);
        assert_eq!(noise_log2(1), 40);
        assert_eq!(noise_log2(512), 49);
        assert_eq!(noise_log2(513), 50);
        let s = Scheme::new(3, 2).unwrap();
        assert!(check_invariants(
            s,
            LINEAR_ENCODING,
            noise_log2(512),
            flood_log2_for(noise_log2(512))
        )
        .is_ok());
        assert!(check_invariants(
            s,
            LINEAR_ENCODING,
            noise_log2(513),
            flood_log2_for(noise_log2(513))
        )
        .is_err());
    }

    #[test]
    fn sums_and_buckets_add() {
        let a: Vec<u128> = (0..600).collect();
        let b: Vec<u128> = (0..600).map(|x| x * 3).collect();
        assert_eq!(
            sum_words(&[&a, &b]),
            (0..600).map(|x| x * 4).collect::<Vec<u128>>()
        );
        let batch = LweBatch::List {
            dimension: 2,
            words: (0..12).collect(),
        };
        let LweBatch::List { words, .. } = bucket(&batch, 2) else {
            unreachable!()
        };
        assert_eq!(words, vec![3, 5, 7, 15, 17, 19]);
    }
}
