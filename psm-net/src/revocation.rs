//! Certificate revocation: a CRL file signed by the CA, checked by every server (for client
//! certificates, in the auth layer) and every client (for the server's certificate, in the TLS
//! verifier). The file is re-read when it changes, so a revocation takes effect within
//! [`RECHECK`] without a restart; a CRL that fails to verify at start refuses the start, and one
//! that fails later is logged and the previous list kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::NetError;

/// How often the CRL file's modification time is looked at.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// The revoked serial numbers of the CA's certificates.
pub struct Revocations {
    source: Option<(PathBuf, Vec<u8>)>,
    state: Mutex<State>,
}

struct State {
    checked: Instant,
    modified: Option<SystemTime>,
    /// The CRL number in force: a reload with a lower one (an old list put back, which would
    /// un-revoke certificates) is refused.
    number: u64,
    revoked: Arc<HashSet<Vec<u8>>>,
}

fn der_of(bytes: &[u8], label: &str) -> Vec<u8> {
    match x509_parser::pem::parse_x509_pem(bytes) {
        Ok((_, pem)) if pem.label == label => pem.contents,
        _ => bytes.to_vec(),
    }
}

/// A verified CRL: its number (0 without one) and revoked serials.
struct Verified {
    number: u64,
    revoked: HashSet<Vec<u8>>,
}

/// Parses `crl` and checks it is the CA's (issuer, signature).
fn verified_serials(crl: &[u8], ca_der: &[u8]) -> Result<Verified, String> {
    let der = der_of(crl, "X509 CRL");
    let (_, list) =
        CertificateRevocationList::from_der(&der).map_err(|e| format!("not a CRL: {e}"))?;
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| format!("CA certificate: {e}"))?;
    if list.issuer() != ca.subject() {
        return Err(format!(
            "issued by {}, not by the CA {}",
            list.issuer(),
            ca.subject()
        ));
    }
    list.verify_signature(ca.public_key())
        .map_err(|e| format!("its signature does not verify with the CA's key: {e}"))?;
    if let Some(next) = list.next_update() {
        if next.timestamp() < x509_parser::time::ASN1Time::now().timestamp() {
            tracing::warn!(next_update = %next, "the CRL is past its next update: publish a fresh one");
        }
    }
    Ok(Verified {
        number: list
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
        revoked: list
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect(),
    })
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("crl", &self.source.as_ref().map(|(p, _)| p))
            .finish()
    }
}

impl Revocations {
    /// No CRL: nothing is revoked.
    pub fn none() -> Arc<Self> {
        Arc::new(Revocations {
            source: None,
            state: Mutex::new(State {
                checked: Instant::now(),
                modified: None,
                number: 0,
                revoked: Arc::new(HashSet::new()),
            }),
        })
    }

    /// Loads the CRL at `crl` (PEM or DER), which must be signed by the CA in `ca_pem`.
    pub fn load(crl: Option<&Path>, ca_pem: &Path) -> Result<Arc<Self>, NetError> {
        let Some(path) = crl else {
            return Ok(Self::none());
        };
        let ca = std::fs::read(ca_pem).map_err(|e| NetError::read(ca_pem, e))?;
        let ca_der = crate::tls::first_cert_der(&ca)?;
        let bytes = std::fs::read(path).map_err(|e| NetError::read(path, e))?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let v = verified_serials(&bytes, &ca_der)
            .map_err(|e| NetError::Certificate(format!("CRL {}: {e}", path.display())))?;
        tracing::info!(crl = %path.display(), number = v.number, revoked = v.revoked.len(), "certificate revocation list loaded");
        Ok(Arc::new(Revocations {
            source: Some((path.to_owned(), ca_der)),
            state: Mutex::new(State {
                checked: Instant::now(),
                modified,
                number: v.number,
                revoked: Arc::new(v.revoked),
            }),
        }))
    }

    /// The current revoked serials, re-reading the file if it changed.
    fn current(&self) -> Arc<HashSet<Vec<u8>>> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((path, ca_der)) = &self.source {
            if st.checked.elapsed() >= RECHECK {
                st.checked = Instant::now();
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if modified != st.modified {
                    let number = st.number;
                    match std::fs::read(path)
                        .map_err(|e| e.to_string())
                        .and_then(|b| verified_serials(&b, ca_der))
                        .and_then(|v| {
                            if v.number < number {
                                Err(format!(
                                    "its CRL number {} is lower than the {number} in force (an older list)",
                                    v.number
                                ))
                            } else {
                                Ok(v)
                            }
                        }) {
                        Ok(v) => {
                            tracing::info!(crl = %path.display(), number = v.number, revoked = v.revoked.len(), "certificate revocation list reloaded");
                            st.revoked = Arc::new(v.revoked);
                            st.number = v.number;
                            st.modified = modified;
                        }
                        Err(e) => {
                            tracing::error!(crl = %path.display(), error = %e, "the new CRL is refused; the previous one stays in force")
                        }
                    }
                }
            }
        }
        st.revoked.clone()
    }

    /// Whether `cert` is revoked (its serial is on the list in force).
    pub fn is_revoked(&self, cert: &X509Certificate<'_>) -> bool {
        self.current().contains(cert.raw_serial())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevPki, Validity};
    use crate::Role;

    #[test]
    fn only_the_cas_own_list_is_accepted_and_it_names_revoked_serials() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pa, _) = DevPki::init(a.path(), "psm.test", false).unwrap();
        let (pb, _) = DevPki::init(b.path(), "psm.test", false).unwrap();
        let gone = pa.issue(Role::Meter, "m-1", Validity::days(1)).unwrap();
        let kept = pa.issue(Role::Meter, "m-2", Validity::days(1)).unwrap();
        let crl = pa.revoke(Role::Meter, "m-1").unwrap();
        let r = Revocations::load(Some(&crl), &pa.ca_cert_path()).unwrap();
        let revoked = |r: &Revocations, p: &Path| {
            let der = crate::tls::first_cert_der(&std::fs::read(p).unwrap()).unwrap();
            r.is_revoked(&crate::identity::parse_cert(&der).unwrap())
        };
        assert!(revoked(&r, &gone.cert));
        assert!(!revoked(&r, &kept.cert));
        // Another CA's list (a forged one, as far as this CA is concerned: same name, other key)
        // refuses the start.
        pb.issue(Role::Meter, "m-9", Validity::days(1)).unwrap();
        let foreign = pb.revoke(Role::Meter, "m-9").unwrap();
        let e = Revocations::load(Some(&foreign), &pa.ca_cert_path())
            .expect_err("a CRL of another CA was accepted");
        assert!(e.to_string().contains("signature does not verify"), "{e}");
        // Revoking again keeps the earlier serials.
        let first = std::fs::read(&crl).unwrap();
        pa.revoke(Role::Meter, "m-2").unwrap();
        let r = Revocations::load(Some(&crl), &pa.ca_cert_path()).unwrap();
        assert!(revoked(&r, &gone.cert) && revoked(&r, &kept.cert));
        // Putting the older list back (which would un-revoke m-2) is refused on reload.
        std::thread::sleep(RECHECK + std::time::Duration::from_millis(100));
        std::fs::write(&crl, first).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            revoked(&r, &kept.cert),
            "an older CRL un-revoked a certificate"
        );
    }
}
