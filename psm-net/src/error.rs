//! Errors of the plumbing library.

use std::path::PathBuf;

/// Everything that can go wrong while setting up TLS, identities, configuration or servers.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("certificate error: {0}")]
    Certificate(String),
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    Spiffe { id: String, reason: String },
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl NetError {
    pub(crate) fn read(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NetError::Read {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NetError::Write {
            path: path.into(),
            source,
        }
    }
}
