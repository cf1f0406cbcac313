//! The scale-out store: PostgreSQL, shared by any number of ingest replicas.
//!
//! The contract is the sled store's, but the rules live in the database so that concurrent
//! writers on different machines keep them: a primary key and an exclusion constraint over slot
//! ranges make "a slot is encrypted once, ever" hold across replicas, each request is one
//! transaction, and an acknowledgement follows the commit (durable as long as the server keeps
//! `synchronous_commit` on, its default). Enrollment numbers are given under a transaction-level
//! advisory lock so that they appear in commit order and a keyshare paging by sequence number
//! never skips one.

use std::collections::BTreeSet;

use prost::Message;
use psm_core::readings::validate_meter_id;
use psm_proto::v1::{Enrollment, ReadingBatch, Track};
use sqlx::postgres::PgPool;
use sqlx::Row;

use super::{prepare, slot_conflict, tfhe_conflict, PutOutcome, ReadingStore, StoreError};

/// Ingest's schema versions (migration table `_psm_ingest_migrations`).
pub const SCHEMA: &[psm_pg::Version] = &[psm_pg::Version {
    version: 1,
    description: "readings and enrollments",
    sql: include_str!("../../migrations/0001_readings_and_enrollments.sql"),
}];

/// Key of the advisory lock that serialises enrollment numbering ("psm-enro").
pub(crate) const ENROLLMENT_LOCK: i64 = 0x7073_6d2d_656e_726f;

/// Times a request is retried when PostgreSQL aborts it for a deadlock or a serialization
/// failure (concurrent replicas writing the same meter-days in different orders).
const RETRIES: usize = 5;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Why a request's transaction ended: a store rule, or a database error that may be retried.
enum TxError {
    Store(StoreError),
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        TxError::Sql(e)
    }
}

/// The PostgreSQL store. Its methods block the calling thread (the blocking pool, as for sled)
/// on the runtime it was opened in.
pub struct PgStore {
    pool: PgPool,
    rt: tokio::runtime::Handle,
}

