//! This keyshare's own list of the meters it serves (DESIGN.md, "Meter registry"): which meter
//! ids exist and where their encryption happens. It is the regulator's, not the utility's: a
//! meter id that is not on it gets no enrollment and no release, and a meter that a head-end
//! encrypts for is plaintext to the utility, so it is marked in responses and audits and not
//! counted toward k-anonymity.

use std::collections::HashMap;
use std::path::Path;

use psm_core::readings::validate_meter_id;
use serde::Deserialize;

/// Where a meter's readings are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// The meter encrypts itself: the privacy claims hold for it.
    Meter,
    /// A head-end encrypts on its behalf: its readings are plaintext to the utility.
    Headend,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    encryption: Encryption,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    /// Development only: every meter id counts as registered and meter-encrypted.
    #[serde(default)]
    development_allow_all: bool,
    #[serde(default)]
    meters: Vec<Entry>,
}

/// The loaded registry.
#[derive(Debug, Default)]
pub struct Registry {
    allow_all: bool,
    meters: HashMap<String, Encryption>,
    /// BLAKE3 of the file, hex (audited at start).
    pub file_hash: String,
}

/// Largest registry file.
const MAX_REGISTRY_BYTES: u64 = 256 << 20;

impl Registry {
    /// Reads a registry file; `None` gives the empty registry (every meter refused).
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Registry::default());
        };
        let what = || format!("registry {}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", what()))?;
        if meta.len() > MAX_REGISTRY_BYTES {
            return Err(format!(
                "{}: larger than {MAX_REGISTRY_BYTES} bytes",
                what()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", what()))?;
        let file: RegistryFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", what()))?;
        let mut meters = HashMap::with_capacity(file.meters.len());
        for e in file.meters {
            validate_meter_id(&e.id).map_err(|x| format!("{}: {x}", what()))?;
            if meters.insert(e.id.clone(), e.encryption).is_some() {
                return Err(format!("{}: meter {} is listed twice", what(), e.id));
            }
        }
        Ok(Registry {
            allow_all: file.development_allow_all,
            meters,
            file_hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
        })
    }

    /// Where `meter`'s encryption happens, or `None` when it is not registered.
    pub fn lookup(&self, meter: &str) -> Option<Encryption> {
        match self.meters.get(meter) {
            Some(e) => Some(*e),
            None if self.allow_all => Some(Encryption::Meter),
            None => None,
        }
    }

    /// Splits `members` into (meter-encrypted, head-end-encrypted), in order; `Err` names the
    /// first member that is not registered. What both tracks judge cohorts by.
    pub fn split<'a>(
        &self,
        members: &'a [String],
    ) -> Result<(Vec<&'a String>, Vec<&'a String>), &'a str> {
        let (mut private, mut headend) = (Vec::new(), Vec::new());
        for m in members {
            match self.lookup(m) {
                None => return Err(m),
                Some(Encryption::Meter) => private.push(m),
                Some(Encryption::Headend) => headend.push(m),
            }
        }
        Ok((private, headend))
    }

    pub fn len(&self) -> usize {
        self.meters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    pub fn allows_all(&self) -> bool {
        self.allow_all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_entries_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(
            &p,
            "[[meters]]\nid = \"m1\"\nencryption = \"meter\"\n[[meters]]\nid = \"m2\"\nencryption = \"headend\"\n",
        )
        .unwrap();
        let r = Registry::load(Some(&p)).unwrap();
        assert_eq!(r.lookup("m1"), Some(Encryption::Meter));
        assert_eq!(r.lookup("m2"), Some(Encryption::Headend));
        assert_eq!(r.lookup("m3"), None);
        assert_eq!(Registry::load(None).unwrap().lookup("m1"), None);
        std::fs::write(
            &p,
            "[[meters]]\nid = \"m1\"\nencryption = \"meter\"\n[[meters]]\nid = \"m1\"\nencryption = \"meter\"\n",
        )
        .unwrap();
        assert!(Registry::load(Some(&p)).unwrap_err().contains("twice"));
        std::fs::write(&p, "[[meters]]\nid = \"bad id\"\nencryption = \"meter\"\n").unwrap();
        assert!(Registry::load(Some(&p)).is_err());
        std::fs::write(&p, "[[meters]]\nid = \"m\"\nencryption = \"maybe\"\n").unwrap();
        assert!(Registry::load(Some(&p)).is_err());
    }
}
