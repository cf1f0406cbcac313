//! Public slot masks: a_τ = BLAKE3-XOF("psm/v2/slot-mask" ‖ epoch ‖ τ), 4096 words of Z_2^128
//! for every absolute 5-minute UTC slot τ. Anybody derives them; nobody transmits or chooses one,
//! which is what keeps a release from being a decryption oracle.

use rayon::prelude::*;

use super::{fill_words, DIMENSION};

/// A run of consecutive slots [start, end) with one weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRun {
    pub start: u64,
    pub end: u64,
    pub weight: i64,
}

/// Writes a_τ for `epoch` into `out`.
pub fn slot_mask_into(epoch: u32, slot: u64, out: &mut [u128]) {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/slot-mask");
    h.update(&epoch.to_le_bytes());
    h.update(&slot.to_le_bytes());
    fill_words(&mut h.finalize_xof(), out);
}

/// a_τ for `epoch`.
pub fn slot_mask(epoch: u32, slot: u64) -> Vec<u128> {
    let mut out = vec![0u128; DIMENSION];
    slot_mask_into(epoch, slot, &mut out);
    out
}

/// Σ_τ w_τ a_τ over the runs, on every core.
pub fn mask_sum(epoch: u32, runs: &[SlotRun]) -> Vec<u128> {
    let slots: Vec<(u64, i64)> = runs
        .iter()
        .flat_map(|r| (r.start..r.end).map(move |s| (s, r.weight)))
        .collect();
    slots
        .par_chunks(16)
        .map(|chunk| {
            let mut acc = vec![0u128; DIMENSION];
            let mut a = vec![0u128; DIMENSION];
            for (slot, w) in chunk {
                slot_mask_into(epoch, *slot, &mut a);
                let w = *w as i128 as u128;
                for (x, y) in acc.iter_mut().zip(&a) {
                    *x = x.wrapping_add(y.wrapping_mul(w));
                }
            }
            acc
        })
        .reduce(
            || vec![0u128; DIMENSION],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x = x.wrapping_add(*y);
                }
                a
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_fixed_by_epoch_and_slot_and_sums_are_weighted() {
        let a = slot_mask(1, 100);
        assert_eq!(a, slot_mask(1, 100));
        assert_ne!(a, slot_mask(1, 101));
        assert_ne!(a, slot_mask(2, 100));
        let b = slot_mask(1, 101);
        let s = mask_sum(
            1,
            &[SlotRun {
                start: 100,
                end: 102,
                weight: 3,
            }],
        );
        for i in [0, 17, 4095] {
            assert_eq!(s[i], a[i].wrapping_add(b[i]).wrapping_mul(3));
        }
        let neg = mask_sum(
            1,
            &[SlotRun {
                start: 100,
                end: 101,
                weight: -1,
            }],
        );
        assert_eq!(neg[5], a[5].wrapping_neg());
    }
}
