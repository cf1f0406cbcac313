//! A regulator's list of the meters its keyshare serves (DESIGN.md, "Meter registry"): meter id,
//! the device's Ed25519 public key, its billing cycle, and where its encryption happens. It is
//! the regulator's, not the utility's: a meter id that is not on it gets no enrollment and no
//! release, an enrollment or batch not signed by the registered device key is refused, and a
//! meter that a head-end encrypts for is plaintext to the utility, so it is marked in responses
//! and audits and not counted toward k-anonymity. Ingest may load the same file to check batch
//! signatures at the door.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::readings::validate_meter_id;
use crate::signing::public_key_hex;

/// Where a meter's readings are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// The meter encrypts itself: the privacy claims hold for it.
    Meter,
    /// A head-end encrypts on its behalf: its readings are plaintext to the utility.
    Headend,
}

impl Encryption {
    pub fn name(self) -> &'static str {
        match self {
            Encryption::Meter => "meter",
            Encryption::Headend => "headend",
        }
    }
}

/// One registered meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub encryption: Encryption,
    /// The device's Ed25519 public key, hex (from the manufacturer or the regulator's meter PKI).
    pub device_key: String,
    /// Day of the month (1..=28) on which the meter's billing periods start.
    #[serde(default = "default_billing_day")]
    pub billing_day: u8,
    /// IANA time zone the meter's billing cycles are counted in (local midnight of the billing
    /// day). Unset: the zone of the tariff each bill is under, which the caller picks among the
    /// allowed tariffs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

fn default_billing_day() -> u8 {
    1
}

impl Entry {
    /// The device key, parsed.
    pub fn device_public(&self) -> Result<[u8; 32], RegistryError> {
        public_key_hex(&self.device_key)
            .map_err(|e| RegistryError(format!("meter {}: device_key: {e}", self.id)))
    }

    /// Checks the entry on its own.
    pub fn check(&self) -> Result<(), RegistryError> {
        validate_meter_id(&self.id).map_err(|e| RegistryError(e.to_string()))?;
        self.device_public()?;
        if let Some(tz) = &self.time_zone {
            if tz.parse::<chrono_tz::Tz>().is_err() {
                return Err(RegistryError(format!(
                    "meter {}: time_zone {tz:?} is not an IANA time zone",
                    self.id
                )));
            }
        }
        if !(1..=28).contains(&self.billing_day) {
            return Err(RegistryError(format!(
                "meter {}: billing_day {} is outside 1..=28 (a day every month has)",
                self.id, self.billing_day
            )));
        }
        Ok(())
    }

    /// One line for audit records and listings.
    pub fn describe(&self) -> String {
        format!(
            "{} (encryption {}, device key {}…, billing day {}{})",
            self.id,
            self.encryption.name(),
            &self.device_key.get(..16).unwrap_or(&self.device_key),
            self.billing_day,
            self.time_zone
                .as_deref()
                .map_or(String::new(), |z| format!(" in {z}"))
        )
    }
}

/// A malformed registry file or entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistryError(pub String);

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    /// Development only: a meter id not listed counts as registered and meter-encrypted, without a
    /// device key (its signatures are not checked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    development_allow_all: bool,
    #[serde(default)]
    meters: Vec<Entry>,
}

/// What the registry says about one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub encryption: Encryption,
    /// `None` only for an unlisted meter under `development_allow_all`.
    pub device_key: Option<[u8; 32]>,
}

/// The loaded registry.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    allow_all: bool,
    meters: BTreeMap<String, (Entry, [u8; 32])>,
    /// BLAKE3 of the file, hex (audited at start).
    pub file_hash: String,
}

/// Largest registry file.
const MAX_REGISTRY_BYTES: u64 = 256 << 20;

