//! Durable storage of reading batches behind one trait, so the embedded sled store and a
//! scale-out backend answer the same calls. Keys are (meter id, UTC day, track); a batch is
//! stored once: the same bytes again are a no-op, different bytes are a conflict.

use prost::Message;
use psm_proto::v1::ReadingBatch;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("meter {meter_id} already holds different readings for {day}")]
    Conflict { meter_id: String, day: String },
    #[error("storage backend: {0}")]
    Backend(String),
}

/// What a `put_all` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub stored: u32,
    pub duplicates: u32,
}

/// Reading storage. Every method may block on disk: call from a blocking context.
pub trait ReadingStore: Send + Sync + 'static {
    /// Stores every batch or none of them, and returns only once the write is durable.
    fn put_all(&self, batches: &[ReadingBatch]) -> Result<PutOutcome, StoreError>;
    /// Batches of one meter for days `from_day..=to_day` (ISO dates), in day order.
    fn scan(
        &self,
        meter_id: &str,
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<ReadingBatch>, StoreError>;
    /// Every meter with stored readings, sorted.
    fn meters(&self) -> Result<Vec<String>, StoreError>;
}

fn key(meter_id: &str, day: &str, track: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(meter_id.len() + day.len() + 3);
    k.extend_from_slice(meter_id.as_bytes());
    k.push(0);
    k.extend_from_slice(day.as_bytes());
    k.push(0);
    k.push(track as u8);
    k
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The embedded store: sled, flushed before every acknowledgement.
pub struct SledStore {
    db: sled::Db,
    readings: sled::Tree,
    meters: sled::Tree,
}

impl SledStore {
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let db = sled::open(dir).map_err(backend)?;
        Ok(SledStore {
            readings: db.open_tree("readings").map_err(backend)?,
            meters: db.open_tree("meters").map_err(backend)?,
            db,
        })
    }
}

impl ReadingStore for SledStore {
    fn put_all(&self, batches: &[ReadingBatch]) -> Result<PutOutcome, StoreError> {
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = batches
            .iter()
            .map(|b| (key(&b.meter_id, &b.day, b.track), b.encode_to_vec()))
            .collect();
        let res = (&self.readings, &self.meters).transaction(|(readings, meters)| {
            let mut out = PutOutcome::default();
            for ((k, v), b) in encoded.iter().zip(batches) {
                match readings.get(k)? {
                    Some(existing) if existing.as_ref() == v.as_slice() => out.duplicates += 1,
                    Some(_) => {
                        return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                            meter_id: b.meter_id.clone(),
                            day: b.day.clone(),
                        }))
                    }
                    None => {
                        readings.insert(k.as_slice(), v.as_slice())?;
                        meters.insert(b.meter_id.as_bytes(), &[])?;
                        out.stored += 1;
                    }
                }
            }
            Ok(out)
        });
        let out = match res {
            Ok(o) => o,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(backend(e)),
        };
        self.db.flush().map_err(backend)?;
        Ok(out)
    }

    fn scan(
        &self,
        meter_id: &str,
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<ReadingBatch>, StoreError> {
        let lo = key(meter_id, from_day, 0);
        let hi = key(meter_id, to_day, 255);
        self.readings
            .range(lo..=hi)
            .map(|kv| {
                let (_, v) = kv.map_err(backend)?;
                ReadingBatch::decode(v.as_ref()).map_err(backend)
            })
            .collect()
    }

    fn meters(&self) -> Result<Vec<String>, StoreError> {
        self.meters
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(backend)?;
                String::from_utf8(k.to_vec()).map_err(backend)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(meter: &str, day: &str, byte: u8) -> ReadingBatch {
        ReadingBatch {
            meter_id: meter.into(),
            day: day.into(),
            track: 1,
            ciphertext: vec![byte; 8],
            ..Default::default()
        }
    }

    #[test]
    fn idempotent_atomic_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let a = [
                batch("m1", "2026-01-01", 1),
                batch("m1", "2026-01-02", 2),
                batch("m2", "2026-01-01", 3),
            ];
            assert_eq!(
                s.put_all(&a).unwrap(),
                PutOutcome {
                    stored: 3,
                    duplicates: 0
                }
            );
            assert_eq!(
                s.put_all(&a[..1]).unwrap(),
                PutOutcome {
                    stored: 0,
                    duplicates: 1
                }
            );
            // A conflict anywhere stores nothing of the request.
            let err = s
                .put_all(&[batch("m3", "2026-01-01", 4), batch("m1", "2026-01-02", 9)])
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
            assert!(s.scan("m3", "2026-01-01", "2026-12-31").unwrap().is_empty());
        }
        let s = SledStore::open(dir.path()).unwrap();
        let got = s.scan("m1", "2026-01-01", "2026-01-02").unwrap();
        assert_eq!(
            got.iter().map(|b| b.day.as_str()).collect::<Vec<_>>(),
            ["2026-01-01", "2026-01-02"]
        );
        assert_eq!(s.scan("m1", "2026-01-02", "2026-01-02").unwrap().len(), 1);
        assert_eq!(s.meters().unwrap(), ["m1", "m2"]);
    }
}
