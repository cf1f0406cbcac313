//! TLS identity flags shared by the commands that call a service.

use std::path::PathBuf;

use anyhow::Context;
use psm_net::tls::TlsPaths;

#[derive(clap::Args, Clone)]
pub struct ClientArgs {
    /// Service URL, e.g. https://127.0.0.1:7411.
    #[arg(long)]
    pub endpoint: String,
    /// DNS name expected in the service certificate (the dev PKI uses the service name).
    #[arg(long)]
    pub server_name: String,
    /// Dev PKI directory the default identity is taken from.
    #[arg(long, default_value = "psm-data/pki")]
    pub pki: PathBuf,
    /// Identity from the dev PKI as ROLE/NAME.
    #[arg(long)]
    pub identity: Option<String>,
    /// Client certificate (PEM); overrides --pki/--identity.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that the service certificate must chain to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The CA's revocation list (PEM or DER); with --pki, its `ca.crl` is used when present.
    #[arg(long)]
    pub tls_crl: Option<PathBuf>,
}

impl ClientArgs {
    /// TLS material, from explicit files or `--pki` + identity (`default_identity` if none given).
    pub fn tls(&self, default_identity: &str) -> anyhow::Result<TlsPaths> {
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            return Ok(TlsPaths {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                crl: self.tls_crl.clone(),
            });
        }
        let ident = self.identity.as_deref().unwrap_or(default_identity);
        let (role, name) = ident
            .split_once('/')
            .with_context(|| format!("--identity {ident:?} must be ROLE/NAME"))?;
        let role: psm_net::Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let pki = psm_net::pki::DevPki::open(&self.pki)
            .with_context(|| format!("opening the dev PKI in {}", self.pki.display()))?;
        let (cert, key) = pki.paths(role, name);
        Ok(TlsPaths {
            cert,
            key,
            ca: pki.ca_cert_path(),
            crl: self.tls_crl.clone().or_else(|| pki.crl_if_any()),
        })
    }

    pub fn channel(&self, default_identity: &str) -> anyhow::Result<tonic::transport::Channel> {
        Ok(psm_net::client::channel(
            &self.endpoint,
            &self.server_name,
            None,
            &self.tls(default_identity)?,
            &psm_net::client::ClientOptions::default(),
        )?)
    }
}
