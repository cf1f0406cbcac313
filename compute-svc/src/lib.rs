//! compute-svc: sums meters' encrypted readings (linear track: bills, aggregates) or evaluates
//! programs on tfhe ciphertexts (demand charges, tiers, analytics), and has only the results
//! released by a quorum of keyshares. The binary is a thin wrapper over [`run`].

pub mod aggregate;
pub mod analytics;
pub mod bill;
pub mod decrypt;
pub mod error;
pub mod inputs;
pub mod job_queue;
pub mod jobs;
pub mod tfhe;

use crate::error::ComputeError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use psm_core::ceremony::PublicBundle;

use prost::Message;
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
    /// Where jobs and their progress live (`[compute.jobs]`): in this replica's memory by
    /// default, or in PostgreSQL so that several replicas share them.
    #[serde(default)]
    pub jobs: job_queue::JobsConfig,
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
#[derive(Clone)]
pub struct ComputeService {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Option<Engine>,
    /// Progress of the jobs this replica runs (WatchJob's source without a queue).
    jobs: jobs::Jobs,
    /// The jobs table shared with other replicas, when configured.
    queue: Option<Arc<job_queue::JobQueue>>,
    /// Jobs of stopped replicas this replica runs at once.
    takeovers: Arc<tokio::sync::Semaphore>,
}

/// One of the three job requests, as a job.
#[derive(Clone)]
enum JobRequest {
    /// Boxed: a tariff with its holidays makes a bill request far larger than the others.
    Bill(Box<BillRequest>),
    Aggregate(AggregateRequest),
    Analytics(AnalyticsRequest),
}

impl JobRequest {
    fn kind(&self) -> &'static str {
        match self {
            JobRequest::Bill(_) => "bill",
            JobRequest::Aggregate(_) => "aggregate",
            JobRequest::Analytics(_) => "analytics",
        }
    }

    fn key(&self) -> &str {
        match self {
            JobRequest::Bill(r) => &r.idempotency_key,
            JobRequest::Aggregate(r) => &r.idempotency_key,
            JobRequest::Analytics(r) => &r.idempotency_key,
        }
    }

    /// What the key promises to name: the request without its key.
    fn fingerprint(&self) -> [u8; 32] {
        match self {
            JobRequest::Bill(r) => jobs::fingerprint(
                self.kind(),
                &BillRequest {
                    idempotency_key: String::new(),
                    ..(**r).clone()
                },
            ),
            JobRequest::Aggregate(r) => jobs::fingerprint(
                self.kind(),
                &AggregateRequest {
                    idempotency_key: String::new(),
                    ..r.clone()
                },
            ),
            JobRequest::Analytics(r) => jobs::fingerprint(
                self.kind(),
                &AnalyticsRequest {
                    idempotency_key: String::new(),
                    ..r.clone()
                },
            ),
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            JobRequest::Bill(r) => r.encode_to_vec(),
            JobRequest::Aggregate(r) => r.encode_to_vec(),
            JobRequest::Analytics(r) => r.encode_to_vec(),
        }
    }

    /// A request stored in the jobs table by another replica.
    fn decode(kind: &str, bytes: &[u8]) -> Result<Self, ComputeError> {
        let corrupt = |e: prost::DecodeError| {
            ComputeError::internal(format!("a stored {kind} request is corrupt: {e}"))
        };
        Ok(match kind {
            "bill" => JobRequest::Bill(Box::new(BillRequest::decode(bytes).map_err(corrupt)?)),
            "aggregate" => JobRequest::Aggregate(AggregateRequest::decode(bytes).map_err(corrupt)?),
            "analytics" => JobRequest::Analytics(AnalyticsRequest::decode(bytes).map_err(corrupt)?),
            other => {
                return Err(ComputeError::internal(format!(
                    "the jobs table holds a job of unknown kind {other:?}"
                )))
            }
        })
    }
}

