//! Ed25519 keys that do not come from the utility (DESIGN.md, "Trust anchors"): a keyshare's
//! **anchor** key, whose public half the regulator provisions into meters, and a meter's
//! **device** key, whose public half is in every keyshare's registry. The utility relays what
//! they sign but cannot forge it: an anchor signs a keyshare's enrollment (HPKE) key and its
//! enrollment receipts; a device signs its enrollment manifest and its reading batches.
//!
//! Every signed message starts with its own domain string, and variable-length fields are
//! length-prefixed, so no message of one kind parses as another.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use psm_proto::v1::{Enrollment, ReadingBatch};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::keys::{check_private_mode, write_atomic, KeyFileError};

/// Size of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Size of an Ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;

/// Why a key or a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Signature(String),
    #[error(transparent)]
    File(#[from] KeyFileError),
}

/// An Ed25519 secret key (an anchor or a device key). Secret (zeroized on drop).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(redacted)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        SecretKey(b)
    }

    /// The key with these secret bytes (from a key file or a key-derivation the caller owns).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        SigningKey::from_bytes(&self.0).verifying_key().to_bytes()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        SigningKey::from_bytes(&self.0).sign(msg).to_bytes()
    }

    /// Reads a key file (32 raw bytes, mode 0600).
    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let bad = |m: String| SigningError::Key(format!("{}: {m}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        check_private_mode(path, &meta).map_err(bad)?;
        let mut bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if bytes.len() != 32 {
            bytes.zeroize();
            return Err(bad("not a 32-byte Ed25519 secret key".into()));
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes);
        bytes.zeroize();
        Ok(SecretKey(k))
    }

    /// Writes the key file (mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), SigningError> {
        Ok(write_atomic(path, &self.0, 0o600)?)
    }

    /// Reads the key at `path`, creating it first when there is none.
    pub fn read_or_create(path: &Path) -> Result<(Self, bool), SigningError> {
        if path.exists() {
            return Ok((Self::read(path)?, false));
        }
        let k = Self::generate();
        k.write(path)?;
        Ok((k, true))
    }
}

/// Parses a public key (32 bytes, a valid curve point).
pub fn public_key(bytes: &[u8]) -> Result<[u8; 32], SigningError> {
    let b: [u8; 32] = bytes.try_into().map_err(|_| {
        SigningError::Key(format!(
            "an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {}",
            bytes.len()
        ))
    })?;
    VerifyingKey::from_bytes(&b)
        .map_err(|_| SigningError::Key("not an Ed25519 public key".into()))?;
    Ok(b)
}

/// Parses a public key written as hex.
pub fn public_key_hex(hex_key: &str) -> Result<[u8; 32], SigningError> {
    let b = hex::decode(hex_key.trim())
        .map_err(|e| SigningError::Key(format!("public key is not hex: {e}")))?;
    public_key(&b)
}

/// Verifies `sig` over `msg` under `public` (strict: no malleable or small-order forms).
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

fn put_str(m: &mut Vec<u8>, s: &str) {
    m.extend_from_slice(&(s.len() as u64).to_le_bytes());
    m.extend_from_slice(s.as_bytes());
}

/// What an anchor signs to vouch for a keyshare's enrollment (HPKE) key.
pub fn enrollment_key_message(party: &str, kem: &str, public_key: &[u8]) -> Vec<u8> {
    let mut m = b"psm/v2/anchor/enrollment-key".to_vec();
    put_str(&mut m, party);
    put_str(&mut m, kem);
    m.extend_from_slice(&(public_key.len() as u64).to_le_bytes());
    m.extend_from_slice(public_key);
    m
}

/// What an anchor signs to state that its keyshare activated (meter, epoch) with this manifest.
pub fn receipt_message(party: &str, meter: &str, epoch: u32, manifest_hash: &[u8; 32]) -> Vec<u8> {
    let mut m = b"psm/v2/anchor/receipt".to_vec();
    put_str(&mut m, party);
    put_str(&mut m, meter);
    m.extend_from_slice(&epoch.to_le_bytes());
    m.extend_from_slice(manifest_hash);
    m
}

