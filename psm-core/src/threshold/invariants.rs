//! The two flooding invariants of DESIGN.md, as checked errors.
//!
//! 1. Hiding: B_flood ≥ 2^40 · B_noise, so a released partial reveals nothing about the
//!    ciphertext's noise (and thereby the key) except with probability about 2^-40.
//! 2. Correctness: C(n, t−1) · 3·B_flood + B_noise < Δ/2, so the combined noise still rounds to
//!    m. The factor 3 is the agreement window: the combiner accepts a contribution within 2·B_flood
//!    of a co-holder's, so a liar can shift a share it holds by up to 2·B_flood on top of its own
//!    flooding without being noticed, and the result must still decode correctly.

use super::{Scheme, ThresholdError};
use crate::lwe::Encoding;

/// Statistical security of noise flooding, in bits.
pub const STATISTICAL_SECURITY_BITS: u32 = 40;

/// Largest error one used contribution may carry, in units of B_flood: its own flooding (B_flood)
/// plus the agreement window the combiner tolerates between co-holders (2·B_flood).
pub const CONTRIBUTION_ERROR_FLOODS: u128 = 3;

/// The flooding bound (log2) used for a ciphertext with noise bound 2^noise_log2: the smallest
/// power of two that satisfies invariant 1.
pub fn flood_log2_for(noise_bound_log2: u32) -> u32 {
    noise_bound_log2 + STATISTICAL_SECURITY_BITS
}

/// Checks both invariants for flooding 2^flood_log2 on ciphertexts with noise ≤ 2^noise_log2.
pub fn check_invariants(
    scheme: Scheme,
    encoding: Encoding,
    noise_bound_log2: u32,
    flood_log2: u32,
) -> Result<(), ThresholdError> {
    encoding.validate()?;
    if flood_log2 < noise_bound_log2 + STATISTICAL_SECURITY_BITS {
        return Err(ThresholdError::Invariant(format!(
            "flooding 2^{flood_log2} is less than 2^{STATISTICAL_SECURITY_BITS} times the noise bound 2^{noise_bound_log2}"
        )));
    }
    // C·3·2^f + 2^noise < 2^(delta−1), computed exactly; anything that overflows fails.
    let half_delta = 1u128 << (encoding.delta_log2 - 1);
    let shares = scheme.share_count() as u128;
    let total = 1u128
        .checked_shl(flood_log2)
        .filter(|_| flood_log2 < 127)
        .and_then(|f| f.checked_mul(shares * CONTRIBUTION_ERROR_FLOODS))
        .and_then(|x| {
            1u128
                .checked_shl(noise_bound_log2)
                .filter(|_| noise_bound_log2 < 127)
                .and_then(|n| x.checked_add(n))
        });
    match total {
        Some(t) if t < half_delta => Ok(()),
        _ => Err(ThresholdError::Invariant(format!(
            "{shares} shares flooded with 2^{flood_log2} (within the agreement window) plus noise 2^{noise_bound_log2} reach Δ/2 = 2^{}: the result could decrypt wrong",
            encoding.delta_log2 - 1
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lwe::SQUASHED_BLOCK;

    #[test]
    fn squashed_parameters_hold_for_all_supported_schemes() {
        for (n, t) in [(3, 2), (3, 3), (5, 3), (7, 4)] {
            let s = Scheme::new(n, t).unwrap();
            check_invariants(s, SQUASHED_BLOCK, 70, flood_log2_for(70)).unwrap();
        }
    }

    #[test]
    fn each_invariant_refuses_its_bad_case() {
        let s = Scheme::new(3, 2).unwrap();
        // Too little flooding for the noise.
        let e = check_invariants(s, SQUASHED_BLOCK, 70, 109).unwrap_err();
        assert!(e.to_string().contains("less than 2^40"), "{e}");
        // Noise so large that the flooding it needs breaks correctness.
        // 3 shares × 3·2^119 + 2^79 ≥ 2^122.
        let e = check_invariants(s, SQUASHED_BLOCK, 79, flood_log2_for(79)).unwrap_err();
        assert!(e.to_string().contains("decrypt wrong"), "{e}");
        // The good neighbour of that case passes: 9·2^118 + 2^78 < 2^122.
        check_invariants(s, SQUASHED_BLOCK, 78, flood_log2_for(78)).unwrap();
    }
}
