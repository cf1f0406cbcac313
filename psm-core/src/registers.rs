//! The tfhe track's inputs: a meter-day's registers — daily peak demand (W) and daily total
//! (Wh), both u32 — as a `ProvenCompactCiphertextList` whose zero-knowledge proof is bound to the
//! key set, the meter and the day through its metadata, so a proof cannot be replayed for
//! another meter-day or key set.

use tfhe::integer::ciphertext::IntegerProvenCompactCiphertextListConformanceParams;
use tfhe::prelude::CiphertextList;
use tfhe::safe_serialization::{safe_deserialize_conformant, safe_serialize};
use tfhe::shortint::parameters::PARAM_PKE_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;
use tfhe::zk::{CompactPkeCrs, ZkComputeLoad};
use tfhe::{CompactPublicKey, FheTypes, FheUint32, ProvenCompactCiphertextList};

/// Registers per meter-day: peak demand, total energy.
pub const REGISTER_COUNT: u32 = 2;
/// Largest serialized register list accepted (a list of two u32 with its proof is ~19 KB).
pub const MAX_REGISTER_LIST_BYTES: u64 = 1 << 20;

/// One meter-day's registers in the clear (meter side only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registers {
    /// Highest average demand over one interval of the day, watts.
    pub peak_w: u32,
    /// Energy imported over the day, watt-hours.
    pub total_wh: u32,
}

/// Why a register list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("not a register list for this key set: {0}")]
    Malformed(String),
    #[error("the list holds {0}; a meter-day carries exactly two FheUint32 (peak W, total Wh)")]
    Shape(String),
    #[error(
        "the zero-knowledge proof does not verify for {0} (another meter, day, key set or CRS?)"
    )]
    Proof(String),
    #[error("tfhe: {0}")]
    Tfhe(String),
}

/// The proof metadata of a meter-day: "psm/v1/registers/<tfhe key id>/<meter>/<day>".
pub fn metadata(tfhe_key_id: &str, meter_id: &str, day: &str) -> Vec<u8> {
    format!("psm/v1/registers/{tfhe_key_id}/{meter_id}/{day}").into_bytes()
}

/// Encrypts and proves a meter-day's registers (what a meter or head-end does); returns the
/// serialized list.
pub fn prove(
    cpk: &CompactPublicKey,
    crs: &CompactPkeCrs,
    tfhe_key_id: &str,
    meter_id: &str,
    day: &str,
    r: Registers,
) -> Result<Vec<u8>, RegisterError> {
    let list = ProvenCompactCiphertextList::builder(cpk)
        .push(r.peak_w)
        .push(r.total_wh)
        .build_with_proof_packed(
            crs,
            &metadata(tfhe_key_id, meter_id, day),
            ZkComputeLoad::Proof,
        )
        .map_err(|e| RegisterError::Tfhe(e.to_string()))?;
    let mut out = Vec::new();
    safe_serialize(&list, &mut out, MAX_REGISTER_LIST_BYTES)
        .map_err(|e| RegisterError::Tfhe(e.to_string()))?;
    Ok(out)
}

/// Checks register lists against this deployment's public key and CRS.
pub struct RegisterVerifier {
    pub tfhe_key_id: String,
    cpk: CompactPublicKey,
    crs: CompactPkeCrs,
    conformance: IntegerProvenCompactCiphertextListConformanceParams,
}

impl RegisterVerifier {
    pub fn new(tfhe_key_id: &str, cpk: CompactPublicKey, crs: CompactPkeCrs) -> Self {
        let conformance =
            IntegerProvenCompactCiphertextListConformanceParams::from_crs_and_parameters(
                PARAM_PKE_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
                &crs,
            );
        RegisterVerifier {
            tfhe_key_id: tfhe_key_id.to_owned(),
            cpk,
            crs,
            conformance,
        }
    }

    /// Parses untrusted bytes (size limit, conformance with the parameters and the CRS) and
    /// checks the shape: two FheUint32.
    fn parse(&self, bytes: &[u8]) -> Result<ProvenCompactCiphertextList, RegisterError> {
        let list: ProvenCompactCiphertextList =
            safe_deserialize_conformant(bytes, MAX_REGISTER_LIST_BYTES, &self.conformance)
                .map_err(RegisterError::Malformed)?;
        let kinds: Vec<Option<FheTypes>> = (0..list.len()).map(|i| list.get_kind_of(i)).collect();
        if kinds != [Some(FheTypes::Uint32), Some(FheTypes::Uint32)] {
            return Err(RegisterError::Shape(format!("{kinds:?}")));
        }
        Ok(list)
    }

    /// Verifies a meter-day's list: parse, shape, and the proof under this meter-day's metadata.
    /// No server key is needed (ingest runs this).
    pub fn verify(&self, meter_id: &str, day: &str, bytes: &[u8]) -> Result<(), RegisterError> {
        let list = self.parse(bytes)?;
        let meta = metadata(&self.tfhe_key_id, meter_id, day);
        if list.verify(&self.crs, &self.cpk, &meta).is_valid() {
            Ok(())
        } else {
            Err(RegisterError::Proof(format!("{meter_id} {day}")))
        }
    }

    /// Verifies and expands a list into (peak W, total Wh). Needs the server key set on this
    /// thread (`tfhe::set_server_key`).
    pub fn expand(
        &self,
        meter_id: &str,
        day: &str,
        bytes: &[u8],
    ) -> Result<(FheUint32, FheUint32), RegisterError> {
        let list = self.parse(bytes)?;
        let meta = metadata(&self.tfhe_key_id, meter_id, day);
        let ex = list
            .verify_and_expand(&self.crs, &self.cpk, &meta)
            .map_err(|_| RegisterError::Proof(format!("{meter_id} {day}")))?;
        let get = |i: usize| -> Result<FheUint32, RegisterError> {
            ex.get::<FheUint32>(i)
                .map_err(|e| RegisterError::Tfhe(e.to_string()))?
                .ok_or_else(|| RegisterError::Shape("fewer than two values".into()))
        };
        Ok((get(0)?, get(1)?))
    }
}

impl Registers {
    /// A meter-day's registers from its net interval readings (Wh per interval): peak demand is
    /// the highest import interval as average watts, total the imported energy (exports count
    /// zero). Saturates at u32::MAX.
    pub fn from_intervals(values: &[i64], interval_seconds: u32) -> Registers {
        let per_hour = 3600 / i64::from(interval_seconds.clamp(1, 3600));
        let peak = values
            .iter()
            .map(|v| v.max(&0) * per_hour)
            .max()
            .unwrap_or(0);
        let total: i64 = values.iter().map(|v| *v.max(&0)).sum();
        Registers {
            peak_w: u32::try_from(peak).unwrap_or(u32::MAX),
            total_wh: u32::try_from(total).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_from_intervals() {
        let r = Registers::from_intervals(&[100, -50, 250, 0], 900);
        assert_eq!(
            r,
            Registers {
                peak_w: 1_000,
                total_wh: 350
            }
        );
        assert_eq!(
            Registers::from_intervals(&[], 900),
            Registers {
                peak_w: 0,
                total_wh: 0
            }
        );
        assert_eq!(
            Registers::from_intervals(&[i64::from(u32::MAX)], 3600).total_wh,
            u32::MAX
        );
        assert_eq!(
            metadata("tfhe-1", "m", "2026-01-01"),
            b"psm/v1/registers/tfhe-1/m/2026-01-01".to_vec()
        );
    }
}
