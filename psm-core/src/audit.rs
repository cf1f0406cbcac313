//! The keyshare audit log's hash chain: every decision is a record whose hash covers the
//! previous record's hash, so editing, dropping or reordering any record breaks verification.

/// Hash that precedes the first record.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Longest caller or rule a record holds, bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest reason a record holds, bytes.
pub const MAX_REASON_BYTES: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary, saying how much was cut: a record's
/// size never depends on what a caller chose to send.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let marker = format!(" [… {} bytes cut]", s.len());
    let mut end = max.saturating_sub(marker.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &s[..end])
}

/// One decision of a keyshare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: u64,
    pub unix_time: i64,
    /// SPIFFE id of the caller.
    pub caller: String,
    /// "allow" or "refuse".
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub request_hash: Vec<u8>,
    pub prev_hash: [u8; 32],
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

impl AuditEntry {
    /// BLAKE3 over a domain tag, the previous hash and every field, length-prefixed.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"psm/v1/audit-record");
        h.update(&self.prev_hash);
        h.update(&self.seq.to_le_bytes());
        h.update(&self.unix_time.to_le_bytes());
        field(&mut h, self.caller.as_bytes());
        field(&mut h, self.decision.as_bytes());
        field(&mut h, self.rule.as_bytes());
        field(&mut h, self.reason.as_bytes());
        field(&mut h, &self.request_hash);
        *h.finalize().as_bytes()
    }
}

/// Where and why a chain failed to verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {reason}")]
pub struct ChainError {
    pub seq: u64,
    pub reason: String,
}

#[cfg(test)]
mod bounded_tests {
    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(super::bounded("short", 10), "short");
        let long = "é".repeat(5000);
        let cut = super::bounded(&long, super::MAX_REASON_BYTES);
        assert!(cut.len() <= super::MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with("[… 10000 bytes cut]"), "{cut}");
    }
}

/// Verifies records (each with its stored hash) in order. `start_prev` is the hash before the
/// first record: [`GENESIS`] for a log read from the start. Returns the head hash.
pub fn verify_chain(
    records: &[(AuditEntry, [u8; 32])],
    start_prev: [u8; 32],
) -> Result<[u8; 32], ChainError> {
    let mut prev = start_prev;
    let mut expect_seq = records.first().map(|(e, _)| e.seq);
    for (entry, stored) in records {
        let err = |reason: &str| ChainError {
            seq: entry.seq,
            reason: reason.to_owned(),
        };
        if Some(entry.seq) != expect_seq {
            return Err(err("sequence gap: a record is missing or out of order"));
        }
        if entry.seq == 0 && entry.prev_hash != GENESIS {
            return Err(err("first record does not start from the genesis hash"));
        }
        if entry.prev_hash != prev {
            return Err(err("does not chain to the previous record"));
        }
        if entry.hash() != *stored {
            return Err(err("content does not match its hash (edited)"));
        }
        prev = *stored;
        expect_seq = entry.seq.checked_add(1);
    }
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<(AuditEntry, [u8; 32])> {
        let mut prev = GENESIS;
        (0..n)
            .map(|seq| {
                let e = AuditEntry {
                    seq,
                    unix_time: 1_700_000_000 + seq as i64,
                    caller: "spiffe://t/compute/c".into(),
                    decision: "allow".into(),
                    rule: "ok".into(),
                    reason: format!("r{seq}"),
                    request_hash: vec![seq as u8; 32],
                    prev_hash: prev,
                };
                prev = e.hash();
                (e, prev)
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies_and_any_edit_fails() {
        let c = chain(5);
        assert_eq!(verify_chain(&c, GENESIS).unwrap(), c[4].1);
        let mut edited = c.clone();
        edited[2].0.reason = "nothing to see".into();
        assert_eq!(verify_chain(&edited, GENESIS).unwrap_err().seq, 2);
        let mut dropped = c.clone();
        dropped.remove(3);
        assert_eq!(verify_chain(&dropped, GENESIS).unwrap_err().seq, 4);
        // Re-hashing an edited record does not help: the next one no longer chains.
        let mut rehashed = c.clone();
        rehashed[1].0.decision = "refuse".into();
        rehashed[1].1 = rehashed[1].0.hash();
        assert_eq!(verify_chain(&rehashed, GENESIS).unwrap_err().seq, 2);
    }
}
