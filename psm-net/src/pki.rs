//! A development PKI: one CA and certificates with SPIFFE URI SANs, written as PEM files
//! (`<dir>/ca.crt`, `<dir>/<role>/<name>.crt` and `.key`, keys mode 0600). Production deployments
//! bring certificates from their own CA; the services only need PEM paths.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{NetError, Role, SpiffeId};

/// File written next to the CA recording the trust domain, so `issue` needs no repetition.
const PKI_META: &str = "pki.toml";

/// The certificates `psm pki init` issues besides the CA: every service plus one client of each
/// kind, enough to run the whole system locally.
pub const DEFAULT_IDENTITIES: &[(Role, &str)] = &[
    (Role::Ingest, "ingest"),
    (Role::Compute, "compute"),
    (Role::Keyshare, "keyshare-1"),
    (Role::Keyshare, "keyshare-2"),
    (Role::Keyshare, "keyshare-3"),
    (Role::Operator, "billing"),
    (Role::Auditor, "regulator"),
    (Role::Headend, "headend-1"),
    (Role::Meter, "meter-0001"),
];

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone)]
pub struct IssuedPaths {
    pub id: SpiffeId,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validity of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// A development CA on disk.
pub struct DevPki {
    dir: PathBuf,
    trust_domain: String,
}

fn cert_err(e: impl std::fmt::Display) -> NetError {
    NetError::Certificate(e.to_string())
}

/// Writes a file atomically (temp + fsync + rename) with the given Unix mode.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), NetError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| NetError::write(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(|e| NetError::write(&tmp, e))?;
    f.write_all(data).map_err(|e| NetError::write(&tmp, e))?;
    f.sync_all().map_err(|e| NetError::write(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| NetError::write(path, e))?;
    Ok(())
}

impl DevPki {
    /// Creates a new CA in `dir` and issues [`DEFAULT_IDENTITIES`]. Refuses to overwrite an
    /// existing CA unless `force`.
    pub fn init(
        dir: &Path,
        trust_domain: &str,
        force: bool,
    ) -> Result<(Self, Vec<IssuedPaths>), NetError> {
        crate::identity::validate_label("trust domain", trust_domain).map_err(NetError::Config)?;
        let ca_cert = dir.join("ca.crt");
        if ca_cert.exists() && !force {
            return Err(NetError::Config(format!(
                "{} already holds a CA; use --force to replace it (every certificate must then be reissued)",
                dir.display()
            )));
        }
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("PSM dev CA ({trust_domain})"));
        dn.push(
            DnType::OrganizationName,
            "Private Smart Metering (development)",
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let v = Validity::days(3650);
        params.not_before = v.not_before;
        params.not_after = v.not_after;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&ca_cert, cert.pem().as_bytes(), 0o644)?;
        write_file(
            &dir.join(PKI_META),
            format!("trust_domain = {trust_domain:?}\n").as_bytes(),
            0o644,
        )?;
        let pki = DevPki {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
        };
        let mut issued = Vec::new();
        for (role, name) in DEFAULT_IDENTITIES {
            issued.push(pki.issue(*role, name, Validity::days(825))?);
        }
        Ok((pki, issued))
    }