/// Aborts a task when dropped: a job's lease renewal ends with the job, also when the request
/// that ran it is cancelled (the lease then runs out and another replica finishes the job).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Jobs of stopped replicas one replica runs at once.
const MAX_TAKEOVERS: usize = 4;

/// How a job run on the shared table ended here.
enum Ran {
    /// With this outcome, stored.
    Outcome(Result<Vec<u8>, ComputeError>),
    /// This replica lost the lease (another one took the job over): its outcome counts.
    Lost,
}

impl ComputeService {
    /// A service with in-memory jobs.
    pub fn new(engine: Option<Engine>) -> Self {
        Self::with_queue(engine, None)
    }

    /// A service whose jobs live in `queue` (shared with other replicas) when given. Call
    /// [`ComputeService::spawn_orphan_worker`] too, so that jobs of stopped replicas finish.
    pub fn with_queue(engine: Option<Engine>, queue: Option<job_queue::JobQueue>) -> Self {
        ComputeService {
            inner: Arc::new(Inner {
                engine,
                jobs: jobs::Jobs::default(),
                queue: queue.map(Arc::new),
                takeovers: Arc::new(tokio::sync::Semaphore::new(MAX_TAKEOVERS)),
            }),
        }
    }

    /// Looks for jobs whose replica stopped (lease run out) every half lease and runs them
    /// (at most MAX_TAKEOVERS at once), and deletes long-finished jobs hourly. Without a queue
    /// there is nothing to do.
    pub fn spawn_orphan_worker(&self) {
        let Some(q) = self.inner.queue.clone() else {
            return;
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut last_prune: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(q.lease() / 2).await;
                Inner::take_over_orphans(&inner).await;
                if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3_600)) {
                    match q.prune().await {
                        Ok(n) if n > 0 => tracing::info!(deleted = n, "deleted long-finished jobs"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "could not delete finished jobs"),
                    }
                    last_prune = Some(tokio::time::Instant::now());
                }
            }
        });
    }
}

impl Inner {
    fn engine(&self) -> Result<&Engine, ComputeError> {
        self.engine.as_ref().ok_or_else(|| {
            ComputeError::precondition(
                "compute is not connected: configure [compute] public_dir, ingest_url and keyshares",
            )
        })
    }

