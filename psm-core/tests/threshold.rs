//! Threshold decryption over Z_2^128 in dimension 4096: squashed-tfhe-shaped LWE ciphertexts
//! from real tfhe-rs encryption through replicated shares, and the linear track's releases
//! (per-meter seeds, public masks, one contribution per held share) combined into exact sums.

use std::collections::HashMap;

use prost::Message;
use psm_core::linear::encrypt::IntervalMasks;
use psm_core::linear::key::{cohort_share_key, MeterKey, MeterSeeds, Seed};
use psm_core::linear::mask::{mask_sum, SlotRun};
use psm_core::linear::release::{
    check_noise, cohort_hash, contribution, flooding, output_hash, release_from_proto, Release,
};
use psm_core::linear::{Channel, DIMENSION, ENCODING, FLOOD_LOG2, SLOTS_PER_DAY};
use psm_core::lwe::{Encoding, LweBatch, SQUASHED_BLOCK};
use psm_core::threshold::{
    combine, combine_bodies, partial_decrypt, split, FloodKey, PartyResponse, PartyShares, Scheme,
    SharePartial, ThresholdError,
};
use psm_proto::v1::{
    AggregateProgram, Cohort, ComputationKind, LinearRelease, ReleaseOutput, TimeRange,
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
            // Exactly t responders: some share came from one party only.
            assert!(!out.cross_checked, "{t}-of-{n} with parties {who:?}");
        }
        let all: Vec<usize> = (0..n).collect();
        let resp = respond(&parties, &fk, scheme, &all, &batch, SQUASHED_BLOCK, 70);
        let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
        assert_eq!(out.values, want);
        assert_eq!(out.cross_checked, n > t, "{t}-of-{n}, all answering");
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
        // With exactly t answering, the disagreement cannot be attributed: the liar's co-holders
        // could be the t − 1 faulty ones. Refuse, never guess.
        let who: Vec<usize> = (0..t).collect();
        let mut resp = respond(&parties, &fk, scheme, &who, &batch, SQUASHED_BLOCK, 70);
        for s in &mut resp[0].shares {
            s.values[0] = s.values[0].wrapping_add(1u128 << 121);
        }
        let err = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap_err();
        assert!(
            matches!(err, ThresholdError::Undecidable(_)),
            "{t}-of-{n}: {err}"
        );
    }
}

/// 3-of-5, all answering: two colluding parties (t − 1, inside the trust assumption) send the
/// same wrong value for a share they hold with one honest party. Outvoting would exclude and
/// name the honest holder and decrypt the lie; the combiner must refuse and name nobody.
#[test]
fn a_colluding_majority_on_one_share_cannot_outvote_its_honest_holder() {
    let mut k = keys();
    let msgs: Vec<u128> = (0..16).collect();
    let batch = squashed_like(&mut k, &msgs);
    let (n, t) = (5, 3);
    let scheme = Scheme::new(n, t).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(n);
    let all: Vec<usize> = (0..n).collect();
    for share in 0..scheme.share_count() {
        let holders: Vec<usize> = (0..n).filter(|p| scheme.holds(*p, share)).collect();
        assert_eq!(holders.len(), 3);
        let (liars, honest) = ([holders[0], holders[1]], holders[2]);
        let mut resp = respond(&parties, &fk, scheme, &all, &batch, SQUASHED_BLOCK, 70);
        for l in liars {
            for s in resp[l].shares.iter_mut().filter(|s| s.share_index == share) {
                s.values[3] = s.values[3].wrapping_add(1u128 << 121);
            }
        }
        let err = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap_err();
        match &err {
            ThresholdError::Undecidable(m) => assert!(
                m.contains(&format!("{honest}")),
                "share {share}: the disagreement is reported, not blamed: {m}"
            ),
            other => panic!("share {share}: {other}"),
        }
    }
    // One liar alone on every share it holds is outnumbered beyond doubt: named and excluded.
    for liar in 0..n {
        let mut resp = respond(&parties, &fk, scheme, &all, &batch, SQUASHED_BLOCK, 70);
        for s in &mut resp[liar].shares {
            s.values[3] = s.values[3].wrapping_add(1u128 << 121);
        }
        let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
        let named: Vec<usize> = out.faulty.iter().map(|(p, _)| *p).collect();
        assert_eq!(named, [liar]);
        assert_eq!(
            out.values,
            msgs.iter().map(|m| *m as i128).collect::<Vec<_>>()
        );
    }
}

