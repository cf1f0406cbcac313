//! The linear track (DESIGN.md, "Linear track: keyed aggregation with public masks").
//!
//! Every meter has its own key per epoch and channel, z = Σ_U PRG(σ_U ‖ channel), made from one
//! random seed σ_U per (t−1)-subset U of the keyshares; any t keyshares hold every σ_U, t−1 miss
//! one. A reading over the 5-minute UTC slots of an interval I is one u128 body
//! b = Σ_{τ∈I} ⟨a_τ, z⟩ + e + Δ·m with public masks a_τ that anybody derives and nobody chooses.
//! compute adds bodies; a keyshare releases d_U = ⟨Σ_τ w_τ a_τ, Σ_{i∈C} z_{i,U}⟩ + E_U for the
//! cohort C and slots it approved, never reading a ciphertext — so what it releases makes exactly
//! the approved weighted sum computable, whatever bodies compute holds.
//!
//! * [`key`]: seeds, meter keys, share keys, commitments.
//! * [`mask`]: the public slot masks and their weighted sums.
//! * [`encrypt`]: bodies, as a meter (or a head-end on its behalf) makes them.
//! * [`envelope`]: HPKE envelopes that carry seeds to keyshares, and enrollments.
//! * [`release`]: what a release covers (outputs, slots, weights), its hash, the noise bound,
//!   one party's contribution and the combination.

pub mod encrypt;
pub mod envelope;
pub mod key;
pub mod mask;
pub mod release;

use crate::lwe::Encoding;

/// Dimension of masks and keys (the modulus is 2^128).
pub const DIMENSION: usize = 4096;
/// Length of one slot, seconds; slot τ starts at τ · 300 Unix seconds.
pub const SLOT_SECONDS: i64 = 300;
/// Slots in a UTC day.
pub const SLOTS_PER_DAY: i64 = 288;
/// Interval lengths a meter may report, seconds (each a whole number of slots).
pub const INTERVALS: [u32; 4] = [300, 900, 1800, 3600];
/// log2 Δ: messages live in the top 48 bits, read as signed.
pub const DELTA_LOG2: u32 = 80;
/// Reading noise e is uniform in [−2^30, 2^30) from the encryptor's CSPRNG.
pub const READING_NOISE_LOG2: u32 = 30;
/// Flooding E_U is uniform in [−2^70, 2^70): each d_U is an LWE sample of the share with noise
/// 2^70 over 2^128 in dimension 4096, and C(n, t−1) floods plus the largest sum stay below Δ/2.
pub const FLOOD_LOG2: u32 = 70;
/// Largest |weight| of a slot in a release.
pub const MAX_WEIGHT: i64 = 1 << 20;
/// Largest effective cohort of one output.
pub const MAX_COHORT: usize = 1_000_000;
/// Largest reading of one interval and channel, Wh (100 kWh: 400 kW over 15 minutes). Releases
/// whose worst-case sum could exceed the 47 bits of magnitude the encoding holds are refused
/// ([`release::check_noise`]).
pub const MAX_READING_WH: i64 = 100_000;

/// Encoding of linear-track plaintexts.
pub const ENCODING: Encoding = Encoding {
    delta_log2: DELTA_LOG2,
    message_bits: 128 - DELTA_LOG2,
    signed: true,
};

/// Which register a reading belongs to; each has its own meter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Channel {
    Import,
    Export,
}

impl Channel {
    /// The channel of a proto `Channel` value; unspecified and unknown values are refused.
    pub fn from_proto(v: i32) -> Option<Channel> {
        match psm_proto::v1::Channel::try_from(v) {
            Ok(psm_proto::v1::Channel::Import) => Some(Channel::Import),
            Ok(psm_proto::v1::Channel::Export) => Some(Channel::Export),
            _ => None,
        }
    }

    pub fn to_proto(self) -> psm_proto::v1::Channel {
        match self {
            Channel::Import => psm_proto::v1::Channel::Import,
            Channel::Export => psm_proto::v1::Channel::Export,
        }
    }

    /// The byte that separates the channels' keys.
    pub fn tag(self) -> u8 {
        match self {
            Channel::Import => 1,
            Channel::Export => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Import => "import",
            Channel::Export => "export",
        }
    }
}

/// Why linear-track input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinearError {
    #[error("release: {0}")]
    Release(String),
    #[error("noise-bound: {0}")]
    NoiseBound(String),
    #[error("reading: {0}")]
    Reading(String),
    #[error("envelope: {0}")]
    Envelope(String),
    #[error("enrollment: {0}")]
    Enrollment(String),
}

impl LinearError {
    /// The reason without the rule name (callers that prefix the rule themselves).
    pub fn detail(&self) -> &str {
        match self {
            LinearError::Release(m)
            | LinearError::NoiseBound(m)
            | LinearError::Reading(m)
            | LinearError::Envelope(m)
            | LinearError::Enrollment(m) => m,
        }
    }
}

/// Wrapping inner product over Z_2^128.
pub fn dot(a: &[u128], b: &[u128]) -> u128 {
    a.iter()
        .zip(b)
        .fold(0u128, |acc, (x, y)| acc.wrapping_add(x.wrapping_mul(*y)))
}

/// Reads 4096 little-endian u128 words from a 64 KiB XOF stream into `out`.
pub(crate) fn fill_words(xof: &mut blake3::OutputReader, out: &mut [u128]) {
    let mut buf = [0u8; 4096];
    for chunk in out.chunks_mut(256) {
        let bytes = &mut buf[..chunk.len() * 16];
        xof.fill(bytes);
        for (w, b) in chunk.iter_mut().zip(bytes.chunks_exact(16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            *w = u128::from_le_bytes(a);
        }
    }
}