    /// Runs a request as a job, or returns the result the same key already has.
    async fn submit(&self, req: JobRequest) -> Result<Vec<u8>, ComputeError> {
        self.engine()?;
        inputs::check_idempotency_key(req.key())?;
        let Some(q) = &self.queue else {
            let job = self.jobs.start(req.key(), req.kind(), req.fingerprint())?;
            return self.execute(&req, &job).await;
        };
        let (fingerprint, bytes) = (req.fingerprint(), req.encode());
        // A caller waits for a job another replica runs as long as a job may run, and a lease.
        let deadline = tokio::time::Instant::now() + q.max_job() + q.lease();
        loop {
            match q
                .submit(req.key(), req.kind(), &fingerprint, &bytes)
                .await?
            {
                job_queue::Claim::Done(bytes) => return Ok(bytes),
                job_queue::Claim::Run(token) => match self.run_shared(q, &req, token).await {
                    Ran::Outcome(r) => return r,
                    Ran::Lost => {}
                },
                job_queue::Claim::Running => {}
            }
            // Another replica runs it: wait for its outcome, or for its lease to run out (then
            // the next submit takes it over).
            loop {
                if tokio::time::Instant::now() > deadline {
                    return Err(ComputeError::unavailable(format!(
                        "job {:?} is still running on another compute replica; follow it with WatchJob or retry with the same key",
                        req.key()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                match q.get(req.key()).await? {
                    Some(row) => match (row.state.as_str(), row.result, row.error) {
                        ("done", Some(bytes), _) => return Ok(bytes),
                        ("failed", _, Some(status)) => return Err(ComputeError::Upstream(status)),
                        _ if row.expired => break,
                        _ => {}
                    },
                    // Pruned meanwhile: submit afresh.
                    None => break,
                }
            }
        }
    }

    /// Runs a job this replica holds the lease of (with `token`), mirroring its progress to
    /// the jobs table, which also renews the lease, and storing its outcome there. Stops as
    /// soon as the lease turns out to be another replica's.
    async fn run_shared(&self, q: &Arc<job_queue::JobQueue>, req: &JobRequest, token: i64) -> Ran {
        let key = req.key().to_owned();
        let job = match self.jobs.start(&key, req.kind(), req.fingerprint()) {
            Ok(j) => j,
            Err(e) => return Ran::Outcome(Err(e)),
        };
        let Some(mut rx) = self.jobs.watch(&key) else {
            return Ran::Outcome(Err(ComputeError::internal(
                "a started job has no progress channel",
            )));
        };
        let renew = q.lease() / 3;
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
        let mirror_q = q.clone();
        let mirror = AbortOnDrop(tokio::spawn(async move {
            loop {
                let changed = tokio::time::timeout(renew, rx.changed()).await;
                let p = rx.borrow_and_update().clone();
                match mirror_q
                    .progress(&p.idempotency_key, token, &p.step, p.percent)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) if !p.done => {
                        let _ = lost_tx.send(());
                        return;
                    }
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, job = %p.idempotency_key, "could not record job progress")
                    }
                }
                if matches!(changed, Ok(Err(_))) || p.done {
                    return;
                }
            }
        }));
        let max = q.max_job();
        let outcome = tokio::select! {
            r = tokio::time::timeout(max, self.execute(req, &job)) => match r {
                Ok(r) => r.map_err(Status::from),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "the job ran longer than {} s ([compute.jobs] max_job_secs) and was stopped",
                    max.as_secs()
                ))),
            },
            Ok(()) = lost_rx => {
                job.step("failed: another compute replica took this job over", 100);
                return Ran::Lost;
            }
        };
        drop(mirror);
        match q.finish(&key, token, &outcome).await {
            Ok(true) => {}
            Ok(false) => {
                job.step("failed: another compute replica took this job over", 100);
                return Ran::Lost;
            }
            Err(e) => {
                tracing::error!(error = %e, job = %key, "could not record the job's outcome; another replica will run it again after the lease");
            }
        }
        drop(job);
        Ran::Outcome(outcome.map_err(ComputeError::Upstream))
    }

    /// Claims jobs whose replica stopped while a takeover slot is free, each run in its own
    /// task.
    async fn take_over_orphans(this: &Arc<Inner>) {
        let Some(q) = this.queue.clone() else { return };
        loop {
            let Ok(permit) = this.takeovers.clone().try_acquire_owned() else {
                return;
            };
            let orphan = match q.claim_orphan().await {
                Ok(Some(o)) => o,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for jobs of stopped replicas");
                    return;
                }
            };
            tracing::info!(job = %orphan.key, kind = %orphan.kind, "taking over a job whose replica stopped");
            metrics::counter!("psm_compute_jobs_taken_over_total").increment(1);
            let inner = this.clone();
            let q = q.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // The stored request must be the one its key and fingerprint name (a replica of
                // another version could decode it into something else).
                let req = JobRequest::decode(&orphan.kind, &orphan.request).and_then(|r| {
                    if r.key() == orphan.key && r.fingerprint().as_slice() == orphan.fingerprint {
                        Ok(r)
                    } else {
                        Err(ComputeError::precondition(format!(
                            "the stored request of job {:?} does not match its key and fingerprint on this replica; submit it again",
                            orphan.key
                        )))
                    }
                });
                match req {
                    Ok(req) => {
                        if let Ran::Outcome(Err(e)) = inner.run_shared(&q, &req, orphan.token).await
                        {
                            tracing::info!(job = %orphan.key, error = %e, "a job taken over failed");
                        }
                    }
                    Err(e) => {
                        let _ = q
                            .finish(&orphan.key, orphan.token, &Err(Status::from(e)))
                            .await;
                    }
                }
            });
        }
    }

    /// Runs one job and encodes its response.
    async fn execute(
        &self,
        req: &JobRequest,
        job: &jobs::JobHandle,
    ) -> Result<Vec<u8>, ComputeError> {
        let e = self.engine()?;
        let r = match req.clone() {
            JobRequest::Bill(req) => bill::Biller {
                ingest: e.ingest.clone(),
                decryptor: &e.decryptor,
                tfhe: &e.tfhe,
                job,
            }
            .run(*req)
            .await
            .map(|r| r.encode_to_vec()),
            JobRequest::Aggregate(req) => aggregate::Aggregator {
                ingest: e.ingest.clone(),
                decryptor: &e.decryptor,
                min_cohort: e.min_cohort,
                job,
            }
            .run(req)
            .await
            .map(|r| r.encode_to_vec()),
            JobRequest::Analytics(req) => analytics::Analyst {
                ingest: e.ingest.clone(),
                decryptor: &e.decryptor,
                tfhe: &e.tfhe,
                min_cohort: e.min_cohort,
                job,
            }
            .run(req)
            .await
            .map(|r| r.encode_to_vec()),
        };
        if let Err(e) = &r {
            job.step(&format!("failed: {e}"), 100);
        }
        r
    }
}

