//! LWE ciphertexts over Z_2^128 as the threshold protocol sees them: a mask and a body per
//! ciphertext, decoded with an explicit encoding.

use crate::threshold::ThresholdError;

/// Largest LWE dimension accepted from outside (the squashing key uses 4096).
pub const MAX_LWE_DIMENSION: usize = 1 << 14;
/// Largest number of ciphertexts in one batch.
pub const MAX_BATCH: usize = 1 << 20;

/// A batch of LWE ciphertexts sharing one dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LweBatch {
    /// Independent ciphertexts: `dimension + 1` words each (mask then body).
    List { dimension: usize, words: Vec<u128> },
}

/// How a decrypted value b − ⟨a, s⟩ = Δ·m + e is turned back into m.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// log2 Δ.
    pub delta_log2: u32,
    /// Bits of m (m is taken modulo 2^message_bits).
    pub message_bits: u32,
    /// Read m as two's complement.
    pub signed: bool,
}

/// Encoding of one packed block of a squashed tfhe ciphertext: 4 message bits, Δ = 2^123.
pub const SQUASHED_BLOCK: Encoding = Encoding {
    delta_log2: 123,
    message_bits: 4,
    signed: false,
};

impl Encoding {
    /// Checks that the message fits above Δ within 128 bits.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        if self.message_bits == 0
            || self.delta_log2 == 0
            || self
                .delta_log2
                .checked_add(self.message_bits)
                .is_none_or(|bits| bits > 128)
        {
            return Err(ThresholdError::BadEncoding(format!(
                "delta 2^{} with {} message bits does not fit in 128 bits",
                self.delta_log2, self.message_bits
            )));
        }
        Ok(())
    }

    /// Rounds a noisy plaintext Δ·m + e (|e| < Δ/2) to m, as i128 (signed or not).
    pub fn decode(&self, plain: u128) -> i128 {
        let half = 1u128 << (self.delta_log2 - 1);
        let m = plain.wrapping_add(half) >> self.delta_log2;
        let mask = if self.message_bits == 128 {
            u128::MAX
        } else {
            (1u128 << self.message_bits) - 1
        };
        let m = m & mask;
        if self.signed && self.message_bits < 128 && m >> (self.message_bits - 1) == 1 {
            (m as i128) - (1i128 << self.message_bits)
        } else {
            m as i128
        }
    }
}

impl LweBatch {
    /// Checks sizes so nothing later indexes out of bounds.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        let bad = |m: String| Err(ThresholdError::BadCiphertext(m));
        match self {
            LweBatch::List { dimension, words } => {
                if *dimension == 0 || *dimension > MAX_LWE_DIMENSION {
                    return bad(format!(
                        "LWE dimension {dimension} outside 1..={MAX_LWE_DIMENSION}"
                    ));
                }
                if words.is_empty() || !words.len().is_multiple_of(dimension + 1) {
                    return bad(format!(
                        "{} words is not a positive multiple of dimension + 1 = {}",
                        words.len(),
                        dimension + 1
                    ));
                }
                if words.len() / (dimension + 1) > MAX_BATCH {
                    return bad(format!("more than {MAX_BATCH} ciphertexts in one batch"));
                }
            }
        }
        Ok(())
    }

    pub fn dimension(&self) -> usize {
        match self {
            LweBatch::List { dimension, .. } => *dimension,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            LweBatch::List { dimension, words } => words.len() / (dimension + 1),
        }
    }

    /// Every word: (mask, body) per ciphertext.
    pub fn words(&self) -> &[u128] {
        match self {
            LweBatch::List { words, .. } => words,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bodies b_i, in order.
    pub fn bodies(&self) -> Vec<u128> {
        match self {
            LweBatch::List { dimension, words } => words
                .chunks_exact(dimension + 1)
                .map(|ct| ct[*dimension])
                .collect(),
        }
    }

    /// Applies `f(mask_i)` to every ciphertext's mask in parallel, in order.
    pub fn par_map_masks<T: Send>(&self, f: impl Fn(&[u128]) -> T + Sync + Send) -> Vec<T> {
        use rayon::prelude::*;
        match self {
            LweBatch::List { dimension, words } => words
                .par_chunks_exact(dimension + 1)
                .map(|ct| f(&ct[..*dimension]))
                .collect(),
        }
    }

    /// BLAKE3-256 over a domain tag, the shape and the little-endian words: what the flooding
    /// PRF and the keyshare manifests bind to.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v1/lwe-batch");
        let (kind, words) = match self {
            LweBatch::List { words, .. } => (0u8, words),
        };
        h.update(&[kind]);
        h.update(&(self.dimension() as u64).to_le_bytes());
        h.update(&(self.len() as u64).to_le_bytes());
        for w in words {
            h.update(&w.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

/// Reads little-endian u128 words from bytes.
pub fn words_from_le_bytes(bytes: &[u8]) -> Result<Vec<u128>, ThresholdError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(ThresholdError::BadCiphertext(format!(
            "{} bytes is not a whole number of 16-byte words",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            u128::from_le_bytes(a)
        })
        .collect())
}

/// Writes u128 words as little-endian bytes.
pub fn words_to_le_bytes(words: &[u128]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rounds_and_signs() {
        let e = Encoding {
            delta_log2: 100,
            message_bits: 8,
            signed: true,
        };
        let delta = 1u128 << 100;
        assert_eq!(e.decode(5 * delta + (delta / 2 - 1)), 5);
        assert_eq!(e.decode((5 * delta).wrapping_sub(delta / 2 - 1)), 5);
        assert_eq!(e.decode(0u128.wrapping_sub(3 * delta)), -3);
        let u = Encoding { signed: false, ..e };
        assert_eq!(u.decode(0u128.wrapping_sub(3 * delta)), 253);
    }

    #[test]
    fn validate_rejects_bad_shapes() {
        assert!(LweBatch::List {
            dimension: 4,
            words: vec![0; 9]
        }
        .validate()
        .is_err());
        assert!(LweBatch::List {
            dimension: 4,
            words: vec![0; 10]
        }
        .validate()
        .is_ok());
        assert!(Encoding {
            delta_log2: 125,
            message_bits: 4,
            signed: false
        }
        .validate()
        .is_err());
        // A request's sum that would wrap a u32 to something small is refused, not accepted.
        assert!(Encoding {
            delta_log2: u32::MAX,
            message_bits: 2,
            signed: false
        }
        .validate()
        .is_err());
    }
}
