//! The tfhe track's programs on expanded registers: the demand peak (maximum of the daily
//! peaks), the tiered block cost of a period total, and histogram counts. Reductions are balanced
//! binary trees split at the midpoint, their halves run with `rayon::join`, so both cores work,
//! depth is log2(n), and the shape — hence every output bit — does not depend on scheduling:
//! tfhe-rs evaluation is deterministic, so a keyshare re-executing a program gets the same
//! ciphertexts as compute. The server key must be installed on every worker
//! ([`install_server_key`]).

use rayon::prelude::*;
use tfhe::prelude::SquashNoise;
use tfhe::prelude::*;
use tfhe::{FheBool, FheUint16, FheUint32, FheUint64, ServerKey};

use crate::lwe::LweBatch;
use crate::squashed::uint_batch;
use psm_tariff::Tier;

/// Most register inputs (meter-days) one tfhe-track program may take. Compute and the
/// re-executing keyshares hold every input's expansion in memory at once (about 0.5 MB each), so
/// both refuse more than this.
pub const MAX_TFHE_INPUTS: usize = 10_000;

/// Sets `key` as the tfhe server key on every thread of rayon's global pool and on this one
/// (tfhe-rs keeps the key per thread). `ServerKey` clones share the key material.
pub fn install_server_key(key: &ServerKey) {
    rayon::broadcast(|_| tfhe::set_server_key(key.clone()));
    tfhe::set_server_key(key.clone());
}

/// Reduces `values` with `f` as a balanced tree (fixed shape, halves in parallel).
pub fn tree<T: Send, F: Fn(T, T) -> T + Sync>(mut values: Vec<T>, f: &F) -> Option<T> {
    match values.len() {
        0 => None,
        1 => values.pop(),
        n => {
            let right = values.split_off(n / 2);
            let (a, b) = rayon::join(|| tree(values, f), || tree(right, f));
            Some(f(a?, b?))
        }
    }
}

/// The maximum, as a balanced tree of pairwise maxima evaluated in parallel.
pub fn max_tree(values: Vec<FheUint32>) -> Option<FheUint32> {
    tree(values, &|a: FheUint32, b: FheUint32| a.max(&b))
}

/// The maximum, one value after another: the naive baseline for the benchmark.
pub fn max_sequential(values: &[FheUint32]) -> Option<FheUint32> {
    let mut it = values.iter();
    let first = it.next()?.clone();
    Some(it.fold(first, |acc, v| acc.max(v)))
}

/// The sum in 64 bits (no overflow for any number of u32 inputs below 2^32), as a tree.
pub fn sum_tree(values: Vec<FheUint32>) -> Option<FheUint64> {
    let wide: Vec<FheUint64> = values.into_par_iter().map(FheUint64::cast_from).collect();
    tree(wide, &|a, b| a + b)
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
    let terms: Vec<FheUint64> = bounds
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
        .collect();
    tree(terms, &|a, b| a + b)
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
            let ones: Vec<FheUint16> = ge
                .par_iter()
                .map(|g| FheUint16::cast_from(&g[j] & !&g[j + 1]))
                .collect();
            tree(ones, &|a, b| a + b).unwrap_or_else(|| FheUint16::encrypt_trivial(0u16))
        })
        .collect()
}

/// A squashed integer result of `bits` bits as an LWE batch, for threshold decryption.
pub type Squashed = (LweBatch, u32);

fn squash<T>(v: &T, bits: u32) -> Result<Squashed, tfhe::Error>
where
    T: SquashNoise<Output = tfhe::SquashedNoiseFheUint>,
{
    Ok((uint_batch(&v.squash_noise()?), bits))
}

/// The tfhe part of a bill from one meter's expanded days (peak W, total Wh), in day order:
/// the squashed maximum peak (32 bits) if `demand`, then the squashed tiered cost (64 bits) if
/// there are tiers. `progress` receives (step, percent within this program).
pub fn bill_registers(
    days: Vec<(FheUint32, FheUint32)>,
    demand: bool,
    tiers: &[Tier],
    progress: &(dyn Fn(&str, u32) + Sync),
) -> Result<Vec<Squashed>, tfhe::Error> {
    let (peaks, totals): (Vec<_>, Vec<_>) = days.into_iter().unzip();
    let mut out = Vec::new();
    if demand {
        progress("maximum of the daily peaks", 0);
        if let Some(peak) = max_tree(peaks) {
            progress("squashing the peak", 40);
            out.push(squash(&peak, 32)?);
        }
    }
    if !tiers.is_empty() {
        progress("tiered cost of the period total", 50);
        if let Some(cost) = sum_tree(totals).and_then(|t| tiered_cost(&t, tiers)) {
            progress("squashing the tiered cost", 80);
            out.push(squash(&cost, 64)?);
        }
    }
    Ok(out)
}

/// A histogram from each meter's expanded days (meters in cohort order, days in order): the
/// squashed count (16 bits) of every band.
pub fn histogram(
    meters: Vec<Vec<FheUint32>>,
    edges: &[u64],
    progress: &(dyn Fn(&str, u32) + Sync),
) -> Result<Vec<Squashed>, tfhe::Error> {
    progress("summing each meter's period total", 0);
    let totals: Vec<FheUint64> = meters.into_par_iter().filter_map(sum_tree).collect();
    progress("comparing with the band edges", 30);
    let counts = band_counts(&totals, edges);
    progress("squashing the counts", 80);
    counts.iter().map(|c| squash(c, 16)).collect()
}

/// The parts concatenated into one batch to decrypt, and each part's (blocks, bits).
pub fn concat(parts: &[Squashed]) -> (LweBatch, Vec<(usize, u32)>) {
    let mut words = Vec::new();
    let mut widths = Vec::new();
    let mut dimension = 0;
    for (b, bits) in parts {
        dimension = b.dimension();
        words.extend_from_slice(b.words());
        widths.push((b.len(), *bits));
    }
    (LweBatch::List { dimension, words }, widths)
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