impl PgStore {
    /// Connects to `url` with `config`'s pool settings and migrates the schema to this
    /// version's. Must run inside a tokio runtime, which then serves every later call.
    pub async fn connect(config: &psm_pg::PgConfig, url: &str) -> Result<Self, StoreError> {
        let pool = config
            .connect(url, "ingest", SCHEMA)
            .await
            .map_err(|e| match e {
                psm_pg::PgError::Config(m) => StoreError::Invalid(m),
                e => backend(e),
            })?;
        Ok(PgStore {
            pool,
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// The pool, for tests and benchmarks that inspect the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Runs `attempt` in its own transaction, again when the database aborted it for a deadlock
    /// or serialization failure.
    fn transact<T, F>(&self, attempt: F) -> Result<T, StoreError>
    where
        F: AsyncFn(&mut sqlx::PgConnection) -> Result<T, TxError>,
    {
        self.block(async {
            let mut tries = 0;
            loop {
                tries += 1;
                let mut tx = self.pool.begin().await.map_err(backend)?;
                let res = match attempt(&mut tx).await {
                    Ok(v) => tx.commit().await.map(|()| v).map_err(TxError::Sql),
                    Err(e) => Err(e),
                };
                match res {
                    Ok(v) => return Ok(v),
                    Err(TxError::Store(e)) => return Err(e),
                    Err(TxError::Sql(e)) if psm_pg::retryable(&e) && tries < RETRIES => {
                        tracing::debug!(error = %e, tries, "PostgreSQL aborted a write; retrying");
                    }
                    Err(TxError::Sql(e)) => return Err(backend(e)),
                }
            }
        })
    }
}

/// A batch as one row.
struct BatchRow {
    meter_id: String,
    day: String,
    track: i16,
    epoch: i64,
    channel: i16,
    first_slot: i32,
    end_slot: i32,
    body: Vec<u8>,
    /// The batch as stored, and (epoch, channel) on the linear track, for messages.
    batch: ReadingBatch,
    linear: Option<(u32, psm_core::linear::Channel)>,
}

fn row_of(i: usize, b: &ReadingBatch) -> Result<BatchRow, StoreError> {
    let p = prepare(i, b)?;
    let (track, epoch, channel, (lo, hi)) = match (p.linear, p.slots) {
        (Some((epoch, channel)), Some(slots)) => {
            (Track::Linear as i16, epoch, i16::from(channel.tag()), slots)
        }
        _ => (
            Track::Tfhe as i16,
            0,
            0,
            (0, psm_core::linear::SLOTS_PER_DAY as u64),
        ),
    };
    let slot = |s: u64| {
        i32::try_from(s).map_err(|_| {
            StoreError::Invalid(format!(
                "batch {i} ({} {}): slots out of range",
                b.meter_id, b.day
            ))
        })
    };
    Ok(BatchRow {
        meter_id: p.batch.meter_id.clone(),
        day: p.batch.day.clone(),
        track,
        epoch: i64::from(epoch),
        channel,
        first_slot: slot(lo)?,
        end_slot: slot(hi)?,
        body: p.batch.encode_to_vec(),
        linear: p.linear,
        batch: p.batch,
    })
}

/// Stores `r` in the open transaction: Ok(true) when stored, Ok(false) for a duplicate, a
/// conflict when it overlaps a stored row (or one of this transaction) with other bytes.
async fn insert_batch(conn: &mut sqlx::PgConnection, r: &BatchRow) -> Result<bool, TxError> {
    let inserted = sqlx::query(
        "INSERT INTO batches (meter_id, day, track, epoch, channel, first_slot, end_slot, body)
         VALUES ($1, $2::text::date, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&r.meter_id)
    .bind(&r.day)
    .bind(r.track)
    .bind(r.epoch)
    .bind(r.channel)
    .bind(r.first_slot)
    .bind(r.end_slot)
    .bind(&r.body)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(true);
    }
    // Something overlaps: the same batch (a duplicate) or another one (a conflict). Under READ
    // COMMITTED this statement sees the row that made the insert give way, committed by any
    // replica.
    let overlapping = sqlx::query(
        "SELECT first_slot, end_slot, body FROM batches
         WHERE meter_id = $1 AND day = $2::text::date AND track = $3 AND epoch = $4 AND channel = $5
           AND int4range(first_slot, end_slot) && int4range($6, $7)
         ORDER BY first_slot",
    )
    .bind(&r.meter_id)
    .bind(&r.day)
    .bind(r.track)
    .bind(r.epoch)
    .bind(r.channel)
    .bind(r.first_slot)
    .bind(r.end_slot)
    .fetch_all(&mut *conn)
    .await?;
    if let [only] = overlapping.as_slice() {
        let body: Vec<u8> = only.try_get("body")?;
        if body == r.body {
            return Ok(false);
        }
    }
    if overlapping.is_empty() {
        // The insert gave way to a row that is gone again (rolled back meanwhile): let the
        // caller retry rather than report a conflict that is not there.
        return Err(TxError::Store(backend(
            "a concurrent write of the same slots was rolled back; retry the request",
        )));
    }
    let Some((epoch, channel)) = r.linear else {
        return Err(TxError::Store(tfhe_conflict(&r.batch)));
    };
    // The part of this batch's slots that the stored rows cover.
    let (mut lo, mut hi) = (r.end_slot, r.first_slot);
    for row in &overlapping {
        let (s, e): (i32, i32) = (row.try_get("first_slot")?, row.try_get("end_slot")?);
        lo = lo.min(s.max(r.first_slot));
        hi = hi.max(e.min(r.end_slot));
    }
    let slot = |s: i32| u64::try_from(s).unwrap_or(0);
    Err(TxError::Store(slot_conflict(
        &r.batch,
        epoch,
        channel,
        (slot(lo), slot(hi)),
    )))
}

impl ReadingStore for PgStore {
    fn put_all(&self, batches: &[ReadingBatch]) -> Result<PutOutcome, StoreError> {
        let mut rows = batches
            .iter()
            .enumerate()
            .map(|(i, b)| row_of(i, b))
            .collect::<Result<Vec<_>, _>>()?;
        // One order for every writer, so concurrent requests over the same meter-days wait for
        // each other instead of deadlocking (a deadlock is retried anyway).
        rows.sort_by(|a, b| {
            (
                &a.meter_id,
                &a.day,
                a.track,
                a.epoch,
                a.channel,
                a.first_slot,
            )
                .cmp(&(
                    &b.meter_id,
                    &b.day,
                    b.track,
                    b.epoch,
                    b.channel,
                    b.first_slot,
                ))
        });
        let meters: BTreeSet<&str> = rows.iter().map(|r| r.meter_id.as_str()).collect();
        let meters: Vec<String> = meters.into_iter().map(str::to_owned).collect();
        self.transact(async |conn| {
            let mut out = PutOutcome::default();
            for r in &rows {
                if insert_batch(conn, r).await? {
                    out.stored += 1;
                } else {
                    out.duplicates += 1;
                }
            }
            sqlx::query(
                "INSERT INTO meters (meter_id) SELECT * FROM unnest($1::text[]) ON CONFLICT DO NOTHING",
            )
            .bind(&meters)
            .execute(&mut *conn)
            .await?;
            Ok(out)
        })
    }

    fn scan(
        &self,
        meter_id: &str,
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<ReadingBatch>, StoreError> {
        self.scan_many(&[meter_id.to_owned()], from_day, to_day, 0)
    }

    fn scan_many(
        &self,
        meters: &[String],
        from_day: &str,
        to_day: &str,
        track: i32,
    ) -> Result<Vec<ReadingBatch>, StoreError> {
        let rows = self
            .block(
                sqlx::query(
                    // LATERAL: one primary-key range scan per meter, whatever the planner's
                    // statistics say (a hash join would read the whole table per group).
                    "SELECT b.body FROM unnest($1::text[]) WITH ORDINALITY AS m(meter_id, ord)
                     CROSS JOIN LATERAL (
                         SELECT body, day, track, epoch, channel, first_slot FROM batches
                         WHERE meter_id = m.meter_id
                           AND day BETWEEN $2::text::date AND $3::text::date
                           AND ($4::int4 = 0 OR track = $4::int4)
                         ORDER BY day, track, epoch, channel, first_slot) b
                     ORDER BY m.ord, b.day, b.track, b.epoch, b.channel, b.first_slot",
                )
                .bind(meters)
                .bind(from_day)
                .bind(to_day)
                .bind(track)
                .fetch_all(&self.pool),
            )
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let body: Vec<u8> = row.try_get("body").map_err(backend)?;
                ReadingBatch::decode(body.as_slice())
                    .map_err(|e| backend(format!("a stored batch is corrupt: {e}")))
            })
            .collect()
    }

    fn meters(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .block(
                sqlx::query("SELECT meter_id FROM meters ORDER BY meter_id").fetch_all(&self.pool),
            )
            .map_err(backend)?;
        rows.iter()
            .map(|r| r.try_get("meter_id").map_err(backend))
            .collect()
    }

    fn put_enrollments(&self, enrollments: &[Enrollment]) -> Result<PutOutcome, StoreError> {
        let mut prepared = Vec::with_capacity(enrollments.len());
        for (i, e) in enrollments.iter().enumerate() {
            validate_meter_id(&e.meter_id)
                .map_err(|x| StoreError::Invalid(format!("enrollment {i}: {x}")))?;
            let mut norm = e.clone();
            norm.seq = 0;
            prepared.push((e.meter_id.clone(), i64::from(e.epoch), norm.encode_to_vec()));
        }
        self.transact(async |conn| {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(ENROLLMENT_LOCK)
                .execute(&mut *conn)
                .await?;
            let mut last: i64 = sqlx::query("SELECT coalesce(max(seq), 0) AS last FROM enrollments")
                .fetch_one(&mut *conn)
                .await?
                .try_get("last")?;
            let mut out = PutOutcome::default();
            for (meter, epoch, body) in &prepared {
                // Read-your-writes: an earlier enrollment of this request is seen here.
                let existing = sqlx::query(
                    "SELECT body FROM enrollments WHERE meter_id = $1 AND epoch = $2",
                )
                .bind(meter)
                .bind(epoch)
                .fetch_optional(&mut *conn)
                .await?;
                match existing {
                    Some(row) => {
                        let stored: Vec<u8> = row.try_get("body")?;
                        if &stored == body {
                            out.duplicates += 1;
                        } else {
                            return Err(TxError::Store(StoreError::EnrollmentConflict {
                                meter: meter.clone(),
                                epoch: u32::try_from(*epoch).unwrap_or(u32::MAX),
                            }));
                        }
                    }
                    None => {
                        last += 1;
                        sqlx::query(
                            "INSERT INTO enrollments (seq, meter_id, epoch, body) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(last)
                        .bind(meter)
                        .bind(epoch)
                        .bind(body)
                        .execute(&mut *conn)
                        .await?;
                        out.stored += 1;
                    }
                }
            }
            Ok(out)
        })
    }

    fn enrollments_after(
        &self,
        after_seq: u64,
        meters: Option<&BTreeSet<String>>,
        limit: usize,
    ) -> Result<Vec<Enrollment>, StoreError> {
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = match meters {
            Some(m) => sqlx::query(
                "SELECT seq, body FROM enrollments WHERE seq > $1 AND meter_id = ANY($3)
                 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .bind(m.iter().cloned().collect::<Vec<String>>()),
            None => sqlx::query(
                "SELECT seq, body FROM enrollments WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit),
        };
        let rows = self.block(query.fetch_all(&self.pool)).map_err(backend)?;
        rows.iter()
            .map(|row| {
                let body: Vec<u8> = row.try_get("body").map_err(backend)?;
                let seq: i64 = row.try_get("seq").map_err(backend)?;
                let mut e = Enrollment::decode(body.as_slice())
                    .map_err(|e| backend(format!("a stored enrollment is corrupt: {e}")))?;
                e.seq = u64::try_from(seq).map_err(backend)?;
                Ok(e)
            })
            .collect()
    }

    fn is_enrolled(&self, meter_id: &str, epoch: u32) -> Result<bool, StoreError> {
        let row = self
            .block(
                sqlx::query(
                    "SELECT EXISTS (SELECT 1 FROM enrollments WHERE meter_id = $1 AND epoch = $2) AS e",
                )
                .bind(meter_id)
                .bind(i64::from(epoch))
                .fetch_one(&self.pool),
            )
            .map_err(backend)?;
        row.try_get("e").map_err(backend)
    }
}
