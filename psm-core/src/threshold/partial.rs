//! A party's partial decryptions with deterministic noise flooding.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{check_invariants, flood_log2_for, PartyShares, Scheme, ThresholdError};
use crate::lwe::{Encoding, LweBatch};

/// The party's key for the flooding PRF (BLAKE3 keyed mode). Secret: whoever knows it can
/// subtract the flooding and learn ⟨a, r_U⟩.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct FloodKey(pub [u8; 32]);

impl std::fmt::Debug for FloodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FloodKey(redacted)")
    }
}

/// One share's partial decryptions, one u128 per ciphertext in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePartial {
    pub share_index: usize,
    pub values: Vec<u128>,
}

/// Flooding terms E_U,i uniform in [−2^f, 2^f), derived from (key id, share, batch hash) only —
/// exactly what is decrypted — so that asking twice, however the request is dressed, returns the
/// same answer (fresh floodings of one ciphertext would average out).
fn flooding(
    key: &FloodKey,
    key_id: &str,
    share_index: usize,
    batch_hash: &[u8; 32],
    count: usize,
    flood_log2: u32,
) -> Vec<u128> {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(b"psm/v1/flood");
    h.update(&(key_id.len() as u64).to_le_bytes());
    h.update(key_id.as_bytes());
    h.update(&(share_index as u64).to_le_bytes());
    h.update(batch_hash);
    let mut xof = h.finalize_xof();
    let mask = (1u128 << (flood_log2 + 1)) - 1;
    let offset = 1u128 << flood_log2;
    let mut buf = [0u8; 16];
    (0..count)
        .map(|_| {
            xof.fill(&mut buf);
            (u128::from_le_bytes(buf) & mask).wrapping_sub(offset)
        })
        .collect()
}

fn dot(a: &[u128], s: &[u128]) -> u128 {
    a.iter()
        .zip(s)
        .fold(0u128, |acc, (x, y)| acc.wrapping_add(x.wrapping_mul(*y)))
}

/// Computes d_U,i = ⟨a_i, r_U⟩ + E_U,i for every share the party holds and every ciphertext,
/// after checking the flooding invariants for the stated noise bound. Uses all cores.
pub fn partial_decrypt(
    party: &PartyShares,
    scheme: Scheme,
    flood_key: &FloodKey,
    key_id: &str,
    batch: &LweBatch,
    encoding: Encoding,
    noise_bound_log2: u32,
) -> Result<Vec<SharePartial>, ThresholdError> {
    batch.validate()?;
    let flood_log2 = flood_log2_for(noise_bound_log2);
    check_invariants(scheme, encoding, noise_bound_log2, flood_log2)?;
    let dim = batch.dimension();
    for (i, r) in &party.shares {
        if r.len() != dim {
            return Err(ThresholdError::BadCiphertext(format!(
                "ciphertext dimension {dim} does not match key dimension {} (share {i})",
                r.len()
            )));
        }
    }
    let hash = batch.hash();
    let count = batch.len();
    // One pass over the masks computes every share's inner product (a mask is derived once).
    let dots: Vec<Vec<u128>> =
        batch.par_map_masks(|a| party.shares.iter().map(|(_, r)| dot(a, r)).collect());
    Ok(party
        .shares
        .iter()
        .enumerate()
        .map(|(k, (index, _))| {
            let flood = flooding(flood_key, key_id, *index, &hash, count, flood_log2);
            let values = dots
                .iter()
                .zip(flood)
                .map(|(d, e)| d[k].wrapping_add(e))
                .collect();
            SharePartial {
                share_index: *index,
                values,
            }
        })
        .collect())
}
