//! Why compute refused or failed a request. Handlers return [`ComputeError`]; its conversion to
//! [`tonic::Status`] is the service's one mapping of errors to gRPC codes.

use tonic::Status;

use crate::decrypt::DecryptError;

/// A compute failure, by what went wrong (each kind has one status code).
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The request is malformed (range, cohort, tariff, ...): INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// Something the request needs is missing or not allowed here (readings, configuration,
    /// a cohort below the minimum): FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// Over a size limit: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// An idempotency key already used for another request: ALREADY_EXISTS.
    #[error("{0}")]
    AlreadyExists(String),
    /// No such job: NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// A dependency is unavailable or shutting down: UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of this service or of stored data: INTERNAL.
    #[error("{0}")]
    Internal(String),
    /// Threshold decryption did not produce a result (the keyshares' refusal keeps its code).
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// A status a called service (ingest) answered with, passed on as it is.
    #[error("{}", .0.message())]
    Upstream(#[from] Status),
}

impl ComputeError {
    pub fn invalid(m: impl Into<String>) -> Self {
        ComputeError::Invalid(m.into())
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        ComputeError::Precondition(m.into())
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        ComputeError::Exhausted(m.into())
    }
    pub fn already_exists(m: impl Into<String>) -> Self {
        ComputeError::AlreadyExists(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        ComputeError::NotFound(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        ComputeError::Unavailable(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        ComputeError::Internal(m.into())
    }
}

impl From<ComputeError> for Status {
    fn from(e: ComputeError) -> Self {
        match e {
            ComputeError::Invalid(m) => Status::invalid_argument(m),
            ComputeError::Precondition(m) => Status::failed_precondition(m),
            ComputeError::Exhausted(m) => Status::resource_exhausted(m),
            ComputeError::AlreadyExists(m) => Status::already_exists(m),
            ComputeError::NotFound(m) => Status::not_found(m),
            ComputeError::Unavailable(m) => Status::unavailable(m),
            ComputeError::Internal(m) => Status::internal(m),
            ComputeError::Upstream(s) => s,
            // A keyshare's policy refusal keeps its code (and the keyshares' reasons); anything
            // else about decryption is UNAVAILABLE.
            ComputeError::Decrypt(d) => match d {
                DecryptError::Quorum(q) => match q.refusal_code() {
                    Some(code) => Status::new(code, format!("the keyshares refused: {q}")),
                    None => Status::unavailable(format!("threshold decryption failed: {q}")),
                },
                DecryptError::Release(e) => Status::invalid_argument(e.to_string()),
                DecryptError::TooLarge(m) => Status::resource_exhausted(m),
                DecryptError::Internal(m) => Status::internal(m),
                other => Status::unavailable(format!("threshold decryption failed: {other}")),
            },
        }
    }
}
