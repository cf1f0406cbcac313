//! Enrollment: a meter's seeds sealed to the keyshares that hold them.
//!
//! Each σ_U goes to every holder of U in its own HPKE envelope (RFC 9180, base mode; KEM X-Wing
//! = ML-KEM-768 + X25519, a hybrid post-quantum KEM; HKDF-SHA256; ChaCha20-Poly1305). The AAD is
//! (meter, epoch, U, recipient) and the recipient rebuilds it from what it expects, so an
//! envelope replayed under another meter, epoch, share or keyshare does not open. An enrollment
//! carries the commitments h_U so a holder can check the seed it opened.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::XWing;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use psm_proto::v1::{Enrollment, SeedEnvelope};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::key::{commitment, MeterSeeds, Seed};
use super::LinearError;
use crate::readings::validate_meter_id;
use crate::threshold::Scheme;

const INFO: &[u8] = b"psm/v2/seed-envelope";
/// Size of an X-Wing public key.
pub const PUBLIC_KEY_BYTES: usize = 1216;
/// Size of an X-Wing encapsulated key.
pub const ENCAPSULATED_KEY_BYTES: usize = 1120;
/// A sealed 32-byte seed: seed and Poly1305 tag.
pub const SEALED_SEED_BYTES: usize = 48;
/// Largest epoch number.
pub const MAX_EPOCH: u32 = 1_000_000;

/// A keyshare's enrollment secret key. Secret (zeroized on drop).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EnrollmentSecret(pub Vec<u8>);

impl std::fmt::Debug for EnrollmentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentSecret(redacted)")
    }
}

/// A fresh key pair: (secret, public key bytes).
pub fn generate_keypair() -> (EnrollmentSecret, Vec<u8>) {
    let (sk, pk) = XWing::gen_keypair();
    (
        EnrollmentSecret(sk.to_bytes().to_vec()),
        pk.to_bytes().to_vec(),
    )
}

/// The public key of a secret key.
pub fn public_key(sk: &EnrollmentSecret) -> Result<Vec<u8>, LinearError> {
    let sk = <XWing as hpke::Kem>::PrivateKey::from_bytes(&sk.0)
        .map_err(|e| LinearError::Envelope(format!("not an X-Wing secret key: {e}")))?;
    Ok(XWing::sk_to_pk(&sk).to_bytes().to_vec())
}

/// A keyshare's published enrollment key (`enrollment.pub`, TOML): what meters seal seeds to,
/// signed by the keyshare's anchor key so that a key the utility swapped in is refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedKey {
    /// The keyshare's party name.
    pub party: String,
    /// Always "X-Wing" (ML-KEM-768 + X25519).
    pub kem: String,
    /// The public key, hex.
    pub public_key: String,
    /// Ed25519 signature by the keyshare's anchor over
    /// [`crate::signing::enrollment_key_message`], hex.
    pub anchor_signature: String,
}

impl PublishedKey {
    /// The key, signed with the keyshare's anchor secret.
    pub fn new(party: &str, public_key: &[u8], anchor: &crate::signing::SecretKey) -> Self {
        let sig = anchor.sign(&crate::signing::enrollment_key_message(
            party, "X-Wing", public_key,
        ));
        PublishedKey {
            party: party.to_owned(),
            kem: "X-Wing".into(),
            public_key: hex::encode(public_key),
            anchor_signature: hex::encode(sig),
        }
    }

    /// The key bytes, checked to be an X-Wing public key signed by the party's anchor.
    pub fn verified_key(&self, anchors: &crate::signing::Anchors) -> Result<Vec<u8>, LinearError> {
        let key = self.key_bytes()?;
        let sig = hex::decode(&self.anchor_signature).map_err(|e| {
            LinearError::Envelope(format!(
                "enrollment key of {}: anchor_signature is not hex: {e}",
                self.party
            ))
        })?;
        anchors
            .verify_enrollment_key(&self.party, &self.kem, &key, &sig)
            .map_err(|e| LinearError::Envelope(e.to_string()))?;
        Ok(key)
    }

    /// The key bytes, checked to be an X-Wing public key.
    pub fn key_bytes(&self) -> Result<Vec<u8>, LinearError> {
        let bad =
            |m: String| LinearError::Envelope(format!("enrollment key of {}: {m}", self.party));
        if self.kem != "X-Wing" {
            return Err(bad(format!("KEM {:?} is not X-Wing", self.kem)));
        }
        let b = hex::decode(&self.public_key).map_err(|e| bad(format!("not hex: {e}")))?;
        <XWing as hpke::Kem>::PublicKey::from_bytes(&b)
            .map_err(|e| bad(format!("not an X-Wing public key: {e}")))?;
        Ok(b)
    }

