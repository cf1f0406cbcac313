//! ingest-svc: accepts encrypted reading batches and linear-track key enrollments from meters
//! and head-ends, stores them durably and idempotently, and serves readings to compute and
//! keyshares and enrollments to keyshares. It never opens an envelope or reads a reading; on the
//! linear track it enforces that each (meter, epoch, channel, slot) is encrypted once, ever, and
//! only under an enrolled epoch. The binary is a thin wrapper over [`run`].

pub mod error;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use psm_core::readings::{format_day, parse_day, validate_meter_id, DAY_SECONDS};
use psm_core::threshold::Scheme;
use psm_net::auth::caller;
use psm_net::Role;
use psm_proto::v1::Track;

use crate::error::{join_error, IngestError};
use crate::store::{ReadingStore, StoreError};
use psm_core::registers::{RegisterVerifier, MAX_REGISTER_LIST_BYTES, REGISTER_COUNT};

use psm_core::ceremony::{CeremonyError, PublicBundle};
use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_proto::v1::ingest_server::{Ingest, IngestServer};
use psm_proto::v1::{
    EnrollRequest, EnrollResponse, Enrollment, GetPublicParamsRequest, PublicParamsChunk,
    ReadingBatch, StreamEnrollmentsRequest, StreamReadingsRequest, SubmitReadingsRequest,
    SubmitReadingsResponse,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// Default API address of ingest.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7401";

/// The `[ingest]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Public bundle directory from `psm ceremony` (`<out>/public`), served by GetPublicParams;
    /// its manifest names the tfhe key id tfhe-track submissions must use and the keyshares'
    /// scheme and names that enrollments are checked against.
    pub public_dir: Option<PathBuf>,
    /// Meters each head-end may submit and enroll for: head-end certificate name → meter ids,
    /// where an id ending in `*` matches every id with that prefix (`"meter-*"`).
    #[serde(default)]
    pub headends: HashMap<String, Vec<String>>,
    /// Per-caller limits on what is submitted (`[ingest.quota]`).
    #[serde(default)]
    pub quota: QuotaConfig,
    /// A meter registry (the keyshares' format, `psm registry`): with it, every batch and
    /// enrollment must carry its meter's device signature under the listed key, so a head-end
    /// relays but cannot alter or invent them; meters not listed are refused. Without it, ingest
    /// checks no signatures (the keyshares still check enrollments and the inputs they
    /// re-execute).
    pub registry: Option<PathBuf>,
    /// Where readings and enrollments are kept (`[ingest.store]`): sled by default, or
    /// PostgreSQL for several replicas.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
}

/// How much one caller (certificate identity) may submit, per minute: a token bucket each,
/// with at most a minute's worth banked. A request over quota is refused whole with
/// RESOURCE_EXHAUSTED and the time to wait; nothing of it is stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Reading batches and enrollments per minute (a head-end of a million meters sending a
    /// day's readings per meter and channel needs about 1,400).
    pub batches_per_minute: u64,
    /// Bytes of ciphertext per minute.
    pub bytes_per_minute: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            batches_per_minute: 600_000,
            bytes_per_minute: 4 << 30,
        }
    }
}

/// Most batches in one SubmitReadings request.
pub const MAX_BATCHES_PER_REQUEST: usize = 1_000;
/// Most enrollments in one Enroll request.
pub const MAX_ENROLLMENTS_PER_REQUEST: usize = 1_000;
/// Most meters named in one StreamReadings or StreamEnrollments request.
pub const MAX_METERS_PER_STREAM: usize = 100_000;
/// Longest time range of one StreamReadings request, days.
pub const MAX_STREAM_DAYS: i64 = 400;
/// Most meter-days StreamReadings reads from the store at a time (linear track; bounds its
/// memory to a few MB).
pub const STREAM_GROUP_METER_DAYS: usize = 2_048;
/// Enrollments StreamEnrollments reads from the store at a time (bounds its memory).
pub const ENROLLMENT_PAGE: usize = 1_000;

/// Size of one GetPublicParams chunk: well under the 4 MiB default limit of gRPC clients.
pub const CHUNK_BYTES: usize = 2 << 20;

/// The Ingest gRPC service.
pub struct IngestService {
    bundle: Option<Arc<PublicBundle>>,
    /// Checks tfhe-track register proofs (present with the bundle).
    verifier: Option<Arc<RegisterVerifier>>,
    /// Bounds the proof verifications running at once (each takes ~0.1 s of a core).
    verify_permits: Arc<tokio::sync::Semaphore>,
    store: Arc<dyn ReadingStore>,
    headends: HashMap<String, Vec<String>>,
    batch_quota: psm_net::quota::Quota,
    byte_quota: psm_net::quota::Quota,
    /// Device keys batches and enrollments are checked against.
    registry: Option<Arc<psm_core::registry::Registry>>,
}

fn valid_idempotency_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

fn check_idempotency_key(k: &str) -> Result<(), IngestError> {
    if valid_idempotency_key(k) {
        Ok(())
    } else {
        Err(IngestError::invalid(
            "idempotency_key must be 1..=128 printable ASCII characters",
        ))
    }
}

/// Whether two enrollments are the same, ignoring `seq` (which callers do not set).
fn same_enrollment(a: &Enrollment, b: &Enrollment) -> bool {
    a.meter_id == b.meter_id
        && a.epoch == b.epoch
        && a.parties == b.parties
        && a.threshold == b.threshold
        && a.commitments == b.commitments
        && a.envelopes == b.envelopes
}

/// One linear batch of a request, for the checks across batches.
struct Covered<'a> {
    index: usize,
    batch: &'a ReadingBatch,
    first_slot: u64,
    end_slot: u64,
}