/// 3-of-5 with four answering: a share held by two colluders and the absent party has two
/// agreeing contributions, both lies. Two agreeing parties prove nothing when t − 1 = 2 could
/// collude, so the result must not be reported as cross-checked.
#[test]
fn two_agreeing_colluders_do_not_make_a_result_cross_checked() {
    let mut k = keys();
    let msgs: Vec<u128> = (0..16).collect();
    let batch = squashed_like(&mut k, &msgs);
    let scheme = Scheme::new(5, 3).unwrap();
    let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
    let fk = flood_keys(5);
    let who = [0usize, 1, 2, 3];
    // The share both 0 and 1 hold that 2 and 3 do not: held by {0, 1, 4}.
    let share = (0..scheme.share_count())
        .find(|u| {
            scheme.holds(0, *u)
                && scheme.holds(1, *u)
                && !scheme.holds(2, *u)
                && !scheme.holds(3, *u)
        })
        .unwrap();
    let mut resp = respond(&parties, &fk, scheme, &who, &batch, SQUASHED_BLOCK, 70);
    for l in [0, 1] {
        for s in resp[l].shares.iter_mut().filter(|s| s.share_index == share) {
            // Both subtract one Δ: the message 3 decrypts as 4.
            s.values[3] = s.values[3].wrapping_sub(1u128 << 123);
        }
    }
    let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
    assert_eq!(
        out.values[3], 4,
        "the colluders' shift went through undetected"
    );
    assert!(
        !out.cross_checked,
        "a result two colluders shifted was reported cross-checked"
    );
}

