//! SPIFFE-style identities carried in certificate URI SANs: `spiffe://<trust-domain>/<role>/<name>`.

use std::fmt;
use std::str::FromStr;

use crate::NetError;

/// What a certificate holder is allowed to be. The role decides which RPCs it may call
/// (see [`crate::roles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A smart meter submitting its own readings.
    Meter,
    /// A meter head-end system submitting for the meters on its list.
    Headend,
    /// The ingest service (server identity only).
    Ingest,
    /// A compute node: reads stored readings, asks keyshares for partial decryptions.
    Compute,
    /// A keyshare service (server identity; also reads inputs from ingest to re-check work).
    Keyshare,
    /// A billing or analytics client of compute.
    Operator,
    /// Fetches and verifies keyshare audit logs.
    Auditor,
}

impl Role {
    /// Whether certificates of this role may serve TLS: the services only.
    pub fn is_server(self) -> bool {
        matches!(self, Role::Ingest | Role::Compute | Role::Keyshare)
    }

    /// Every role, in a stable order.
    pub const ALL: [Role; 7] = [
        Role::Meter,
        Role::Headend,
        Role::Ingest,
        Role::Compute,
        Role::Keyshare,
        Role::Operator,
        Role::Auditor,
    ];

    /// The path segment used in SPIFFE ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Meter => "meter",
            Role::Headend => "headend",
            Role::Ingest => "ingest",
            Role::Compute => "compute",
            Role::Keyshare => "keyshare",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; expected one of {}", names.join(", "))
            })
    }
}

/// A parsed `spiffe://<trust-domain>/<role>/<name>` identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub role: Role,
    pub name: String,
}

/// Names and trust domains are kept to a conservative alphabet so they are safe in file names,
/// log lines and URIs.
pub fn validate_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1..=128 characters of [A-Za-z0-9._-] and not start with '.'"
        ))
    }
}

impl SpiffeId {
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, NetError> {
        let id = format!("spiffe://{trust_domain}/{role}/{name}");
        validate_label("trust domain", trust_domain)
            .and_then(|()| validate_label("name", name))
            .map_err(|reason| NetError::Spiffe {
                id: id.clone(),
                reason,
            })?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            role,
            name: name.to_owned(),
        })
    }

    /// Reads the single SPIFFE URI SAN of a DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, NetError> {
        Self::from_cert(&parse_cert(der)?)
    }

    /// Reads the single SPIFFE URI SAN of a parsed certificate (callers that also check its
    /// revocation parse it once).
    pub fn from_cert(
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<Self, NetError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| NetError::Certificate(format!("bad subjectAltName: {e}")))?
            .ok_or_else(|| NetError::Certificate("certificate has no subjectAltName".into()))?;
        let mut found = None;
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = gn {
                if uri.starts_with("spiffe://") {
                    if found.is_some() {
                        return Err(NetError::Certificate(
                            "certificate has more than one SPIFFE id".into(),
                        ));
                    }
                    found = Some(uri.parse::<SpiffeId>()?);
                }
            }
        }
        found.ok_or_else(|| NetError::Certificate("certificate has no spiffe:// URI SAN".into()))
    }
}

/// Parses a DER certificate.
pub fn parse_cert(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, NetError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| NetError::Certificate(format!("cannot parse certificate: {e}")))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

impl FromStr for SpiffeId {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| NetError::Spiffe {
            id: s.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, role, name] = parts.as_slice() else {
            return Err(bad("expected spiffe://<trust-domain>/<role>/<name>"));
        };
        let role: Role = role.parse().map_err(|e: String| bad(&e))?;
        SpiffeId::new(td, role, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://psm.local/keyshare/ks-1".parse().unwrap();
        assert_eq!(id.role, Role::Keyshare);
        assert_eq!(id.name, "ks-1");
        assert_eq!(id.to_string(), "spiffe://psm.local/keyshare/ks-1");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "https://psm.local/meter/m1",
            "spiffe://psm.local/meter",
            "spiffe://psm.local/wizard/m1",
            "spiffe://psm.local/meter/m1/extra",
            "spiffe://psm.local/meter/../etc",
            "spiffe:///meter/m1",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }
}
