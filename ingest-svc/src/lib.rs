//! ingest-svc: accepts encrypted reading batches from meters and head-ends, stores them durably
//! and idempotently, and serves them to compute and keyshares. The binary is a thin wrapper over
//! [`run`].

use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_proto::v1::ingest_server::{Ingest, IngestServer};
use psm_proto::v1::{
    GetPublicParamsRequest, PublicParamsChunk, ReadingBatch, StreamReadingsRequest,
    SubmitReadingsRequest, SubmitReadingsResponse,
};
use serde::Deserialize;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// Default API address of ingest.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7401";

/// The `[ingest]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {}

/// The Ingest gRPC service.
#[derive(Default)]
pub struct IngestService {}

type ChunkStream = tokio_stream::Iter<std::vec::IntoIter<Result<PublicParamsChunk, Status>>>;
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
        _request: Request<GetPublicParamsRequest>,
    ) -> Result<Response<Self::GetPublicParamsStream>, Status> {
        Err(Status::unimplemented(
            "this ingest build serves no public key bundle yet",
        ))
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
pub async fn run(settings: ServerSettings) -> Result<(), psm_net::NetError> {
    psm_net::server::run(
        &settings,
        routes(&settings, IngestService::default()),
        &[psm_proto::service_names::INGEST],
    )
    .await
}