    /// Reads a published key file.
    pub fn read(path: &std::path::Path) -> Result<Self, LinearError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LinearError::Envelope(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            LinearError::Envelope(format!(
                "{} is not an enrollment key file: {e}",
                path.display()
            ))
        })
    }

    /// Writes the file (mode 0644).
    pub fn write(&self, path: &std::path::Path) -> Result<(), crate::keys::KeyFileError> {
        let text = toml::to_string(self).map_err(|e| crate::keys::KeyFileError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        crate::keys::write_atomic(path, text.as_bytes(), 0o644)
    }
}

/// Orders published keys by the scheme's party names: (name, key bytes) in party order. Every
/// party needs exactly one key, signed by its anchor.
pub fn keys_in_party_order(
    published: &[PublishedKey],
    party_names: &[String],
    anchors: &crate::signing::Anchors,
) -> Result<Vec<(String, Vec<u8>)>, LinearError> {
    party_names
        .iter()
        .map(|name| {
            let mut found = published.iter().filter(|k| &k.party == name);
            match (found.next(), found.next()) {
                (Some(k), None) => Ok((name.clone(), k.verified_key(anchors)?)),
                (None, _) => Err(LinearError::Envelope(format!(
                    "no enrollment key for keyshare {name}"
                ))),
                (Some(_), Some(_)) => Err(LinearError::Envelope(format!(
                    "two enrollment keys for keyshare {name}"
                ))),
            }
        })
        .collect()
}

fn aad(meter: &str, epoch: u32, share_index: usize, recipient: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(64 + meter.len() + recipient.len());
    a.extend_from_slice(b"psm/v2/seed-envelope-aad");
    a.extend_from_slice(&(meter.len() as u64).to_le_bytes());
    a.extend_from_slice(meter.as_bytes());
    a.extend_from_slice(&epoch.to_le_bytes());
    a.extend_from_slice(&(share_index as u32).to_le_bytes());
    a.extend_from_slice(&(recipient.len() as u64).to_le_bytes());
    a.extend_from_slice(recipient.as_bytes());
    a
}

/// Seals one seed to `recipient` (its party name and public key).
pub fn seal(
    meter: &str,
    epoch: u32,
    share_index: usize,
    recipient: &str,
    public_key: &[u8],
    seed: &Seed,
) -> Result<SeedEnvelope, LinearError> {
    let pk = <XWing as hpke::Kem>::PublicKey::from_bytes(public_key).map_err(|e| {
        LinearError::Envelope(format!(
            "{recipient}'s key is not an X-Wing public key: {e}"
        ))
    })?;
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, XWing>(
        &OpModeS::Base,
        &pk,
        INFO,
        &seed.0,
        &aad(meter, epoch, share_index, recipient),
    )
    .map_err(|e| LinearError::Envelope(format!("sealing to {recipient}: {e}")))?;
    Ok(SeedEnvelope {
        share_index: share_index as u32,
        recipient: recipient.to_owned(),
        encapsulated_key: enc.to_bytes().to_vec(),
        ciphertext: ct,
    })
}

/// Opens an envelope addressed to `me`, for the meter, epoch and share the caller expects.
pub fn open(
    meter: &str,
    epoch: u32,
    share_index: usize,
    me: &str,
    sk: &EnrollmentSecret,
    env: &SeedEnvelope,
) -> Result<Seed, LinearError> {
    let bad = |m: String| LinearError::Envelope(m);
    let sk = <XWing as hpke::Kem>::PrivateKey::from_bytes(&sk.0)
        .map_err(|e| bad(format!("not an X-Wing secret key: {e}")))?;
    let enc = <XWing as hpke::Kem>::EncappedKey::from_bytes(&env.encapsulated_key)
        .map_err(|e| bad(format!("malformed encapsulated key: {e}")))?;
    let mut plain = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, XWing>(
        &OpModeR::Base,
        &sk,
        &enc,
        INFO,
        &env.ciphertext,
        &aad(meter, epoch, share_index, me),
    )
    .map_err(|_| {
        bad(format!(
            "the envelope for share {share_index} of meter {meter} epoch {epoch} does not open for {me}"
        ))
    })?;
    if plain.len() != 32 {
        plain.zeroize();
        return Err(bad("the sealed seed is not 32 bytes".into()));
    }
    let mut s = [0u8; 32];
    s.copy_from_slice(&plain);
    plain.zeroize();
    Ok(Seed(s))
}