    /// Opens an existing dev PKI directory.
    pub fn open(dir: &Path) -> Result<Self, NetError> {
        let meta_path = dir.join(PKI_META);
        let meta = fs::read_to_string(&meta_path).map_err(|e| NetError::read(&meta_path, e))?;
        let table: toml::Table = meta
            .parse()
            .map_err(|e| NetError::Config(format!("{}: {e}", meta_path.display())))?;
        let trust_domain = table
            .get("trust_domain")
            .and_then(|v| v.as_str())
            .ok_or_else(|| NetError::Config(format!("{} lacks trust_domain", meta_path.display())))?
            .to_owned();
        Ok(DevPki {
            dir: dir.to_owned(),
            trust_domain,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA's certificate revocation list, `<dir>/ca.crl` (written by [`DevPki::revoke`]).
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("ca.crl")
    }

    /// The CRL, if one was written.
    pub fn crl_if_any(&self) -> Option<PathBuf> {
        Some(self.crl_path()).filter(|p| p.exists())
    }

    /// Revokes the certificate of `role`/`name`: rewrites `ca.crl`, signed by the CA, with every
    /// serial revoked before plus this one (and a CRL number one higher). Services given the
    /// file (`--tls-crl`) refuse the certificate within seconds, without a restart.
    pub fn revoke(&self, role: Role, name: &str) -> Result<PathBuf, NetError> {
        use rcgen::{
            CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber,
        };
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (cert_path, _) = self.paths(role, name);
        let pem = fs::read(&cert_path).map_err(|e| NetError::read(&cert_path, e))?;
        let der = crate::tls::first_cert_der(&pem)?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(cert_err)?;
        let serial = cert.raw_serial().to_vec();
        let now = OffsetDateTime::now_utc();
        let crl_path = self.crl_path();
        let (mut serials, mut number) = (Vec::new(), 0u64);
        if crl_path.exists() {
            let bytes = fs::read(&crl_path).map_err(|e| NetError::read(&crl_path, e))?;
            let der = match x509_parser::pem::parse_x509_pem(&bytes) {
                Ok((_, p)) => p.contents,
                Err(_) => bytes,
            };
            let (_, old) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
                .map_err(cert_err)?;
            serials = old
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect();
            number = old
                .crl_number()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
        }
        if !serials.contains(&serial) {
            serials.push(serial);
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(30),
            crl_number: SerialNumber::from(number + 1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .into_iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let ca_key_path = self.dir.join("ca.key");
        let ca_key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| NetError::read(&ca_key_path, e))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
        let ca_pem_path = self.ca_cert_path();
        let ca_pem =
            fs::read_to_string(&ca_pem_path).map_err(|e| NetError::read(&ca_pem_path, e))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_err)?;
        let crl = params.signed_by(&issuer).map_err(cert_err)?;
        write_file(&crl_path, crl.pem().map_err(cert_err)?.as_bytes(), 0o644)?;
        Ok(crl_path)
    }

    /// Where the certificate of `role`/`name` lives (whether or not it exists yet).
    pub fn paths(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        let base = self.dir.join(role.as_str());
        (
            base.join(format!("{name}.crt")),
            base.join(format!("{name}.key")),
        )
    }

    /// Issues a certificate for `spiffe://<td>/<role>/<name>` with DNS SANs `localhost` and
    /// `name` and IP SAN 127.0.0.1: a TLS client certificate, and a server certificate too for
    /// the service roles (ingest, compute, keyshare).
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        validity: Validity,
    ) -> Result<IssuedPaths, NetError> {
        let id = SpiffeId::new(&self.trust_domain, role, name)?;
        let ca_key_path = self.dir.join("ca.key");
        let ca_key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| NetError::read(&ca_key_path, e))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
        let ca_pem_path = self.ca_cert_path();
        let ca_pem =
            fs::read_to_string(&ca_pem_path).map_err(|e| NetError::read(&ca_pem_path, e))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_err)?;

        let mut params = CertificateParams::new(vec!["localhost".to_owned(), name.to_owned()])
            .map_err(cert_err)?;
        params
            .subject_alt_names
            .push(SanType::URI(id.to_string().try_into().map_err(cert_err)?));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{role}/{name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // Only services serve: a meter, head-end, operator or auditor certificate must not be
        // able to stand in for a server (a head-end passing itself off as ingest).
        params.extended_key_usages = if role.is_server() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
        let (cert_path, key_path) = self.paths(role, name);
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(IssuedPaths {
            id,
            cert: cert_path,
            key: key_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_read_back_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, issued) = DevPki::init(dir.path(), "psm.test", false).unwrap();
        assert_eq!(issued.len(), DEFAULT_IDENTITIES.len());
        assert!(
            DevPki::init(dir.path(), "psm.test", false).is_err(),
            "overwrote a CA"
        );
        let extra = pki.issue(Role::Meter, "m-42", Validity::days(1)).unwrap();
        let pem = fs::read(&extra.cert).unwrap();
        let der = crate::tls::first_cert_der(&pem).unwrap();
        let id = SpiffeId::from_cert_der(&der).unwrap();
        assert_eq!(id.to_string(), "spiffe://psm.test/meter/m-42");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&extra.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let reopened = DevPki::open(dir.path()).unwrap();
        assert_eq!(reopened.trust_domain(), "psm.test");
    }
}