/// What a keyshare's anchor signs when it answers a co-holder: the kind of answer, who answers
/// whom, the asker's fresh nonce and a hash of the answer. Co-holders are pinned by their anchors,
/// so an impostor holding a certificate from the utility's CA cannot answer for one.
pub fn peer_message(
    kind: &str,
    callee: &str,
    caller: &str,
    nonce: &[u8],
    body: &[u8; 32],
) -> Vec<u8> {
    let mut m = b"psm/v2/anchor/peer/".to_vec();
    m.extend_from_slice(kind.as_bytes());
    put_str(&mut m, callee);
    put_str(&mut m, caller);
    m.extend_from_slice(&(nonce.len() as u64).to_le_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(body);
    m
}

/// The enrollment manifest a meter signs: (meter, epoch, scheme, every commitment h_U, every
/// envelope). With the envelopes signed, a relay that alters one makes a signature failure —
/// refused without being recorded — rather than an enrollment that fails to open and blocks the
/// meter's own; each holder still checks its seed against h_U, and co-holders compare the
/// manifest hash.
pub fn manifest_message(e: &Enrollment) -> Vec<u8> {
    let mut m = b"psm/v2/enrollment-manifest".to_vec();
    put_str(&mut m, &e.meter_id);
    m.extend_from_slice(&e.epoch.to_le_bytes());
    m.extend_from_slice(&e.parties.to_le_bytes());
    m.extend_from_slice(&e.threshold.to_le_bytes());
    m.extend_from_slice(&(e.commitments.len() as u32).to_le_bytes());
    for c in &e.commitments {
        m.extend_from_slice(&(c.len() as u64).to_le_bytes());
        m.extend_from_slice(c);
    }
    m.extend_from_slice(&(e.envelopes.len() as u32).to_le_bytes());
    for env in &e.envelopes {
        m.extend_from_slice(&env.share_index.to_le_bytes());
        put_str(&mut m, &env.recipient);
        for b in [&env.encapsulated_key, &env.ciphertext] {
            m.extend_from_slice(&(b.len() as u64).to_le_bytes());
            m.extend_from_slice(b);
        }
    }
    m
}

/// BLAKE3 of the signed manifest (signature included): what co-holders compare and receipts
/// name.
pub fn manifest_hash(e: &Enrollment) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&manifest_message(e));
    h.update(&(e.device_signature.len() as u64).to_le_bytes());
    h.update(&e.device_signature);
    *h.finalize().as_bytes()
}

/// What a meter signs for one reading batch: every field but the ciphertext itself, which the
/// signed `ciphertext_hash` pins.
pub fn batch_message(b: &ReadingBatch) -> Vec<u8> {
    let mut m = b"psm/v2/reading-batch".to_vec();
    put_str(&mut m, &b.meter_id);
    put_str(&mut m, &b.day);
    m.extend_from_slice(&(b.track as u32).to_le_bytes());
    put_str(
        &mut m,
        b.key
            .as_ref()
            .map(|k| k.key_id.as_str())
            .unwrap_or_default(),
    );
    m.extend_from_slice(&b.interval_seconds.to_le_bytes());
    m.extend_from_slice(&b.count.to_le_bytes());
    m.extend_from_slice(&b.epoch.to_le_bytes());
    m.extend_from_slice(&(b.channel as u32).to_le_bytes());
    m.extend_from_slice(&b.first_interval.to_le_bytes());
    m.extend_from_slice(&(b.ciphertext_hash.len() as u64).to_le_bytes());
    m.extend_from_slice(&b.ciphertext_hash);
    m
}

/// Signs an enrollment with the meter's device key.
pub fn sign_enrollment(e: &mut Enrollment, device: &SecretKey) {
    e.device_signature = device.sign(&manifest_message(e)).to_vec();
}

/// Checks an enrollment's device signature.
pub fn verify_enrollment(e: &Enrollment, device_public: &[u8; 32]) -> Result<(), SigningError> {
    if verify(device_public, &manifest_message(e), &e.device_signature) {
        Ok(())
    } else {
        Err(SigningError::Signature(format!(
            "the enrollment of meter {} epoch {} is not signed by the meter's registered device key",
            e.meter_id, e.epoch
        )))
    }
}

/// Signs a reading batch with the meter's device key.
pub fn sign_batch(b: &mut ReadingBatch, device: &SecretKey) {
    b.device_signature = device.sign(&batch_message(b)).to_vec();
}

/// Checks a reading batch's device signature.
pub fn verify_batch(b: &ReadingBatch, device_public: &[u8; 32]) -> Result<(), SigningError> {
    if verify(device_public, &batch_message(b), &b.device_signature) {
        Ok(())
    } else {
        Err(SigningError::Signature(format!(
            "the batch of meter {} for {} is not signed by the meter's registered device key (altered in transit, or not from the meter)",
            b.meter_id, b.day
        )))
    }
}

