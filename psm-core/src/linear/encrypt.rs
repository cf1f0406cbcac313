//! Bodies as a meter makes them: b = ⟨Σ_{τ∈I} a_τ, z⟩ + e + Δ·m for each interval I.

use rand::RngCore;
use rayon::prelude::*;

use super::key::MeterKey;
use super::mask::slot_mask_into;
use super::{dot, LinearError, DELTA_LOG2, DIMENSION, MAX_READING_WH, READING_NOISE_LOG2};

/// The masks of consecutive intervals (each the sum of its slots' masks), derived once and used
/// for every meter that reports those intervals: what a head-end encrypting for many meters
/// keeps per day.
pub struct IntervalMasks {
    pub epoch: u32,
    pub first_slot: u64,
    pub slots_per_interval: u64,
    masks: Vec<Vec<u128>>,
}

impl IntervalMasks {
    /// Masks of `count` intervals of `slots_per_interval` slots from `first_slot`.
    pub fn new(epoch: u32, first_slot: u64, slots_per_interval: u64, count: usize) -> Self {
        let masks = (0..count as u64)
            .into_par_iter()
            .map(|i| {
                let mut acc = vec![0u128; DIMENSION];
                let mut a = vec![0u128; DIMENSION];
                for s in 0..slots_per_interval {
                    slot_mask_into(epoch, first_slot + i * slots_per_interval + s, &mut a);
                    for (x, y) in acc.iter_mut().zip(&a) {
                        *x = x.wrapping_add(*y);
                    }
                }
                acc
            })
            .collect();
        IntervalMasks {
            epoch,
            first_slot,
            slots_per_interval,
            masks,
        }
    }

    pub fn len(&self) -> usize {
        self.masks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// Encrypts `values[i]` (Wh, 0..=MAX_READING_WH) for interval `offset + i` under `key`, with
    /// fresh noise from the operating system's CSPRNG (never from the seeds).
    pub fn encrypt(
        &self,
        key: &MeterKey,
        offset: usize,
        values: &[i64],
    ) -> Result<Vec<u128>, LinearError> {
        if offset + values.len() > self.masks.len() {
            return Err(LinearError::Reading(format!(
                "intervals {offset}..{} outside the {} masks derived",
                offset + values.len(),
                self.masks.len()
            )));
        }
        let mut rng = rand::rngs::OsRng;
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if !(0..=MAX_READING_WH).contains(v) {
                    return Err(LinearError::Reading(format!(
                        "{v} Wh is outside 0..={MAX_READING_WH} (one value per channel: import and export are separate, never negative)"
                    )));
                }
                Ok(body(&self.masks[offset + i], key, *v, noise(&mut rng)))
            })
            .collect()
    }
}

/// Uniform noise in [−2^30, 2^30).
pub fn noise(rng: &mut impl RngCore) -> u128 {
    let span = 1u64 << (READING_NOISE_LOG2 + 1);
    let r = rng.next_u64() & (span - 1);
    (r as i64 - (1i64 << READING_NOISE_LOG2)) as i128 as u128
}

/// ⟨mask, z⟩ + e + Δ·m.
pub fn body(mask: &[u128], key: &MeterKey, m: i64, e: u128) -> u128 {
    dot(mask, &key.0)
        .wrapping_add(e)
        .wrapping_add((m as i128 as u128) << DELTA_LOG2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::key::MeterSeeds;
    use crate::linear::ENCODING;
    use crate::threshold::Scheme;

    #[test]
    fn bodies_decrypt_with_the_key_and_sums_add() {
        let seeds = MeterSeeds::generate(Scheme::new(3, 2).unwrap(), 1);
        let z = seeds.key(crate::linear::Channel::Import);
        let masks = IntervalMasks::new(1, 5_000_000, 3, 4);
        let b = masks.encrypt(&z, 0, &[10, 20, 0, 7]).unwrap();
        for (i, want) in [10, 20, 0, 7].into_iter().enumerate() {
            let plain = b[i].wrapping_sub(dot(&masks.masks[i], &z.0));
            assert_eq!(ENCODING.decode(plain), want);
        }
        // The sum of bodies decrypts with the sum of masks.
        let s = b.iter().fold(0u128, |a, x| a.wrapping_add(*x));
        let mut m = vec![0u128; DIMENSION];
        for mk in &masks.masks {
            for (x, y) in m.iter_mut().zip(mk) {
                *x = x.wrapping_add(*y);
            }
        }
        assert_eq!(ENCODING.decode(s.wrapping_sub(dot(&m, &z.0))), 37);
        assert!(masks.encrypt(&z, 0, &[-1]).is_err());
        assert!(masks.encrypt(&z, 3, &[1, 2]).is_err());
    }

    #[test]
    fn noise_is_bounded() {
        let mut rng = rand::rngs::OsRng;
        for _ in 0..10_000 {
            let e = noise(&mut rng) as i128;
            assert!((-(1i128 << 30)..(1i128 << 30)).contains(&e));
        }
    }
}
