//! Loading PEM material into tonic's mutual-TLS configurations.

use std::fs;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::NetError;

/// Paths of a certificate, its private key and the CA that verifies peers.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, NetError> {
    fs::read(path).map_err(|e| NetError::read(path, e))
}

/// The first certificate of a PEM bundle, as DER.
pub fn first_cert_der(pem: &[u8]) -> Result<Vec<u8>, NetError> {
    let cert = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| NetError::Certificate("no CERTIFICATE block in PEM".into()))?
        .map_err(|e| NetError::Certificate(format!("bad PEM: {e}")))?;
    Ok(cert.as_ref().to_vec())
}

impl TlsPaths {
    fn identity(&self) -> Result<Identity, NetError> {
        let cert = read(&self.cert)?;
        // Fail early with a clear message rather than inside the TLS handshake.
        first_cert_der(&cert)
            .map_err(|e| NetError::Certificate(format!("{}: {e}", self.cert.display())))?;
        let key = read(&self.key)?;
        Ok(Identity::from_pem(cert, key))
    }

    fn ca(&self) -> Result<Certificate, NetError> {
        let ca = read(&self.ca)?;
        first_cert_der(&ca)
            .map_err(|e| NetError::Certificate(format!("{}: {e}", self.ca.display())))?;
        Ok(Certificate::from_pem(ca))
    }

    /// Server side: present our certificate, require a client certificate from the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, NetError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?))
    }

    /// Client side: present our certificate, trust only the CA, expect `server_name` in the
    /// server's certificate.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, NetError> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }

    /// The SPIFFE id in our own certificate.
    pub fn own_id(&self) -> Result<crate::SpiffeId, NetError> {
        let der = first_cert_der(&read(&self.cert)?)?;
        crate::SpiffeId::from_cert_der(&der)
    }
}