/// A keyshare's anchor public key as the regulator distributes it (`anchor.pub`, TOML).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorFile {
    /// The keyshare's party name.
    pub party: String,
    /// Always "Ed25519".
    pub algorithm: String,
    /// The public key, hex.
    pub public_key: String,
}

impl AnchorFile {
    pub fn new(party: &str, public: &[u8; 32]) -> Self {
        AnchorFile {
            party: party.to_owned(),
            algorithm: "Ed25519".into(),
            public_key: hex::encode(public),
        }
    }

    /// The key, checked.
    pub fn key(&self) -> Result<[u8; 32], SigningError> {
        if self.algorithm != "Ed25519" {
            return Err(SigningError::Key(format!(
                "anchor of {}: algorithm {:?} is not Ed25519",
                self.party, self.algorithm
            )));
        }
        public_key_hex(&self.public_key)
            .map_err(|e| SigningError::Key(format!("anchor of {}: {e}", self.party)))
    }

    pub fn read(path: &Path) -> Result<Self, SigningError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SigningError::Key(format!("cannot read {}: {e}", path.display())))?;
        let f: AnchorFile = toml::from_str(&text).map_err(|e| {
            SigningError::Key(format!("{} is not an anchor file: {e}", path.display()))
        })?;
        f.key()?;
        Ok(f)
    }

    /// The anchor key of `party` at `key` (read, or made there first, mode 0600) with its public
    /// file written to `public`; returns the key and whether it was made now. What a regulator
    /// runs once (`psm anchor init`) and a keyshare at every start.
    pub fn init(party: &str, key: &Path, public: &Path) -> Result<(SecretKey, bool), SigningError> {
        let (secret, created) = SecretKey::read_or_create(key)?;
        AnchorFile::new(party, &secret.public()).write(public)?;
        Ok((secret, created))
    }

    /// Writes the file (mode 0644).
    pub fn write(&self, path: &Path) -> Result<(), SigningError> {
        let text = toml::to_string(self).map_err(|e| KeyFileError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(write_atomic(path, text.as_bytes(), 0o644)?)
    }
}

/// The anchors a meter trusts: party name → anchor public key, one per party.
#[derive(Debug, Clone, Default)]
pub struct Anchors(pub std::collections::BTreeMap<String, [u8; 32]>);

impl Anchors {
    /// Reads anchor files; a party given twice is refused.
    pub fn read(paths: &[std::path::PathBuf]) -> Result<Self, SigningError> {
        let mut m = std::collections::BTreeMap::new();
        for p in paths {
            let f = AnchorFile::read(p)?;
            if m.insert(f.party.clone(), f.key()?).is_some() {
                return Err(SigningError::Key(format!(
                    "two anchors for keyshare {}",
                    f.party
                )));
            }
        }
        Ok(Anchors(m))
    }

    fn of(&self, party: &str) -> Result<&[u8; 32], SigningError> {
        self.0.get(party).ok_or_else(|| {
            SigningError::Key(format!(
                "no anchor for keyshare {party}: pass its anchor.pub (from the regulator, not the utility)"
            ))
        })
    }

    /// Checks a keyshare's enrollment key against its anchor.
    pub fn verify_enrollment_key(
        &self,
        party: &str,
        kem: &str,
        public_key: &[u8],
        sig: &[u8],
    ) -> Result<(), SigningError> {
        if verify(
            self.of(party)?,
            &enrollment_key_message(party, kem, public_key),
            sig,
        ) {
            Ok(())
        } else {
            Err(SigningError::Signature(format!(
                "the enrollment key of keyshare {party} is not signed by its anchor: refusing to seal seeds to it"
            )))
        }
    }

