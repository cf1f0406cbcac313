//! Meter seeds and the keys derived from them.
//!
//! A meter draws one 32-byte seed σ_U per share U (a (t−1)-subset of the keyshares, canonical
//! order of [`crate::threshold::Scheme::subsets`]) from its own CSPRNG, per epoch. Its key for a
//! channel is z = Σ_U PRG(σ_U ‖ channel); the share key PRG(σ_U ‖ channel) is what every holder
//! of U can compute. Nobody — no dealer, no single keyshare — ever holds z.

use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{fill_words, Channel, DIMENSION};
use crate::threshold::Scheme;

/// One seed σ_U. Secret.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, serde::Serialize, serde::Deserialize)]
pub struct Seed(pub [u8; 32]);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(redacted)")
    }
}

/// Adds the share key PRG(σ ‖ channel) into `acc` (BLAKE3 keyed by σ, XOF of 4096 words).
pub fn add_share_key(acc: &mut [u128], seed: &Seed, channel: Channel) {
    let mut words = vec![0u128; DIMENSION];
    share_key_into(seed, channel, &mut words);
    for (a, w) in acc.iter_mut().zip(&words) {
        *a = a.wrapping_add(*w);
    }
    words.zeroize();
}

/// Writes the share key PRG(σ ‖ channel) into `out` (DIMENSION words).
pub fn share_key_into(seed: &Seed, channel: Channel, out: &mut [u128]) {
    let mut h = blake3::Hasher::new_keyed(&seed.0);
    h.update(b"psm/v2/meter-key");
    h.update(&[channel.tag()]);
    fill_words(&mut h.finalize_xof(), out);
}

/// h_U = BLAKE3("psm/v2/seed-commitment" ‖ meter ‖ epoch ‖ U ‖ σ_U): binds a seed to its meter,
/// epoch and share so a holder can check what it opened and co-holders can compare.
pub fn commitment(meter: &str, epoch: u32, share_index: usize, seed: &Seed) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/seed-commitment");
    h.update(&(meter.len() as u64).to_le_bytes());
    h.update(meter.as_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(share_index as u32).to_le_bytes());
    h.update(&seed.0);
    *h.finalize().as_bytes()
}

/// A meter's seeds for one epoch: one per share of the scheme. Secret (zeroized on drop).
#[derive(Clone, Zeroize, ZeroizeOnDrop, serde::Serialize, serde::Deserialize)]
pub struct MeterSeeds {
    #[zeroize(skip)]
    pub epoch: u32,
    pub seeds: Vec<Seed>,
}

impl std::fmt::Debug for MeterSeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MeterSeeds {{ epoch: {}, {} seeds (redacted) }}",
            self.epoch,
            self.seeds.len()
        )
    }
}

impl MeterSeeds {
    /// Fresh seeds from the operating system's CSPRNG.
    pub fn generate(scheme: Scheme, epoch: u32) -> Self {
        let seeds = (0..scheme.share_count())
            .map(|_| {
                let mut s = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut s);
                Seed(s)
            })
            .collect();
        MeterSeeds { epoch, seeds }
    }

    /// Reads seeds written by [`MeterSeeds::write`].
    pub fn read(path: &std::path::Path) -> Result<Self, crate::keys::KeyFileError> {
        let invalid = |reason: String| crate::keys::KeyFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut bytes = std::fs::read(path).map_err(|e| crate::keys::KeyFileError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        let r = bincode::deserialize(&bytes).map_err(|e| invalid(e.to_string()));
        bytes.zeroize();
        r
    }

    /// Writes the seeds (mode 0600): a meter, or a head-end encrypting for it, keeps them for
    /// the whole epoch.
    pub fn write(&self, path: &std::path::Path) -> Result<(), crate::keys::KeyFileError> {
        let mut bytes =
            bincode::serialize(self).map_err(|e| crate::keys::KeyFileError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let r = crate::keys::write_atomic(path, &bytes, 0o600);
        bytes.zeroize();
        r
    }

    /// The meter's key for `channel`: Σ_U PRG(σ_U ‖ channel).
    pub fn key(&self, channel: Channel) -> MeterKey {
        let mut z = vec![0u128; DIMENSION];
        for s in &self.seeds {
            add_share_key(&mut z, s, channel);
        }
        MeterKey(z)
    }

    /// The commitments h_U, in share order.
    pub fn commitments(&self, meter: &str) -> Vec<[u8; 32]> {
        self.seeds
            .iter()
            .enumerate()
            .map(|(i, s)| commitment(meter, self.epoch, i, s))
            .collect()
    }
}

/// A meter's key z for one epoch and channel. Secret (zeroized on drop).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MeterKey(pub Vec<u128>);

impl std::fmt::Debug for MeterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeterKey(redacted)")
    }
}

/// Σ_{i∈C} PRG(σ_{i,U} ‖ channel): one share of a cohort's key, from the cohort members' seeds
/// for U, on every core. Secret: the caller keeps it like a seed.
pub fn cohort_share_key(seeds: &[&Seed], channel: Channel) -> MeterKey {
    use rayon::prelude::*;
    let sum = seeds
        .par_chunks(64)
        .map(|chunk| {
            let mut acc = vec![0u128; DIMENSION];
            let mut words = vec![0u128; DIMENSION];
            for s in chunk {
                share_key_into(s, channel, &mut words);
                for (a, w) in acc.iter_mut().zip(&words) {
                    *a = a.wrapping_add(*w);
                }
            }
            words.zeroize();
            MeterKey(acc)
        })
        .reduce(
            || MeterKey(vec![0u128; DIMENSION]),
            |mut a, b| {
                for (x, y) in a.0.iter_mut().zip(&b.0) {
                    *x = x.wrapping_add(*y);
                }
                a
            },
        );
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_the_sum_of_share_keys_and_channels_differ() {
        let s = Scheme::new(3, 2).unwrap();
        let seeds = MeterSeeds::generate(s, 1);
        assert_eq!(seeds.seeds.len(), 3);
        let z = seeds.key(Channel::Import);
        let refs: Vec<&Seed> = seeds.seeds.iter().collect();
        let mut sum = vec![0u128; DIMENSION];
        for r in &refs {
            let k = cohort_share_key(&[r], Channel::Import);
            for (a, w) in sum.iter_mut().zip(&k.0) {
                *a = a.wrapping_add(*w);
            }
        }
        assert_eq!(z.0, sum);
        assert_ne!(z.0, seeds.key(Channel::Export).0);
        // A cohort share key is the sum over members.
        let other = MeterSeeds::generate(s, 1);
        let both = cohort_share_key(&[&seeds.seeds[0], &other.seeds[0]], Channel::Import);
        let a = cohort_share_key(&[&seeds.seeds[0]], Channel::Import);
        let b = cohort_share_key(&[&other.seeds[0]], Channel::Import);
        let ab: Vec<u128> =
            a.0.iter()
                .zip(&b.0)
                .map(|(x, y)| x.wrapping_add(*y))
                .collect();
        assert_eq!(both.0, ab);
    }

    #[test]
    fn commitments_bind_meter_epoch_and_share() {
        let seed = Seed([7; 32]);
        let c = commitment("m1", 1, 0, &seed);
        assert_ne!(c, commitment("m2", 1, 0, &seed));
        assert_ne!(c, commitment("m1", 2, 0, &seed));
        assert_ne!(c, commitment("m1", 1, 1, &seed));
        assert_ne!(c, commitment("m1", 1, 0, &Seed([8; 32])));
    }
}
