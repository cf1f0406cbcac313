//! Service plumbing shared by every Private Smart Metering service and client: mutual TLS with
//! SPIFFE identities, the role table, server and client setup, configuration and telemetry.
//!
//! Services stay thin: they build their tonic service, hand it to [`server::serve`], and read the
//! authenticated caller from the request with [`auth::caller`].

pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod pki;
pub mod quorum;
pub mod quota;
pub mod revocation;
pub mod roles;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use error::NetError;
pub use identity::{Role, SpiffeId};

/// Installs the ring crypto provider for rustls. Call first thing in every `main` and test: the
/// process must have exactly one provider, and tonic panics at start if it cannot pick one.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
