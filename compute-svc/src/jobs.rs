//! Progress of running jobs (Bill, Aggregate, Analytics) by idempotency key, for WatchJob: each
//! job publishes its step and percent on a watch channel; finished jobs are kept (bounded) so a
//! watcher that arrives late still sees the end.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use psm_proto::v1::JobProgress;
use tokio::sync::watch;

/// Finished jobs remembered for late watchers.
const KEEP_FINISHED: usize = 1_000;

#[derive(Default)]
struct Table {
    running: HashMap<String, watch::Sender<JobProgress>>,
    finished: VecDeque<String>,
}

/// Every job this compute node runs or recently ran.
#[derive(Default, Clone)]
pub struct Jobs {
    table: Arc<Mutex<Table>>,
}

impl Jobs {
    /// Registers a job; its progress is published until the handle is dropped (then `done`).
    pub fn start(&self, key: &str) -> JobHandle {
        let (tx, _) = watch::channel(JobProgress {
            idempotency_key: key.to_owned(),
            step: "queued".into(),
            percent: 0,
            done: false,
        });
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.finished.retain(|k| k != key);
        t.running.insert(key.to_owned(), tx.clone());
        JobHandle {
            key: key.to_owned(),
            tx,
            jobs: self.clone(),
        }
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
        self.tx.send_modify(|p| {
            p.done = true;
            if !p.step.starts_with("failed") {
                p.percent = 100;
            }
        });
        let mut t = self
            .jobs
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.finished.push_back(self.key.clone());
        while t.finished.len() > KEEP_FINISHED {
            if let Some(old) = t.finished.pop_front() {
                t.running.remove(&old);
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
        let h = jobs.start("a");
        let mut rx = jobs.watch("a").unwrap();
        h.step("summing", 40);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().step, "summing");
        drop(h);
        rx.changed().await.unwrap();
        assert!(rx.borrow().done);
        // A late watcher still sees the finished job.
        assert!(jobs.watch("a").unwrap().borrow().done);
    }
}
