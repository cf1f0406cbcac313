//! Combining partial decryptions from any t responders into clear messages.

use std::collections::{BTreeMap, BTreeSet};

use super::{check_invariants, flood_log2_for, Scheme, SharePartial, ThresholdError};
use crate::lwe::{Encoding, LweBatch};

/// What one party returned.
#[derive(Debug, Clone)]
pub struct PartyResponse {
    /// 0-based party index.
    pub party: usize,
    pub shares: Vec<SharePartial>,
}

/// The decrypted messages and who contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Combined {
    pub values: Vec<i128>,
    /// Parties whose contributions were used (sorted).
    pub used: Vec<usize>,
    /// Parties excluded because their contributions disagreed with more parties than could be
    /// faulty, with the reason. Only proven faults are named.
    pub faulty: Vec<(usize, String)>,
    /// Whether every share was contributed by at least t trusted parties that agreed (so at least
    /// one honest one among them, with at most t − 1 faulty). A result combined from exactly t
    /// responders never is: some share came from one responder, which could have shifted it.
    pub cross_checked: bool,
}

/// Two honest contributions for the same share differ only by their flooding: by less than
/// 2·B_flood.
fn agree(a: &[u128], b: &[u128], flood_log2: u32) -> bool {
    let limit = 1u128 << (flood_log2 + 1);
    a.iter().zip(b).all(|(x, y)| {
        let d = x.wrapping_sub(*y);
        d <= limit || d.wrapping_neg() <= limit
    })
}

/// Combines the responses. Malformed responses (a share the party does not hold, a wrong
/// length) are refused outright. Parties that contributed the same share are compared; a party
/// is excluded and named only when it is provably faulty (it disagrees with more parties than
/// t − 1 faulty ones could explain). Any other disagreement refuses the whole decryption: with a
/// colluding majority on one share, outvoting would name the honest holder and use the lie.
pub fn combine(
    scheme: Scheme,
    batch: &LweBatch,
    encoding: Encoding,
    noise_bound_log2: u32,
    responses: &[PartyResponse],
) -> Result<Combined, ThresholdError> {
    batch.validate()?;
    let flood_log2 = flood_log2_for(noise_bound_log2);
    check_invariants(scheme, encoding, noise_bound_log2, flood_log2)?;
    combine_bodies(scheme, &batch.bodies(), encoding, flood_log2, responses)
}

/// [`combine`] for values whose masks the parties derived themselves (the linear track): the
/// i-th message is `bodies[i]` − Σ_U d_U,i, decoded. `flood_log2` bounds each party's flooding;
/// the caller has checked that the result decodes correctly.
pub fn combine_bodies(
    scheme: Scheme,
    bodies: &[u128],
    encoding: Encoding,
    flood_log2: u32,
    responses: &[PartyResponse],
) -> Result<Combined, ThresholdError> {
    encoding.validate()?;
    let count = bodies.len();

    // share index → (party → values)
    let mut by_share: BTreeMap<usize, BTreeMap<usize, &[u128]>> = BTreeMap::new();
    let mut seen_parties = BTreeSet::new();
    for r in responses {
        if !seen_parties.insert(r.party) {
            return Err(ThresholdError::BadPartial {
                party: r.party,
                reason: "answered twice".into(),
            });
        }
        for s in &r.shares {
            if !scheme.holds(r.party, s.share_index) {
                return Err(ThresholdError::BadPartial {
                    party: r.party,
                    reason: format!("sent share {} which it does not hold", s.share_index),
                });
            }
            if s.values.len() != count {
                return Err(ThresholdError::BadPartial {
                    party: r.party,
                    reason: format!("{} values for {count} ciphertexts", s.values.len()),
                });
            }
            by_share
                .entry(s.share_index)
                .or_default()
                .insert(r.party, &s.values);
        }
    }

    // Who disagrees with whom on some share they both hold. Honest contributions for the same
    // share always agree (their floodings differ by less than the window), so a disagreeing pair
    // contains at least one faulty party — but which one is only certain when the alternative
    // would need more than t − 1 faulty parties.
    let mut disagree: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for contribs in by_share.values() {
        let list: Vec<(&usize, &&[u128])> = contribs.iter().collect();
        for (i, (p, a)) in list.iter().enumerate() {
            for (q, b) in &list[i + 1..] {
                if !agree(a, b, flood_log2) {
                    disagree.entry(**p).or_default().insert(**q);
                    disagree.entry(**q).or_default().insert(**p);
                }
            }
        }
    }
    let max_faulty = scheme.threshold() - 1;
    let mut faulty: BTreeSet<usize> = BTreeSet::new();
    loop {
        // If p were honest, everyone it disagrees with would be faulty, and so would everyone
        // already shown faulty; more than t − 1 of them is impossible, so p is faulty.
        let proven: Vec<usize> = disagree
            .iter()
            .filter(|(p, d)| !faulty.contains(p) && d.union(&faulty).count() > max_faulty)
            .map(|(p, _)| *p)
            .collect();
        if proven.is_empty() {
            break;
        }
        faulty.extend(proven);
    }
    let unresolved: Vec<(usize, usize)> = disagree
        .iter()
        .filter(|(p, _)| !faulty.contains(p))
        .flat_map(|(p, d)| {
            d.iter()
                .filter(|q| **q > *p && !faulty.contains(q))
                .map(|q| (*p, *q))
        })
        .collect();
    if !unresolved.is_empty() {
        return Err(ThresholdError::Undecidable(format!(
            "parties {unresolved:?} sent disagreeing contributions for a share they both hold, and with at most {max_faulty} faulty part{} it cannot be shown which of them is wrong; nothing was decrypted",
            if max_faulty == 1 { "y" } else { "ies" }
        )));
    }
    let excluded: Vec<(usize, String)> = faulty
        .iter()
        .map(|p| {
            let others: Vec<usize> = disagree[p].iter().copied().collect();
            (
                *p,
                format!(
                    "its partial decryptions disagree with those of parties {others:?}, more than the {max_faulty} that could be faulty"
                ),
            )
        })
        .collect();

    let mut sum = vec![0u128; count];
    let mut used = BTreeSet::new();
    let mut cross_checked = true;
    for index in 0..scheme.share_count() {
        let mut trusted = by_share
            .get(&index)
            .into_iter()
            .flatten()
            .filter(|(p, _)| !faulty.contains(p));
        let Some((party, values)) = trusted.next() else {
            return Err(ThresholdError::NoQuorum(format!(
                "no trusted contribution for share {index}; {} of {} parties answered usably, {} needed",
                seen_parties.len() - faulty.len(),
                scheme.parties(),
                scheme.threshold()
            )));
        };
        // Checked only when at least t trusted parties agree on it: t − 1 of them could be the
        // colluding liars, so fewer agreeing proves nothing.
        cross_checked &= 1 + trusted.count() >= scheme.threshold();
        used.insert(*party);
        for (acc, v) in sum.iter_mut().zip(values.iter()) {
            *acc = acc.wrapping_add(*v);
        }
    }

    let values = bodies
        .iter()
        .zip(&sum)
        .map(|(b, d)| encoding.decode(b.wrapping_sub(*d)))
        .collect();
    Ok(Combined {
        values,
        used: used.into_iter().collect(),
        faulty: excluded,
        cross_checked,
    })
}
