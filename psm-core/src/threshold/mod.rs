//! Threshold decryption of LWE ciphertexts over Z_2^128 (DESIGN.md, "Cryptography").
//!
//! * [`sharing`]: replicated secret sharing — one share r_U per (t−1)-subset U of the parties,
//!   given to every party outside U; any t parties hold all of them.
//! * [`partial`]: a party's partial decryptions d_U = ⟨a, r_U⟩ + E_U, with E_U drawn from a PRF
//!   keyed by the party's flooding key so a repeated request gets the same answer.
//! * [`combine`]: any t responders' partials give b − Σ d_U = Δ·m + e − Σ E_U, rounded to m;
//!   duplicate contributions are cross-checked; a party is named and excluded only when provably
//!   faulty, and any other disagreement refuses the decryption.
//! * [`invariants`]: the two inequalities that make flooding both hiding and correct, checked
//!   before anything is released.

pub mod combine;
pub mod invariants;
pub mod partial;
pub mod sharing;

pub use combine::{combine, combine_bodies, Combined, PartyResponse};
pub use invariants::{
    check_invariants, flood_log2_for, CONTRIBUTION_ERROR_FLOODS, STATISTICAL_SECURITY_BITS,
};
pub use partial::{partial_decrypt, FloodKey, SharePartial};
pub use sharing::{split, PartyShares, Scheme};

/// Why a threshold operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThresholdError {
    #[error("invalid threshold scheme: {0}")]
    BadScheme(String),
    #[error("malformed ciphertext batch: {0}")]
    BadCiphertext(String),
    #[error("invalid encoding: {0}")]
    BadEncoding(String),
    #[error("flooding invariant violated: {0}")]
    Invariant(String),
    #[error("malformed partial decryption from party {party}: {reason}")]
    BadPartial { party: usize, reason: String },
    #[error("not enough shares to decrypt: {0}")]
    NoQuorum(String),
    #[error("contributions disagree and the faulty party cannot be determined: {0}")]
    Undecidable(String),
}
