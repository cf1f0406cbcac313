//! The keyshare's hash-chained audit log, stored in sled. Every record is flushed to disk before
//! the decision it records is returned.

use std::path::Path;

use prost::Message;
use psm_core::audit::{
    bounded, verify_chain, AuditEntry, GENESIS, MAX_NAME_BYTES, MAX_REASON_BYTES,
};
use psm_core::wire::{audit_from_proto, audit_to_proto};
use psm_proto::v1::AuditRecord;
use tokio::sync::Mutex;

/// Storage errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
    #[error("audit store holds an undecodable record: {0}")]
    Decode(String),
}

struct Head {
    next_seq: u64,
    prev_hash: [u8; 32],
}

/// Append-only log of decisions.
pub struct AuditLog {
    db: sled::Db,
    tree: sled::Tree,
    head: Mutex<Head>,
}

/// A decision to record.
pub struct Decision<'a> {
    pub caller: &'a str,
    pub allow: bool,
    pub rule: &'a str,
    pub reason: &'a str,
    pub request_hash: &'a [u8],
}

fn decode(v: &[u8]) -> Result<AuditRecord, AuditError> {
    AuditRecord::decode(v).map_err(|e| AuditError::Decode(e.to_string()))
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, and verifies the stored chain: a broken chain is
    /// reported loudly but the keyshare keeps running so an auditor can fetch the evidence.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let db = sled::open(dir)?;
        let tree = db.open_tree("audit")?;
        let head = match tree.last()? {
            Some((_, v)) => {
                let r = decode(&v)?;
                let hash: [u8; 32] = r
                    .record_hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| AuditError::Decode("record hash is not 32 bytes".into()))?;
                Head {
                    next_seq: r.seq + 1,
                    prev_hash: hash,
                }
            }
            None => Head {
                next_seq: 0,
                prev_hash: GENESIS,
            },
        };
        metrics::gauge!("psm_keyshare_audit_records").set(head.next_seq as f64);
        let log = AuditLog {
            db,
            tree,
            head: Mutex::new(head),
        };
        match log.verify() {
            Ok(n) => tracing::info!(records = n, "audit chain verified"),
            Err(e) => {
                tracing::error!(error = %e, "AUDIT CHAIN BROKEN: the log was modified outside this service")
            }
        }
        Ok(log)
    }

    /// Verifies the whole stored chain, a chunk of records at a time (memory does not grow with
    /// the log); returns the number of records.
    pub fn verify(&self) -> Result<u64, String> {
        const CHUNK: usize = 4096;
        let (mut next, mut prev) = (0u64, GENESIS);
        loop {
            let records = self.read(next, CHUNK).map_err(|e| e.to_string())?;
            let parsed: Vec<_> = records
                .iter()
                .map(audit_from_proto)
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            if let Some((first, _)) = parsed.first() {
                if first.seq != next {
                    return Err(format!(
                        "audit record {next}: sequence gap: a record is missing or out of order"
                    ));
                }
            }
            prev = verify_chain(&parsed, prev).map_err(|e| e.to_string())?;
            next += parsed.len() as u64;
            if parsed.len() < CHUNK {
                return Ok(next);
            }
        }
    }

    /// Records from `from_seq`, at most `limit`, read a page at a time on the blocking pool and
    /// sent from an async task: a slow auditor holds one page, never a blocking thread.
    pub fn stream(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<AuditRecord, tonic::Status>> {
        const PAGE: usize = 256;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tree = self.tree.clone();
        tokio::spawn(async move {
            let (mut next, mut left) = (from_seq, limit);
            while left > 0 {
                let t = tree.clone();
                let want = left.min(PAGE);
                let page = tokio::task::spawn_blocking(move || {
                    t.range(next.to_be_bytes()..)
                        .take(want)
                        .map(|kv| decode(&kv?.1))
                        .collect::<Result<Vec<_>, AuditError>>()
                })
                .await;
                let page = match page {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(tonic::Status::internal(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(tonic::Status::internal(format!("read task: {e}"))))
                            .await;
                        return;
                    }
                };
                let last = page.len() < want;
                left -= page.len();
                for r in page {
                    next = r.seq.saturating_add(1);
                    if tx.send(Ok(r)).await.is_err() {
                        return; // the auditor went away
                    }
                }
                if last {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Appends a decision durably; returns its sequence number.
    pub async fn append(&self, d: Decision<'_>) -> Result<u64, AuditError> {
        self.append_many(std::slice::from_ref(&d)).await
    }

    /// Appends several decisions with one flush (enrollment syncs decide thousands at once);
    /// returns the first sequence number.
    pub async fn append_many(&self, ds: &[Decision<'_>]) -> Result<u64, AuditError> {
        let mut head = self.head.lock().await;
        let first = head.next_seq;
        let mut batch = sled::Batch::default();
        let (mut seq, mut prev) = (head.next_seq, head.prev_hash);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for d in ds {
            let entry = AuditEntry {
                seq,
                unix_time: now,
                caller: bounded(d.caller, MAX_NAME_BYTES),
                decision: if d.allow { "allow" } else { "refuse" }.to_owned(),
                rule: bounded(d.rule, MAX_NAME_BYTES),
                reason: bounded(d.reason, MAX_REASON_BYTES),
                request_hash: d.request_hash.to_vec(),
                prev_hash: prev,
            };
            let hash = entry.hash();
            batch.insert(
                &seq.to_be_bytes(),
                audit_to_proto(&entry, hash).encode_to_vec(),
            );
            seq += 1;
            prev = hash;
        }
        self.tree.apply_batch(batch)?;
        // The head moves with the tree, before the flush is awaited: a caller that goes away
        // during the flush must not leave records the next append would overwrite.
        head.next_seq = seq;
        head.prev_hash = prev;
        self.db.flush_async().await?;
        for d in ds {
            // Rule names are a fixed set (crate::rules); anything else is counted as "other" so
            // the label cannot grow without bound.
            let rule = crate::rules::Rule::ALL
                .iter()
                .map(|r| r.name())
                .find(|n| *n == d.rule)
                .unwrap_or("other");
            let decision = if d.allow { "allow" } else { "refuse" };
            metrics::counter!("psm_keyshare_decisions_total", "rule" => rule, "decision" => decision)
                .increment(1);
        }
        metrics::gauge!("psm_keyshare_audit_records").set(seq as f64);
        Ok(first)
    }

    /// Records from `from_seq`, at most `limit`.
    pub fn read(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
        self.tree
            .range(from_seq.to_be_bytes()..)
            .take(limit)
            .map(|kv| decode(&kv?.1))
            .collect()
    }

    /// Number of records and the head hash.
    pub async fn head(&self) -> (u64, [u8; 32]) {
        let h = self.head.lock().await;
        (h.next_seq, h.prev_hash)
    }
}
