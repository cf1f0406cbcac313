//! The trusted-dealer key ceremony (DESIGN.md, "Keys"): generate the tfhe-rs key set, split the
//! squash secret into replicated shares, write one share file per party and the public bundle,
//! and check the result by decrypting a known ciphertext through the files. The linear track
//! needs no ceremony: meters make their own keys and enroll them with the keyshares.

use std::fs;
use std::path::{Path, PathBuf};

use tfhe::prelude::*;
use tfhe::shortint::parameters::{
    COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    NOISE_SQUASHING_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    PARAM_KEYSWITCH_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    PARAM_PKE_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
};
use tfhe::zk::CompactPkeCrs;
use tfhe::{
    ClientKey, CompactCiphertextList, CompactPublicKey, CompressedServerKey, Config, ConfigBuilder,
    FheUint8,
};
use zeroize::Zeroize;

use crate::keys::{
    blake3_hex, write_atomic, KeyFileError, KeyKind, KeyShare, Manifest, ManifestItem, ShareFile,
    SHARE_FILE_VERSION,
};
use crate::lwe::SQUASHED_BLOCK;
use crate::squashed;
use crate::threshold::{combine, partial_decrypt, split, PartyResponse, Scheme, ThresholdError};

/// Noise bound (log2) of squashed tfhe blocks: Zama's threshold specification uses 2^70
/// (measured maximum here 2^66).
pub const SQUASHED_NOISE_LOG2: u32 = 70;
/// Largest proven list, in bits, the CRS supports (meter registers: a few u32 per day).
pub const CRS_MAX_BITS: usize = 512;
/// Size limit for deserializing public key material.
pub const MAX_PUBLIC_ITEM_BYTES: u64 = 2 << 30;

/// Item names in the public bundle.
pub const SERVER_KEY: &str = "server_key";
pub const TFHE_PUBLIC_KEY: &str = "tfhe_public_key";
pub const CRS: &str = "crs";

/// Why the ceremony failed.
#[derive(Debug, thiserror::Error)]
pub enum CeremonyError {
    #[error("tfhe: {0}")]
    Tfhe(String),
    #[error("serialization: {0}")]
    Serialize(String),
    #[error(transparent)]
    File(#[from] KeyFileError),
    #[error(transparent)]
    Threshold(#[from] ThresholdError),
    #[error("{path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("self-check failed: {0}")]
    SelfCheck(String),
}

/// The tfhe-rs configuration of the product (parameters from ../shared/notes/tfhe-1.8.md).
pub fn tfhe_config() -> Config {
    ConfigBuilder::with_custom_parameters(PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128)
        .use_dedicated_compact_public_key_parameters((
            PARAM_PKE_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
            PARAM_KEYSWITCH_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
        ))
        .enable_compression(COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128)
        .enable_noise_squashing(NOISE_SQUASHING_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128)
        .build()
}

/// The dealer's material: the squash secret in the clear plus the serialized public items. It exists
/// only inside the ceremony (and in the tests' cached key set); secrets are zeroized on drop.
pub struct KeyMaterial {
    pub tfhe_secret: Vec<u128>,
    pub server_key: Vec<u8>,
    pub tfhe_public_key: Vec<u8>,
    pub crs: Vec<u8>,
}

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        self.tfhe_secret.zeroize();
    }
}

fn tfhe_ser<T: serde::Serialize + tfhe::Versionize + tfhe::named::Named>(
    obj: &T,
) -> Result<Vec<u8>, CeremonyError> {
    let mut out = Vec::new();
    tfhe::safe_serialization::safe_serialize(obj, &mut out, MAX_PUBLIC_ITEM_BYTES)
        .map_err(|e| CeremonyError::Serialize(e.to_string()))?;
    Ok(out)
}

/// Generates every key. Slow: the compressed server key with noise squashing takes over a
/// minute on two cores. `progress` receives a line per step.
pub fn generate(progress: &mut dyn FnMut(&str)) -> Result<KeyMaterial, CeremonyError> {
    let config = tfhe_config();
    progress("generating the tfhe client key");
    let ck = ClientKey::generate(config);
    let cpk = CompactPublicKey::new(&ck);
    progress("generating the compressed server key with noise squashing (about a minute)");
    let csk = CompressedServerKey::new(&ck);
    progress("generating the ZK CRS");
    let crs = CompactPkeCrs::from_config(config, CRS_MAX_BITS)
        .map_err(|e| CeremonyError::Tfhe(e.to_string()))?;
    progress("extracting the 128-bit noise-squashing secret");
    let (_int, _cpk_sk, _comp, ns, _nsc, _rr, _oprf, _tk, _tag) = ck.into_raw_parts();
    let ns = ns.ok_or_else(|| CeremonyError::Tfhe("config has no noise-squashing key".into()))?;
    let (glwe, _params) = ns.into_raw_parts().into_raw_parts();
    let tfhe_secret = glwe.into_lwe_secret_key().into_container();
    Ok(KeyMaterial {
        tfhe_secret,
        server_key: tfhe_ser(&csk)?,
        tfhe_public_key: tfhe_ser(&cpk)?,
        crs: tfhe_ser(&crs)?,
    })
}

