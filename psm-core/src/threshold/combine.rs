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
    /// Parties excluded because their contributions disagreed with the others, with the reason.
    pub faulty: Vec<(usize, String)>,
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
/// length) are refused outright. When several parties contributed the same share, the party that
/// disagrees with the most others is excluded and named, repeatedly, until the rest agree; if
/// that cannot be decided (a tie), nothing is decrypted.
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

    // Disagreement graph between parties that contributed the same share.
    let mut disagree: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for contribs in by_share.values() {
        let list: Vec<(&usize, &&[u128])> = contribs.iter().collect();
        for (i, (p, a)) in list.iter().enumerate() {
            for (q, b) in &list[i + 1..] {
                if !agree(a, b, flood_log2) {
                    *disagree.entry((**p, **q)).or_default() += 1;
                }
            }
        }
    }
    let mut excluded: Vec<(usize, String)> = Vec::new();
    while !disagree.is_empty() {
        let mut degree: BTreeMap<usize, usize> = BTreeMap::new();
        for (p, q) in disagree.keys() {
            *degree.entry(*p).or_default() += 1;
            *degree.entry(*q).or_default() += 1;
        }
        let max = degree.values().copied().max().unwrap_or(0);
        let top: Vec<usize> = degree
            .iter()
            .filter(|(_, d)| **d == max)
            .map(|(p, _)| *p)
            .collect();
        if top.len() != 1 {
            return Err(ThresholdError::Undecidable(format!(
                "parties {top:?} each disagree with {max} other(s)"
            )));
        }
        let bad = top[0];
        let others: Vec<usize> = disagree
            .keys()
            .filter_map(|(p, q)| {
                if *p == bad {
                    Some(*q)
                } else if *q == bad {
                    Some(*p)
                } else {
                    None
                }
            })
            .collect();
        excluded.push((
            bad,
            format!("its partial decryptions disagree with those of parties {others:?}"),
        ));
        disagree.retain(|(p, q), _| *p != bad && *q != bad);
    }
    let excluded_set: BTreeSet<usize> = excluded.iter().map(|(p, _)| *p).collect();

    let mut sum = vec![0u128; count];
    let mut used = BTreeSet::new();
    for index in 0..scheme.share_count() {
        let contrib = by_share
            .get(&index)
            .and_then(|c| c.iter().find(|(p, _)| !excluded_set.contains(p)));
        let Some((party, values)) = contrib else {
            return Err(ThresholdError::NoQuorum(format!(
                "no trusted contribution for share {index}; {} of {} parties answered usably, {} needed",
                seen_parties.len() - excluded_set.len(),
                scheme.parties(),
                scheme.threshold()
            )));
        };
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
    })
}
