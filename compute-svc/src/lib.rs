//! compute-svc: evaluates bills and analytics homomorphically and has only the results
//! threshold-decrypted by a quorum of keyshares. The binary is a thin wrapper over [`run`].

pub mod aggregate;
pub mod bill;
pub mod decrypt;
pub mod inputs;

use std::path::PathBuf;
use std::time::Duration;

use psm_core::ceremony::PublicBundle;

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
pub struct ComputeSection {
    /// Public bundle directory from `psm ceremony` (`<out>/public`): key ids and parties.
    pub public_dir: Option<PathBuf>,
    /// Ingest URL, e.g. `https://127.0.0.1:7401`.
    pub ingest_url: Option<String>,
    /// DNS name in ingest's certificate (default `ingest`).
    pub ingest_server_name: Option<String>,
    /// The keyshares to ask for partial decryptions.
    #[serde(default)]
    pub keyshares: Vec<decrypt::KeyshareEndpoint>,
    /// Smallest cohort an aggregate is released for (default 5).
    pub min_cohort: Option<usize>,
    /// Most meters summed into one decrypted shard (default: as many as the flooding
    /// invariants allow).
    pub max_shard_meters: Option<usize>,
}

/// Default smallest cohort for aggregates.
pub const DEFAULT_MIN_COHORT: usize = 5;

/// What compute needs to evaluate and decrypt: ingest, the keyshares, the key manifest.
pub struct Engine {
    ingest: tonic::transport::Channel,
    decryptor: decrypt::ThresholdDecryptor,
    linear_key_id: String,
    min_cohort: usize,
    max_shard_meters: usize,
}

impl Engine {
    /// Builds the engine from the `[compute]` section; `None` when it names no ingest, key set
    /// or keyshares (the service then answers FAILED_PRECONDITION explaining what is missing).
    pub fn from_config(
        settings: &ServerSettings,
        c: &ComputeSection,
    ) -> Result<Option<Self>, Box<dyn std::error::Error + Send + Sync>> {
        let (Some(public_dir), Some(ingest_url)) = (&c.public_dir, &c.ingest_url) else {
            return Ok(None);
        };
        if c.keyshares.is_empty() {
            return Ok(None);
        }
        let manifest = PublicBundle::open(public_dir)?.manifest;
        let decryptor = decrypt::ThresholdDecryptor::new(
            manifest.clone(),
            &c.keyshares,
            &settings.tls,
            Duration::from_millis(300),
            Duration::from_secs(120),
        )?;
        let ingest = psm_net::client::channel(
            ingest_url,
            c.ingest_server_name.as_deref().unwrap_or("ingest"),
            &settings.tls,
            &psm_net::client::ClientOptions::default(),
        )?;
        Ok(Some(Engine {
            ingest,
            decryptor,
            linear_key_id: manifest.linear_key_id,
            min_cohort: c.min_cohort.unwrap_or(DEFAULT_MIN_COHORT),
            max_shard_meters: c.max_shard_meters.unwrap_or(usize::MAX).max(1),
        }))
    }
}

/// The Compute gRPC service.
#[derive(Default)]
pub struct ComputeService {
    engine: Option<Engine>,
}

impl ComputeService {
    pub fn new(engine: Option<Engine>) -> Self {
        ComputeService { engine }
    }

    fn engine(&self) -> Result<&Engine, Status> {
        self.engine.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "compute is not connected: configure [compute] public_dir, ingest_url and keyshares",
            )
        })
    }
}

const NOT_YET: &str = "this compute build does not evaluate tfhe-track analytics yet";

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn bill(&self, r: Request<BillRequest>) -> Result<Response<BillResponse>, Status> {
        let e = self.engine()?;
        let biller = bill::Biller {
            ingest: e.ingest.clone(),
            decryptor: &e.decryptor,
            linear_key_id: &e.linear_key_id,
        };
        biller.run(r.into_inner()).await.map(Response::new)
    }

    async fn aggregate(
        &self,
        r: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        let e = self.engine()?;
        let agg = aggregate::Aggregator {
            ingest: e.ingest.clone(),
            decryptor: &e.decryptor,
            linear_key_id: &e.linear_key_id,
            min_cohort: e.min_cohort,
            max_shard_meters: e.max_shard_meters,
        };
        agg.run(r.into_inner()).await.map(Response::new)
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
pub async fn run(settings: ServerSettings, svc: ComputeService) -> Result<(), psm_net::NetError> {
    psm_net::server::run(
        &settings,
        routes(&settings, svc),
        &[psm_proto::service_names::COMPUTE],
    )
    .await
}