/// Paths the ceremony wrote.
#[derive(Debug, Clone)]
pub struct CeremonyOutput {
    pub public_dir: PathBuf,
    pub share_files: Vec<PathBuf>,
    pub manifest: Manifest,
}

/// Default party names: keyshare-1 … keyshare-n (the dev PKI's certificate names).
pub fn default_party_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("keyshare-{i}")).collect()
}

/// Splits the squash secret for `scheme` and writes `out/public/` (bundle + manifest.toml) and
/// `out/shares/<party>.share` (mode 0600).
pub fn write_bundle(
    material: &KeyMaterial,
    scheme: Scheme,
    party_names: &[String],
    out: &Path,
) -> Result<CeremonyOutput, CeremonyError> {
    if party_names.len() != scheme.parties() {
        return Err(CeremonyError::Threshold(ThresholdError::BadScheme(
            format!(
                "{} party names for {} parties",
                party_names.len(),
                scheme.parties()
            ),
        )));
    }
    for name in party_names {
        if !crate::readings::is_label(name) {
            return Err(CeremonyError::Threshold(ThresholdError::BadScheme(
                format!("party name {name:?} must be [A-Za-z0-9._-] and not start with '.'"),
            )));
        }
    }
    let public_dir = out.join("public");
    let items_src = [
        (SERVER_KEY, "server_key.bin", &material.server_key),
        (
            TFHE_PUBLIC_KEY,
            "tfhe_public_key.bin",
            &material.tfhe_public_key,
        ),
        (CRS, "crs.bin", &material.crs),
    ];
    let mut items = Vec::new();
    for (name, file, data) in items_src {
        write_atomic(&public_dir.join(file), data, 0o644)?;
        items.push(ManifestItem {
            name: name.into(),
            file: file.into(),
            size: data.len() as u64,
            blake3: blake3_hex(data),
        });
    }
    let mut tfhe_id = blake3::Hasher::new();
    tfhe_id.update(&material.server_key);
    tfhe_id.update(&material.tfhe_public_key);
    let tfhe_key_id = format!("tfhe-{}", &tfhe_id.finalize().to_hex()[..16]);
    let manifest = Manifest {
        version: 2,
        tfhe_key_id: tfhe_key_id.clone(),
        parties: scheme.parties(),
        threshold: scheme.threshold(),
        party_names: party_names.to_vec(),
        items,
    };
    let manifest_text =
        toml::to_string(&manifest).map_err(|e| CeremonyError::Serialize(e.to_string()))?;
    write_atomic(
        &public_dir.join("manifest.toml"),
        manifest_text.as_bytes(),
        0o644,
    )?;
    let manifest_hash = blake3_hex(manifest_text.as_bytes());

    let mut rng = rand::rngs::OsRng;
    let tfhe_parts = split(&material.tfhe_secret, scheme, &mut rng);
    let mut share_files = Vec::new();
    for (p, name) in party_names.iter().enumerate() {
        let mut flood_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rng, &mut flood_key);
        let file = ShareFile {
            version: SHARE_FILE_VERSION,
            party: name.clone(),
            party_index: p + 1,
            parties: scheme.parties(),
            threshold: scheme.threshold(),
            flood_key,
            keys: vec![KeyShare {
                key_id: tfhe_key_id.clone(),
                kind: KeyKind::Tfhe,
                lwe_dimension: material.tfhe_secret.len(),
                min_noise_log2: SQUASHED_NOISE_LOG2,
                shares: tfhe_parts[p].shares.clone(),
            }],
            manifest_hash: manifest_hash.clone(),
        };
        let path = out.join("shares").join(format!("{name}.share"));
        file.write(&path)?;
        share_files.push(path);
    }
    Ok(CeremonyOutput {
        public_dir,
        share_files,
        manifest,
    })
}

/// The public bundle, read and hash-checked.
pub struct PublicBundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_hash: String,
}

impl PublicBundle {
    pub fn open(dir: &Path) -> Result<Self, CeremonyError> {
        let path = dir.join("manifest.toml");
        let bad = |reason: String| CeremonyError::Bundle {
            path: path.clone(),
            reason,
        };
        let text = fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        Ok(PublicBundle {
            dir: dir.to_owned(),
            manifest_hash: blake3_hex(text.as_bytes()),
            manifest,
        })
    }

