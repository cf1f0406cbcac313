//! Why ingest refused or failed a request. Handlers return [`IngestError`]; its conversion to
//! [`tonic::Status`] is the service's one mapping of errors to gRPC codes.

use tonic::Status;

use crate::store::StoreError;

/// An ingest failure, by what went wrong (each kind has one status code).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The request, or a batch in it, is malformed or fails validation: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not submit or read that: PERMISSION_DENIED.
    #[error("{0}")]
    NotPermitted(String),
    /// Something the request needs first is missing (an enrollment, the key bundle):
    /// FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// Over a size limit or the caller's quota: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// Named public material that does not exist: NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// The store refused (a conflict: ALREADY_EXISTS; invalid: INVALID_ARGUMENT) or failed
    /// (UNAVAILABLE, details logged).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutting down, or a dependency is unavailable: UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// Served material that no longer matches its manifest: DATA_LOSS.
    #[error("{0}")]
    Corrupt(String),
    /// A failed task or another fault of this service: INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl IngestError {
    pub fn invalid(m: impl Into<String>) -> Self {
        IngestError::Invalid(m.into())
    }
    pub fn not_permitted(m: impl Into<String>) -> Self {
        IngestError::NotPermitted(m.into())
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        IngestError::Precondition(m.into())
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        IngestError::Exhausted(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        IngestError::NotFound(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        IngestError::Unavailable(m.into())
    }
    pub fn corrupt(m: impl Into<String>) -> Self {
        IngestError::Corrupt(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        IngestError::Internal(m.into())
    }
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        let reason = match &e {
            IngestError::Invalid(_) => "invalid",
            IngestError::NotPermitted(_) => "not_permitted",
            IngestError::Precondition(_) => "precondition",
            IngestError::Exhausted(_) => "quota",
            IngestError::NotFound(_) => "not_found",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::Corrupt(_) => "corrupt",
            IngestError::Internal(_) => "internal",
            IngestError::Store(
                StoreError::Conflict { .. } | StoreError::EnrollmentConflict { .. },
            ) => "conflict",
            IngestError::Store(StoreError::Invalid(_)) => "invalid",
            IngestError::Store(_) => "store_unavailable",
        };
        metrics::counter!("psm_ingest_refusals_total", "reason" => reason).increment(1);
        match e {
            IngestError::Invalid(m) => Status::invalid_argument(m),
            IngestError::NotPermitted(m) => Status::permission_denied(m),
            IngestError::Precondition(m) => Status::failed_precondition(m),
            IngestError::Exhausted(m) => Status::resource_exhausted(m),
            IngestError::NotFound(m) => Status::not_found(m),
            IngestError::Unavailable(m) => Status::unavailable(m),
            IngestError::Corrupt(m) => Status::data_loss(m),
            IngestError::Internal(m) => Status::internal(m),
            IngestError::Store(e) => match e {
                StoreError::Conflict { .. } | StoreError::EnrollmentConflict { .. } => {
                    Status::already_exists(format!("{e}; nothing from this request was stored"))
                }
                StoreError::Invalid(m) => {
                    Status::invalid_argument(format!("{m}; nothing from this request was stored"))
                }
                StoreError::Format(m) | StoreError::Backend(m) => {
                    tracing::error!(error = %m, "reading store failed");
                    Status::unavailable(
                        "the reading store is unavailable; nothing was stored, retry later",
                    )
                }
            },
        }
    }
}

/// A blocking task that failed to finish.
pub fn join_error(e: tokio::task::JoinError) -> IngestError {
    IngestError::internal(format!("store task failed: {e}"))
}
