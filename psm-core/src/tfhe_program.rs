//! The tfhe track's programs on expanded registers: the demand peak (maximum of the daily
//! peaks), the tiered block cost of a period total, and histogram counts. Reductions are trees
//! on rayon's pool, so both cores work and depth is log2(n); the server key must be installed on
//! every worker ([`install_server_key`]). Evaluation is deterministic (same inputs, same key →
//! bit-identical outputs), which is what lets a keyshare re-execute it.

use rayon::prelude::*;
use tfhe::prelude::*;
use tfhe::{FheBool, FheUint16, FheUint32, FheUint64, ServerKey};

use crate::tariff::Tier;

/// Sets `key` as the tfhe server key on every thread of rayon's global pool and on this one
/// (tfhe-rs keeps the key per thread). `ServerKey` clones share the key material.
pub fn install_server_key(key: &ServerKey) {
    rayon::broadcast(|_| tfhe::set_server_key(key.clone()));
    tfhe::set_server_key(key.clone());
}

/// The maximum, as a balanced tree of pairwise maxima evaluated in parallel.
pub fn max_tree(values: Vec<FheUint32>) -> Option<FheUint32> {
    values.into_par_iter().reduce_with(|a, b| a.max(&b))
}

/// The maximum, one value after another: the naive baseline for the benchmark.
pub fn max_sequential(values: &[FheUint32]) -> Option<FheUint32> {
    let mut it = values.iter();
    let first = it.next()?.clone();
    Some(it.fold(first, |acc, v| acc.max(v)))
}

/// The sum in 64 bits (no overflow for any number of u32 inputs below 2^32), as a tree.
pub fn sum_tree(values: Vec<FheUint32>) -> Option<FheUint64> {
    values
        .into_par_iter()
        .map(FheUint64::cast_from)
        .reduce_with(|a, b| a + b)
}

/// Σ over tiers of price × energy falling in the tier, in Wh × milli-minor units per kWh
/// (divide by 10^6 for minor units). Tier i covers [previous bound, up_to_wh); only the cost
/// leaves this function, never the total.
pub fn tiered_cost(total_wh: &FheUint64, tiers: &[Tier]) -> Option<FheUint64> {
    let bounds: Vec<(u64, Option<u64>, u64)> = tiers
        .iter()
        .scan(0u64, |lower, t| {
            let l = *lower;
            *lower = t.up_to_wh.unwrap_or(u64::MAX);
            Some((l, t.up_to_wh, t.price_milli))
        })
        .collect();
    bounds
        .into_par_iter()
        .map(|(lower, upper, price)| {
            let mut x = if lower > 0 {
                total_wh.max(lower)
            } else {
                total_wh.clone()
            };
            if let Some(u) = upper {
                x = x.min(u);
            }
            if lower > 0 {
                x -= lower;
            }
            x * price
        })
        .reduce_with(|a, b| a + b)
}

/// Per band [edges[j], edges[j+1]), how many of `totals` fall in it (counts only).
pub fn band_counts(totals: &[FheUint64], edges: &[u64]) -> Vec<FheUint16> {
    let bands = edges.len().saturating_sub(1);
    // ge[m][j] = totals[m] >= edges[j], all comparisons in parallel.
    let ge: Vec<Vec<FheBool>> = totals
        .par_iter()
        .map(|t| edges.par_iter().map(|e| t.ge(*e)).collect())
        .collect();
    (0..bands)
        .into_par_iter()
        .map(|j| {
            ge.par_iter()
                .map(|g| FheUint16::cast_from(&g[j] & !&g[j + 1]))
                .reduce_with(|a, b| a + b)
                .unwrap_or_else(|| FheUint16::encrypt_trivial(0u16))
        })
        .collect()
}

/// The plaintext reference of [`tiered_cost`].
pub fn tiered_cost_clear(total_wh: u64, tiers: &[Tier]) -> u128 {
    let mut lower = 0u64;
    let mut cost = 0u128;
    for t in tiers {
        let upper = t.up_to_wh.unwrap_or(u64::MAX);
        let inside = total_wh.clamp(lower, upper.max(lower)) - lower;
        cost += u128::from(inside) * u128::from(t.price_milli);
        lower = upper;
    }
    cost
}

/// The plaintext reference of [`band_counts`].
pub fn band_counts_clear(totals: &[u64], edges: &[u64]) -> Vec<u32> {
    (0..edges.len().saturating_sub(1))
        .map(|j| {
            totals
                .iter()
                .filter(|t| **t >= edges[j] && **t < edges[j + 1])
                .count() as u32
        })
        .collect()
}
