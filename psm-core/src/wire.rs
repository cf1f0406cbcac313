//! Conversions between the psm.v1 messages and the domain types, with the size and shape
//! checks untrusted input needs.

use psm_proto::v1::{lwe_ciphertext_batch, LweCiphertextBatch, LweEncoding, LweList};

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

/// A linear-track reading batch, checked: what it covers and its bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearBatch {
    pub meter_id: String,
    /// Day number (days since 1970-01-01).
    pub day: i64,
    pub epoch: u32,
    pub channel: crate::linear::Channel,
    pub interval_seconds: u32,
    /// Absolute slot where the first interval starts.
    pub first_slot: u64,
    pub slots_per_interval: u64,
    /// One body per interval.
    pub bodies: Vec<u128>,
}

impl LinearBatch {
    /// Slots [first_slot, end_slot) the batch covers.
    pub fn end_slot(&self) -> u64 {
        self.first_slot + self.slots_per_interval * self.bodies.len() as u64
    }

    /// (first slot, body) of every interval.
    pub fn intervals(&self) -> impl Iterator<Item = (u64, u128)> + '_ {
        self.bodies
            .iter()
            .enumerate()
            .map(|(i, b)| (self.first_slot + i as u64 * self.slots_per_interval, *b))
    }
}

/// Checks a linear-track batch from the wire or the store: canonical day, epoch, channel,
/// interval length, the intervals inside the day, size and content hash. Neither ingest, compute
/// nor a keyshare trusts a batch without it.
pub fn linear_batch(
    b: &psm_proto::v1::ReadingBatch,
) -> Result<LinearBatch, crate::readings::ReadingError> {
    use crate::linear::{Channel, INTERVALS, SLOTS_PER_DAY, SLOT_SECONDS};
    use crate::readings::{parse_day, validate_meter_id, ReadingError};
    let bad = |field: &'static str, reason: String| ReadingError { field, reason };
    validate_meter_id(&b.meter_id)?;
    if b.track != psm_proto::v1::Track::Linear as i32 {
        return Err(bad("track", "not a linear-track batch".into()));
    }
    let day = parse_day(&b.day)?;
    if b.key.as_ref().is_some_and(|k| !k.key_id.is_empty()) {
        return Err(bad(
            "key",
            "linear-track batches carry no key id (each meter uses its enrolled key)".into(),
        ));
    }
    if b.epoch == 0 || b.epoch > crate::linear::envelope::MAX_EPOCH {
        return Err(bad(
            "epoch",
            format!(
                "{} is outside 1..={}",
                b.epoch,
                crate::linear::envelope::MAX_EPOCH
            ),
        ));
    }
    let channel = Channel::from_proto(b.channel)
        .ok_or_else(|| bad("channel", "must be CHANNEL_IMPORT or CHANNEL_EXPORT".into()))?;
    if !INTERVALS.contains(&b.interval_seconds) {
        return Err(bad(
            "interval_seconds",
            format!("{} is not one of {INTERVALS:?}", b.interval_seconds),
        ));
    }
    let slots_per_interval = u64::from(b.interval_seconds) / SLOT_SECONDS as u64;
    let per_day = SLOTS_PER_DAY as u64 / slots_per_interval;
    if b.count == 0 || u64::from(b.first_interval) + u64::from(b.count) > per_day {
        return Err(bad(
            "count",
            format!(
                "intervals {}..{} do not lie within the day's {per_day} intervals of {} s (count must be at least 1)",
                b.first_interval,
                u64::from(b.first_interval) + u64::from(b.count),
                b.interval_seconds
            ),
        ));
    }
    if b.ciphertext.len() != b.count as usize * 16 {
        return Err(bad(
            "ciphertext",
            format!(
                "{} bytes; {} bodies are {} bytes",
                b.ciphertext.len(),
                b.count,
                b.count as usize * 16
            ),
        ));
    }
    if blake3::hash(&b.ciphertext).as_bytes().as_slice() != b.ciphertext_hash.as_slice() {
        return Err(bad(
            "ciphertext_hash",
            "is not the BLAKE3 hash of the ciphertext (truncated or corrupted?)".into(),
        ));
    }
    let bodies =
        words_from_le_bytes(&b.ciphertext).map_err(|e| bad("ciphertext", e.to_string()))?;
    Ok(LinearBatch {
        meter_id: b.meter_id.clone(),
        day,
        epoch: b.epoch,
        channel,
        interval_seconds: b.interval_seconds,
        first_slot: day as u64 * SLOTS_PER_DAY as u64
            + u64::from(b.first_interval) * slots_per_interval,
        slots_per_interval,
        bodies,
    })
}

/// A linear-track batch for the wire, as a meter sends it (unsigned: the meter signs it with
/// [`crate::signing::sign_batch`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_batch_to_proto(
    meter_id: &str,
    day: i64,
    epoch: u32,
    channel: crate::linear::Channel,
    interval_seconds: u32,
    first_interval: u32,
    bodies: &[u128],
) -> psm_proto::v1::ReadingBatch {
    let ciphertext = words_to_le_bytes(bodies);
    psm_proto::v1::ReadingBatch {
        meter_id: meter_id.to_owned(),
        day: crate::readings::format_day(day),
        track: psm_proto::v1::Track::Linear as i32,
        key: None,
        interval_seconds,
        count: bodies.len() as u32,
        ciphertext_hash: blake3::hash(&ciphertext).as_bytes().to_vec(),
        ciphertext,
        epoch,
        channel: channel.to_proto() as i32,
        first_interval,
        device_signature: Vec::new(),
    }
}
