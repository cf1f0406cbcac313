//! Conversions between the psm.v1 messages and the domain types, with the size and shape
//! checks untrusted input needs.

use psm_proto::v1::{
    lwe_ciphertext_batch, LweCiphertextBatch, LweCompactList, LweEncoding, LweList,
};

use crate::lwe::{words_from_le_bytes, words_to_le_bytes, Encoding, LweBatch};
use crate::threshold::ThresholdError;

/// Reads a batch from the wire, validating its shape.
pub fn batch_from_proto(b: &LweCiphertextBatch) -> Result<LweBatch, ThresholdError> {
    let dimension = b.lwe_dimension as usize;
    let batch = match &b.payload {
        Some(lwe_ciphertext_batch::Payload::List(l)) => {
            let words = words_from_le_bytes(&l.words)?;
            let batch = LweBatch::List { dimension, words };
            if dimension > 0 && batch.len() != l.count as usize {
                return Err(ThresholdError::BadCiphertext(format!(
                    "list says {} ciphertexts but holds {}",
                    l.count,
                    batch.len()
                )));
            }
            batch
        }
        Some(lwe_ciphertext_batch::Payload::Compact(c)) => LweBatch::Compact {
            dimension,
            count: c.count as usize,
            words: words_from_le_bytes(&c.words)?,
        },
        None => {
            return Err(ThresholdError::BadCiphertext(
                "batch has no ciphertexts".into(),
            ))
        }
    };
    batch.validate()?;
    Ok(batch)
}

/// Writes a batch for the wire.
pub fn batch_to_proto(
    batch: &LweBatch,
    encoding: Encoding,
    noise_bound_log2: u32,
) -> LweCiphertextBatch {
    let payload = match batch {
        LweBatch::List { words, .. } => lwe_ciphertext_batch::Payload::List(LweList {
            words: words_to_le_bytes(words),
            count: batch.len() as u32,
        }),
        LweBatch::Compact { count, words, .. } => {
            lwe_ciphertext_batch::Payload::Compact(LweCompactList {
                words: words_to_le_bytes(words),
                count: *count as u32,
            })
        }
    };
    LweCiphertextBatch {
        lwe_dimension: batch.dimension() as u32,
        payload: Some(payload),
        encoding: Some(encoding_to_proto(encoding, noise_bound_log2)),
    }
}

pub fn encoding_to_proto(e: Encoding, noise_bound_log2: u32) -> LweEncoding {
    LweEncoding {
        delta_log2: e.delta_log2,
        message_bits: e.message_bits,
        signed: e.signed,
        noise_bound_log2,
    }
}

/// The encoding and stated noise bound of a batch.
pub fn encoding_from_proto(e: Option<&LweEncoding>) -> Result<(Encoding, u32), ThresholdError> {
    let e = e.ok_or_else(|| ThresholdError::BadEncoding("batch has no encoding".into()))?;
    let enc = Encoding {
        delta_log2: e.delta_log2,
        message_bits: e.message_bits,
        signed: e.signed,
    };
    enc.validate()?;
    if e.noise_bound_log2 >= 127 {
        return Err(ThresholdError::BadEncoding(format!(
            "noise bound 2^{} is meaningless",
            e.noise_bound_log2
        )));
    }
    Ok((enc, e.noise_bound_log2))
}

/// An audit record for the wire.
pub fn audit_to_proto(
    e: &crate::audit::AuditEntry,
    record_hash: [u8; 32],
) -> psm_proto::v1::AuditRecord {
    psm_proto::v1::AuditRecord {
        seq: e.seq,
        unix_time: e.unix_time,
        caller: e.caller.clone(),
        decision: e.decision.clone(),
        rule: e.rule.clone(),
        reason: e.reason.clone(),
        request_hash: e.request_hash.clone(),
        prev_hash: e.prev_hash.to_vec(),
        record_hash: record_hash.to_vec(),
    }
}

/// An audit record from the wire, with its stored hash.
pub fn audit_from_proto(
    r: &psm_proto::v1::AuditRecord,
) -> Result<(crate::audit::AuditEntry, [u8; 32]), crate::audit::ChainError> {
    let h32 = |b: &[u8], what: &str| -> Result<[u8; 32], crate::audit::ChainError> {
        b.try_into().map_err(|_| crate::audit::ChainError {
            seq: r.seq,
            reason: format!("{what} is {} bytes, expected 32", b.len()),
        })
    };
    Ok((
        crate::audit::AuditEntry {
            seq: r.seq,
            unix_time: r.unix_time,
            caller: r.caller.clone(),
            decision: r.decision.clone(),
            rule: r.rule.clone(),
            reason: r.reason.clone(),
            request_hash: r.request_hash.clone(),
            prev_hash: h32(&r.prev_hash, "prev_hash")?,
        },
        h32(&r.record_hash, "record_hash")?,
    ))
}

/// A tariff from the wire, validated (demand charges and tiers are not part of the linear
/// track's bill and are not checked here).
pub fn tariff_from_proto(
    t: &psm_proto::v1::Tariff,
) -> Result<crate::tariff::Tariff, crate::tariff::TariffError> {
    let bands = t
        .bands
        .iter()
        .map(|b| crate::tariff::Band {
            name: b.name.clone(),
            weekday_mask: b.weekday_mask,
            start_hour: b.start_hour,
            end_hour: b.end_hour,
            import_price_milli: b.import_price_milli,
            export_price_milli: b.export_price_milli,
        })
        .collect();
    crate::tariff::Tariff::new(
        &t.name,
        &t.time_zone,
        bands,
        t.standing_charge_per_day,
        t.vat_basis_points,
        &t.currency,
    )
}

/// The compact-list words of a stored linear-track batch, after checking its key id, shape and
/// content hash again: neither compute nor a keyshare trusts the store blindly.
pub fn linear_words(
    b: &psm_proto::v1::ReadingBatch,
    linear_key_id: &str,
) -> Result<Vec<u128>, crate::readings::ReadingError> {
    let bad = |field: &'static str, reason: String| crate::readings::ReadingError {
        field,
        reason: format!("{} {}: {reason}", b.meter_id, b.day),
    };
    let kid = b
        .key
        .as_ref()
        .map(|k| k.key_id.as_str())
        .unwrap_or_default();
    if kid != linear_key_id {
        return Err(bad(
            "key",
            format!("under key {kid:?}, not {linear_key_id}"),
        ));
    }
    crate::readings::check_linear_shape(b.interval_seconds, b.count, b.ciphertext.len())
        .map_err(|e| bad(e.field, e.reason))?;
    if blake3::hash(&b.ciphertext).as_bytes().as_slice() != b.ciphertext_hash.as_slice() {
        return Err(bad(
            "ciphertext_hash",
            "the stored bytes do not match their hash".into(),
        ));
    }
    words_from_le_bytes(&b.ciphertext).map_err(|e| bad("ciphertext", e.to_string()))
}
