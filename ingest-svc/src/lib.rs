//! ingest-svc: accepts encrypted reading batches from meters and head-ends, stores them durably
//! and idempotently, and serves them to compute and keyshares. The binary is a thin wrapper over
//! [`run`].

pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use psm_core::readings::{
    check_linear_shape, format_day, parse_day, validate_meter_id, DAY_SECONDS,
};
use psm_net::auth::caller;
use psm_net::Role;
use psm_proto::v1::Track;

use crate::store::{ReadingStore, StoreError};
use psm_core::registers::{RegisterVerifier, MAX_REGISTER_LIST_BYTES, REGISTER_COUNT};

use psm_core::ceremony::{CeremonyError, PublicBundle};
use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_proto::v1::ingest_server::{Ingest, IngestServer};
use psm_proto::v1::{
    GetPublicParamsRequest, PublicParamsChunk, ReadingBatch, StreamReadingsRequest,
    SubmitReadingsRequest, SubmitReadingsResponse,
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
    /// its manifest names the key ids submissions must use.
    pub public_dir: Option<PathBuf>,
    /// Meters each head-end may submit for: head-end certificate name → meter ids, where an id
    /// ending in `*` matches every id with that prefix (`"meter-*"`).
    #[serde(default)]
    pub headends: HashMap<String, Vec<String>>,
}

/// Most batches in one SubmitReadings request.
pub const MAX_BATCHES_PER_REQUEST: usize = 1_000;
/// Most meters named in one StreamReadings request.
pub const MAX_METERS_PER_STREAM: usize = 100_000;
/// Longest time range of one StreamReadings request, days.
pub const MAX_STREAM_DAYS: i64 = 400;

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
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::already_exists(format!(
            "{e}; nothing from this request was stored (a meter-day is immutable once stored)"
        )),
        StoreError::Backend(m) => {
            tracing::error!(error = %m, "reading store failed");
            Status::unavailable("the reading store is unavailable; nothing was stored, retry later")
        }
    }
}

fn valid_idempotency_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

impl IngestService {
    /// A service over `store`, serving the public bundle in `public_dir` if given (without one
    /// it cannot check key ids and refuses submissions).
    pub fn new(
        public_dir: Option<&Path>,
        store: Arc<dyn ReadingStore>,
        headends: HashMap<String, Vec<String>>,
    ) -> Result<Self, CeremonyError> {
        let bundle = public_dir
            .map(PublicBundle::open)
            .transpose()?
            .map(Arc::new);
        if let Some(b) = &bundle {
            tracing::info!(dir = %b.dir.display(), tfhe_key = %b.manifest.tfhe_key_id, linear_key = %b.manifest.linear_key_id, "serving public key material");
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
        })
    }

    /// Whether the caller may submit for `meter_id`: a meter for itself, a head-end for the
    /// meters on its list.
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
    async fn verify_proofs(&self, req: &SubmitReadingsRequest) -> Result<(), Status> {
        let mut jobs = Vec::new();
        for (i, b) in req.batches.iter().enumerate() {
            if b.track() != Track::Tfhe {
                continue;
            }
            let verifier = self.verifier.clone().ok_or_else(|| {
                Status::failed_precondition("this ingest has no key bundle; nothing was stored")
            })?;
            let permit = self
                .verify_permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Status::unavailable("ingest is shutting down"))?;
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
                .map_err(|e| Status::internal(format!("proof verification task failed: {e}")))?
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "batch {i} ({} {}): {e}; nothing was stored",
                        b.meter_id, b.day
                    ))
                })?;
        }
        Ok(())
    }

    /// Every check on a submission, before anything touches storage.
    fn validate(&self, who: &psm_net::SpiffeId, req: &SubmitReadingsRequest) -> Result<(), Status> {
        if !valid_idempotency_key(&req.idempotency_key) {
            return Err(Status::invalid_argument(
                "idempotency_key must be 1..=128 printable ASCII characters",
            ));
        }
        if req.batches.is_empty() {
            return Err(Status::invalid_argument("the request holds no batches"));
        }
        if req.batches.len() > MAX_BATCHES_PER_REQUEST {
            return Err(Status::resource_exhausted(format!(
                "{} batches in one request; the limit is {MAX_BATCHES_PER_REQUEST}",
                req.batches.len()
            )));
        }
        let bundle = self.bundle.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this ingest has no key manifest (start it with --public-dir); nothing was stored",
            )
        })?;
        let mut seen = BTreeMap::new();
        for (i, b) in req.batches.iter().enumerate() {
            let bad = |m: String| {
                Status::invalid_argument(format!(
                    "batch {i} ({} {}): {m}; nothing was stored",
                    b.meter_id, b.day
                ))
            };
            validate_meter_id(&b.meter_id).map_err(|e| bad(e.to_string()))?;
            if !self.may_submit(who, &b.meter_id) {
                return Err(Status::permission_denied(format!(
                    "{who} may not submit readings for meter {:?} (batch {i}); nothing was stored",
                    b.meter_id
                )));
            }
            parse_day(&b.day).map_err(|e| bad(e.to_string()))?;
            let key_id = b
                .key
                .as_ref()
                .map(|k| k.key_id.as_str())
                .unwrap_or_default();
            match b.track() {
                Track::Linear => {
                    if key_id != bundle.manifest.linear_key_id {
                        return Err(bad(format!(
                            "key id {key_id:?} is not this deployment's linear key {:?}",
                            bundle.manifest.linear_key_id
                        )));
                    }
                    check_linear_shape(b.interval_seconds, b.count, b.ciphertext.len())
                        .map_err(|e| bad(e.to_string()))?;
                }
                Track::Tfhe => {
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
                }
                Track::Unspecified => {
                    return Err(bad("track must be TRACK_LINEAR or TRACK_TFHE".into()))
                }
            }
            if blake3::hash(&b.ciphertext).as_bytes().as_slice() != b.ciphertext_hash.as_slice() {
                return Err(bad("ciphertext_hash is not the BLAKE3 hash of the ciphertext (truncated or corrupted?)".into()));
            }
            if let Some(prev) = seen.insert(
                (b.meter_id.as_str(), b.day.as_str(), b.track),
                &b.ciphertext_hash,
            ) {
                if *prev != b.ciphertext_hash {
                    return Err(bad(
                        "the request holds two different batches for this meter-day".into(),
                    ));
                }
            }
        }
        Ok(())
    }
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
            .send(Err(Status::data_loss(format!(
                "{} changed on disk: it no longer matches the manifest",
                path.display()
            ))))
            .await;
    }
}

