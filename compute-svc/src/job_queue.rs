//! Jobs shared by compute replicas in PostgreSQL (`[compute.jobs] backend = "postgres"`).
//!
//! A Bill, Aggregate or Analytics request is recorded under its idempotency key with the
//! request itself and a lease held by the replica that runs it. Progress goes to the row (which
//! renews the lease), so WatchJob answers on any replica; the response or the final status goes
//! there too, so the same key on another replica returns the same result without running again.
//! A replica that stops mid-job stops renewing: once the lease has run out, the next replica
//! that looks claims the job (`FOR UPDATE SKIP LOCKED`, so two never claim one) and runs it from
//! the stored request. Running a job twice is harmless: every release is deterministic and the
//! keyshares treat the same release again as the same release.

use std::time::Duration;

use psm_proto::v1::JobProgress;
use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::ComputeError;

/// Compute's schema versions (migration table `_psm_compute_migrations`).
pub const SCHEMA: &[psm_pg::Version] = &[psm_pg::Version {
    version: 1,
    description: "jobs",
    sql: include_str!("../migrations/0001_jobs.sql"),
}];

/// Environment variable that overrides `[compute.jobs] url`.
pub const DATABASE_URL_ENV: &str = "PSM_COMPUTE_DATABASE_URL";

/// A job that stopped this many replicas is failed rather than handed to another.
pub const MAX_ATTEMPTS: i32 = 3;

/// Where compute keeps its jobs (`[compute.jobs]`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// `memory` (the default: this replica only) or `postgres` (shared by every replica).
    #[serde(default)]
    pub backend: JobsBackend,
    /// PostgreSQL URL; `PSM_COMPUTE_DATABASE_URL` overrides it. May be ingest's database:
    /// each service has its own tables and migration table.
    pub url: Option<String>,
    /// Connections this replica keeps open (default 16).
    pub max_connections: Option<u32>,
    /// Seconds a request waits for a free connection (default 10).
    pub acquire_timeout_secs: Option<u64>,
    /// Seconds a replica's lease on a running job lasts without renewal (default 30; renewed
    /// every third of it). After a replica stops, its jobs are taken over this long after.
    pub lease_secs: Option<u64>,
    /// This replica's name in the jobs table (default: host name and process id).
    pub replica: Option<String>,
    /// Longest a job may run, seconds (default 3600); then it fails with DEADLINE_EXCEEDED
    /// rather than hold its lease for ever.
    pub max_job_secs: Option<u64>,
    /// Finished and failed jobs (their requests and results) are deleted this many days after
    /// they ended (default 30); a key is free again after that.
    pub keep_finished_days: Option<u32>,
    /// Longest statement (default 60 s) and lock wait (default 10 s).
    pub statement_timeout_secs: Option<u64>,
    pub lock_timeout_secs: Option<u64>,
}

/// The job backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobsBackend {
    #[default]
    Memory,
    Postgres,
}

/// The shared jobs table of one replica.
pub struct JobQueue {
    pool: PgPool,
    replica: String,
    lease: Duration,
    max_job: Duration,
    keep_finished_days: i32,
}

/// What a replica should do with a request it received.
pub enum Claim {
    /// Run it: this replica holds the lease with this token.
    Run(i64),
    /// It finished before: its stored response.
    Done(Vec<u8>),
    /// Another replica holds the lease: wait for its outcome.
    Running,
}

/// A job to take over from a replica that stopped.
pub struct Orphan {
    pub key: String,
    pub kind: String,
    pub fingerprint: Vec<u8>,
    pub request: Vec<u8>,
    /// The lease token this replica now holds.
    pub token: i64,
}

/// A job's row as WatchJob reports it.
pub struct JobRow {
    pub progress: JobProgress,
    pub state: String,
    /// A running job whose lease ran out (its replica stopped).
    pub expired: bool,
    pub result: Option<Vec<u8>>,
    pub error: Option<tonic::Status>,
}

