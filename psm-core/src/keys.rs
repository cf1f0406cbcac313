//! Key material on disk: one share file per keyshare and the public bundle.
//!
//! A share file holds, for every key, the shares r_U its party holds plus the party's flooding
//! key; it is secret (mode 0600) and never leaves the keyshare. The public bundle holds what
//! meters, ingest and compute need, with a manifest of BLAKE3 hashes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::lwe::Encoding;
use crate::threshold::{FloodKey, PartyShares, Scheme, ThresholdError};

/// Version of the share-file format.
pub const SHARE_FILE_VERSION: u32 = 2;
/// A share file larger than this is not a share file (7 parties, 2 keys, 20 shares of 64 KiB).
pub const MAX_SHARE_FILE_BYTES: u64 = 16 << 20;

/// Which track a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    /// The tfhe-rs noise-squashing secret: decrypts squashed blocks (Δ = 2^123, 4 bits).
    /// (The linear track has no dealt key: meters enroll their own.)
    Tfhe,
}

/// Errors reading or writing key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
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
    #[error("{path} is not a valid share file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Threshold(#[from] ThresholdError),
}

/// One key's shares as held by one party.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct KeyShare {
    #[zeroize(skip)]
    pub key_id: String,
    #[zeroize(skip)]
    pub kind: KeyKind,
    #[zeroize(skip)]
    pub lwe_dimension: usize,
    /// The noise bound (log2) this key's ciphertexts are decrypted under, fixed by the ceremony
    /// (70 for squashed blocks): requests stating another are refused, so a caller cannot buy a
    /// fresh, independent flooding of the same ciphertext by restating its noise.
    #[zeroize(skip)]
    pub min_noise_log2: u32,
    /// (canonical share index, r_U words).
    pub shares: Vec<(usize, Vec<u128>)>,
}

/// Everything a keyshare holds, written by the ceremony.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ShareFile {
    #[zeroize(skip)]
    pub version: u32,
    /// Party name (matches the keyshare's certificate name) and 1-based index.
    #[zeroize(skip)]
    pub party: String,
    #[zeroize(skip)]
    pub party_index: usize,
    #[zeroize(skip)]
    pub parties: usize,
    #[zeroize(skip)]
    pub threshold: usize,
    pub flood_key: [u8; 32],
    pub keys: Vec<KeyShare>,
    /// BLAKE3 of the public bundle manifest this share belongs to (hex).
    #[zeroize(skip)]
    pub manifest_hash: String,
}

impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|k| k.key_id.as_str()).collect();
        write!(
            f,
            "ShareFile {{ party: {} ({}/{}, t={}), keys: {keys:?} (secrets redacted) }}",
            self.party, self.party_index, self.parties, self.threshold
        )
    }
}

impl ShareFile {
    pub fn scheme(&self) -> Result<Scheme, ThresholdError> {
        Scheme::new(self.parties, self.threshold)
    }

    pub fn flood_key(&self) -> FloodKey {
        FloodKey(self.flood_key)
    }

    pub fn key(&self, key_id: &str) -> Option<&KeyShare> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }

    /// The key's shares in the form the threshold functions take (0-based party index).
    pub fn party_shares(&self, key: &KeyShare) -> PartyShares {
        PartyShares {
            party: self.party_index - 1,
            shares: key.shares.clone(),
        }
    }

    /// Checks internal consistency: the scheme, that the party holds exactly its shares, and
    /// the dimensions.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != SHARE_FILE_VERSION {
            return Err(format!(
                "format version {} (expected {SHARE_FILE_VERSION})",
                self.version
            ));
        }
        let scheme = self.scheme().map_err(|e| e.to_string())?;
        if self.party_index == 0 || self.party_index > self.parties {
            return Err(format!(
                "party index {} outside 1..={}",
                self.party_index, self.parties
            ));
        }
        let want = scheme.held_by(self.party_index - 1);
        for k in &self.keys {
            let have: Vec<usize> = k.shares.iter().map(|(i, _)| *i).collect();
            if have != want {
                return Err(format!(
                    "key {} holds shares {have:?}, party should hold {want:?}",
                    k.key_id
                ));
            }
            if k.shares.iter().any(|(_, r)| r.len() != k.lwe_dimension) {
                return Err(format!(
                    "key {} has a share of the wrong dimension",
                    k.key_id
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates a share file.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let invalid = |reason: String| KeyFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| KeyFileError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        if meta.len() > MAX_SHARE_FILE_BYTES {
            return Err(invalid(format!(
                "{} bytes is larger than any share file",
                meta.len()
            )));
        }
        check_private_mode(path, &meta).map_err(invalid)?;
        let bytes = zeroize::Zeroizing::new(fs::read(path).map_err(|e| KeyFileError::Read {
            path: path.to_owned(),
            source: e,
        })?);
        let file: ShareFile = bincode::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        file.validate().map_err(invalid)?;
        Ok(file)
    }

    /// Writes the file with mode 0600 (temp file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), KeyFileError> {
        let bytes = zeroize::Zeroizing::new(bincode::serialize(self).map_err(|e| {
            KeyFileError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        })?);
        write_atomic(path, &bytes, 0o600)
    }
}

/// Writes a file atomically: temp file with `mode`, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let err = |e| KeyFileError::Write {
        path: path.to_owned(),
        source: e,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("partial");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Refuses a secret file that other users may read (mode wider than 0600): whoever reads it
/// holds the secret.
pub fn check_private_mode(path: &Path, meta: &fs::Metadata) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "mode {mode:04o} lets other users read this secret; run `chmod 600 {}`",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, meta);
    Ok(())
}

/// The encoding and noise bound a key is decrypted under: the key's own, fixed ones. A request
/// stating anything else is refused rather than adjusted.
pub fn enforced_encoding(
    key: &KeyShare,
    requested: Encoding,
    stated_noise_log2: u32,
) -> Result<(Encoding, u32), ThresholdError> {
    match key.kind {
        KeyKind::Tfhe => {
            if requested != crate::lwe::SQUASHED_BLOCK {
                return Err(ThresholdError::BadEncoding(format!(
                    "key {} decrypts squashed tfhe blocks only (Δ = 2^123, 4 message bits, unsigned)",
                    key.key_id
                )));
            }
            if stated_noise_log2 != key.min_noise_log2 {
                return Err(ThresholdError::BadEncoding(format!(
                    "key {} decrypts under noise bound 2^{} only; the request states 2^{stated_noise_log2}",
                    key.key_id, key.min_noise_log2
                )));
            }
            Ok((requested, key.min_noise_log2))
        }
    }
}

/// An entry of the public bundle manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestItem {
    pub name: String,
    pub file: String,
    pub size: u64,
    /// BLAKE3-256, hex.
    pub blake3: String,
}

/// `manifest.toml` of the public bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub tfhe_key_id: String,
    pub parties: usize,
    pub threshold: usize,
    pub party_names: Vec<String>,
    pub items: Vec<ManifestItem>,
}

impl Manifest {
    pub fn item(&self, name: &str) -> Option<&ManifestItem> {
        self.items.iter().find(|i| i.name == name)
    }
}

/// BLAKE3-256 as lowercase hex.
pub fn blake3_hex(data: &[u8]) -> String {
    hex::encode(blake3::hash(data).as_bytes())
}