/// Whether two batches of one (meter, epoch, channel) are the same batch.
fn same_batch(a: &ReadingBatch, b: &ReadingBatch) -> bool {
    a.first_interval == b.first_interval
        && a.interval_seconds == b.interval_seconds
        && a.count == b.count
        && a.ciphertext == b.ciphertext
}

impl IngestService {
    /// A service over `store`, serving the public bundle in `public_dir` if given (without one
    /// it cannot check tfhe key ids and proofs or the scheme of enrollments, and refuses
    /// tfhe-track batches and enrollments).
    pub fn new(
        public_dir: Option<&Path>,
        store: Arc<dyn ReadingStore>,
        headends: HashMap<String, Vec<String>>,
        quota: &QuotaConfig,
    ) -> Result<Self, CeremonyError> {
        let bundle = public_dir
            .map(PublicBundle::open)
            .transpose()?
            .map(Arc::new);
        if let Some(b) = &bundle {
            tracing::info!(
                dir = %b.dir.display(),
                tfhe_key = %b.manifest.tfhe_key_id,
                parties = b.manifest.parties,
                threshold = b.manifest.threshold,
                "serving public key material"
            );
        }
        let verifier = match &bundle {
            Some(b) => Some(Arc::new(b.register_verifier()?)),
            None => None,
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(IngestService {
            bundle,
            verifier,
            verify_permits: Arc::new(tokio::sync::Semaphore::new(cores)),
            store,
            headends,
            batch_quota: psm_net::quota::Quota::new(quota.batches_per_minute),
            byte_quota: psm_net::quota::Quota::new(quota.bytes_per_minute),
            registry: None,
        })
    }

    /// Checks device signatures against `registry` from now on.
    pub fn with_registry(mut self, registry: psm_core::registry::Registry) -> Self {
        tracing::info!(
            meters = registry.len(),
            "device signatures of batches and enrollments are checked against the registry"
        );
        self.registry = Some(Arc::new(registry));
        self
    }

    /// The device key `meter`'s signatures must verify under; `Ok(None)` when ingest checks no
    /// signatures (no registry, or a development registry's unlisted meter).
    fn device_key(&self, meter: &str) -> Result<Option<[u8; 32]>, IngestError> {
        let Some(r) = &self.registry else {
            return Ok(None);
        };
        match r.lookup(meter) {
            Some(l) => Ok(l.device_key),
            None => Err(IngestError::not_permitted(format!(
                "meter {meter} is not on this ingest's registry; nothing was stored"
            ))),
        }
    }

    /// Spends `batches` and `bytes` of the caller's quota (both or neither), or refuses the
    /// whole request.
    fn spend_quota(
        &self,
        who: &psm_net::SpiffeId,
        batches: usize,
        bytes: usize,
    ) -> Result<(), IngestError> {
        use psm_net::quota::OverQuota;
        let name = who.to_string();
        let mut bytes_refusal = None;
        let over = |what: &str, limit: u64, o: OverQuota| {
            match o {
            OverQuota::RetryIn(wait) => IngestError::exhausted(format!(
                "{who} is over this ingest's quota of {limit} {what} per minute; retry in {} s; nothing was stored",
                wait.as_secs() + 1
            )),
            OverQuota::TooLarge => IngestError::exhausted(format!(
                "the request holds more {what} than this ingest's quota of {limit} per minute allows; split it; nothing was stored"
            )),
        }
        };
        self.batch_quota
            .take_if(&name, batches as u64, || {
                match self.byte_quota.take(&name, bytes as u64) {
                    Ok(()) => true,
                    Err(o) => {
                        bytes_refusal = Some(o);
                        false
                    }
                }
            })
            .map_err(|o| match bytes_refusal {
                Some(b) => over("bytes", self.byte_quota.per_minute(), b),
                None => over("batches", self.batch_quota.per_minute(), o),
            })
    }

    /// Whether the caller may submit or enroll for `meter_id`: a meter for itself, a head-end
    /// for the meters on its list.
    fn may_submit(&self, who: &psm_net::SpiffeId, meter_id: &str) -> bool {
        match who.role {
            Role::Meter => who.name == meter_id,
            Role::Headend => self.headends.get(&who.name).is_some_and(|list| {
                list.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => meter_id.starts_with(prefix),
                    None => p == meter_id,
                })
            }),
            _ => false,
        }
    }

    /// Verifies the zero-knowledge proofs of every tfhe-track batch on the blocking pool, at most
    /// one verification per core at a time; any failure refuses the whole request.
    async fn verify_proofs(&self, req: &SubmitReadingsRequest) -> Result<(), IngestError> {
        let mut jobs = Vec::new();
        for (i, b) in req.batches.iter().enumerate() {
            if b.track() != Track::Tfhe {
                continue;
            }
            let verifier = self.verifier.clone().ok_or_else(|| {
                IngestError::precondition("this ingest has no key bundle; nothing was stored")
            })?;
            let permit = self
                .verify_permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| IngestError::unavailable("ingest is shutting down"))?;
            let (meter, day, bytes) = (b.meter_id.clone(), b.day.clone(), b.ciphertext.clone());
            jobs.push((
                i,
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    verifier.verify(&meter, &day, &bytes)
                }),
            ));
        }
        for (i, job) in jobs {
            let b = &req.batches[i];
            job.await
                .map_err(|e| IngestError::internal(format!("proof verification task failed: {e}")))?
                .map_err(|e| {
                    IngestError::invalid(format!(
                        "batch {i} ({} {}): {e}; nothing was stored",
                        b.meter_id, b.day
                    ))
                })?;
        }
        Ok(())
    }

    /// Every check on a submission that needs no storage. Returns the (meter, epoch) pairs of
    /// the linear batches with the first batch naming each, which must be enrolled.
    fn validate(
        &self,
        who: &psm_net::SpiffeId,
        req: &SubmitReadingsRequest,
    ) -> Result<BTreeMap<(String, u32), usize>, IngestError> {
        check_idempotency_key(&req.idempotency_key)?;
        if req.batches.is_empty() {
            return Err(IngestError::invalid("the request holds no batches"));
        }
        if req.batches.len() > MAX_BATCHES_PER_REQUEST {
            return Err(IngestError::exhausted(format!(
                "{} batches in one request; the limit is {MAX_BATCHES_PER_REQUEST}",
                req.batches.len()
            )));
        }
        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            .div_euclid(DAY_SECONDS);
        let mut epochs = BTreeMap::new();
        let mut tfhe_days = BTreeMap::new();
        // (meter, epoch, channel) → the request's batches for it.
        let mut linear: BTreeMap<(&str, u32, psm_core::linear::Channel), Vec<Covered>> =
            BTreeMap::new();
        for (i, b) in req.batches.iter().enumerate() {
            let bad = |m: String| {
                IngestError::invalid(format!(
                    "batch {i} ({} {}): {m}; nothing was stored",
                    b.meter_id, b.day
                ))
            };
            validate_meter_id(&b.meter_id).map_err(|e| bad(e.to_string()))?;
            let day = parse_day(&b.day).map_err(|e| bad(e.to_string()))?;
            if day > today + 1 {
                return Err(bad(format!(
                    "the day is after tomorrow ({} UTC); readings are accepted up to tomorrow, so no slot of the future is taken",
                    format_day(today + 1)
                )));
            }
            if !self.may_submit(who, &b.meter_id) {
                return Err(IngestError::not_permitted(format!(
                    "{who} may not submit readings for meter {:?} (batch {i}); nothing was stored",
                    b.meter_id
                )));
            }
            if let Some(device) = self.device_key(&b.meter_id)? {
                psm_core::signing::verify_batch(b, &device).map_err(|e| {
                    IngestError::not_permitted(format!("batch {i}: {e}; nothing was stored"))
                })?;
            }
            match b.track() {
                Track::Linear => {
                    let lb = psm_core::wire::linear_batch(b).map_err(|e| bad(e.to_string()))?;
                    let group = linear
                        .entry((&b.meter_id, lb.epoch, lb.channel))
                        .or_default();
                    for prev in group.iter() {
                        if prev.first_slot < lb.end_slot()
                            && lb.first_slot < prev.end_slot
                            && !same_batch(prev.batch, b)
                        {
                            return Err(bad(format!(
                                "it covers slots of batch {} (epoch {} channel {}) with other bodies; a slot is encrypted once, ever",
                                prev.index,
                                lb.epoch,
                                lb.channel.name()
                            )));
                        }
                    }
                    group.push(Covered {
                        index: i,
                        batch: b,
                        first_slot: lb.first_slot,
                        end_slot: lb.end_slot(),
                    });
                    epochs.entry((b.meter_id.clone(), lb.epoch)).or_insert(i);
                }
                Track::Tfhe => {
                    let bundle = self.bundle.as_ref().ok_or_else(|| {
                        IngestError::precondition(
                            "this ingest has no key manifest (start it with --public-dir), so it cannot take tfhe-track batches; nothing was stored",
                        )
                    })?;
                    parse_day(&b.day).map_err(|e| bad(e.to_string()))?;
                    let key_id = b
                        .key
                        .as_ref()
                        .map(|k| k.key_id.as_str())
                        .unwrap_or_default();
                    if key_id != bundle.manifest.tfhe_key_id {
                        return Err(bad(format!(
                            "key id {key_id:?} is not this deployment's tfhe key {:?}",
                            bundle.manifest.tfhe_key_id
                        )));
                    }
                    if b.interval_seconds != 0 || b.count != REGISTER_COUNT {
                        return Err(bad(format!(
                            "a tfhe-track batch carries {REGISTER_COUNT} registers (peak W, total Wh) with interval_seconds 0"
                        )));
                    }
                    if b.ciphertext.len() as u64 > MAX_REGISTER_LIST_BYTES {
                        return Err(bad(format!(
                            "{} bytes; a register list is at most {MAX_REGISTER_LIST_BYTES}",
                            b.ciphertext.len()
                        )));
                    }
                    if blake3::hash(&b.ciphertext).as_bytes().as_slice()
                        != b.ciphertext_hash.as_slice()
                    {
                        return Err(bad("ciphertext_hash is not the BLAKE3 hash of the ciphertext (truncated or corrupted?)".into()));
                    }
                    if let Some(prev) =
                        tfhe_days.insert((b.meter_id.as_str(), b.day.as_str()), &b.ciphertext_hash)
                    {
                        if *prev != b.ciphertext_hash {
                            return Err(bad(
                                "the request holds two different tfhe-track batches for this meter-day"
                                    .into(),
                            ));
                        }
                    }
                }
                Track::Unspecified => {
                    return Err(bad("track must be TRACK_LINEAR or TRACK_TFHE".into()))
                }
            }
        }
        Ok(epochs)
    }

    /// Refuses a submission with a linear batch under an epoch its meter has not enrolled.
    async fn check_enrolled(
        &self,
        epochs: BTreeMap<(String, u32), usize>,
    ) -> Result<(), IngestError> {
        if epochs.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let missing = tokio::task::spawn_blocking(move || {
            for ((meter, epoch), i) in epochs {
                if !store.is_enrolled(&meter, epoch)? {
                    return Ok(Some((meter, epoch, i)));
                }
            }
            Ok::<_, StoreError>(None)
        })
        .await
        .map_err(join_error)?
        .map_err(IngestError::from)?;
        match missing {
            Some((meter, epoch, i)) => Err(IngestError::precondition(format!(
                "batch {i}: meter {meter} has not enrolled key epoch {epoch}; enroll it first with Ingest.Enroll; nothing was stored"
            ))),
            None => Ok(()),
        }
    }

    /// Every check on an enrollment request that needs no storage.
    fn validate_enrollments(
        &self,
        who: &psm_net::SpiffeId,
        req: &EnrollRequest,
    ) -> Result<(), IngestError> {
        check_idempotency_key(&req.idempotency_key)?;
        if req.enrollments.is_empty() {
            return Err(IngestError::invalid("the request holds no enrollments"));
        }
        if req.enrollments.len() > MAX_ENROLLMENTS_PER_REQUEST {
            return Err(IngestError::exhausted(format!(
                "{} enrollments in one request; the limit is {MAX_ENROLLMENTS_PER_REQUEST}",
                req.enrollments.len()
            )));
        }
        let bundle = self.bundle.as_ref().ok_or_else(|| {
            IngestError::precondition(
                "this ingest has no key manifest (start it with --public-dir), so it cannot check enrollments against the keyshares' scheme; nothing was stored",
            )
        })?;
        let manifest = &bundle.manifest;
        let scheme = Scheme::new(manifest.parties, manifest.threshold).map_err(|e| {
            IngestError::precondition(format!(
                "the key manifest's scheme is unusable: {e}; nothing was stored"
            ))
        })?;
        let mut seen: BTreeMap<(&str, u32), (usize, &Enrollment)> = BTreeMap::new();
        for (i, e) in req.enrollments.iter().enumerate() {
            let bad = |m: String| {
                IngestError::invalid(format!(
                    "enrollment {i} (meter {} epoch {}): {m}; nothing was stored",
                    e.meter_id, e.epoch
                ))
            };
            validate_meter_id(&e.meter_id).map_err(|x| bad(x.to_string()))?;
            if !self.may_submit(who, &e.meter_id) {
                return Err(IngestError::not_permitted(format!(
                    "{who} may not enroll meter {:?} (enrollment {i}); nothing was stored",
                    e.meter_id
                )));
            }
            psm_core::linear::envelope::check_shape(e, scheme, &manifest.party_names)
                .map_err(|x| bad(x.to_string()))?;
            if let Some(device) = self.device_key(&e.meter_id)? {
                psm_core::signing::verify_enrollment(e, &device).map_err(|x| {
                    IngestError::not_permitted(format!("enrollment {i}: {x}; nothing was stored"))
                })?;
            }
            if let Some((j, prev)) = seen.insert((e.meter_id.as_str(), e.epoch), (i, e)) {
                if !same_enrollment(prev, e) {
                    return Err(bad(format!(
                        "enrollment {j} of this request enrolls the same meter and epoch with other seeds"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Runs a store read on the blocking pool for a response stream: its result, or None after
/// sending the failure to the stream (which then ends).
async fn read_or_send<T: Send + 'static, I>(
    tx: &mpsc::Sender<Result<I, Status>>,
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Option<T> {
    let e = match tokio::task::spawn_blocking(read).await {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => IngestError::from(e),
        Err(e) => join_error(e),
    };
    let _ = tx.send(Err(e.into())).await;
    None
}

/// Streams `path` in chunks, checking at the end that what was sent has `hash`.
async fn stream_file(
    path: PathBuf,
    hash: [u8; 32],
    tx: mpsc::Sender<Result<PublicParamsChunk, Status>>,
) {
    use tokio::io::AsyncReadExt;
    let fail = |m: String| Err(Status::internal(m));
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = tx
                .send(fail(format!("cannot open {}: {e}", path.display())))
                .await;
            return;
        }
    };
    let total = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            let _ = tx
                .send(fail(format!("cannot stat {}: {e}", path.display())))
                .await;
            return;
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let _ = tx
                        .send(fail(format!("reading {}: {e}", path.display())))
                        .await;
                    return;
                }
            }
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        hasher.update(&buf);
        let chunk = PublicParamsChunk {
            total_size: total,
            offset,
            data: buf,
            item_hash: hash.to_vec(),
        };
        offset += filled as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return; // the caller went away
        }
    }
    if *hasher.finalize().as_bytes() != hash || offset != total {
        let _ = tx
            .send(Err(Status::from(IngestError::corrupt(format!(
                "{} changed on disk: it no longer matches the manifest",
                path.display()
            )))))
            .await;
    }
}

type ChunkStream = tokio_stream::wrappers::ReceiverStream<Result<PublicParamsChunk, Status>>;
type BatchStream = tokio_stream::wrappers::ReceiverStream<Result<ReadingBatch, Status>>;
type EnrollmentStream = tokio_stream::wrappers::ReceiverStream<Result<Enrollment, Status>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn submit_readings(
        &self,
        request: Request<SubmitReadingsRequest>,
    ) -> Result<Response<SubmitReadingsResponse>, Status> {
        let who = caller(&request)?.clone();
        let req = request.into_inner();
        let epochs = self.validate(&who, &req)?;
        let bytes = req.batches.iter().map(|b| b.ciphertext.len()).sum();
        self.spend_quota(&who, req.batches.len(), bytes)?;
        self.check_enrolled(epochs).await?;
        self.verify_proofs(&req).await?;
        let store = self.store.clone();
        let batches = req.batches;
        let outcome = tokio::task::spawn_blocking(move || store.put_all(&batches))
            .await
            .map_err(join_error)?
            .map_err(IngestError::from)?;
        tracing::info!(caller = %who, key = %req.idempotency_key, stored = outcome.stored, duplicates = outcome.duplicates, "readings stored durably");
        metrics::counter!("psm_ingest_batches_total", "outcome" => "stored")
            .increment(outcome.stored.into());
        metrics::counter!("psm_ingest_batches_total", "outcome" => "duplicate")
            .increment(outcome.duplicates.into());
        Ok(Response::new(SubmitReadingsResponse {
            stored: outcome.stored,
            duplicates: outcome.duplicates,
        }))
    }

    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let who = caller(&request)?.clone();
        let req = request.into_inner();
        self.validate_enrollments(&who, &req)?;
        let bytes = req.enrollments.iter().map(|e| e.encoded_len()).sum();
        self.spend_quota(&who, req.enrollments.len(), bytes)?;
        let store = self.store.clone();
        let enrollments = req.enrollments;
        let outcome = tokio::task::spawn_blocking(move || store.put_enrollments(&enrollments))
            .await
            .map_err(join_error)?
            .map_err(IngestError::from)?;
        tracing::info!(caller = %who, key = %req.idempotency_key, stored = outcome.stored, duplicates = outcome.duplicates, "enrollments stored durably");
        metrics::counter!("psm_ingest_enrollments_total", "outcome" => "stored")
            .increment(outcome.stored.into());
        metrics::counter!("psm_ingest_enrollments_total", "outcome" => "duplicate")
            .increment(outcome.duplicates.into());
        Ok(Response::new(EnrollResponse {
            stored: outcome.stored,
            duplicates: outcome.duplicates,
        }))
    }

    type StreamEnrollmentsStream = EnrollmentStream;

    async fn stream_enrollments(
        &self,
        request: Request<StreamEnrollmentsRequest>,
    ) -> Result<Response<Self::StreamEnrollmentsStream>, Status> {
        let who = caller(&request)?.clone();
        let req = request.into_inner();
        if req.meter_ids.len() > MAX_METERS_PER_STREAM {
            return Err(IngestError::exhausted(format!(
                "{} meters in one request; the limit is {MAX_METERS_PER_STREAM}",
                req.meter_ids.len()
            ))
            .into());
        }
        for m in &req.meter_ids {
            validate_meter_id(m).map_err(|e| IngestError::invalid(e.to_string()))?;
        }
        let meters: Option<BTreeSet<String>> =
            (!req.meter_ids.is_empty()).then(|| req.meter_ids.into_iter().collect());
        tracing::info!(caller = %who, after_seq = req.after_seq, meters = meters.as_ref().map_or(0, |m| m.len()), "streaming enrollments");
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(16);
        let mut after = req.after_seq;
        // Pages are read on the blocking pool and sent from an async task: a slow reader holds a
        // page of memory, never a blocking thread.
        tokio::spawn(async move {
            loop {
                let (st, m) = (store.clone(), meters.clone());
                let Some(page) = read_or_send(&tx, move || {
                    st.enrollments_after(after, m.as_ref(), ENROLLMENT_PAGE)
                })
                .await
                else {
                    return;
                };
                let last_page = page.len() < ENROLLMENT_PAGE;
                for e in page {
                    after = e.seq;
                    if tx.send(Ok(e)).await.is_err() {
                        return; // the caller went away
                    }
                }
                if last_page {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type StreamReadingsStream = BatchStream;

    async fn stream_readings(
        &self,
        request: Request<StreamReadingsRequest>,
    ) -> Result<Response<Self::StreamReadingsStream>, Status> {
        let who = caller(&request)?.clone();
        let req = request.into_inner();
        let range = req
            .range
            .ok_or_else(|| IngestError::invalid("range is required"))?;
        if range.end_unix <= range.start_unix {
            return Err(IngestError::invalid("range end must be after its start").into());
        }
        let first = range.start_unix.div_euclid(DAY_SECONDS);
        let last = (range.end_unix - 1).div_euclid(DAY_SECONDS);
        if last - first + 1 > MAX_STREAM_DAYS {
            return Err(IngestError::invalid(format!(
                "range spans {} days; the limit is {MAX_STREAM_DAYS}",
                last - first + 1
            ))
            .into());
        }
        let (from_day, to_day) = (format_day(first), format_day(last));
        if req.meter_ids.len() > MAX_METERS_PER_STREAM {
            return Err(IngestError::exhausted(format!(
                "{} meters in one request; the limit is {MAX_METERS_PER_STREAM}",
                req.meter_ids.len()
            ))
            .into());
        }
        for m in &req.meter_ids {
            validate_meter_id(m).map_err(|e| IngestError::invalid(e.to_string()))?;
        }
        if req.meter_ids.is_empty() && who.role != Role::Compute {
            return Err(IngestError::invalid(
                "name the meters: only role compute may stream every meter",
            )
            .into());
        }
        let track = req.track;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(16);
        // Each meter's batches are read on the blocking pool and sent from an async task: a
        // slow reader holds one meter's range in memory, never a blocking thread.
        tokio::spawn(async move {
            let meters = if req.meter_ids.is_empty() {
                let st = store.clone();
                match read_or_send(&tx, move || st.meters()).await {
                    Some(m) => m,
                    None => return,
                }
            } else {
                req.meter_ids
            };
            // Meters are read a group at a time (one round trip on PostgreSQL), the group sized
            // so that it holds at most STREAM_GROUP_METER_DAYS meter-days; tfhe-track registers
            // are large, so streams that may hold them go one meter at a time.
            let days = usize::try_from(last - first + 1).unwrap_or(1).max(1);
            let group = if track == Track::Linear as i32 {
                (STREAM_GROUP_METER_DAYS / days).max(1)
            } else {
                1
            };
            for m in meters.chunks(group) {
                if tx.is_closed() {
                    return; // the caller went away
                }
                let (st, from, to, m) =
                    (store.clone(), from_day.clone(), to_day.clone(), m.to_vec());
                let Some(batches) =
                    read_or_send(&tx, move || st.scan_many(&m, &from, &to, track)).await
                else {
                    return;
                };
                for b in batches {
                    if track != 0 && b.track != track {
                        continue;
                    }
                    if tx.send(Ok(b)).await.is_err() {
                        return; // the caller went away
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type GetPublicParamsStream = ChunkStream;

    async fn get_public_params(
        &self,
        request: Request<GetPublicParamsRequest>,
    ) -> Result<Response<Self::GetPublicParamsStream>, Status> {
        let bundle = self.bundle.as_ref().ok_or_else(|| {
            IngestError::precondition(
                "this ingest serves no public key material (start it with --public-dir)",
            )
        })?;
        let r = request.into_inner();
        let names: Vec<&str> = std::iter::once("manifest")
            .chain(bundle.manifest.items.iter().map(|i| i.name.as_str()))
            .collect();
        let manifest_path = bundle.dir.join("manifest.toml");
        let by_name = |name: &str| -> Option<(PathBuf, String)> {
            if name == "manifest" {
                return Some((manifest_path.clone(), bundle.manifest_hash.clone()));
            }
            bundle
                .manifest
                .item(name)
                .map(|i| (bundle.dir.join(&i.file), i.blake3.clone()))
        };
        let wanted_hash = (!r.hash.is_empty()).then(|| hex::encode(&r.hash));
        let found = match (r.name.as_str(), &wanted_hash) {
            ("", None) => {
                return Err(IngestError::invalid(format!(
                    "name or hash is required; names: {names:?}"
                ))
                .into())
            }
            ("", Some(h)) => names
                .iter()
                .filter_map(|n| by_name(n))
                .find(|(_, ih)| ih == h),
            (n, h) => by_name(n).filter(|(_, ih)| h.as_ref().is_none_or(|h| h == ih)),
        };
        let (path, hash_hex) = found.ok_or_else(|| {
            IngestError::not_found(format!(
                "no public item matches name {:?} and hash {:?}; names: {names:?}",
                r.name,
                wanted_hash.unwrap_or_default()
            ))
        })?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&hash_hex, &mut hash)
            .map_err(|e| IngestError::internal(format!("manifest hash is not hex: {e}")))?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(stream_file(path, hash, tx));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// The service's routes with its message-size limits applied.
pub fn routes(settings: &ServerSettings, svc: IngestService) -> Routes {
    Routes::new(
        IngestServer::new(svc)
            .max_decoding_message_size(settings.max_request_bytes)
            .max_encoding_message_size(DEFAULT_MAX_RESPONSE_BYTES),
    )
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: ServerSettings, svc: IngestService) -> Result<(), psm_net::NetError> {
    psm_net::server::run(
        &settings,
        routes(&settings, svc),
        &[psm_proto::service_names::INGEST],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use psm_core::linear::envelope::{enroll, generate_keypair};
    use psm_core::linear::key::MeterSeeds;
    use psm_core::linear::Channel;
    use tokio_stream::StreamExt;
    use tonic::Code;

    const DAY: i64 = 20_454; // 2026-01-01

    fn names() -> Vec<String> {
        (1..=3).map(|i| format!("keyshare-{i}")).collect()
    }

    fn service(dir: &Path) -> IngestService {
        let manifest = psm_core::keys::Manifest {
            version: 2,
            tfhe_key_id: "tfhe-test".into(),
            parties: 3,
            threshold: 2,
            party_names: names(),
            items: vec![],
        };
        IngestService {
            bundle: Some(Arc::new(PublicBundle {
                dir: dir.to_owned(),
                manifest,
                manifest_hash: String::new(),
            })),
            verifier: None,
            verify_permits: Arc::new(tokio::sync::Semaphore::new(2)),
            store: Arc::new(SledStore::open(&dir.join("store")).unwrap()),
            headends: HashMap::from([("headend-1".to_string(), vec!["meter-*".to_string()])]),
            batch_quota: psm_net::quota::Quota::new(QUOTA_BATCHES),
            byte_quota: psm_net::quota::Quota::new(u64::MAX),
            registry: None,
        }
    }

    /// The unit tests' batch quota per minute.
    const QUOTA_BATCHES: u64 = 200;

    fn req<T>(role: Role, name: &str, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.extensions_mut().insert(psm_net::auth::Caller(
            psm_net::SpiffeId::new("psm.test", role, name).unwrap(),
        ));
        r
    }

    struct Keys(Vec<(String, Vec<u8>)>);

    impl Keys {
        fn new() -> Self {
            Keys(
                names()
                    .into_iter()
                    .map(|n| (n, generate_keypair().1))
                    .collect(),
            )
        }

        fn enrollment(&self, meter: &str, epoch: u32) -> Enrollment {
            let scheme = Scheme::new(3, 2).unwrap();
            enroll(
                meter,
                &MeterSeeds::generate(scheme, epoch),
                scheme,
                &self.0,
                &psm_core::signing::SecretKey::generate(),
            )
            .unwrap()
        }
    }

    async fn enroll_as(
        svc: &IngestService,
        who: (Role, &str),
        enrollments: Vec<Enrollment>,
    ) -> Result<(u32, u32), Status> {
        let r = svc
            .enroll(req(
                who.0,
                who.1,
                EnrollRequest {
                    idempotency_key: "e-1".into(),
                    enrollments,
                },
            ))
            .await?
            .into_inner();
        Ok((r.stored, r.duplicates))
    }

    async fn submit(svc: &IngestService, batches: Vec<ReadingBatch>) -> Result<(u32, u32), Status> {
        let r = svc
            .submit_readings(req(
                Role::Headend,
                "headend-1",
                SubmitReadingsRequest {
                    idempotency_key: "s-1".into(),
                    batches,
                },
            ))
            .await?
            .into_inner();
        Ok((r.stored, r.duplicates))
    }

    fn lin(meter: &str, ch: Channel, interval: u32, first: u32, n: usize, v: u128) -> ReadingBatch {
        let bodies: Vec<u128> = (0..n as u128).map(|i| v << 64 | i).collect();
        psm_core::wire::linear_batch_to_proto(meter, DAY, 1, ch, interval, first, &bodies)
    }

    fn code(r: Result<(u32, u32), Status>, want: Code) -> String {
        match r {
            Err(e) if e.code() == want => e.message().to_owned(),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }

    fn stored(svc: &IngestService, meter: &str) -> Vec<ReadingBatch> {
        svc.store.scan(meter, "2026-01-01", "2026-01-01").unwrap()
    }

    #[tokio::test]
    async fn enrollments_are_checked_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        let keys = Keys::new();
        let he = (Role::Headend, "headend-1");
        let e1 = keys.enrollment("meter-1", 1);
        assert_eq!(enroll_as(&svc, he, vec![e1.clone()]).await.unwrap(), (1, 0));
        assert_eq!(enroll_as(&svc, he, vec![e1.clone()]).await.unwrap(), (0, 1));
        // A meter enrolls itself; not another meter.
        let own = keys.enrollment("meter-2", 1);
        assert_eq!(
            enroll_as(&svc, (Role::Meter, "meter-2"), vec![own.clone()])
                .await
                .unwrap(),
            (1, 0)
        );
        let m = code(
            enroll_as(
                &svc,
                (Role::Meter, "meter-2"),
                vec![keys.enrollment("meter-3", 1)],
            )
            .await,
            Code::PermissionDenied,
        );
        assert!(m.contains("meter-3"), "{m}");
        code(
            enroll_as(
                &svc,
                (Role::Headend, "headend-2"),
                vec![keys.enrollment("meter-3", 1)],
            )
            .await,
            Code::PermissionDenied,
        );
        // Other seeds for an enrolled (meter, epoch): ALREADY_EXISTS, nothing of the request
        // stored.
        let m = code(
            enroll_as(
                &svc,
                he,
                vec![keys.enrollment("meter-3", 1), keys.enrollment("meter-1", 1)],
            )
            .await,
            Code::AlreadyExists,
        );
        assert!(
            m.contains("meter-1") && m.contains("epoch 1") && m.contains("rotation"),
            "{m}"
        );
        assert!(!svc.store.is_enrolled("meter-3", 1).unwrap());
        // Malformed enrollments: INVALID_ARGUMENT.
        let mut missing = keys.enrollment("meter-3", 1);
        missing.envelopes.pop();
        let mut scheme = keys.enrollment("meter-3", 1);
        scheme.parties = 4;
        let mut epoch0 = keys.enrollment("meter-3", 1);
        epoch0.epoch = 0;
        for (what, e) in [("missing", missing), ("scheme", scheme), ("epoch", epoch0)] {
            let m = code(
                enroll_as(&svc, he, vec![keys.enrollment("meter-4", 1), e]).await,
                Code::InvalidArgument,
            );
            assert!(m.contains("enrollment 1"), "{what}: {m}");
        }
        let m = code(
            enroll_as(
                &svc,
                he,
                vec![keys.enrollment("meter-4", 1), keys.enrollment("meter-4", 1)],
            )
            .await,
            Code::InvalidArgument,
        );
        assert!(m.contains("other seeds"), "{m}");
        code(enroll_as(&svc, he, vec![]).await, Code::InvalidArgument);
        let m = code(
            enroll_as(&svc, he, vec![e1.clone(); MAX_ENROLLMENTS_PER_REQUEST + 1]).await,
            Code::ResourceExhausted,
        );
        assert!(m.contains("1000"), "{m}");
        assert!(!svc.store.is_enrolled("meter-4", 1).unwrap());

        // StreamEnrollments: store order, after_seq paging, meter filter.
        let e3 = keys.enrollment("meter-3", 1);
        assert_eq!(enroll_as(&svc, he, vec![e3.clone()]).await.unwrap(), (1, 0));
        let stream = |after_seq, meter_ids: Vec<String>| {
            let svc = &svc;
            async move {
                let s = svc
                    .stream_enrollments(req(
                        Role::Keyshare,
                        "keyshare-1",
                        StreamEnrollmentsRequest {
                            meter_ids,
                            after_seq,
                        },
                    ))
                    .await?
                    .into_inner();
                s.collect::<Result<Vec<_>, _>>().await
            }
        };
        let all = stream(0, vec![]).await.unwrap();
        let got: Vec<(u64, &str)> = all.iter().map(|e| (e.seq, e.meter_id.as_str())).collect();
        assert_eq!(got, [(1, "meter-1"), (2, "meter-2"), (3, "meter-3")]);
        assert!(same_enrollment(&all[0], &e1) && same_enrollment(&all[2], &e3));
        let later = stream(1, vec![]).await.unwrap();
        assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        let some = stream(0, vec!["meter-3".into(), "meter-9".into()])
            .await
            .unwrap();
        assert_eq!(some.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        let e = stream(0, vec!["bad id".into()]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_caller_over_its_quota_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        let many = |n: usize, from: usize| -> Vec<ReadingBatch> {
            (from..from + n)
                .map(|k| lin(&format!("meter-{k}"), Channel::Import, 900, 0, 4, 1))
                .collect()
        };
        // 150 batches are judged (these meters never enrolled) and spend the quota ...
        let q = QUOTA_BATCHES as usize;
        code(
            submit(&svc, many(q * 3 / 4, 0)).await,
            Code::FailedPrecondition,
        );
        // ... so 100 more in the same minute are refused before any work, naming the wait.
        let m = code(
            submit(&svc, many(q / 2, 1000)).await,
            Code::ResourceExhausted,
        );
        assert!(m.contains("quota") && m.contains("retry in"), "{m}");
        // Another caller has its own bucket.
        let other = svc
            .submit_readings(req(
                Role::Meter,
                "meter-7",
                SubmitReadingsRequest {
                    idempotency_key: "s-2".into(),
                    batches: vec![lin("meter-7", Channel::Import, 900, 0, 4, 1)],
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            other.code(),
            Code::FailedPrecondition,
            "{}",
            other.message()
        );
    }

    #[tokio::test]
    async fn linear_slots_are_encrypted_once() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path());
        let keys = Keys::new();
        let full = lin("meter-1", Channel::Import, 900, 0, 96, 1);
        // Not enrolled yet.
        let m = code(
            submit(&svc, vec![full.clone()]).await,
            Code::FailedPrecondition,
        );
        assert!(
            m.contains("meter-1") && m.contains("epoch 1") && m.contains("Ingest.Enroll"),
            "{m}"
        );
        enroll_as(
            &svc,
            (Role::Headend, "headend-1"),
            vec![keys.enrollment("meter-1", 1), keys.enrollment("meter-2", 1)],
        )
        .await
        .unwrap();
        // Another epoch is not enrolled.
        let mut epoch2 = lin("meter-1", Channel::Export, 900, 0, 4, 9);
        epoch2.epoch = 2;
        let m = code(submit(&svc, vec![epoch2]).await, Code::FailedPrecondition);
        assert!(m.contains("epoch 2"), "{m}");

        // A partial day, then the rest; the full day over it is refused.
        let morning = lin("meter-2", Channel::Import, 900, 0, 40, 2);
        let afternoon = lin("meter-2", Channel::Import, 900, 40, 56, 3);
        assert_eq!(submit(&svc, vec![morning.clone()]).await.unwrap(), (1, 0));
        let m = code(
            submit(&svc, vec![lin("meter-2", Channel::Import, 900, 0, 96, 4)]).await,
            Code::AlreadyExists,
        );
        assert!(m.contains("meter-2") && m.contains("2026-01-01"), "{m}");
        assert!(
            m.contains("epoch 1 channel import") && m.contains("00:00–10:00"),
            "{m}"
        );
        assert_eq!(submit(&svc, vec![afternoon.clone()]).await.unwrap(), (1, 0));
        // The identical retry is a duplicate; a re-encryption of the same intervals is refused.
        assert_eq!(submit(&svc, vec![morning.clone()]).await.unwrap(), (0, 1));
        code(
            submit(&svc, vec![lin("meter-2", Channel::Import, 900, 0, 40, 5)]).await,
            Code::AlreadyExists,
        );
        assert_eq!(stored(&svc, "meter-2"), [morning, afternoon]);

        // A head-end taking slots of the future (a day after tomorrow, UTC): refused, nothing
        // stored; tomorrow is still accepted (meters in time zones ahead of UTC).
        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            / DAY_SECONDS;
        let on = |day: i64| {
            let bodies = vec![1u128 << 64; 4];
            psm_core::wire::linear_batch_to_proto(
                "meter-2",
                day,
                1,
                Channel::Import,
                900,
                0,
                &bodies,
            )
        };
        let m = code(
            submit(&svc, vec![on(today + 2)]).await,
            Code::InvalidArgument,
        );
        assert!(m.contains("after tomorrow"), "{m}");
        assert_eq!(submit(&svc, vec![on(today + 1)]).await.unwrap(), (1, 0));

        // Two overlapping batches in one request: INVALID_ARGUMENT, nothing stored.
        let m = code(
            submit(
                &svc,
                vec![full.clone(), lin("meter-1", Channel::Import, 3600, 5, 1, 6)],
            )
            .await,
            Code::InvalidArgument,
        );
        assert!(m.contains("batch 1") && m.contains("batch 0"), "{m}");
        // The same batch twice is fine; another channel is another key.
        let export = lin("meter-1", Channel::Export, 300, 0, 288, 7);
        assert_eq!(
            submit(&svc, vec![full.clone(), full.clone(), export.clone()])
                .await
                .unwrap(),
            (2, 1)
        );
        // Malformed input.
        let mut day = lin("meter-1", Channel::Import, 900, 0, 4, 8);
        day.day = "2026-01-+1".into();
        let mut key = lin("meter-1", Channel::Import, 900, 0, 4, 8);
        key.key = Some(psm_proto::v1::KeyRef {
            key_id: "linear-1".into(),
        });
        let mut hash = lin("meter-1", Channel::Import, 900, 0, 4, 8);
        hash.ciphertext[3] ^= 1;
        let mut channel = lin("meter-1", Channel::Import, 900, 0, 4, 8);
        channel.channel = 0;
        let mut count = lin("meter-1", Channel::Import, 900, 90, 7, 8);
        count.count = 7;
        for (what, b, needle) in [
            ("day", day, "day"),
            ("key", key, "key"),
            ("hash", hash, "ciphertext_hash"),
            ("channel", channel, "channel"),
            ("past the day", count, "count"),
        ] {
            let m = code(submit(&svc, vec![b]).await, Code::InvalidArgument);
            assert!(
                m.contains(needle) && m.contains("nothing was stored"),
                "{what}: {m}"
            );
        }
        let m = code(
            submit(&svc, vec![lin("other-1", Channel::Import, 900, 0, 4, 8)]).await,
            Code::PermissionDenied,
        );
        assert!(m.contains("other-1"), "{m}");
        assert_eq!(stored(&svc, "meter-1"), [full, export]);
    }
}
