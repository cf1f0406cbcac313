//! Fan-out to a set of peers (the keyshares) with a quorum: call all in parallel, return once
//! `needed` have answered plus a short grace period for the rest (so a disagreeing party can be
//! named), time out slow ones, and say which peer failed and why.

use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tonic::transport::Channel;
use tonic::Status;

/// One peer: a name (its certificate name) and a channel.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub channel: Channel,
}

/// How long to wait and for how many.
#[derive(Clone, Copy, Debug)]
pub struct QuorumPolicy {
    /// Answers needed.
    pub needed: usize,
    /// After `needed` answers, wait this much longer for the others.
    pub grace: Duration,
    /// Give up on a peer after this long.
    pub timeout: Duration,
}

/// A peer that did not answer usefully.
#[derive(Debug, Clone)]
pub struct Failure {
    pub peer: String,
    /// The gRPC status code it answered with; None when it did not answer in time.
    pub code: Option<tonic::Code>,
    pub reason: String,
}

/// The answers gathered.
#[derive(Debug)]
pub struct Gathered<T> {
    /// (peer name, answer), in arrival order.
    pub answers: Vec<(String, T)>,
    /// Peers that failed or timed out.
    pub failures: Vec<Failure>,
    /// Peers still working when the grace period ended (not faults: just not needed).
    pub late: Vec<String>,
}

/// Too few peers answered.
#[derive(Debug, thiserror::Error)]
#[error("quorum not reached: {got} of {needed} needed answers; failures: {}", describe(.failures))]
pub struct QuorumError {
    pub needed: usize,
    pub got: usize,
    pub failures: Vec<Failure>,
}

impl QuorumError {
    /// The status code of the first peer that answered with a refusal (a policy decision or a
    /// bad request) rather than a transport failure, if any did.
    pub fn refusal_code(&self) -> Option<tonic::Code> {
        use tonic::Code;
        self.failures.iter().find_map(|f| {
            f.code.filter(|c| {
                matches!(
                    c,
                    Code::FailedPrecondition
                        | Code::PermissionDenied
                        | Code::InvalidArgument
                        | Code::ResourceExhausted
                        | Code::NotFound
                )
            })
        })
    }
}

fn describe(f: &[Failure]) -> String {
    if f.is_empty() {
        return "none".into();
    }
    f.iter()
        .map(|f| format!("{}: {}", f.peer, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Calls `call` on every peer in parallel and gathers answers per `policy`.
pub async fn gather<T, F, Fut>(
    peers: &[Peer],
    policy: QuorumPolicy,
    call: F,
) -> Result<Gathered<T>, QuorumError>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut pending: FuturesUnordered<_> = peers
        .iter()
        .map(|p| {
            let fut = tokio::time::timeout(policy.timeout, call(p.channel.clone()));
            let name = p.name.clone();
            async move { (name, fut.await) }
        })
        .collect();
    let mut names_pending: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
    let mut out = Gathered {
        answers: Vec::new(),
        failures: Vec::new(),
        late: Vec::new(),
    };
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match grace_deadline {
            Some(d) => match tokio::time::timeout_at(d, pending.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => pending.next().await,
        };
        let Some((name, res)) = next else { break };
        names_pending.retain(|n| *n != name);
        match res {
            Ok(Ok(v)) => out.answers.push((name, v)),
            Ok(Err(status)) => out.failures.push(Failure {
                peer: name,
                code: Some(status.code()),
                reason: format!("{:?}: {}", status.code(), status.message()),
            }),
            Err(_) => out.failures.push(Failure {
                peer: name,
                code: None,
                reason: format!("no answer within {:?}", policy.timeout),
            }),
        }
        if out.answers.len() >= policy.needed && grace_deadline.is_none() {
            grace_deadline = Some(tokio::time::Instant::now() + policy.grace);
        }
    }
    out.late = names_pending;
    if out.answers.len() < policy.needed {
        return Err(QuorumError {
            needed: policy.needed,
            got: out.answers.len(),
            failures: out.failures,
        });
    }
    Ok(out)
}