fn db(e: sqlx::Error) -> ComputeError {
    tracing::error!(error = %e, "compute jobs database failed");
    ComputeError::unavailable(format!(
        "the compute jobs database is unavailable ({e}); retry with the same idempotency key"
    ))
}

/// The status of a job that stopped `attempts` replicas.
fn abandoned(attempts: i32) -> tonic::Status {
    tonic::Status::aborted(format!(
        "abandoned: the job stopped {attempts} compute replicas; submit it again with the same key to retry"
    ))
}

fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "compute".into());
    format!("{host}/{}", std::process::id())
}

impl JobQueue {
    /// Connects and migrates, when `config` asks for PostgreSQL; `None` for in-memory jobs.
    pub async fn open(config: &JobsConfig) -> Result<Option<Self>, psm_pg::PgError> {
        if config.backend == JobsBackend::Memory {
            if config.url.is_some() {
                return Err(psm_pg::PgError::Config(
                    "[compute.jobs] url is set but backend is memory; set backend = \"postgres\" or remove the url".into(),
                ));
            }
            return Ok(None);
        }
        let pg = psm_pg::PgConfig {
            url: config.url.clone(),
            max_connections: config.max_connections,
            acquire_timeout_secs: config.acquire_timeout_secs,
            statement_timeout_secs: config.statement_timeout_secs,
            lock_timeout_secs: config.lock_timeout_secs,
        };
        let url = pg.resolved_url(DATABASE_URL_ENV)?;
        let pool = pg.connect(&url, "compute", SCHEMA).await?;
        Ok(Some(JobQueue {
            pool,
            replica: config.replica.clone().unwrap_or_else(default_replica),
            lease: Duration::from_secs(config.lease_secs.unwrap_or(30).max(1)),
            max_job: Duration::from_secs(config.max_job_secs.unwrap_or(3_600).max(1)),
            keep_finished_days: i32::try_from(config.keep_finished_days.unwrap_or(30).max(1))
                .unwrap_or(i32::MAX),
        }))
    }

    /// How long a lease lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a job may run.
    pub fn max_job(&self) -> Duration {
        self.max_job
    }