fn response<T: prost::Message + Default>(bytes: Vec<u8>) -> Result<Response<T>, Status> {
    T::decode(bytes.as_slice())
        .map(Response::new)
        .map_err(|e| Status::internal(format!("a stored job result is corrupt: {e}")))
}

type ProgressStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<JobProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Compute for ComputeService {
    async fn bill(&self, r: Request<BillRequest>) -> Result<Response<BillResponse>, Status> {
        response(
            self.inner
                .submit(JobRequest::Bill(Box::new(r.into_inner())))
                .await?,
        )
    }

    async fn aggregate(
        &self,
        r: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        response(
            self.inner
                .submit(JobRequest::Aggregate(r.into_inner()))
                .await?,
        )
    }

    async fn analytics(
        &self,
        r: Request<AnalyticsRequest>,
    ) -> Result<Response<AnalyticsResponse>, Status> {
        response(
            self.inner
                .submit(JobRequest::Analytics(r.into_inner()))
                .await?,
        )
    }

    type WatchJobStream = ProgressStream;

    async fn watch_job(
        &self,
        r: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let key = r.get_ref().idempotency_key.clone();
        // With a shared table, a job this replica no longer runs (finished here, cancelled, or
        // taken over) is followed in the table, which has the last word.
        let rx = self
            .inner
            .jobs
            .watch(&key)
            .filter(|rx| self.inner.queue.is_none() || !rx.borrow().done);
        let Some(rx) = rx else {
            return self.watch_shared(key).await;
        };
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

impl ComputeService {
    /// WatchJob of a job this replica does not run: its row in the shared jobs table, polled
    /// until it ends.
    async fn watch_shared(&self, key: String) -> Result<Response<ProgressStream>, Status> {
        let not_found = || {
            Status::from(ComputeError::not_found(format!(
                "no running or recently finished job with idempotency key {key:?}"
            )))
        };
        let Some(q) = self.inner.queue.clone() else {
            return Err(not_found());
        };
        if q.get(&key).await?.is_none() {
            return Err(not_found());
        }
        // Every change, polled, until (and including) the one that marks the job done, for at
        // most as long as a job may run.
        let deadline = tokio::time::Instant::now() + q.max_job() + q.lease();
        let stream = futures::stream::unfold(
            (q, key, None::<JobProgress>, false),
            move |(q, key, last, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    if tokio::time::Instant::now() > deadline {
                        let e =
                            Status::deadline_exceeded("the job did not end within max_job_secs");
                        return Some((Err(e), (q, key, last, true)));
                    }
                    let p = match q.get(&key).await {
                        Ok(Some(row)) => row.progress,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(Status::from(e)), (q, key, last, true))),
                    };
                    if last.as_ref() != Some(&p) {
                        let done = p.done;
                        return Some((Ok(p.clone()), (q, key, Some(p), done)));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            },
        );
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
