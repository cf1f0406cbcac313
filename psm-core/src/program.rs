//! The linear-track programs — a bill's per-band sums and an aggregate's per-interval sums —
//! evaluated one way, so that compute and a keyshare re-executing a request arrive at the same
//! output ciphertexts, and therefore the same output hash.

use crate::aggregate::{bucket, noise_log2, sum_words};
use crate::linear::LINEAR_DIMENSION;
use crate::lwe::LweBatch;
use crate::readings::DAY_SECONDS;
use crate::tariff::Tariff;

/// One encrypted band total of a bill (a band holding more intervals than one decryption may
/// carry is split into several).
#[derive(Debug, Clone)]
pub struct BandSum {
    pub band: usize,
    /// One LWE ciphertext (mask and body).
    pub words: Vec<u128>,
    pub summands: usize,
}

/// Adds a meter's interval ciphertexts into per-band sums, day by day, in the order given.
pub struct BillEvaluator<'a> {
    tariff: &'a Tariff,
    max_summands: usize,
    open: Vec<BandSum>,
    done: Vec<BandSum>,
}

impl<'a> BillEvaluator<'a> {
    /// `max_summands` is the most fresh ciphertexts one decrypted sum may hold
    /// ([`crate::aggregate::max_summands`]).
    pub fn new(tariff: &'a Tariff, max_summands: usize) -> Self {
        BillEvaluator {
            tariff,
            max_summands: max_summands.max(1),
            open: (0..tariff.bands.len())
                .map(|band| BandSum {
                    band,
                    words: vec![0; LINEAR_DIMENSION + 1],
                    summands: 0,
                })
                .collect(),
            done: Vec::new(),
        }
    }

    /// Adds one stored meter-day: `words` is its compact list of `count` readings whose
    /// intervals of `interval_seconds` start at 00:00 UTC of `day`.
    pub fn add_day(&mut self, day: i64, interval_seconds: u32, count: usize, words: Vec<u128>) {
        let lwe = LINEAR_DIMENSION + 1;
        let expanded = LweBatch::Compact {
            dimension: LINEAR_DIMENSION,
            count,
            words,
        }
        .expand();
        for (i, ct) in expanded.chunks_exact(lwe).enumerate() {
            let start = day * DAY_SECONDS + i as i64 * i64::from(interval_seconds);
            let acc = &mut self.open[self.tariff.band_at(start)];
            for (a, w) in acc.words.iter_mut().zip(ct) {
                *a = a.wrapping_add(*w);
            }
            acc.summands += 1;
            if acc.summands == self.max_summands {
                let full = std::mem::replace(&mut acc.words, vec![0; lwe]);
                self.done.push(BandSum {
                    band: acc.band,
                    words: full,
                    summands: acc.summands,
                });
                acc.summands = 0;
            }
        }
    }

    /// The band sums to decrypt: full pieces in the order they filled, then every band's
    /// remainder in band order; the batch holding them; its noise bound (log2).
    pub fn finish(self) -> (Vec<BandSum>, LweBatch, u32) {
        let mut sums = self.done;
        sums.extend(self.open.into_iter().filter(|a| a.summands > 0));
        let noise = noise_log2(sums.iter().map(|s| s.summands).max().unwrap_or(1));
        let batch = LweBatch::List {
            dimension: LINEAR_DIMENSION,
            words: sums.iter().flat_map(|s| s.words.iter().copied()).collect(),
        };
        (sums, batch, noise)
    }
}

/// The output of an aggregate over meter-days of one day and one interval length: their compact
/// lists added (`sums` from [`sum_words`]), each run of `k` intervals added into one value. Also
/// its noise bound (log2) for `meters` summed lists.
pub fn aggregate_output(summed: Vec<u128>, meters: usize, k: usize) -> (LweBatch, u32) {
    let count = summed.len().saturating_sub(LINEAR_DIMENSION);
    let compact = LweBatch::Compact {
        dimension: LINEAR_DIMENSION,
        count,
        words: summed,
    };
    let batch = if k <= 1 { compact } else { bucket(&compact, k) };
    (batch, noise_log2(meters * k.max(1)))
}

/// Adds the compact lists of several meter-days of the same shape.
pub fn add_lists(lists: &[Vec<u128>]) -> Vec<u128> {
    let refs: Vec<&[u128]> = lists.iter().map(Vec::as_slice).collect();
    sum_words(&refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tariff::Band;

    fn two_band_tariff() -> Tariff {
        let band = |name: &str, s: u32, e: u32| Band {
            name: name.into(),
            weekday_mask: 0x7F,
            start_hour: s,
            end_hour: e,
            import_price_milli: 10_000,
            export_price_milli: 5_000,
        };
        Tariff::new(
            "t",
            "UTC",
            vec![band("night", 0, 6), band("day", 6, 24)],
            0,
            0,
            "EUR",
        )
        .unwrap()
    }

    #[test]
    fn bill_pieces_depend_only_on_order_and_limit() {
        let tariff = two_band_tariff();
        // Plaintext-shaped "ciphertexts": a zero mask and the value in the body is enough to
        // check the bookkeeping (the words add the same way).
        let day = |v: u128| {
            let mut w = vec![0u128; LINEAR_DIMENSION + 24];
            for i in 0..24 {
                w[LINEAR_DIMENSION + i] = v;
            }
            w
        };
        let mut e = BillEvaluator::new(&tariff, 10);
        e.add_day(20_000, 3600, 24, day(1));
        e.add_day(20_001, 3600, 24, day(2));
        let (sums, batch, noise) = e.finish();
        // night: 6 + 6 = 12 summands → one piece of 10, remainder 2; day: 18 + 18 = 36 → 3 × 10,
        // remainder 6.
        let shape: Vec<(usize, usize)> = sums.iter().map(|s| (s.band, s.summands)).collect();
        assert_eq!(
            shape,
            vec![(1, 10), (0, 10), (1, 10), (1, 10), (0, 2), (1, 6)]
        );
        assert_eq!(batch.len(), 6);
        assert_eq!(noise, noise_log2(10));
        let total: u128 = sums.iter().map(|s| s.words[LINEAR_DIMENSION]).sum();
        assert_eq!(total, 24 + 48);
    }

    #[test]
    fn aggregate_buckets_runs_of_k() {
        let a: Vec<u128> = (0..(LINEAR_DIMENSION as u128 + 4)).collect();
        let summed = add_lists(&[a.clone(), a]);
        let (batch, noise) = aggregate_output(summed, 2, 2);
        assert_eq!(batch.len(), 2);
        assert_eq!(noise, noise_log2(4));
        let (batch, _) = aggregate_output(vec![0; LINEAR_DIMENSION + 4], 1, 1);
        assert!(matches!(batch, LweBatch::Compact { count: 4, .. }));
    }
}