    /// Checks a receipt: signed by the party's anchor, for this meter, epoch and manifest.
    pub fn verify_receipt(
        &self,
        r: &psm_proto::v1::EnrollmentReceipt,
        meter: &str,
        epoch: u32,
        manifest_hash: &[u8; 32],
    ) -> Result<(), SigningError> {
        if r.meter_id != meter || r.epoch != epoch || r.manifest_hash != manifest_hash {
            return Err(SigningError::Signature(format!(
                "the receipt from {} is for meter {} epoch {}, not for this enrollment of {meter} epoch {epoch}",
                r.party, r.meter_id, r.epoch
            )));
        }
        if verify(
            self.of(&r.party)?,
            &receipt_message(&r.party, meter, epoch, manifest_hash),
            &r.signature,
        ) {
            Ok(())
        } else {
            Err(SigningError::Signature(format!(
                "the receipt for meter {meter} epoch {epoch} claiming to be from {} is not signed by its anchor",
                r.party
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_their_fields_and_keys() {
        let k = SecretKey::generate();
        let other = SecretKey::generate();
        let mut e = Enrollment {
            meter_id: "m1".into(),
            epoch: 1,
            parties: 3,
            threshold: 2,
            commitments: vec![vec![1; 32], vec![2; 32], vec![3; 32]],
            ..Default::default()
        };
        sign_enrollment(&mut e, &k);
        verify_enrollment(&e, &k.public()).unwrap();
        assert!(verify_enrollment(&e, &other.public()).is_err());
        let mut changed = e.clone();
        changed.commitments[1] = vec![9; 32];
        assert!(verify_enrollment(&changed, &k.public()).is_err());
        let mut renamed = e.clone();
        renamed.meter_id = "m2".into();
        assert!(verify_enrollment(&renamed, &k.public()).is_err());
        // An envelope altered in transit breaks the signature too.
        let mut with_env = e.clone();
        with_env.envelopes.push(psm_proto::v1::SeedEnvelope {
            share_index: 0,
            recipient: "ks-2".into(),
            encapsulated_key: vec![1; 4],
            ciphertext: vec![2; 4],
        });
        sign_enrollment(&mut with_env, &k);
        verify_enrollment(&with_env, &k.public()).unwrap();
        with_env.envelopes[0].ciphertext[0] ^= 1;
        assert!(verify_enrollment(&with_env, &k.public()).is_err());
        // A signature moved onto a batch does not verify there.
        let mut b = ReadingBatch {
            meter_id: "m1".into(),
            day: "2026-01-01".into(),
            ciphertext_hash: vec![7; 32],
            ..Default::default()
        };
        b.device_signature = e.device_signature.clone();
        assert!(verify_batch(&b, &k.public()).is_err());
        sign_batch(&mut b, &k);
        verify_batch(&b, &k.public()).unwrap();
        b.ciphertext_hash[0] ^= 1;
        assert!(verify_batch(&b, &k.public()).is_err());
        assert!(public_key(&[0u8; 31]).is_err());
        assert!(public_key_hex("zz").is_err());
    }

    #[test]
    fn anchors_check_keys_and_receipts() {
        let a = SecretKey::generate();
        let mut anchors = Anchors::default();
        anchors.0.insert("ks-1".into(), a.public());
        let pk = vec![5u8; 40];
        let sig = a.sign(&enrollment_key_message("ks-1", "X-Wing", &pk));
        anchors
            .verify_enrollment_key("ks-1", "X-Wing", &pk, &sig)
            .unwrap();
        // Another key, another party or another anchor's signature: refused.
        assert!(anchors
            .verify_enrollment_key("ks-1", "X-Wing", &[6u8; 40], &sig)
            .is_err());
        assert!(anchors
            .verify_enrollment_key("ks-2", "X-Wing", &pk, &sig)
            .is_err());
        let forged = SecretKey::generate().sign(&enrollment_key_message("ks-1", "X-Wing", &pk));
        assert!(anchors
            .verify_enrollment_key("ks-1", "X-Wing", &pk, &forged)
            .is_err());
        let h = [4u8; 32];
        let r = psm_proto::v1::EnrollmentReceipt {
            party: "ks-1".into(),
            meter_id: "m1".into(),
            epoch: 2,
            manifest_hash: h.to_vec(),
            signature: a.sign(&receipt_message("ks-1", "m1", 2, &h)).to_vec(),
        };
        anchors.verify_receipt(&r, "m1", 2, &h).unwrap();
        assert!(anchors.verify_receipt(&r, "m1", 3, &h).is_err());
        assert!(anchors.verify_receipt(&r, "m1", 2, &[0; 32]).is_err());
        let mut r2 = r.clone();
        r2.signature = SecretKey::generate()
            .sign(&receipt_message("ks-1", "m1", 2, &h))
            .to_vec();
        assert!(anchors.verify_receipt(&r2, "m1", 2, &h).is_err());
    }

    #[test]
    fn key_files_round_trip_and_private_mode_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let (k, created) = SecretKey::read_or_create(&p).unwrap();
        assert!(created);
        let (k2, created) = SecretKey::read_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k.public(), k2.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(SecretKey::read(&p).is_err());
        }
        let f = AnchorFile::new("ks-1", &k.public());
        let fp = dir.path().join("anchor.pub");
        f.write(&fp).unwrap();
        assert_eq!(AnchorFile::read(&fp).unwrap(), f);
    }
}
