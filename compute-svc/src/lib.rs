//! compute-svc: evaluates bills and analytics homomorphically and has only the results
//! threshold-decrypted by a quorum of keyshares. The binary is a thin wrapper over [`run`].

pub mod decrypt;

use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_proto::v1::compute_server::{Compute, ComputeServer};
use psm_proto::v1::{
    AggregateRequest, AggregateResponse, AnalyticsRequest, AnalyticsResponse, BillRequest,
    BillResponse, JobProgress, WatchJobRequest,
};
use serde::Deserialize;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// Default API address of compute.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7402";

/// The `[compute]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSection {}

/// The Compute gRPC service.
#[derive(Default)]
pub struct ComputeService {}

const NOT_YET: &str = "this compute build has no evaluation engine yet";

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn bill(&self, _r: Request<BillRequest>) -> Result<Response<BillResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn aggregate(
        &self,
        _r: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn analytics(
        &self,
        _r: Request<AnalyticsRequest>,
    ) -> Result<Response<AnalyticsResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    type WatchJobStream = tokio_stream::Iter<std::vec::IntoIter<Result<JobProgress, Status>>>;

    async fn watch_job(
        &self,
        r: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(Status::not_found(format!(
            "no job with idempotency key {:?}",
            r.get_ref().idempotency_key
        )))
    }
}

/// The service's routes with its message-size limits applied.
pub fn routes(settings: &ServerSettings, svc: ComputeService) -> Routes {
    Routes::new(
        ComputeServer::new(svc)
            .max_decoding_message_size(settings.max_request_bytes)
            .max_encoding_message_size(DEFAULT_MAX_RESPONSE_BYTES),
    )
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: ServerSettings) -> Result<(), psm_net::NetError> {
    psm_net::server::run(
        &settings,
        routes(&settings, ComputeService::default()),
        &[psm_proto::service_names::COMPUTE],
    )
    .await
}