    fn lease_interval(&self) -> sqlx::postgres::types::PgInterval {
        sqlx::postgres::types::PgInterval {
            months: 0,
            days: 0,
            microseconds: i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX),
        }
    }

    /// Records a request under `key`, or finds it: [`Claim::Run`] when this replica is to run
    /// it (new, failed before, or its replica's lease ran out), [`Claim::Done`] with the stored
    /// response, [`Claim::Running`] while another replica holds the lease. A key recorded for
    /// another request is ALREADY_EXISTS.
    pub async fn submit(
        &self,
        key: &str,
        kind: &str,
        fingerprint: &[u8; 32],
        request: &[u8],
    ) -> Result<Claim, ComputeError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let inserted = sqlx::query(
            "INSERT INTO compute_jobs (idempotency_key, kind, fingerprint, request, state, replica,
                 lease_until, step, percent)
             VALUES ($1, $2, $3, $4, 'running', $5, now() + $6, 'queued', 0)
             ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(kind)
        .bind(fingerprint.as_slice())
        .bind(request)
        .bind(&self.replica)
        .bind(self.lease_interval())
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 1 {
            tx.commit().await.map_err(db)?;
            return Ok(Claim::Run(1));
        }
        let row = sqlx::query(
            "SELECT fingerprint, state, result, lease_until < now() AS expired, attempts
             FROM compute_jobs WHERE idempotency_key = $1 FOR UPDATE",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let stored: Vec<u8> = row.try_get("fingerprint").map_err(db)?;
        if stored != fingerprint.as_slice() {
            return Err(ComputeError::already_exists(format!(
                "idempotency key {key:?} was already used for a different request; choose a new key for a new request"
            )));
        }
        let state: String = row.try_get("state").map_err(db)?;
        let expired: bool = row.try_get("expired").map_err(db)?;
        let attempts: i32 = row.try_get("attempts").map_err(db)?;
        let attempts = match state.as_str() {
            "done" => {
                let result: Option<Vec<u8>> = row.try_get("result").map_err(db)?;
                return result.map(Claim::Done).ok_or_else(|| {
                    ComputeError::internal(format!(
                        "job {key:?} is marked done but has no stored result"
                    ))
                });
            }
            "running" if !expired => return Ok(Claim::Running),
            "running" if attempts >= MAX_ATTEMPTS => {
                let status = abandoned(attempts);
                sqlx::query(
                    "UPDATE compute_jobs SET state = 'failed', error_code = $2, error_message = $3,
                         step = 'failed: abandoned', percent = 100, updated = now()
                     WHERE idempotency_key = $1",
                )
                .bind(key)
                .bind(status.code() as i32)
                .bind(status.message())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                return Err(ComputeError::Upstream(status));
            }
            // Its replica stopped: one more attempt.
            "running" => attempts + 1,
            // Failed before: the same request again runs again, counted afresh.
            _ => 1,
        };
        let token: i64 = sqlx::query(
            "UPDATE compute_jobs SET state = 'running', replica = $2, lease_until = now() + $3,
                 attempts = $4, lease_token = lease_token + 1, step = 'queued', percent = 0,
                 result = NULL, error_code = NULL, error_message = NULL, updated = now()
             WHERE idempotency_key = $1 RETURNING lease_token",
        )
        .bind(key)
        .bind(&self.replica)
        .bind(self.lease_interval())
        .bind(attempts)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .try_get("lease_token")
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Claim::Run(token))
    }

    /// Claims one running job whose lease ran out, if any. Jobs that already stopped
    /// [`MAX_ATTEMPTS`] replicas are failed instead.
    pub async fn claim_orphan(&self) -> Result<Option<Orphan>, ComputeError> {
        let status = abandoned(MAX_ATTEMPTS);
        sqlx::query(
            "UPDATE compute_jobs SET state = 'failed', error_code = $1, percent = 100,
                 error_message = $3, step = 'failed: abandoned', updated = now()
             WHERE state = 'running' AND lease_until < now() AND attempts >= $2",
        )
        .bind(status.code() as i32)
        .bind(MAX_ATTEMPTS)
        .bind(status.message())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        let row = sqlx::query(
            "UPDATE compute_jobs SET replica = $1, lease_until = now() + $2,
                 attempts = attempts + 1, lease_token = lease_token + 1, updated = now()
             WHERE idempotency_key = (
                 SELECT idempotency_key FROM compute_jobs
                 WHERE state = 'running' AND lease_until < now()
                 ORDER BY lease_until LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING idempotency_key, kind, fingerprint, request, lease_token",
        )
        .bind(&self.replica)
        .bind(self.lease_interval())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(Orphan {
                key: r.try_get("idempotency_key").map_err(db)?,
                kind: r.try_get("kind").map_err(db)?,
                fingerprint: r.try_get("fingerprint").map_err(db)?,
                request: r.try_get("request").map_err(db)?,
                token: r.try_get("lease_token").map_err(db)?,
            })
        })
        .transpose()
    }

    /// Publishes progress and renews the lease held with `token`. False when the lease is
    /// no longer this replica's (the job ended, or another replica took it over): stop.
    pub async fn progress(
        &self,
        key: &str,
        token: i64,
        step: &str,
        percent: u32,
    ) -> Result<bool, ComputeError> {
        let n = sqlx::query(
            "UPDATE compute_jobs SET step = $3, percent = $4, lease_until = now() + $5, updated = now()
             WHERE idempotency_key = $1 AND lease_token = $2 AND state = 'running'",
        )
        .bind(key)
        .bind(token)
        .bind(step)
        .bind(i32::try_from(percent.min(100)).unwrap_or(100))
        .bind(self.lease_interval())
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Stores a job's outcome (the encoded response, or the status it failed with) if this
    /// replica still holds its lease with `token`; false when it does not (the new holder's
    /// outcome counts).
    pub async fn finish(
        &self,
        key: &str,
        token: i64,
        outcome: &Result<Vec<u8>, tonic::Status>,
    ) -> Result<bool, ComputeError> {
        let (state, result, code, message, step) = match outcome {
            Ok(bytes) => (
                "done",
                Some(bytes.as_slice()),
                None,
                None,
                "done".to_string(),
            ),
            Err(s) => (
                "failed",
                None,
                Some(s.code() as i32),
                Some(s.message()),
                format!("failed: {}", s.message()),
            ),
        };
        let n = sqlx::query(
            "UPDATE compute_jobs SET state = $2, result = $3, error_code = $4, error_message = $5,
                 step = $6, percent = 100, updated = now()
             WHERE idempotency_key = $1 AND state = 'running' AND lease_token = $7",
        )
        .bind(key)
        .bind(state)
        .bind(result)
        .bind(code)
        .bind(message)
        .bind(step)
        .bind(token)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Deletes jobs that ended more than `keep_finished_days` ago; returns how many.
    pub async fn prune(&self) -> Result<u64, ComputeError> {
        Ok(sqlx::query(
            "DELETE FROM compute_jobs WHERE state <> 'running' AND updated < now() - make_interval(days => $1)",
        )
        .bind(self.keep_finished_days)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected())
    }

    /// The job's row, if the key is known.
    pub async fn get(&self, key: &str) -> Result<Option<JobRow>, ComputeError> {
        let row = sqlx::query(
            "SELECT state, step, percent, result, error_code, error_message,
                 lease_until < now() AS expired
             FROM compute_jobs WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let state: String = r.try_get("state").map_err(db)?;
        let percent: i32 = r.try_get("percent").map_err(db)?;
        let error = match r.try_get::<Option<i32>, _>("error_code").map_err(db)? {
            Some(code) => Some(tonic::Status::new(
                tonic::Code::from_i32(code),
                r.try_get::<Option<String>, _>("error_message")
                    .map_err(db)?
                    .unwrap_or_default(),
            )),
            None => None,
        };
        Ok(Some(JobRow {
            progress: JobProgress {
                idempotency_key: key.to_owned(),
                step: r.try_get("step").map_err(db)?,
                percent: u32::try_from(percent).unwrap_or(0),
                done: state != "running",
            },
            result: r.try_get("result").map_err(db)?,
            expired: state == "running" && r.try_get::<bool, _>("expired").map_err(db)?,
            state,
            error,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn replica(url: &str, name: &str) -> JobQueue {
        JobQueue::open(&JobsConfig {
            backend: JobsBackend::Postgres,
            url: Some(url.to_owned()),
            lease_secs: Some(1),
            replica: Some(name.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .unwrap()
    }

    fn claimed_by_b(pg: &psm_testpg::TestPostgres, key: &str) -> bool {
        let out = pg
            .client(
                "psql",
                &[
                    "-d",
                    "psm",
                    "-Atc",
                    &format!("SELECT replica FROM compute_jobs WHERE idempotency_key = '{key}'"),
                ],
            )
            .unwrap();
        String::from_utf8_lossy(&out).trim() == "b"
    }

    fn run_token(c: Claim) -> i64 {
        match c {
            Claim::Run(t) => t,
            Claim::Done(_) => panic!("expected Run, got Done"),
            Claim::Running => panic!("expected Run, got Running"),
        }
    }

    /// Past a 1-second lease, with margin for a loaded machine.
    async fn lease_runs_out() {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }

    #[tokio::test]
    async fn claims_leases_takeovers_and_poison_jobs() {
        let pg = psm_testpg::TestPostgres::start().unwrap();
        let (a, b) = (
            replica(&pg.url("psm"), "a").await,
            replica(&pg.url("psm"), "b").await,
        );
        let fp = [7u8; 32];
        let ta = run_token(a.submit("k", "bill", &fp, b"req").await.unwrap());
        // B sees it running under A's lease, and may not reuse the key for another request.
        assert!(matches!(
            b.submit("k", "bill", &fp, b"req").await.unwrap(),
            Claim::Running
        ));
        let e = b
            .submit("k", "bill", &[8; 32], b"other")
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ComputeError::AlreadyExists(_)), "{e}");
        // Nothing to take over while A renews its lease.
        assert!(a.progress("k", ta, "summing", 40).await.unwrap());
        assert!(b.claim_orphan().await.unwrap().is_none());
        let row = b.get("k").await.unwrap().unwrap();
        assert_eq!(
            (row.progress.step.as_str(), row.progress.percent),
            ("summing", 40)
        );
        assert!(!row.progress.done && !row.expired);

        // A stops renewing: after the lease, exactly one replica claims it, with the request
        // and a new token.
        lease_runs_out().await;
        assert!(b.get("k").await.unwrap().unwrap().expired);
        let (ca, cb) = tokio::join!(a.claim_orphan(), b.claim_orphan());
        let claimed: Vec<Orphan> = [ca.unwrap(), cb.unwrap()].into_iter().flatten().collect();
        assert_eq!(claimed.len(), 1);
        let o = &claimed[0];
        assert_eq!(
            (o.kind.as_str(), o.request.as_slice()),
            ("bill", &b"req"[..])
        );
        assert_eq!(o.fingerprint, fp);
        assert!(o.token > ta);
        // The old lease is worthless: its progress is refused (so it stops) and its outcome
        // is not stored, even when it comes first.
        assert!(!a.progress("k", ta, "late", 90).await.unwrap());
        assert!(!a
            .finish("k", ta, &Err(tonic::Status::internal("stale")))
            .await
            .unwrap());
        assert_eq!(a.get("k").await.unwrap().unwrap().state, "running");
        let holder = if claimed_by_b(&pg, "k") { &b } else { &a };
        assert!(holder
            .finish("k", o.token, &Ok(b"resp".to_vec()))
            .await
            .unwrap());
        assert!(!holder
            .finish("k", o.token, &Ok(b"again".to_vec()))
            .await
            .unwrap());
        assert!(
            matches!(a.submit("k", "bill", &fp, b"req").await.unwrap(), Claim::Done(r) if r == b"resp")
        );

        // A poison job (one that stops every replica that runs it) is failed after
        // MAX_ATTEMPTS, whether replicas find it through their orphan worker or through a
        // waiting caller's submit.
        run_token(a.submit("p", "bill", &fp, b"req").await.unwrap());
        lease_runs_out().await;
        assert!(b.claim_orphan().await.unwrap().is_some());
        lease_runs_out().await;
        run_token(b.submit("p", "bill", &fp, b"req").await.unwrap());
        lease_runs_out().await;
        let e = a.submit("p", "bill", &fp, b"req").await.err().unwrap();
        let ComputeError::Upstream(status) = e else {
            panic!("{e}")
        };
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(
            status.message().contains("abandoned"),
            "{}",
            status.message()
        );
        assert!(b.claim_orphan().await.unwrap().is_none());
        let row = a.get("p").await.unwrap().unwrap();
        assert_eq!(row.state, "failed");
        assert_eq!(row.error.unwrap().code(), tonic::Code::Aborted);
        // Submitted again, it runs again, its attempts counted afresh: one more stop is not
        // the end of it.
        let t = run_token(b.submit("p", "bill", &fp, b"req").await.unwrap());
        lease_runs_out().await;
        let o = b.claim_orphan().await.unwrap().expect("a second attempt");
        assert!(o.token > t);

        // Finished jobs are deleted after keep_finished_days; running ones never.
        assert_eq!(a.prune().await.unwrap(), 0);
        pg.client(
            "psql",
            &[
                "-d",
                "psm",
                "-c",
                "UPDATE compute_jobs SET updated = now() - interval '31 days'",
            ],
        )
        .unwrap();
        assert_eq!(a.prune().await.unwrap(), 1, "only the finished job k");
        assert!(a.get("k").await.unwrap().is_none() && a.get("p").await.unwrap().is_some());
    }
}
