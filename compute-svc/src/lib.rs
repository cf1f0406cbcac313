//! compute-svc: sums meters' encrypted readings (linear track: bills, aggregates) or evaluates
//! programs on tfhe ciphertexts (demand charges, tiers, analytics), and has only the results
//! released by a quorum of keyshares. The binary is a thin wrapper over [`run`].

pub mod aggregate;
pub mod analytics;
pub mod bill;
pub mod decrypt;
pub mod error;
pub mod inputs;
pub mod jobs;
pub mod tfhe;

use crate::error::ComputeError;
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
    /// Smallest cohort an aggregate is released for (default 5); also the smallest effective
    /// cohort of one output interval (smaller ones are withheld).
    pub min_cohort: Option<usize>,
    /// Expanded tfhe-track meter-days kept in memory for reuse (~0.5 MB each; default 512).
    pub expanded_cache_meter_days: Option<usize>,
    /// How long to wait for a keyshare's answer, seconds (default 600: keyshares that
    /// re-execute a tfhe program take as long as compute did).
    pub keyshare_timeout_secs: Option<u64>,
}

/// Default smallest cohort for aggregates.
pub const DEFAULT_MIN_COHORT: usize = 5;

/// What compute needs to evaluate and decrypt: ingest, the keyshares, the key manifest.
pub struct Engine {
    ingest: tonic::transport::Channel,
    decryptor: decrypt::ThresholdDecryptor,
    min_cohort: usize,
    tfhe: tfhe::TfheEngine,
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
            Duration::from_secs(c.keyshare_timeout_secs.unwrap_or(600).max(1)),
        )?;
        let ingest = psm_net::client::channel(
            ingest_url,
            c.ingest_server_name.as_deref().unwrap_or("ingest"),
            Some(psm_net::Role::Ingest),
            &settings.tls,
            &psm_net::client::ClientOptions::default(),
        )?;
        Ok(Some(Engine {
            ingest,
            decryptor,
            min_cohort: c.min_cohort.unwrap_or(DEFAULT_MIN_COHORT).max(1),
            tfhe: tfhe::TfheEngine::new(
                public_dir.clone(),
                manifest.tfhe_key_id.clone(),
                c.expanded_cache_meter_days.unwrap_or(512),
            ),
        }))
    }
}

/// The Compute gRPC service.
#[derive(Default)]
pub struct ComputeService {
    engine: Option<Engine>,
    jobs: jobs::Jobs,
}

impl ComputeService {
    pub fn new(engine: Option<Engine>) -> Self {
        ComputeService {
            engine,
            jobs: jobs::Jobs::default(),
        }
    }

    fn engine(&self) -> Result<&Engine, ComputeError> {
        self.engine.as_ref().ok_or_else(|| {
            ComputeError::precondition(
                "compute is not connected: configure [compute] public_dir, ingest_url and keyshares",
            )
        })
    }
}

/// A job's outcome: a failure is published to watchers before the handle ends the job.
fn finish<T>(job: &jobs::JobHandle, r: Result<T, ComputeError>) -> Result<Response<T>, Status> {
    if let Err(e) = &r {
        job.step(&format!("failed: {e}"), 100);
    }
    r.map(Response::new).map_err(Status::from)
}

type ProgressStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<JobProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn bill(&self, r: Request<BillRequest>) -> Result<Response<BillResponse>, Status> {
        let e = self.engine()?;
        let req = r.into_inner();
        inputs::check_idempotency_key(&req.idempotency_key)?;
        let request = jobs::fingerprint(
            "bill",
            &BillRequest {
                idempotency_key: String::new(),
                ..req.clone()
            },
        );
        let job = self.jobs.start(&req.idempotency_key, "bill", request)?;
        let biller = bill::Biller {
            ingest: e.ingest.clone(),
            decryptor: &e.decryptor,
            tfhe: &e.tfhe,
            job: &job,
        };
        finish(&job, biller.run(req).await)
    }

    async fn aggregate(
        &self,
        r: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        let e = self.engine()?;
        let req = r.into_inner();
        inputs::check_idempotency_key(&req.idempotency_key)?;
        let request = jobs::fingerprint(
            "aggregate",
            &AggregateRequest {
                idempotency_key: String::new(),
                ..req.clone()
            },
        );
        let job = self
            .jobs
            .start(&req.idempotency_key, "aggregate", request)?;
        let agg = aggregate::Aggregator {
            ingest: e.ingest.clone(),
            decryptor: &e.decryptor,
            min_cohort: e.min_cohort,
            job: &job,
        };
        finish(&job, agg.run(req).await)
    }

    async fn analytics(
        &self,
        r: Request<AnalyticsRequest>,
    ) -> Result<Response<AnalyticsResponse>, Status> {
        let e = self.engine()?;
        let req = r.into_inner();
        inputs::check_idempotency_key(&req.idempotency_key)?;
        let request = jobs::fingerprint(
            "analytics",
            &AnalyticsRequest {
                idempotency_key: String::new(),
                ..req.clone()
            },
        );
        let job = self
            .jobs
            .start(&req.idempotency_key, "analytics", request)?;
        let analyst = analytics::Analyst {
            ingest: e.ingest.clone(),
            decryptor: &e.decryptor,
            tfhe: &e.tfhe,
            min_cohort: e.min_cohort,
            job: &job,
        };
        finish(&job, analyst.run(req).await)
    }

    type WatchJobStream = ProgressStream;

    async fn watch_job(
        &self,
        r: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let key = &r.get_ref().idempotency_key;
        let rx = self.jobs.watch(key).ok_or_else(|| {
            ComputeError::not_found(format!(
                "no running or recently finished job with idempotency key {key:?}"
            ))
        })?;
        // Every change until (and including) the one that marks the job done.
        let stream = futures::stream::unfold((rx, false), |(mut rx, ended)| async move {
            if ended {
                return None;
            }
            let p = rx.borrow_and_update().clone();
            if !p.done && rx.changed().await.is_err() {
                let last = rx.borrow().clone();
                return Some((Ok(last), (rx, true)));
            }
            let done = p.done;
            Some((Ok(p), (rx, done)))
        });
        Ok(Response::new(Box::pin(stream)))
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