/// A liar that shifts its shares only as far as the agreement window allows goes unnoticed; the
/// correctness invariant counts that window, so the result still decrypts right.
#[test]
fn shifts_inside_the_agreement_window_still_decrypt_correctly() {
    use psm_core::threshold::flood_log2_for;
    let mut k = keys();
    // Messages at the edges of the 4-bit space, where a shift could round to a neighbour.
    let msgs: Vec<u128> = vec![0, 15, 7, 8, 1, 14];
    let batch = squashed_like(&mut k, &msgs);
    let want: Vec<i128> = msgs.iter().map(|m| *m as i128).collect();
    let window = 1u128 << (flood_log2_for(70) + 1);
    for (n, t) in [(3, 2), (5, 3)] {
        let scheme = Scheme::new(n, t).unwrap();
        let parties = split(k.sk.as_ref(), scheme, &mut rand::rngs::OsRng);
        let fk = flood_keys(n);
        let all: Vec<usize> = (0..n).collect();
        for liar in 0..n {
            for sign in [1i8, -1] {
                let honest = respond(&parties, &fk, scheme, &all, &batch, SQUASHED_BLOCK, 70);
                let mut resp = honest.clone();
                // The largest shift that still agrees with every co-holder, per value.
                for s in &mut resp[liar].shares {
                    for (i, v) in s.values.iter_mut().enumerate() {
                        let others: Vec<u128> = honest
                            .iter()
                            .filter(|r| r.party != liar)
                            .flat_map(|r| r.shares.iter())
                            .filter(|o| o.share_index == s.share_index)
                            .map(|o| o.values[i])
                            .collect();
                        let room = others
                            .iter()
                            .map(|o| {
                                let d = o.wrapping_sub(*v) as i128;
                                if sign > 0 {
                                    window as i128 + d
                                } else {
                                    window as i128 - d
                                }
                            })
                            .min()
                            .unwrap_or(0)
                            .max(0) as u128;
                        *v = if sign > 0 {
                            v.wrapping_add(room)
                        } else {
                            v.wrapping_sub(room)
                        };
                    }
                }
                let out = combine(scheme, &batch, SQUASHED_BLOCK, 70, &resp).unwrap();
                assert_eq!(out.values, want, "{t}-of-{n}, liar {liar}");
                assert!(
                    out.faulty.is_empty(),
                    "inside the window nothing is noticed"
                );
            }
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

// The linear track: every meter's own seeds, public slot masks, releases answered per held share.

const EPOCH: u32 = 3;
/// A UTC day number (2026-01-27).
const DAY: u64 = 20_480;
/// Slots per interval of the meters, in turn: 5, 15, 30 and 60 minutes.
const INTERVAL_SLOTS: [u64; 4] = [1, 3, 6, 12];
/// Slots per output: hourly aggregates, which every interval length tiles.
const BUCKET_SLOTS: u64 = 12;

/// A meter as it reports: its own seeds (no dealer), its interval length, a day of readings and
/// the bodies it encrypted for them.
struct Meter {
    id: String,
    seeds: MeterSeeds,
    /// Slots per interval.
    spi: u64,
    values: Vec<i64>,
    bodies: Vec<u128>,
}

/// The public masks of DAY's intervals, per interval length: shared by every meter, derived by
/// anybody.
fn day_masks() -> Vec<IntervalMasks> {
    let spd = SLOTS_PER_DAY as u64;
    INTERVAL_SLOTS
        .iter()
        .map(|spi| IntervalMasks::new(EPOCH, DAY * spd, *spi, (spd / spi) as usize))
        .collect()
}

/// `count` meters of `scheme` with mixed interval lengths and random readings for DAY.
fn meters(scheme: Scheme, masks: &[IntervalMasks], count: usize) -> Vec<Meter> {
    let mut rng = rand::thread_rng();
    (0..count)
        .map(|k| {
            let seeds = MeterSeeds::generate(scheme, EPOCH);
            assert_eq!(seeds.seeds.len(), scheme.share_count());
            let which = k % INTERVAL_SLOTS.len();
            let spi = INTERVAL_SLOTS[which];
            let values: Vec<i64> = (0..masks[which].len())
                .map(|_| rng.gen_range(0..=400 * spi as i64))
                .collect();
            let bodies = masks[which]
                .encrypt(&seeds.key(Channel::Import), 0, &values)
                .unwrap();
            Meter {
                id: format!("meter-{k:02}"),
                seeds,
                spi,
                values,
                bodies,
            }
        })
        .collect()
}

/// An hourly import aggregate over DAY with these cohorts and (output, cohort) pairs, as compute
/// sends it.
fn hourly(cohorts: &[Vec<String>], outputs: &[(u32, u32)]) -> LinearRelease {
    let start = (DAY * 86_400) as i64;
    LinearRelease {
        kind: ComputationKind::Aggregate as i32,
        epoch: EPOCH,
        channel: psm_proto::v1::Channel::Import as i32,
        program: AggregateProgram {
            granularity_seconds: 3600,
        }
        .encode_to_vec(),
        range: Some(TimeRange {
            start_unix: start,
            end_unix: start + 86_400,
        }),
        cohorts: cohorts
            .iter()
            .map(|c| Cohort {
                meter_ids: c.clone(),
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|(index, cohort)| ReleaseOutput {
                index: *index,
                cohort: *cohort,
            })
            .collect(),
        reissue_reason: String::new(),
    }
}

/// What every party derives from a validated release by itself, per output asked for: the mask
/// sum of its slots and weights, and the hash its flooding is keyed on.
struct Derived {
    masks: Vec<Vec<u128>>,
    hashes: Vec<[u8; 32]>,
}

fn derive(scheme: Scheme, r: &Release) -> Derived {
    let mut masks = Vec::new();
    let mut hashes = Vec::new();
    for (index, cohort) in &r.outputs {
        let runs: Vec<SlotRun> = r.spec.output_runs(*index);
        check_noise(scheme, r.cohorts[*cohort].len(), &runs).unwrap();
        masks.push(mask_sum(r.spec.epoch, &runs));
        hashes.push(output_hash(
            &r.spec,
            &cohort_hash(&r.cohorts[*cohort]),
            &runs,
        ));
    }
    Derived { masks, hashes }
}

/// Σ_{i∈cohort} PRG(σ_{i,U} ‖ channel): share U of the cohort's key, from the members' seeds for
/// U alone.
fn share_key(meters: &[Meter], cohort: &[String], u: usize, channel: Channel) -> MeterKey {
    let by_id: HashMap<&str, &Meter> = meters.iter().map(|m| (m.id.as_str(), m)).collect();
    let seeds: Vec<&Seed> = cohort
        .iter()
        .map(|id| &by_id[id.as_str()].seeds.seeds[u])
        .collect();
    cohort_share_key(&seeds, channel)
}

/// Party `party`'s answer: for every share it holds, one d_U per output, computed from the seeds
/// of that share only, with its own flooding key. No ciphertext is read.
fn answer(
    scheme: Scheme,
    party: usize,
    fk: &FloodKey,
    meters: &[Meter],
    r: &Release,
    d: &Derived,
) -> PartyResponse {
    let shares = scheme
        .held_by(party)
        .into_iter()
        .map(|u| {
            let keys: Vec<MeterKey> = r
                .cohorts
                .iter()
                .map(|c| share_key(meters, c, u, r.spec.channel))
                .collect();
            let values = r
                .outputs
                .iter()
                .enumerate()
                .map(|(o, (_, c))| contribution(&d.masks[o], &keys[*c].0, fk, u, &d.hashes[o]))
                .collect();
            SharePartial {
                share_index: u,
                values,
            }
        })
        .collect();
    PartyResponse { party, shares }
}

/// compute's part: per output, the wrapping sum of its cohort's bodies over the output's hour;
/// and the plaintext reference.
fn sums(meters: &[Meter], r: &Release) -> (Vec<u128>, Vec<i128>) {
    let by_id: HashMap<&str, &Meter> = meters.iter().map(|m| (m.id.as_str(), m)).collect();
    r.outputs
        .iter()
        .map(|(index, c)| {
            let (mut body, mut value) = (0u128, 0i128);
            for id in &r.cohorts[*c] {
                let m = by_id[id.as_str()];
                let per = (BUCKET_SLOTS / m.spi) as usize;
                for j in index * per..(index + 1) * per {
                    body = body.wrapping_add(m.bodies[j]);
                    value += i128::from(m.values[j]);
                }
            }
            (body, value)
        })
        .unzip()
}

#[test]
fn linear_releases_combine_to_exact_sums_through_any_quorum() {
    let masks = day_masks();
    for (n, t) in [(3, 2), (5, 3)] {
        let scheme = Scheme::new(n, t).unwrap();
        let fk = flood_keys(n);
        // Eight meters: two each of 5, 15, 30 and 60 minutes.
        let ms = meters(scheme, &masks, 8);
        let all: Vec<String> = ms.iter().map(|m| m.id.clone()).collect();
        // meter-03 is missing hour 13: it is not in that output's effective cohort.
        let without: Vec<String> = all.iter().filter(|id| *id != "meter-03").cloned().collect();
        let outputs: Vec<(u32, u32)> = (0..24).map(|h| (h, u32::from(h == 13))).collect();
        let r = release_from_proto(&hourly(&[all.clone(), without], &outputs)).unwrap();
        assert_eq!(r.spec.output_count(), 24);
        let first = DAY * SLOTS_PER_DAY as u64;
        assert_eq!(
            r.spec.output_runs(13),
            vec![SlotRun {
                start: first + 13 * BUCKET_SLOTS,
                end: first + 14 * BUCKET_SLOTS,
                weight: 1,
            }],
            "the keyshare derives the slots and weights itself"
        );
        let d = derive(scheme, &r);
        let responses: Vec<PartyResponse> = (0..n)
            .map(|p| answer(scheme, p, &fk[p], &ms, &r, &d))
            .collect();
        for (p, resp) in responses.iter().enumerate() {
            let held: Vec<usize> = resp.shares.iter().map(|s| s.share_index).collect();
            assert_eq!(held, scheme.held_by(p));
            assert_eq!(
                held.len(),
                scheme.share_count() - (scheme.share_count() * (t - 1)) / n
            );
        }
        let (bodies, want) = sums(&ms, &r);
        let hour13: i128 = ms
            .iter()
            .filter(|m| m.id != "meter-03")
            .map(|m| {
                let per = (BUCKET_SLOTS / m.spi) as usize;
                m.values[13 * per..14 * per]
                    .iter()
                    .map(|v| i128::from(*v))
                    .sum::<i128>()
            })
            .sum();
        assert_eq!(want[13], hour13);

        for who in subsets(n, t) {
            let chosen: Vec<PartyResponse> = who.iter().map(|p| responses[*p].clone()).collect();
            let out = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &chosen).unwrap();
            assert_eq!(out.values, want, "{t}-of-{n} with parties {who:?}");
            assert!(out.faulty.is_empty(), "{:?}", out.faulty);
            assert_eq!(out.used, who, "each of exactly t parties is needed");
            assert!(!out.cross_checked);
        }
        for who in subsets(n, t - 1) {
            let chosen: Vec<PartyResponse> = who.iter().map(|p| responses[*p].clone()).collect();
            let err = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &chosen).unwrap_err();
            assert!(
                matches!(err, ThresholdError::NoQuorum(_)),
                "{t}-of-{n} {who:?}: {err}"
            );
        }

        // A party that lies (shifts one output of every share it holds), with all n answering:
        // named, excluded, and the sums are still exact.
        for liar in 0..n {
            let mut resp = responses.clone();
            for s in &mut resp[liar].shares {
                s.values[7] = s.values[7].wrapping_add(1u128 << 100);
            }
            let out = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &resp).unwrap();
            assert_eq!(out.values, want, "{t}-of-{n}, liar {liar}");
            assert_eq!(out.faulty.len(), 1, "{:?}", out.faulty);
            assert_eq!(out.faulty[0].0, liar);
            assert!(!out.used.contains(&liar));
        }
    }
}

#[test]
fn t_minus_1_keyshares_cannot_rebuild_a_meter_key() {
    use psm_core::linear::dot;
    use psm_core::linear::encrypt::{body, noise};
    use psm_core::linear::key::add_share_key;
    use psm_core::linear::mask::slot_mask;

    for (n, t) in [(3, 2), (5, 3)] {
        let scheme = Scheme::new(n, t).unwrap();
        let seeds = MeterSeeds::generate(scheme, EPOCH);
        let subsets_bits = scheme.subsets();
        let slot = DAY * SLOTS_PER_DAY as u64 + 100;
        let mask = slot_mask(EPOCH, slot);
        for channel in [Channel::Import, Channel::Export] {
            let z = seeds.key(channel);
            let b = body(&mask, &z, 1_234, noise(&mut rand::rngs::OsRng));
            assert_eq!(ENCODING.decode(b.wrapping_sub(dot(&mask, &z.0))), 1_234);
            for who in subsets(n, t - 1) {
                let held: std::collections::BTreeSet<usize> =
                    who.iter().flat_map(|p| scheme.held_by(*p)).collect();
                let missing: Vec<usize> = (0..scheme.share_count())
                    .filter(|u| !held.contains(u))
                    .collect();
                // Exactly the share of the subset U = `who` is held by nobody among them.
                let bits: u32 = who.iter().map(|p| 1u32 << p).sum();
                let theirs = subsets_bits.iter().position(|u| *u == bits).unwrap();
                assert_eq!(missing, vec![theirs], "{t}-of-{n} {who:?}");
                // The most they can compute from the seeds they hold is not the meter's key ...
                let mut partial = vec![0u128; DIMENSION];
                for u in &held {
                    add_share_key(&mut partial, &seeds.seeds[*u], channel);
                }
                assert_ne!(partial, z.0, "{t}-of-{n} {who:?}");
                // ... and decrypts nothing.
                assert_ne!(
                    ENCODING.decode(b.wrapping_sub(dot(&mask, &partial))),
                    1_234,
                    "{t}-of-{n} {who:?}"
                );
                // What it lacks is exactly the PRG output of the seed they never saw.
                add_share_key(&mut partial, &seeds.seeds[missing[0]], channel);
                assert_eq!(partial, z.0);
            }
            for who in subsets(n, t) {
                let held: std::collections::BTreeSet<usize> =
                    who.iter().flat_map(|p| scheme.held_by(*p)).collect();
                assert_eq!(held.len(), scheme.share_count(), "any t hold every share");
            }
        }
        assert_ne!(seeds.key(Channel::Import).0, seeds.key(Channel::Export).0);
    }
}

#[test]
fn cohorts_get_independent_flooding_and_repeats_are_identical() {
    use psm_core::linear::dot;

    let scheme = Scheme::new(3, 2).unwrap();
    let fk = flood_keys(3);
    let masks = day_masks();
    let ms = meters(scheme, &masks, 6);
    let all: Vec<String> = ms.iter().map(|m| m.id.clone()).collect();
    let removed = vec!["meter-05".to_string()];
    let less: Vec<String> = all[..5].to_vec();
    let outputs = [(4, 0), (9, 0)];
    let ra = release_from_proto(&hourly(std::slice::from_ref(&all), &outputs)).unwrap();
    let rb = release_from_proto(&hourly(std::slice::from_ref(&less), &outputs)).unwrap();
    let (da, db) = (derive(scheme, &ra), derive(scheme, &rb));
    assert_eq!(da.masks, db.masks, "the same slots and weights");
    for o in 0..outputs.len() {
        assert_ne!(
            da.hashes[o], db.hashes[o],
            "the cohort is part of the flooding's input"
        );
    }
    for (p, fkp) in fk.iter().enumerate() {
        let a = answer(scheme, p, fkp, &ms, &ra, &da);
        let b = answer(scheme, p, fkp, &ms, &rb, &db);
        for (sa, sb) in a.shares.iter().zip(&b.shares) {
            let u = sa.share_index;
            let common = share_key(&ms, &less, u, Channel::Import);
            let extra = share_key(&ms, &removed, u, Channel::Import);
            for o in 0..outputs.len() {
                // The common members' part is flooded afresh in each release ...
                let ca = contribution(&da.masks[o], &common.0, fkp, u, &da.hashes[o]);
                let cb = contribution(&db.masks[o], &common.0, fkp, u, &db.hashes[o]);
                assert_ne!(ca, cb, "party {p} share {u} output {o}");
                // ... so differencing the two answers does not isolate the removed meter's share:
                // what is left over is the difference of two independent floods.
                let exposed = dot(&da.masks[o], &extra.0);
                let residue = sa.values[o]
                    .wrapping_sub(sb.values[o])
                    .wrapping_sub(exposed) as i128;
                let floods = flooding(fkp, u, &da.hashes[o]) as i128
                    - flooding(fkp, u, &db.hashes[o]) as i128;
                assert_eq!(residue, floods);
                assert!(
                    residue.unsigned_abs() > 1u128 << 40 && residue.unsigned_abs() < 1u128 << 71,
                    "party {p} share {u} output {o}: residue {residue}"
                );
            }
        }
    }
    // The smaller cohort's release decodes to its own exact sums.
    let (bodies, want) = sums(&ms, &rb);
    let resp: Vec<PartyResponse> = [0, 2]
        .iter()
        .map(|p| answer(scheme, *p, &fk[*p], &ms, &rb, &db))
        .collect();
    let out = combine_bodies(scheme, &bodies, ENCODING, FLOOD_LOG2, &resp).unwrap();
    assert_eq!(out.values, want);

    // The same release again, validated and derived from scratch: identical answers.
    let again = release_from_proto(&hourly(std::slice::from_ref(&all), &outputs)).unwrap();
    let dagain = derive(scheme, &again);
    for (p, fkp) in fk.iter().enumerate() {
        let first = answer(scheme, p, fkp, &ms, &ra, &da);
        let second = answer(scheme, p, fkp, &ms, &again, &dagain);
        assert_eq!(first.shares, second.shares, "party {p}");
    }
    // An output's value does not depend on its position in the request: asking for hour 9 alone
    // gets the same answer, not a fresh flooding of the same value.
    let alone = release_from_proto(&hourly(&[all], &[(9, 0)])).unwrap();
    let dalone = derive(scheme, &alone);
    let a = answer(scheme, 1, &fk[1], &ms, &ra, &da);
    let b = answer(scheme, 1, &fk[1], &ms, &alone, &dalone);
    for (sa, sb) in a.shares.iter().zip(&b.shares) {
        assert_eq!(sa.values[1], sb.values[0]);
    }
}