    /// The bytes of an item, checked against the manifest hash.
    pub fn item(&self, name: &str) -> Result<Vec<u8>, CeremonyError> {
        let item = self
            .manifest
            .item(name)
            .ok_or_else(|| CeremonyError::Bundle {
                path: self.dir.join("manifest.toml"),
                reason: format!("no item {name:?}"),
            })?;
        let path = self.dir.join(&item.file);
        if item.file.contains('/') || item.file.starts_with('.') {
            return Err(CeremonyError::Bundle {
                path,
                reason: "item file must be a plain file name".into(),
            });
        }
        let data = fs::read(&path).map_err(|e| CeremonyError::Bundle {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if blake3_hex(&data) != item.blake3 {
            return Err(CeremonyError::Bundle {
                path,
                reason: "hash does not match the manifest".into(),
            });
        }
        Ok(data)
    }

    pub fn compressed_server_key(&self) -> Result<CompressedServerKey, CeremonyError> {
        let data = self.item(SERVER_KEY)?;
        tfhe::safe_serialization::safe_deserialize(data.as_slice(), MAX_PUBLIC_ITEM_BYTES)
            .map_err(CeremonyError::Serialize)
    }

    pub fn compact_public_key(&self) -> Result<CompactPublicKey, CeremonyError> {
        let data = self.item(TFHE_PUBLIC_KEY)?;
        tfhe::safe_serialization::safe_deserialize(data.as_slice(), MAX_PUBLIC_ITEM_BYTES)
            .map_err(CeremonyError::Serialize)
    }

    pub fn crs(&self) -> Result<CompactPkeCrs, CeremonyError> {
        let data = self.item(CRS)?;
        tfhe::safe_serialization::safe_deserialize(data.as_slice(), MAX_PUBLIC_ITEM_BYTES)
            .map_err(CeremonyError::Serialize)
    }

    /// The checker of tfhe-track register lists under this bundle's key set and CRS.
    pub fn register_verifier(&self) -> Result<crate::registers::RegisterVerifier, CeremonyError> {
        Ok(crate::registers::RegisterVerifier::new(
            &self.manifest.tfhe_key_id,
            self.compact_public_key()?,
            self.crs()?,
        ))
    }
}

/// Decrypts in-process through the given parties' share files (each floods at its key's floor)
/// and combines their answers; any disagreement is an error. Used by the ceremony's self-check,
/// and by tests and benchmarks as the no-network baseline.
pub fn decrypt_via_files(
    shares: &[&ShareFile],
    key_id: &str,
    batch: &crate::lwe::LweBatch,
    encoding: crate::lwe::Encoding,
) -> Result<Vec<i128>, CeremonyError> {
    let mut responses = Vec::new();
    let mut scheme = None;
    let mut noise = 0;
    for f in shares {
        let s = f.scheme()?;
        scheme = Some(s);
        let key = f
            .key(key_id)
            .ok_or_else(|| CeremonyError::SelfCheck(format!("{} lacks key {key_id}", f.party)))?;
        noise = key.min_noise_log2;
        let part = partial_decrypt(
            &f.party_shares(key),
            s,
            &f.flood_key(),
            key_id,
            batch,
            encoding,
            noise,
        )?;
        responses.push(PartyResponse {
            party: f.party_index - 1,
            shares: part,
        });
    }
    let scheme = scheme.ok_or_else(|| CeremonyError::SelfCheck("no share files".into()))?;
    let out = combine(scheme, batch, encoding, noise, &responses)?;
    if !out.faulty.is_empty() {
        return Err(CeremonyError::SelfCheck(format!(
            "parties disagree: {:?}",
            out.faulty
        )));
    }
    Ok(out.values)
}

/// Decrypts a known squashed FheUint8 through the written share files and fails unless it
/// comes out right. Needs the server key (decompressed here, ~15 s).
pub fn self_check(
    output: &CeremonyOutput,
    progress: &mut dyn FnMut(&str),
) -> Result<(), CeremonyError> {
    let bundle = PublicBundle::open(&output.public_dir)?;
    let files: Vec<ShareFile> = output
        .share_files
        .iter()
        .map(|p| ShareFile::read(p))
        .collect::<Result<_, _>>()?;
    let shares: Vec<&ShareFile> = files.iter().collect();
    for s in &shares {
        if s.manifest_hash != bundle.manifest_hash {
            return Err(CeremonyError::SelfCheck(format!(
                "{} belongs to another bundle",
                s.party
            )));
        }
    }

    progress("self-check: tfhe track (decompressing the server key, encrypting, squashing)");
    let sk = bundle.compressed_server_key()?.decompress();
    tfhe::set_server_key(sk);
    let cpk = bundle.compact_public_key()?;
    let list = CompactCiphertextList::builder(&cpk).push(173u8).build();
    let expanded = list
        .expand()
        .map_err(|e| CeremonyError::Tfhe(e.to_string()))?;
    let x: FheUint8 = expanded
        .get(0)
        .map_err(|e| CeremonyError::Tfhe(e.to_string()))?
        .ok_or_else(|| CeremonyError::Tfhe("empty list".into()))?;
    let sq = x
        .squash_noise()
        .map_err(|e| CeremonyError::Tfhe(e.to_string()))?;
    let batch = squashed::uint_batch(&sq);
    let blocks = decrypt_via_files(
        &shares,
        &bundle.manifest.tfhe_key_id,
        &batch,
        SQUASHED_BLOCK,
    )?;
    let got = squashed::recompose(&blocks, 8);
    if got != 173 {
        return Err(CeremonyError::SelfCheck(format!(
            "tfhe: decrypted {got}, expected 173"
        )));
    }
    Ok(())
}
