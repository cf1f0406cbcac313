//! The tfhe track in compute: the server key, loaded once and shared by every job; register
//! inputs streamed from ingest and verified-and-expanded in parallel; squashed results decrypted
//! through the keyshares.

use crate::error::ComputeError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use psm_core::ceremony::PublicBundle;
use psm_core::lwe::SQUASHED_BLOCK;
use psm_core::readings::parse_day;
use psm_core::registers::RegisterVerifier;
use psm_core::squashed::recompose;
use psm_core::tfhe_program::{concat, install_server_key, Squashed};
use psm_proto::v1::{ComputationManifest, InputRef, TimeRange, Track};
use rayon::prelude::*;
use tfhe::{FheUint32, ServerKey};
use tonic::transport::Channel;

use crate::decrypt::{Decrypted, ThresholdDecryptor};
use crate::jobs::JobHandle;

/// The loaded key material, and the expanded registers of recent meter-days.
pub struct Loaded {
    pub server_key: ServerKey,
    pub verifier: RegisterVerifier,
    pub cache: ExpansionCache<Expanded>,
}

/// Expanded register pairs by (meter, day, stored ciphertext hash), least recently used evicted
/// first: an entry is only ever reused for the meter-day whose proof it was verified under.
/// Verifying and expanding a list costs ~0.4 s of both cores and its result ~0.5 MB, so a bill
/// re-issued, a histogram over meters just billed, or a retry reuses them.
pub struct ExpansionCache<V> {
    /// None when caching is off (capacity 0).
    inner: Option<std::sync::Mutex<lru::LruCache<CacheKey, V>>>,
}

type CacheKey = (String, i64, Vec<u8>);