/// A meter's enrollment for `seeds`' epoch: commitments, one envelope per (share, holder) in
/// canonical order (share index, then party index), signed with the meter's device key. `keys`
/// are the parties' (name, public key) in party order, already checked against their anchors.
pub fn enroll(
    meter: &str,
    seeds: &MeterSeeds,
    scheme: Scheme,
    keys: &[(String, Vec<u8>)],
    device: &crate::signing::SecretKey,
) -> Result<Enrollment, LinearError> {
    validate_meter_id(meter).map_err(|e| LinearError::Enrollment(e.to_string()))?;
    if keys.len() != scheme.parties() || seeds.seeds.len() != scheme.share_count() {
        return Err(LinearError::Enrollment(format!(
            "{} keys and {} seeds for a {}-of-{} scheme",
            keys.len(),
            seeds.seeds.len(),
            scheme.threshold(),
            scheme.parties()
        )));
    }
    let mut envelopes = Vec::new();
    for (u, seed) in seeds.seeds.iter().enumerate() {
        for (p, (name, pk)) in keys.iter().enumerate() {
            if scheme.holds(p, u) {
                envelopes.push(seal(meter, seeds.epoch, u, name, pk, seed)?);
            }
        }
    }
    let mut e = Enrollment {
        meter_id: meter.to_owned(),
        epoch: seeds.epoch,
        parties: scheme.parties() as u32,
        threshold: scheme.threshold() as u32,
        commitments: seeds
            .commitments(meter)
            .into_iter()
            .map(|c| c.to_vec())
            .collect(),
        envelopes,
        seq: 0,
        device_signature: Vec::new(),
    };
    crate::signing::sign_enrollment(&mut e, device);
    Ok(e)
}

/// The shape checks anyone can do without opening an envelope (ingest does them): the scheme,
/// 32-byte commitments, exactly one envelope per (share, holder) in canonical order, sizes.
pub fn check_shape(
    e: &Enrollment,
    scheme: Scheme,
    party_names: &[String],
) -> Result<(), LinearError> {
    let bad = |m: String| Err(LinearError::Enrollment(m));
    validate_meter_id(&e.meter_id).map_err(|x| LinearError::Enrollment(x.to_string()))?;
    if e.epoch == 0 || e.epoch > MAX_EPOCH {
        return bad(format!("epoch {} outside 1..={MAX_EPOCH}", e.epoch));
    }
    if e.parties as usize != scheme.parties() || e.threshold as usize != scheme.threshold() {
        return bad(format!(
            "made for {}-of-{}; this deployment is {}-of-{}",
            e.threshold,
            e.parties,
            scheme.threshold(),
            scheme.parties()
        ));
    }
    if e.commitments.len() != scheme.share_count() || e.commitments.iter().any(|c| c.len() != 32) {
        return bad(format!(
            "needs {} commitments of 32 bytes",
            scheme.share_count()
        ));
    }
    let mut want = Vec::new();
    for u in 0..scheme.share_count() {
        for (p, name) in party_names.iter().enumerate() {
            if scheme.holds(p, u) {
                want.push((u as u32, name.as_str()));
            }
        }
    }
    let have: Vec<(u32, &str)> = e
        .envelopes
        .iter()
        .map(|x| (x.share_index, x.recipient.as_str()))
        .collect();
    if have != want {
        return bad(format!(
            "needs exactly one envelope per (share, holder) in canonical order: {want:?}"
        ));
    }
    if e.device_signature.len() != crate::signing::SIGNATURE_BYTES {
        return bad(format!(
            "the device signature must be {} bytes, not {}",
            crate::signing::SIGNATURE_BYTES,
            e.device_signature.len()
        ));
    }
    if e.envelopes.iter().any(|x| {
        x.encapsulated_key.len() != ENCAPSULATED_KEY_BYTES
            || x.ciphertext.len() != SEALED_SEED_BYTES
    }) {
        return bad(format!(
            "an envelope is not {ENCAPSULATED_KEY_BYTES} + {SEALED_SEED_BYTES} bytes"
        ));
    }
    Ok(())
}