impl Registry {
    /// Reads a registry file; `None` gives the empty registry (every meter refused).
    pub fn load(path: Option<&Path>) -> Result<Self, RegistryError> {
        let Some(path) = path else {
            return Ok(Registry::default());
        };
        let what = || format!("registry {}", path.display());
        let meta =
            std::fs::metadata(path).map_err(|e| RegistryError(format!("{}: {e}", what())))?;
        if meta.len() > MAX_REGISTRY_BYTES {
            return Err(RegistryError(format!(
                "{}: larger than {MAX_REGISTRY_BYTES} bytes",
                what()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| RegistryError(format!("{}: {e}", what())))?;
        let mut r = Self::parse(&text).map_err(|e| RegistryError(format!("{}: {e}", what())))?;
        r.file_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
        Ok(r)
    }

    /// Parses registry TOML.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| RegistryError(e.to_string()))?;
        let mut r = Registry {
            allow_all: file.development_allow_all,
            ..Default::default()
        };
        for e in file.meters {
            r.insert(e)?;
        }
        Ok(r)
    }

    /// Adds an entry; a meter already listed is refused.
    pub fn insert(&mut self, e: Entry) -> Result<(), RegistryError> {
        e.check()?;
        let key = e.device_public()?;
        if self.meters.contains_key(&e.id) {
            return Err(RegistryError(format!("meter {} is listed twice", e.id)));
        }
        self.meters.insert(e.id.clone(), (e, key));
        Ok(())
    }

    /// Adds or replaces an entry; returns the one it replaced.
    pub fn upsert(&mut self, e: Entry) -> Result<Option<Entry>, RegistryError> {
        e.check()?;
        let key = e.device_public()?;
        Ok(self
            .meters
            .insert(e.id.clone(), (e, key))
            .map(|(old, _)| old))
    }

    /// Removes a meter; returns its entry.
    pub fn remove(&mut self, meter: &str) -> Option<Entry> {
        self.meters.remove(meter).map(|(e, _)| e)
    }

    /// The file text (meters in id order).
    pub fn to_toml(&self) -> Result<String, RegistryError> {
        toml::to_string(&RegistryFile {
            development_allow_all: self.allow_all,
            meters: self.entries().cloned().collect(),
        })
        .map_err(|e| RegistryError(e.to_string()))
    }

    /// Writes the file atomically (mode 0644).
    pub fn write(&self, path: &Path) -> Result<(), RegistryError> {
        crate::keys::write_atomic(path, self.to_toml()?.as_bytes(), 0o644)
            .map_err(|e| RegistryError(e.to_string()))
    }

    /// What the registry says about `meter`, or `None` when it is not registered.
    pub fn lookup(&self, meter: &str) -> Option<Lookup> {
        match self.meters.get(meter) {
            Some((e, k)) => Some(Lookup {
                encryption: e.encryption,
                device_key: Some(*k),
            }),
            None if self.allow_all => Some(Lookup {
                encryption: Encryption::Meter,
                device_key: None,
            }),
            None => None,
        }
    }

    /// The day of the month `meter`'s billing cycles start on and the zone they are counted in
    /// (if the registry fixes one): its entry's, or the 1st for an unlisted meter under
    /// `development_allow_all`; `None` when it is not registered.
    pub fn billing_cycle(&self, meter: &str) -> Option<(u8, Option<chrono_tz::Tz>)> {
        match self.meters.get(meter) {
            Some((e, _)) => Some((
                e.billing_day,
                e.time_zone.as_deref().and_then(|z| z.parse().ok()),
            )),
            None if self.allow_all => Some((default_billing_day(), None)),
            None => None,
        }
    }

    /// The listed entry of `meter`.
    pub fn entry(&self, meter: &str) -> Option<&Entry> {
        self.meters.get(meter).map(|(e, _)| e)
    }

    /// Listed entries in id order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.meters.values().map(|(e, _)| e)
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
                Some(l) if l.encryption == Encryption::Meter => private.push(m),
                Some(_) => headend.push(m),
            }
        }
        Ok((private, headend))
    }

    /// The changes from `old` to `self`, one line each ("added …", "removed …", "changed …").
    pub fn changes_from(&self, old: &Registry) -> Vec<String> {
        let mut out = Vec::new();
        if self.allow_all != old.allow_all {
            out.push(format!(
                "development_allow_all set to {} (unlisted meters {})",
                self.allow_all,
                if self.allow_all {
                    "now count as registered and meter-encrypted, unsigned"
                } else {
                    "are refused again"
                }
            ));
        }
        for (id, (e, _)) in &self.meters {
            match old.meters.get(id) {
                None => out.push(format!("added {}", e.describe())),
                Some((o, _)) if o != e => {
                    out.push(format!("changed {} to {}", o.describe(), e.describe()))
                }
                Some(_) => {}
            }
        }
        for (id, (o, _)) in &old.meters {
            if !self.meters.contains_key(id) {
                out.push(format!("removed {}", o.describe()));
            }
        }
        out
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

    /// Development only: let unlisted meters count as registered.
    pub fn set_allow_all(&mut self, on: bool) {
        self.allow_all = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SecretKey;

    fn entry(id: &str, enc: &str) -> String {
        format!(
            "[[meters]]\nid = \"{id}\"\nencryption = \"{enc}\"\ndevice_key = \"{}\"\n",
            hex::encode(SecretKey::generate().public())
        )
    }

    #[test]
    fn explicit_entries_and_refusals() {
        let r = Registry::parse(&(entry("m1", "meter") + &entry("m2", "headend"))).unwrap();
        assert_eq!(r.lookup("m1").unwrap().encryption, Encryption::Meter);
        assert!(r.lookup("m1").unwrap().device_key.is_some());
        assert_eq!(r.lookup("m2").unwrap().encryption, Encryption::Headend);
        assert_eq!(r.lookup("m3"), None);
        assert_eq!(r.entry("m1").unwrap().billing_day, 1);
        assert_eq!(Registry::load(None).unwrap().lookup("m1"), None);
        let e = Registry::parse(&(entry("m1", "meter") + &entry("m1", "meter"))).unwrap_err();
        assert!(e.0.contains("twice"));
        assert!(Registry::parse(&entry("bad id", "meter")).is_err());
        assert!(Registry::parse(&entry("m", "maybe")).is_err());
        // A device key is required, and must be a key.
        assert!(Registry::parse("[[meters]]\nid = \"m\"\nencryption = \"meter\"\n").is_err());
        assert!(Registry::parse(
            "[[meters]]\nid = \"m\"\nencryption = \"meter\"\ndevice_key = \"00\"\n"
        )
        .is_err());
        assert!(Registry::parse(&(entry("m", "meter") + "billing_day = 31\n")).is_err());
        // Development mode lists nothing and signs nothing.
        let d = Registry::parse("development_allow_all = true\n").unwrap();
        assert_eq!(d.lookup("x").unwrap().device_key, None);
    }

    #[test]
    fn edits_round_trip_and_report_their_changes() {
        let old = Registry::parse(&(entry("m1", "meter") + &entry("m2", "meter"))).unwrap();
        let mut new = Registry::parse(&old.to_toml().unwrap()).unwrap();
        assert!(new.changes_from(&old).is_empty());
        new.remove("m2").unwrap();
        let mut e = new.entry("m1").unwrap().clone();
        e.encryption = Encryption::Headend;
        assert!(new.upsert(e).unwrap().is_some());
        new.insert(
            Registry::parse(&entry("m3", "meter"))
                .unwrap()
                .entry("m3")
                .unwrap()
                .clone(),
        )
        .unwrap();
        let c = new.changes_from(&old);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c[0].starts_with("changed m1"));
        assert!(c[1].starts_with("added m3"));
        assert!(c[2].starts_with("removed m2"));
    }
}
