//! Loading PEM material into tonic's mutual-TLS configurations.

use std::fs;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{Role, SpiffeId};

use crate::NetError;

/// Paths of a certificate, its private key, the CA that verifies peers, and optionally the CA's
/// certificate revocation list.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub crl: Option<PathBuf>,
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

    /// Client side: present our certificate, trust only the CA, and accept only a server whose
    /// certificate carries `server_name` as a DNS name *and* the SPIFFE id
    /// `spiffe://<our trust domain>/<role>/<server_name>` — `role` when given, otherwise any
    /// service role. The CA alone is not enough: it also signs meters and head-ends.
    pub fn client_config(
        &self,
        server_name: &str,
        role: Option<Role>,
    ) -> Result<rustls::ClientConfig, NetError> {
        let bad =
            |what: &Path, e: String| NetError::Certificate(format!("{}: {e}", what.display()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(&self.ca)?) {
            let c = c.map_err(|e| bad(&self.ca, e.to_string()))?;
            roots.add(c).map_err(|e| bad(&self.ca, e.to_string()))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| bad(&self.ca, e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&read(&self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&self.cert, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| bad(&self.key, e.to_string()))?;
        let verifier = SpiffeServerVerifier {
            inner: webpki,
            trust_domain: self.own_id()?.trust_domain,
            role,
            name: server_name.to_owned(),
            revoked: self.revocations()?,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::Certificate(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad(&self.key, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// The CA's revocation list (empty without `crl`).
    pub fn revocations(&self) -> Result<Arc<crate::revocation::Revocations>, NetError> {
        crate::revocation::Revocations::load(self.crl.as_deref(), &self.ca)
    }

    /// The SPIFFE id in our own certificate.
    pub fn own_id(&self) -> Result<crate::SpiffeId, NetError> {
        let der = first_cert_der(&read(&self.cert)?)?;
        crate::SpiffeId::from_cert_der(&der)
    }
}

/// The CA's verification (chain, validity, DNS name, serverAuth) and then the server's SPIFFE
/// identity: the name and role the client meant to reach, in its own trust domain.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    trust_domain: String,
    role: Option<Role>,
    name: String,
    revoked: Arc<crate::revocation::Revocations>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let bad = |e| rustls::Error::General(format!("server certificate: {e}"));
        let cert = crate::identity::parse_cert(end_entity.as_ref()).map_err(bad)?;
        let id = SpiffeId::from_cert(&cert).map_err(bad)?;
        if self.revoked.is_revoked(&cert) {
            return Err(rustls::Error::General(format!(
                "the server certificate of {id} is revoked"
            )));
        }
        let role_ok = match self.role {
            Some(r) => id.role == r,
            None => id.role.is_server(),
        };
        if id.trust_domain != self.trust_domain || id.name != self.name || !role_ok {
            let want = self
                .role
                .map_or_else(|| "<a service role>".to_owned(), |r| r.to_string());
            return Err(rustls::Error::General(format!(
                "the server is {id}, not spiffe://{}/{want}/{}",
                self.trust_domain, self.name
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
