//! Threshold decryption against real tfhe-rs LWE encryption over Z_2^128 (dimension 4096, the
//! shape of the noise-squashing and linear keys).

use psm_core::lwe::{Encoding, LweBatch, SQUASHED_BLOCK};
use psm_core::threshold::{
    combine, partial_decrypt, split, FloodKey, PartyResponse, PartyShares, Scheme, ThresholdError,
};
use rand::{Rng, RngCore};
use tfhe::core_crypto::prelude::*;

const DIM: usize = 4096;

struct Keys {
    sk: LweSecretKeyOwned<u128>,
    enc: EncryptionRandomGenerator<DefaultRandomGenerator>,
}

fn keys() -> Keys {
    let mut seeder = new_seeder();
    let seeder = seeder.as_mut();
    let mut secret_gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
    let enc = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder);
    let sk = allocate_and_generate_new_binary_lwe_secret_key(LweDimension(DIM), &mut secret_gen);
    Keys { sk, enc }
}

/// Ciphertexts of `msgs` with Δ = 2^123 and noise uniform in ±2^66 (the measured maximum of
/// squashed tfhe blocks), as one List batch.
fn squashed_like(k: &mut Keys, msgs: &[u128]) -> LweBatch {
    let noise = TUniform::<u128>::new(66);
    let mut words = Vec::new();
    for m in msgs {
        let mut ct = LweCiphertext::new(0u128, LweSize(DIM + 1), CiphertextModulus::new_native());
        encrypt_lwe_ciphertext(&k.sk, &mut ct, Plaintext(m << 123), noise, &mut k.enc);
        words.extend_from_slice(ct.as_ref());
    }
    LweBatch::List {
        dimension: DIM,
        words,
    }
}

fn flood_keys(n: usize) -> Vec<FloodKey> {
    (0..n)
        .map(|_| {
            let mut k = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut k);
            FloodKey(k)
        })
        .collect()
}

fn respond(
    parties: &[PartyShares],
    fk: &[FloodKey],
    scheme: Scheme,
    who: &[usize],
    batch: &LweBatch,
    enc: Encoding,
    noise: u32,
) -> Vec<PartyResponse> {
    who.iter()
        .map(|p| PartyResponse {
            party: *p,
            shares: partial_decrypt(&parties[*p], scheme, &fk[*p], "k1", batch, enc, noise)
                .unwrap(),
        })
        .collect()
}

fn subsets(n: usize, size: usize) -> Vec<Vec<usize>> {
    (0u32..(1 << n))
        .filter(|m| m.count_ones() as usize == size)
        .map(|m| (0..n).filter(|p| m & (1 << p) != 0).collect())
        .collect()
}

#[test]
fn any_t_decrypt_and_t_minus_1_cannot() {
    let mut k = keys();
    let msgs: Vec<u128> = (0..16).collect();
    let batch = squashed_like(&mut k, &msgs);
    let want: Vec<i128> = msgs.iter().map(|m| *m as i128).collect();
    for (n, t) in [(3, 2), (3, 3), (5, 3)] {
        let scheme = Scheme::new(n, t).unwrap();
        let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
        let fk = flood_keys(n);
        for who in subsets(n, t) {
            let resp = respond(&parties, &fk, scheme, &who, &batch, SQUASHED_BLOCK, 70);
            let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
            assert_eq!(out.values, want, "{t}-of-{n} with parties {who:?}");
            assert!(out.faulty.is_empty());
        }
        for who in subsets(n, t - 1) {
            let resp = respond(&parties, &fk, scheme, &who, &batch, SQUASHED_BLOCK, 70);
            let err = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap_err();
            assert!(
                matches!(err, ThresholdError::NoQuorum(_)),
                "{t}-of-{n} {who:?}: {err}"
            );
        }
    }
}

#[test]
fn linear_track_sums_decrypt_exactly() {
    // A day of 96 signed readings for 50 meters, encrypted as compact lists, summed word-wise.
    let mut k = keys();
    let noise = TUniform::<u128>::new(30);
    let modulus = CiphertextModulus::<u128>::new_native();
    let pk = allocate_and_generate_new_lwe_compact_public_key(&k.sk, noise, modulus, &mut k.enc);
    let delta_log2 = 92;
    let mut rng = rand::thread_rng();
    let mut sums = vec![0i128; 96];
    let mut acc = vec![0u128; DIM + 96];
    for _ in 0..50 {
        let readings: Vec<i64> = (0..96).map(|_| rng.gen_range(-3_000..20_000)).collect();
        for (s, r) in sums.iter_mut().zip(&readings) {
            *s += i128::from(*r);
        }
        let plain = PlaintextList::from_container(
            readings
                .iter()
                .map(|r| (*r as i128 as u128) << delta_log2)
                .collect::<Vec<u128>>(),
        );
        let mut ct =
            LweCompactCiphertextList::new(0u128, LweSize(DIM + 1), LweCiphertextCount(96), modulus);
        encrypt_lwe_compact_ciphertext_list_with_compact_public_key(
            &pk,
            &mut ct,
            &plain,
            noise,
            noise,
            k.enc.noise_generator_mut(),
        );
        for (a, w) in acc.iter_mut().zip(ct.as_ref()) {
            *a = a.wrapping_add(*w);
        }
    }
    let batch = LweBatch::Compact {
        dimension: DIM,
        count: 96,
        words: acc,
    };
    let enc = Encoding {
        delta_log2,
        message_bits: 128 - delta_log2,
        signed: true,
    };
    let scheme = Scheme::new(3, 2).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(3);
    // Noise of 50 fresh lists is far below 2^48.
    let resp = respond(&parties, &fk, scheme, &[0, 2], &batch, enc, 48);
    let out = combine(scheme, &batch, enc, 48, &resp).unwrap();
    assert_eq!(out.values, sums);
}

