-- Compute's PostgreSQL schema, version 1: jobs shared by every compute replica, so WatchJob
-- works on any of them, an idempotency key repeated on another replica returns the same result,
-- and a job whose replica stopped is finished by another (its lease runs out).
CREATE TABLE compute_jobs (
    idempotency_key text COLLATE "C" PRIMARY KEY,
    -- bill, aggregate or analytics.
    kind            text     NOT NULL,
    -- BLAKE3 of the request without its key: a key names one request.
    fingerprint     bytea    NOT NULL,
    -- The protobuf request, so another replica can run it.
    request         bytea    NOT NULL,
    -- running, done or failed.
    state           text     NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    -- The replica that holds the lease, and until when; a running job whose lease ran out is
    -- claimed by the next replica that looks (FOR UPDATE SKIP LOCKED).
    replica         text     NOT NULL,
    lease_until     timestamptz NOT NULL,
    -- Replicas that started it since it was last submitted: a job that stopped its replica
    -- too often is failed.
    attempts        integer  NOT NULL DEFAULT 1,
    -- Raised on every claim: progress and outcomes count only from the current holder, so a
    -- replica that lost its lease cannot overwrite what the new holder reports.
    lease_token     bigint   NOT NULL DEFAULT 1,
    step            text     NOT NULL,
    percent         integer  NOT NULL,
    -- The protobuf response of a done job; the status of a failed one.
    result          bytea,
    error_code      integer,
    error_message   text,
    created         timestamptz NOT NULL DEFAULT now(),
    updated         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX compute_jobs_orphans ON compute_jobs (lease_until) WHERE state = 'running';