/// What a holder gets from an enrollment: the seeds of the shares it holds, each checked against
/// its commitment.
pub fn open_enrollment(
    e: &Enrollment,
    scheme: Scheme,
    party_names: &[String],
    me: usize,
    sk: &EnrollmentSecret,
) -> Result<Vec<(usize, Seed)>, LinearError> {
    check_shape(e, scheme, party_names)?;
    let name = party_names
        .get(me)
        .ok_or_else(|| LinearError::Enrollment(format!("party {me} is not in the scheme")))?;
    let mut out = Vec::new();
    for env in e.envelopes.iter().filter(|x| &x.recipient == name) {
        let u = env.share_index as usize;
        let seed = open(&e.meter_id, e.epoch, u, name, sk, env)?;
        if commitment(&e.meter_id, e.epoch, u, &seed).as_slice() != e.commitments[u].as_slice() {
            return Err(LinearError::Enrollment(format!(
                "the seed for share {u} of meter {} epoch {} does not match its commitment",
                e.meter_id, e.epoch
            )));
        }
        out.push((u, seed));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    type KeyPairs = Vec<(EnrollmentSecret, Vec<u8>)>;

    fn parties() -> (Scheme, Vec<String>, KeyPairs) {
        let s = Scheme::new(3, 2).unwrap();
        let names = vec!["ks-1".to_string(), "ks-2".into(), "ks-3".into()];
        let keys = (0..3).map(|_| generate_keypair()).collect();
        (s, names, keys)
    }

    #[test]
    fn holders_open_their_seeds_and_nothing_else_opens() {
        let (s, names, keys) = parties();
        let pubs: Vec<(String, Vec<u8>)> = names
            .iter()
            .cloned()
            .zip(keys.iter().map(|k| k.1.clone()))
            .collect();
        let seeds = MeterSeeds::generate(s, 1);
        let device = crate::signing::SecretKey::generate();
        let e = enroll("m1", &seeds, s, &pubs, &device).unwrap();
        crate::signing::verify_enrollment(&e, &device.public()).unwrap();
        check_shape(&e, s, &names).unwrap();
        assert_eq!(e.envelopes.len(), 6);
        for (p, key) in keys.iter().enumerate() {
            let got = open_enrollment(&e, s, &names, p, &key.0).unwrap();
            let idx: Vec<usize> = got.iter().map(|(u, _)| *u).collect();
            assert_eq!(idx, s.held_by(p));
            for (u, seed) in got {
                assert_eq!(seed, seeds.seeds[u]);
            }
        }
        // The wrong keyshare's secret does not open ks-1's envelopes.
        let env = &e.envelopes[0];
        assert_eq!(env.recipient, "ks-2");
        assert!(open("m1", 1, 0, "ks-2", &keys[2].0, env).is_err());
        // Another meter's, epoch's or share's AAD does not open it either.
        assert!(open("m2", 1, 0, "ks-2", &keys[1].0, env).is_err());
        assert!(open("m1", 2, 0, "ks-2", &keys[1].0, env).is_err());
        assert!(open("m1", 1, 1, "ks-2", &keys[1].0, env).is_err());
        assert!(open("m1", 1, 0, "ks-3", &keys[1].0, env).is_err());
        assert!(open("m1", 1, 0, "ks-2", &keys[1].0, env).is_ok());
        // An envelope moved to another meter's enrollment is refused.
        let other = enroll("m2", &MeterSeeds::generate(s, 1), s, &pubs, &device).unwrap();
        let mut moved = other.clone();
        moved.envelopes[0] = e.envelopes[0].clone();
        assert!(open_enrollment(&moved, s, &names, 1, &keys[1].0).is_err());
        // A commitment that does not match the sealed seed is refused.
        let mut lied = e.clone();
        lied.commitments[0] = vec![0; 32];
        assert!(open_enrollment(&lied, s, &names, 1, &keys[1].0).is_err());
        // Shapes.
        let mut missing = e.clone();
        missing.envelopes.pop();
        assert!(check_shape(&missing, s, &names).is_err());
        let mut reordered = e.clone();
        reordered.envelopes.swap(0, 1);
        assert!(check_shape(&reordered, s, &names).is_err());
        let mut zero = e.clone();
        zero.epoch = 0;
        assert!(check_shape(&zero, s, &names).is_err());
        let mut unsigned = e.clone();
        unsigned.device_signature.clear();
        assert!(check_shape(&unsigned, s, &names).is_err());
        assert_eq!(public_key(&keys[0].0).unwrap(), keys[0].1);
    }
}
