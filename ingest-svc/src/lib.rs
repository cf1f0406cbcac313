//! ingest-svc: accepts encrypted reading batches from meters and head-ends, stores them durably
//! and idempotently, and serves them to compute and keyshares. The binary is a thin wrapper over
//! [`run`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Public bundle directory from `psm ceremony` (`<out>/public`), served by GetPublicParams.
    pub public_dir: Option<PathBuf>,
}

/// Size of one GetPublicParams chunk: well under the 4 MiB default limit of gRPC clients.
pub const CHUNK_BYTES: usize = 2 << 20;

/// The Ingest gRPC service.
#[derive(Default)]
pub struct IngestService {
    bundle: Option<Arc<PublicBundle>>,
}

impl IngestService {
    /// A service serving the public bundle in `public_dir`, if given.
    pub fn new(public_dir: Option<&Path>) -> Result<Self, CeremonyError> {
        let bundle = public_dir
            .map(PublicBundle::open)
            .transpose()?
            .map(Arc::new);
        if let Some(b) = &bundle {
            tracing::info!(dir = %b.dir.display(), tfhe_key = %b.manifest.tfhe_key_id, linear_key = %b.manifest.linear_key_id, "serving public key material");
        }
        Ok(IngestService { bundle })
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
type BatchStream = tokio_stream::Iter<std::vec::IntoIter<Result<ReadingBatch, Status>>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn submit_readings(
        &self,
        _request: Request<SubmitReadingsRequest>,
    ) -> Result<Response<SubmitReadingsResponse>, Status> {
        Err(Status::unimplemented(
            "this ingest build has no reading store yet; nothing was stored",
        ))
    }

    type StreamReadingsStream = BatchStream;

    async fn stream_readings(
        &self,
        _request: Request<StreamReadingsRequest>,
    ) -> Result<Response<Self::StreamReadingsStream>, Status> {
        Err(Status::unimplemented(
            "this ingest build has no reading store yet",
        ))
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
