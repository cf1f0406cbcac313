//! Per-request authorization: a tower layer that reads the verified client certificate, checks
//! the caller's trust domain and role against [`crate::roles`], and hands the caller's identity
//! to handlers. It also reports tonic's "message too large" decode error as RESOURCE_EXHAUSTED,
//! the code gRPC specifies for size limits (tonic itself says OUT_OF_RANGE).

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use crate::roles::{access_for, Access};
use crate::SpiffeId;

/// The authenticated caller, placed in each request's extensions by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Caller(pub SpiffeId);

/// The caller of a request, as authenticated by [`AuthLayer`]. Handlers use this for checks
/// finer than the role (a meter may only submit for itself).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&SpiffeId, Status> {
    req.extensions()
        .get::<Caller>()
        .map(|c| &c.0)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller on this request"))
}

/// Enforces the role table for every request of a server.
#[derive(Clone)]
pub struct AuthLayer {
    trust_domain: Arc<str>,
    revoked: Arc<crate::revocation::Revocations>,
}

impl AuthLayer {
    /// Callers must be in `trust_domain` and hold a certificate `revoked` does not list.
    pub fn new(trust_domain: &str, revoked: Arc<crate::revocation::Revocations>) -> Self {
        AuthLayer {
            trust_domain: trust_domain.into(),
            revoked,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            trust_domain: self.trust_domain.clone(),
            revoked: self.revoked.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    trust_domain: Arc<str>,
    revoked: Arc<crate::revocation::Revocations>,
}

fn authorize<B>(
    req: &Request<B>,
    trust_domain: &str,
    revoked: &crate::revocation::Revocations,
) -> Result<SpiffeId, Status> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let rejected = |e| Status::unauthenticated(format!("client certificate rejected: {e}"));
    let cert = crate::identity::parse_cert(leaf.as_ref()).map_err(rejected)?;
    let id = SpiffeId::from_cert(&cert).map_err(rejected)?;
    if revoked.is_revoked(&cert) {
        return Err(Status::unauthenticated(format!(
            "the client certificate of {id} is revoked"
        )));
    }
    if id.trust_domain != trust_domain {
        return Err(Status::permission_denied(format!(
            "caller {id} is not in trust domain {trust_domain:?}"
        )));
    }
    let path = req.uri().path();
    match access_for(path) {
        Access::Open => Ok(id),
        Access::Roles(roles) if roles.contains(&id.role) => Ok(id),
        Access::Roles(roles) => {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(Status::permission_denied(format!(
                "{path} requires role {}; caller {id} has role {}",
                names.join(" or "),
                id.role
            )))
        }
        Access::Unknown => Err(Status::unimplemented(format!(
            "{path} is not a method of this API"
        ))),
    }
}

/// Rewrites a trailers-only OUT_OF_RANGE "message length too large" response to
/// RESOURCE_EXHAUSTED, keeping tonic's message (it names the size and the limit).
fn remap_size_error<B>(resp: &mut Response<B>) {
    let is_oor = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == (Code::OutOfRange as i32).to_string());
    let is_size = resp
        .headers()
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| {
            m.contains("message%20length%20too%20large") || m.contains("message length too large")
        });
    if is_oor && is_size {
        resp.headers_mut().insert(
            "grpc-status",
            HeaderValue::from(Code::ResourceExhausted as i32),
        );
    }
}

impl<S, ReqBody> tower::Service<Request<ReqBody>> for AuthService<S>
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

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match authorize(&req, &self.trust_domain, &self.revoked) {
            Ok(id) => {
                tracing::debug!(caller = %id, path = req.uri().path(), "authorized");
                req.extensions_mut().insert(Caller(id));
                // Take the service that was polled ready, leave a fresh clone behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let mut resp = inner.call(req).await?;
                    remap_size_error(&mut resp);
                    Ok(resp)
                })
            }
            Err(status) => {
                tracing::info!(path = req.uri().path(), code = ?status.code(), message = status.message(), "request refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