type ChunkStream = tokio_stream::wrappers::ReceiverStream<Result<PublicParamsChunk, Status>>;
type BatchStream = tokio_stream::wrappers::ReceiverStream<Result<ReadingBatch, Status>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn submit_readings(
        &self,
        request: Request<SubmitReadingsRequest>,
    ) -> Result<Response<SubmitReadingsResponse>, Status> {
        let who = caller(&request)?.clone();
        let req = request.into_inner();
        self.validate(&who, &req)?;
        self.verify_proofs(&req).await?;
        let store = self.store.clone();
        let batches = req.batches;
        let outcome = tokio::task::spawn_blocking(move || store.put_all(&batches))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(store_status)?;
        tracing::info!(caller = %who, key = %req.idempotency_key, stored = outcome.stored, duplicates = outcome.duplicates, "readings stored durably");
        Ok(Response::new(SubmitReadingsResponse {
            stored: outcome.stored,
            duplicates: outcome.duplicates,
        }))
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
            .ok_or_else(|| Status::invalid_argument("range is required"))?;
        if range.end_unix <= range.start_unix {
            return Err(Status::invalid_argument(
                "range end must be after its start",
            ));
        }
        let first = range.start_unix.div_euclid(DAY_SECONDS);
        let last = (range.end_unix - 1).div_euclid(DAY_SECONDS);
        if last - first + 1 > MAX_STREAM_DAYS {
            return Err(Status::invalid_argument(format!(
                "range spans {} days; the limit is {MAX_STREAM_DAYS}",
                last - first + 1
            )));
        }
        let (from_day, to_day) = (format_day(first), format_day(last));
        if req.meter_ids.len() > MAX_METERS_PER_STREAM {
            return Err(Status::resource_exhausted(format!(
                "{} meters in one request; the limit is {MAX_METERS_PER_STREAM}",
                req.meter_ids.len()
            )));
        }
        for m in &req.meter_ids {
            validate_meter_id(m).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if req.meter_ids.is_empty() && who.role != Role::Compute {
            return Err(Status::invalid_argument(
                "name the meters: only role compute may stream every meter",
            ));
        }
        let track = req.track;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            let meters = if req.meter_ids.is_empty() {
                match store.meters() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(store_status(e)));
                        return;
                    }
                }
            } else {
                req.meter_ids
            };
            for m in meters {
                match store.scan(&m, &from_day, &to_day) {
                    Ok(batches) => {
                        for b in batches {
                            if track != 0 && b.track != track {
                                continue;
                            }
                            if tx.blocking_send(Ok(b)).is_err() {
                                return; // the caller went away
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(store_status(e)));
                        return;
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
            Status::failed_precondition(
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
                return Err(Status::invalid_argument(format!(
                    "name or hash is required; names: {names:?}"
                )))
            }
            ("", Some(h)) => names
                .iter()
                .filter_map(|n| by_name(n))
                .find(|(_, ih)| ih == h),
            (n, h) => by_name(n).filter(|(_, ih)| h.as_ref().is_none_or(|h| h == ih)),
        };
        let (path, hash_hex) = found.ok_or_else(|| {
            Status::not_found(format!(
                "no public item matches name {:?} and hash {:?}; names: {names:?}",
                r.name,
                wanted_hash.unwrap_or_default()
            ))
        })?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&hash_hex, &mut hash)
            .map_err(|e| Status::internal(format!("manifest hash is not hex: {e}")))?;
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
