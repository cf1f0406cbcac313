//! The linear track: u128 LWE compact lists under the linear public key (DESIGN.md). Meters
//! encrypt a day of readings as one list; sums are word-wise additions of lists.

use tfhe::core_crypto::prelude::*;

use crate::lwe::{Encoding, LweBatch};

/// LWE dimension of the linear key (the shape of tfhe-rs's 128-bit noise-squashing key).
pub const LINEAR_DIMENSION: usize = 4096;
/// Encryption noise: TUniform with bound 2^30.
pub const LINEAR_NOISE_LOG2: u32 = 30;
/// Δ of linear plaintexts: readings and their sums live in the top 36 bits, signed.
pub const LINEAR_DELTA_LOG2: u32 = 92;
/// Bound on the noise of one fresh list entry (measured maximum 2^36.5; see notes).
pub const LINEAR_FRESH_NOISE_LOG2: u32 = 40;

/// Encoding of linear-track plaintexts.
pub const LINEAR_ENCODING: Encoding = Encoding {
    delta_log2: LINEAR_DELTA_LOG2,
    message_bits: 128 - LINEAR_DELTA_LOG2,
    signed: true,
};

/// Public key of the linear track.
pub type LinearPublicKey = LweCompactPublicKeyOwned<u128>;

/// Generates the linear key pair: a binary secret of dimension 4096 and its compact public key.
pub fn generate_keypair() -> (LweSecretKeyOwned<u128>, LinearPublicKey) {
    let mut seeder = new_seeder();
    let seeder = seeder.as_mut();
    let mut secret_gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
    let mut enc_gen =
        EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder);
    let sk = allocate_and_generate_new_binary_lwe_secret_key(
        LweDimension(LINEAR_DIMENSION),
        &mut secret_gen,
    );
    let noise = TUniform::<u128>::new(LINEAR_NOISE_LOG2);
    let pk = allocate_and_generate_new_lwe_compact_public_key(
        &sk,
        noise,
        CiphertextModulus::new_native(),
        &mut enc_gen,
    );
    (sk, pk)
}

/// Encrypts signed values (at most the dimension) as one compact list.
pub fn encrypt(pk: &LinearPublicKey, values: &[i64]) -> LweBatch {
    let mut seeder = new_seeder();
    let seeder = seeder.as_mut();
    let mut enc_gen =
        EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder);
    let noise = TUniform::<u128>::new(LINEAR_NOISE_LOG2);
    let plain = PlaintextList::from_container(
        values
            .iter()
            .map(|v| (i128::from(*v) as u128) << LINEAR_DELTA_LOG2)
            .collect::<Vec<u128>>(),
    );
    let mut ct = LweCompactCiphertextList::new(
        0u128,
        pk.lwe_dimension().to_lwe_size(),
        LweCiphertextCount(values.len()),
        CiphertextModulus::new_native(),
    );
    encrypt_lwe_compact_ciphertext_list_with_compact_public_key(
        pk,
        &mut ct,
        &plain,
        noise,
        noise,
        enc_gen.noise_generator_mut(),
    );
    LweBatch::Compact {
        dimension: pk.lwe_dimension().0,
        count: values.len(),
        words: ct.into_container(),
    }
}
