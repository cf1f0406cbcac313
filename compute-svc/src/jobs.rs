//! Progress of running jobs (Bill, Aggregate, Analytics) by idempotency key, for WatchJob: each
//! job publishes its step and percent on a watch channel; finished jobs are kept (bounded) so a
//! watcher that arrives late still sees the end.

use crate::error::ComputeError;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use psm_proto::v1::JobProgress;
use tokio::sync::watch;

/// Finished jobs remembered for late watchers.
const KEEP_FINISHED: usize = 1_000;

#[derive(Default)]
struct Table {
    running: HashMap<String, watch::Sender<JobProgress>>,
    /// What each remembered key was used for: BLAKE3 of the request without its key.
    requests: HashMap<String, [u8; 32]>,
    finished: VecDeque<String>,
}

/// BLAKE3 of a request's kind and encoding with its idempotency key cleared: what the key
/// promises to name.
pub fn fingerprint(kind: &str, request_without_key: &impl prost::Message) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v1/compute-request");
    h.update(&(kind.len() as u64).to_le_bytes());
    h.update(kind.as_bytes());
    h.update(&request_without_key.encode_to_vec());
    *h.finalize().as_bytes()
}

/// Every job this compute node runs or recently ran.
#[derive(Default, Clone)]
pub struct Jobs {
    table: Arc<Mutex<Table>>,
}

impl Jobs {
    /// Registers a job; its progress is published until the handle is dropped (then `done`).
    /// A key this node remembers (running, or among the last KEEP_FINISHED finished) that named
    /// another request is refused with ALREADY_EXISTS; the same request again runs again and,
    /// every release being deterministic, returns the same result.
    /// `kind` (bill, aggregate, analytics) labels the job's metrics.
    pub fn start(
        &self,
        key: &str,
        kind: &'static str,
        request: [u8; 32],
    ) -> Result<JobHandle, ComputeError> {
        let (tx, _) = watch::channel(JobProgress {
            idempotency_key: key.to_owned(),
            step: "queued".into(),
            percent: 0,
            done: false,
        });
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if t.requests.get(key).is_some_and(|r| *r != request) {
            return Err(ComputeError::already_exists(format!(
                "idempotency key {key:?} was already used for a different request; choose a new key for a new request"
            )));
        }
        t.finished.retain(|k| k != key);
        t.running.insert(key.to_owned(), tx.clone());
        t.requests.insert(key.to_owned(), request);
        Ok(JobHandle {
            key: key.to_owned(),
            kind,
            started: std::time::Instant::now(),
            tx,
            jobs: self.clone(),
        })
    }

    /// A receiver of a job's progress, if the job is running or recently finished.
    pub fn watch(&self, key: &str) -> Option<watch::Receiver<JobProgress>> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.running.get(key).map(watch::Sender::subscribe)
    }
}

/// A running job's side of its progress channel.
pub struct JobHandle {
    key: String,
    kind: &'static str,
    started: std::time::Instant,
    tx: watch::Sender<JobProgress>,
    jobs: Jobs,
}

impl JobHandle {
    /// Publishes the current step and its completion (0..=100).
    pub fn step(&self, step: &str, percent: u32) {
        self.tx.send_modify(|p| {
            p.step = step.to_owned();
            p.percent = percent.min(100);
        });
        tracing::debug!(job = %self.key, step, percent, "job progress");
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        let mut failed = false;
        self.tx.send_modify(|p| {
            p.done = true;
            failed = p.step.starts_with("failed");
            if !failed {
                p.percent = 100;
            }
        });
        let outcome = if failed { "failed" } else { "ok" };
        metrics::counter!("psm_compute_jobs_total", "kind" => self.kind, "outcome" => outcome)
            .increment(1);
        metrics::histogram!("psm_compute_job_duration_seconds", "kind" => self.kind)
            .record(self.started.elapsed().as_secs_f64());
        let mut t = self
            .jobs
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only the latest run of a key marks it finished (a retry may still be running), and
        // a key is listed once, so evicting it never drops a running job's entry.
        let latest = t
            .running
            .get(&self.key)
            .is_some_and(|tx| tx.same_channel(&self.tx));
        if !latest {
            return;
        }
        t.finished.retain(|k| *k != self.key);
        t.finished.push_back(self.key.clone());
        while t.finished.len() > KEEP_FINISHED {
            if let Some(old) = t.finished.pop_front() {
                t.running.remove(&old);
                t.requests.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_steps_and_the_end() {
        let jobs = Jobs::default();
        assert!(jobs.watch("a").is_none());
        let h = jobs.start("a", "bill", [1; 32]).unwrap();
        let mut rx = jobs.watch("a").unwrap();
        h.step("summing", 40);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().step, "summing");
        drop(h);
        rx.changed().await.unwrap();
        assert!(rx.borrow().done);
        // A late watcher still sees the finished job.
        assert!(jobs.watch("a").unwrap().borrow().done);
        // The key names that request: another request under it is refused, the same one runs.
        let Err(e) = jobs.start("a", "bill", [2; 32]) else {
            panic!("another request under a used key was accepted");
        };
        assert!(
            matches!(e, crate::error::ComputeError::AlreadyExists(_)),
            "{e}"
        );
        assert!(jobs.start("a", "bill", [1; 32]).is_ok());
    }
}