impl<V: Clone> ExpansionCache<V> {
    pub fn new(capacity: usize) -> Self {
        ExpansionCache {
            inner: std::num::NonZeroUsize::new(capacity)
                .map(|c| std::sync::Mutex::new(lru::LruCache::new(c))),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, lru::LruCache<CacheKey, V>>> {
        self.inner
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn get(&self, meter: &str, day: i64, hash: &[u8]) -> Option<V> {
        self.lock()?
            .get(&(meter.to_owned(), day, hash.to_vec()))
            .cloned()
    }

    fn put(&self, meter: &str, day: i64, hash: &[u8], e: &V) {
        if let Some(mut c) = self.lock() {
            c.put((meter.to_owned(), day, hash.to_vec()), e.clone());
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Lazily loads the server key (decompression takes ~15 s and ~1 GB) the first time a job
/// needs it, then shares it.
pub struct TfheEngine {
    public_dir: PathBuf,
    pub key_id: String,
    cache_meter_days: usize,
    loaded: tokio::sync::OnceCell<Arc<Loaded>>,
    /// One tfhe evaluation at a time: each already uses every core, and running several at once
    /// only multiplies memory.
    evaluations: Arc<tokio::sync::Semaphore>,
}

/// One meter-day's stored register list.
pub struct RegisterInput {
    pub meter_id: String,
    pub day: i64,
    pub input: InputRef,
    pub bytes: Vec<u8>,
}

/// Expanded registers of one meter-day: (peak W, total Wh).
pub type Expanded = (FheUint32, FheUint32);

impl TfheEngine {
    /// `cache_meter_days`: how many expanded meter-days to keep (~0.5 MB each).
    pub fn new(public_dir: PathBuf, key_id: String, cache_meter_days: usize) -> Self {
        TfheEngine {
            public_dir,
            key_id,
            cache_meter_days,
            loaded: tokio::sync::OnceCell::new(),
            evaluations: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Waits for this job's turn to evaluate; hold the permit while evaluating.
    pub async fn turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ComputeError> {
        self.evaluations
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ComputeError::unavailable("compute is shutting down"))
    }

    /// The server key and verifier, loading them on first use.
    pub async fn loaded(&self) -> Result<Arc<Loaded>, ComputeError> {
        self.loaded
            .get_or_try_init(|| async {
                let dir = self.public_dir.clone();
                let key_id = self.key_id.clone();
                let capacity = self.cache_meter_days;
                tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let bundle = PublicBundle::open(&dir).map_err(|e| e.to_string())?;
                    let server_key = bundle
                        .compressed_server_key()
                        .map_err(|e| e.to_string())?
                        .decompress();
                    install_server_key(&server_key);
                    let verifier = bundle.register_verifier().map_err(|e| e.to_string())?;
                    if verifier.tfhe_key_id != key_id {
                        return Err(format!(
                            "the bundle's tfhe key is {}, not {key_id}",
                            verifier.tfhe_key_id
                        ));
                    }
                    tracing::info!(
                        seconds = t.elapsed().as_secs_f64(),
                        "tfhe server key loaded"
                    );
                    Ok::<_, String>(Arc::new(Loaded {
                        server_key,
                        verifier,
                        cache: ExpansionCache::new(capacity),
                    }))
                })
                .await
                .map_err(|e| ComputeError::internal(format!("key loading task failed: {e}")))?
                .map_err(|e| {
                    ComputeError::unavailable(format!("cannot load the tfhe server key: {e}"))
                })
            })
            .await
            .cloned()
    }

    /// Streams the register lists of `meters` over `days` from ingest and requires every
    /// meter-day; sorted by (meter, day).
    pub async fn registers(
        &self,
        ingest: Channel,
        meters: &[String],
        first_day: i64,
        days: i64,
    ) -> Result<Vec<RegisterInput>, ComputeError> {
        let range = TimeRange {
            start_unix: first_day * psm_core::readings::DAY_SECONDS,
            end_unix: (first_day + days) * psm_core::readings::DAY_SECONDS,
        };
        let wanted: psm_net::client::Wanted = meters
            .iter()
            .flat_map(|m| {
                (first_day..first_day + days)
                    .map(move |d| ((m.clone(), psm_core::readings::format_day(d)), None))
            })
            .collect();
        use psm_net::client::FetchError;
        let fetched = psm_net::client::fetch_days(ingest, &wanted, range, Track::Tfhe)
            .await
            .map_err(|e| match e {
                FetchError::Unavailable(_) => ComputeError::unavailable(e.to_string()),
                FetchError::Missing { meter, day } => ComputeError::precondition(format!(
                    "meter {meter} has no register readings (tfhe track) for {day}; demand charges, tiers and analytics need every day"
                )),
                other => ComputeError::internal(other.to_string()),
            })?;
        let mut got: BTreeMap<(String, i64), RegisterInput> = BTreeMap::new();
        for ((meter_id, day_text), b) in fetched {
            let day = parse_day(&day_text)
                .map_err(|e| ComputeError::internal(format!("ingest returned {e}")))?;
            let kid = b
                .key
                .as_ref()
                .map(|k| k.key_id.as_str())
                .unwrap_or_default();
            if kid != self.key_id {
                return Err(ComputeError::precondition(format!(
                    "{meter_id} {day_text} is under key {kid:?}, not {}",
                    self.key_id
                )));
            }
            got.insert(
                (meter_id.clone(), day),
                RegisterInput {
                    input: InputRef {
                        meter_id: meter_id.clone(),
                        day: day_text,
                        track: Track::Tfhe as i32,
                        ciphertext_hash: b.ciphertext_hash,
                    },
                    meter_id,
                    day,
                    bytes: b.ciphertext,
                },
            );
        }
        Ok(got.into_values().collect())
    }

    /// Decrypts squashed results through the keyshares: `parts` are squashed integers of the
    /// given bit widths, concatenated into one batch; returns each as an integer.
    pub async fn decrypt(
        &self,
        decryptor: &ThresholdDecryptor,
        parts: Vec<Squashed>,
        manifest: ComputationManifest,
        idempotency_key: &str,
    ) -> Result<(Vec<u128>, Decrypted), ComputeError> {
        let (batch, widths) = concat(&parts);
        let out = decryptor
            .decrypt(
                &self.key_id,
                &batch,
                SQUASHED_BLOCK,
                psm_core::ceremony::SQUASHED_NOISE_LOG2,
                manifest,
                idempotency_key,
            )
            .await
            .map_err(ComputeError::from)?;
        let mut at = 0;
        let values = widths
            .iter()
            .map(|(blocks, bits)| {
                let v = recompose(&out.values[at..at + blocks], *bits);
                at += blocks;
                v
            })
            .collect();
        Ok((values, out))
    }
}

/// Verifies and expands register lists on every core (the server key is installed on rayon's
/// workers when it is loaded), reporting progress.
pub fn expand_all(
    loaded: &Loaded,
    inputs: &[RegisterInput],
    job: &JobHandle,
    from: u32,
    to: u32,
) -> Result<Vec<Expanded>, ComputeError> {
    tfhe::set_server_key(loaded.server_key.clone());
    let done = std::sync::atomic::AtomicU32::new(0);
    let n = inputs.len().max(1) as u32;
    inputs
        .par_iter()
        .map(|r| {
            let hash = &r.input.ciphertext_hash;
            let out = match loaded.cache.get(&r.meter_id, r.day, hash) {
                Some(e) => Ok(e),
                None => loaded
                    .verifier
                    .expand(
                        &r.meter_id,
                        &psm_core::readings::format_day(r.day),
                        &r.bytes,
                    )
                    .inspect(|e| loaded.cache.put(&r.meter_id, r.day, hash, e))
                    .map_err(|e| {
                        ComputeError::internal(format!("stored registers {} : {e}", r.meter_id))
                    }),
            };
            let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            job.step(
                &format!("expanding registers {k}/{n}"),
                from + (to - from) * k / n,
            );
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ExpansionCache;

    #[test]
    fn cache_keeps_the_most_recently_used_per_meter_day() {
        let c = ExpansionCache::new(2);
        c.put("a", 1, b"h1", &1);
        c.put("b", 1, b"h2", &2);
        assert_eq!(c.get("a", 1, b"h1"), Some(1)); // a is now the most recent
        c.put("c", 1, b"h3", &3); // evicts b
        assert_eq!(
            (
                c.get("a", 1, b"h1"),
                c.get("b", 1, b"h2"),
                c.get("c", 1, b"h3")
            ),
            (Some(1), None, Some(3))
        );
        assert_eq!(c.len(), 2);
        // The same bytes under another meter or day are not the verified entry.
        assert_eq!(c.get("b", 1, b"h1"), None);
        assert_eq!(c.get("a", 2, b"h1"), None);
        let off = ExpansionCache::new(0);
        off.put("a", 1, b"h", &1);
        assert!(off.is_empty());
    }
}
