//! Squashed tfhe-rs ciphertexts as LWE batches for threshold decryption, and back to integers.

use tfhe::{SquashedNoiseFheBool, SquashedNoiseFheUint};

use crate::lwe::LweBatch;

/// The u128 LWE blocks of a squashed unsigned integer (4 message bits each, least significant
/// first) as one batch.
pub fn uint_batch(ct: &SquashedNoiseFheUint) -> LweBatch {
    let inner = ct.underlying_squashed_noise_ciphertext();
    let blocks = inner.packed_blocks();
    let dimension = blocks
        .first()
        .map_or(0, |b| b.lwe_ciphertext().lwe_size().to_lwe_dimension().0);
    let mut words = Vec::with_capacity(blocks.len() * (dimension + 1));
    for b in blocks {
        words.extend_from_slice(b.lwe_ciphertext().as_ref());
    }
    LweBatch::List { dimension, words }
}

/// The single block of a squashed boolean.
pub fn bool_batch(ct: &SquashedNoiseFheBool) -> LweBatch {
    let inner = ct.underlying_squashed_noise_ciphertext();
    let words = inner.packed_blocks().lwe_ciphertext().as_ref().to_vec();
    LweBatch::List {
        dimension: words.len() - 1,
        words,
    }
}

/// Recomposes decrypted 4-bit blocks (least significant first) into an integer of `bits` bits.
pub fn recompose(blocks: &[i128], bits: u32) -> u128 {
    let v = blocks
        .iter()
        .enumerate()
        .fold(0u128, |acc, (j, b)| acc | ((*b as u128 & 0xF) << (4 * j)));
    if bits >= 128 {
        v
    } else {
        v & ((1u128 << bits) - 1)
    }
}
