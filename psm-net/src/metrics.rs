//! Prometheus metrics: one process-wide recorder (the `metrics` facade, rendered by
//! `metrics-exporter-prometheus`), served as `/metrics` on the plaintext health port, and a
//! tower layer that counts every RPC by service, method and status code and times it.
//!
//! Services add their own counters with the `metrics` macros (`psm_ingest_*`, `psm_compute_*`,
//! `psm_keyshare_*`); docs/operator-guide.md lists them. Label values come only from fixed sets
//! (services, methods, codes, rules), never from request content, so a caller cannot grow the
//! series without bound: an RPC to a method the server does not have is counted under
//! `service="other", method="other"`.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{Request, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::Code;

/// Histogram buckets for every `*_seconds` metric: 1 ms to 5 min.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use. Every service calls this through
/// [`crate::server::serve`]; calling it again is free.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        // Only an empty bucket list is refused, and the constant is not empty.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only this one's series"
            );
        }
        // Histograms keep raw samples until upkeep folds them into buckets.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .ok();
        handle
    })
}

/// The text exposition format of every metric of this process.
pub fn render() -> String {
    handle().render()
}

/// Counts and times every RPC: `psm_rpc_requests_total{service,method,code}` and
/// `psm_rpc_duration_seconds{service,method}` (until the last byte of the response, so a
/// stream's whole life). The code is the one the client sees, from the response headers or, for
/// responses that carry it at the end, the trailers.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    known: Known,
}

impl RpcMetricsLayer {
    /// A layer for a server of `services` (full names, such as `psm.v1.Ingest`); health and
    /// reflection are known too.
    pub fn new(services: &[&'static str]) -> Self {
        handle();
        RpcMetricsLayer {
            known: known_rpcs(services),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a server.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    known: Known,
}

/// Methods of health and reflection, which every server has.
const OPEN_METHODS: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The RPCs a server has, path → (service, method): made once per server, looked up per call.
type Known = std::sync::Arc<[(&'static str, (&'static str, &'static str))]>;

/// The RPCs of `services` in the role table, and health and reflection.
fn known_rpcs(services: &[&'static str]) -> Known {
    crate::roles::ROLE_TABLE
        .iter()
        .map(|(p, _)| *p)
        .chain(OPEN_METHODS)
        .filter_map(|p| Some((p, p.strip_prefix('/')?.split_once('/')?)))
        .filter(|(p, (svc, _))| OPEN_METHODS.contains(p) || services.contains(svc))
        .collect()
}

/// (service, method) of a request path when it is an RPC this server has (`known`);
/// ("other", "other") for anything else, so that no caller — not even one the auth layer turns
/// away — can add series.
fn labels(path: &str, known: &Known) -> (&'static str, &'static str) {
    known
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(("other", "other"), |(_, l)| *l)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(v))
}

/// One RPC in flight: recorded once, when its response ends (or is dropped unfinished, as
/// CANCELLED unless a code was already seen).
struct Observation {
    service: &'static str,
    method: &'static str,
    started: Instant,
    code: Option<Code>,
    done: bool,
}

impl Observation {
    fn finish(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let (service, method) = (self.service, self.method);
        metrics::counter!("psm_rpc_requests_total", "service" => service, "method" => method, "code" => code_name(code)).increment(1);
        metrics::histogram!("psm_rpc_duration_seconds", "service" => service, "method" => method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        self.finish(code);
    }
}

/// A response body that reports its RPC when the trailers (or the end) arrive.
struct MeteredBody {
    inner: tonic::body::Body,
    obs: Observation,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.obs.code = Some(code);
                    this.obs.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.obs.finish(Code::Internal),
            Poll::Ready(None) => {
                let code = this.obs.code.unwrap_or(Code::Ok);
                this.obs.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, ReqBody> tower::Service<Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (service, method) = labels(req.uri().path(), &self.known);
        let mut obs = Observation {
            service,
            method,
            started: Instant::now(),
            code: None,
            done: false,
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // A trailers-only response (every error tonic returns from a handler) has its code
            // in the headers.
            obs.code = status_of(resp.headers());
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                tonic::body::Body::new(MeteredBody { inner: body, obs }),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_only_from_known_services() {
        let svc = &known_rpcs(&["psm.v1.Ingest"]);
        assert_eq!(
            labels("/psm.v1.Ingest/SubmitReadings", svc),
            ("psm.v1.Ingest", "SubmitReadings")
        );
        assert_eq!(
            labels("/grpc.health.v1.Health/Check", svc),
            ("grpc.health.v1.Health", "Check")
        );
        // Methods this server does not have, under a known service or not, and another
        // service's RPC: one series for all of them, whoever sends them.
        let long = format!("/psm.v1.Ingest/{}", "x".repeat(65));
        for junk in [
            "/attacker.Made/Up",
            "/psm.v1.Ingest/",
            "/",
            "/psm.v1.Ingest/a/b",
            "/psm.v1.Ingest/Bogus",
            "/grpc.health.v1.Health/Bogus",
            "/psm.v1.Compute/Bill",
            long.as_str(),
        ] {
            assert_eq!(labels(junk, svc), ("other", "other"), "{junk}");
        }
    }

    #[test]
    fn counters_render_in_the_exposition_format() {
        handle();
        metrics::counter!("psm_test_events_total", "kind" => "a").increment(3);
        let text = render();
        assert!(
            text.contains("psm_test_events_total{kind=\"a\"} 3"),
            "{text}"
        );
    }
}