#[test]
fn request_that_breaks_an_invariant_is_refused() {
    let mut k = keys();
    let batch = squashed_like(&mut k, &[1, 2, 3]);
    let scheme = Scheme::new(3, 2).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(3);
    // A noise bound of 2^85 would need flooding 2^125: wider than Δ/2 = 2^122.
    let err = partial_decrypt(
        &parties[0],
        scheme,
        &fk[0],
        "k1",
        &batch,
        SQUASHED_BLOCK,
        85,
    )
    .unwrap_err();
    assert!(matches!(err, ThresholdError::Invariant(_)), "{err}");
    // A wrong dimension is refused too.
    let short = LweBatch::List {
        dimension: 1024,
        words: vec![0; 1025],
    };
    assert!(partial_decrypt(
        &parties[0],
        scheme,
        &fk[0],
        "k1",
        &short,
        SQUASHED_BLOCK,
        70
    )
    .is_err());
}

#[test]
fn tampered_partial_is_named_and_excluded() {
    let mut k = keys();
    let msgs: Vec<u128> = (0..16).rev().collect();
    let batch = squashed_like(&mut k, &msgs);
    let want: Vec<i128> = msgs.iter().map(|m| *m as i128).collect();
    for (n, t) in [(3, 2), (5, 3)] {
        let scheme = Scheme::new(n, t).unwrap();
        let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
        let fk = flood_keys(n);
        let all: Vec<usize> = (0..n).collect();
        for liar in 0..n {
            let mut resp = respond(&parties, &fk, scheme, &all, &batch, SQUASHED_BLOCK, 70);
            // Shift one value of every share the liar holds by 2^121 (flips the message).
            for s in &mut resp[liar].shares {
                s.values[5] = s.values[5].wrapping_add(1u128 << 121);
            }
            let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
            assert_eq!(out.values, want, "{t}-of-{n}, liar {liar}");
            assert_eq!(out.faulty.len(), 1);
            assert_eq!(out.faulty[0].0, liar);
            assert!(!out.used.contains(&liar));
        }
        // With exactly t answering, a liar whose shares others also hold is caught, but without
        // it the quorum is short (5-of-3: NoQuorum); with two parties the disagreement cannot be
        // attributed (3-of-2: Undecidable). Either way: refuse, never guess.
        let who: Vec<usize> = (0..t).collect();
        let mut resp = respond(&parties, &fk, scheme, &who, &batch, SQUASHED_BLOCK, 70);
        for s in &mut resp[0].shares {
            s.values[0] = s.values[0].wrapping_add(1u128 << 121);
        }
        let err = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap_err();
        if t == 2 {
            assert!(matches!(err, ThresholdError::Undecidable(_)), "{err}");
        } else {
            assert!(matches!(err, ThresholdError::NoQuorum(_)), "{err}");
        }
    }
}

#[test]
fn repeated_requests_return_identical_partials() {
    let mut k = keys();
    let batch = squashed_like(&mut k, &[7, 8]);
    let scheme = Scheme::new(3, 2).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(3);
    let a = partial_decrypt(
        &parties[1],
        scheme,
        &fk[1],
        "k1",
        &batch,
        SQUASHED_BLOCK,
        70,
    )
    .unwrap();
    let b = partial_decrypt(
        &parties[1],
        scheme,
        &fk[1],
        "k1",
        &batch,
        SQUASHED_BLOCK,
        70,
    )
    .unwrap();
    assert_eq!(a, b);
    // Another key id or another flooding key gives other flooding.
    let c = partial_decrypt(
        &parties[1],
        scheme,
        &fk[1],
        "k2",
        &batch,
        SQUASHED_BLOCK,
        70,
    )
    .unwrap();
    let d = partial_decrypt(
        &parties[1],
        scheme,
        &fk[0],
        "k1",
        &batch,
        SQUASHED_BLOCK,
        70,
    )
    .unwrap();
    assert_ne!(a, c);
    assert_ne!(a, d);
}

#[test]
fn malformed_responses_are_refused() {
    let mut k = keys();
    let batch = squashed_like(&mut k, &[1]);
    let scheme = Scheme::new(3, 2).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(3);
    let mut resp = respond(&parties, &fk, scheme, &[0, 1], &batch, SQUASHED_BLOCK, 70);
    // Party 0 claims share 0, which is the share it must not hold.
    resp[0].shares[0].share_index = 0;
    let err = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap_err();
    assert!(
        matches!(err, ThresholdError::BadPartial { party: 0, .. }),
        "{err}"
    );
    let mut resp = respond(&parties, &fk, scheme, &[0, 1], &batch, SQUASHED_BLOCK, 70);
    resp[1].shares[0].values.push(0);
    assert!(combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).is_err());
}
