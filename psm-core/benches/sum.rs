//! Linear-track summation: meter-day compact lists added word by word, against plain u64
//! summation of the same readings and against one pass reading the ciphertext bytes, in one run.
//!
//! Run: cargo bench -p psm-core --bench sum

use std::hint::black_box;
use std::time::Instant;

use psm_core::aggregate::sum_words;
use psm_core::lwe::LweBatch;
use rayon::prelude::*;

fn main() {
    let (_sk, pk) = psm_core::linear::generate_keypair();
    // 1,000 distinct meter-days of 96 readings; the 100,000-meter case cycles through them.
    let t = Instant::now();
    let pool: Vec<(Vec<u128>, Vec<i64>)> = (0..1000)
        .into_par_iter()
        .map(|m| {
            let readings: Vec<i64> = (0..96)
                .map(|i| ((m * 31 + i * 17) % 900) as i64 - 100)
                .collect();
            let LweBatch::Compact { words, .. } = psm_core::linear::encrypt(&pk, &readings) else {
                unreachable!()
            };
            (words, readings)
        })
        .collect();
    println!(
        "encrypting 1,000 meter-days (96 values each): {:.2} s on all cores",
        t.elapsed().as_secs_f64()
    );
    let bytes_per_list = pool[0].0.len() * 16;
    println!("| meters | FHE sum of compact lists (ms) | plain u64 sum of the same readings (ms) | reading the ciphertext bytes once (ms) | ciphertext bytes |");
    println!("|---|---|---|---|---|");
    for meters in [1_000usize, 100_000] {
        let lists: Vec<&[u128]> = (0..meters)
            .map(|i| pool[i % pool.len()].0.as_slice())
            .collect();
        let best = |f: &dyn Fn() -> u128| {
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    black_box(f());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let fhe = best(&|| {
            // Sum in chunks of 512 (the largest sum one decryption may hold, 2-of-3), then the
            // chunk sums: how compute shards a big cohort.
            let shards: Vec<Vec<u128>> = lists.chunks(512).map(sum_words).collect();
            shards
                .iter()
                .map(|s| s[5])
                .fold(0u128, |a, b| a.wrapping_add(b))
        });
        let plain = best(&|| {
            (0..meters)
                .map(|i| pool[i % pool.len()].1[5] as u64)
                .fold(0u64, u64::wrapping_add) as u128
        });
        let read = best(&|| {
            lists
                .par_iter()
                .map(|l| l.iter().fold(0u128, |a, w| a ^ w))
                .reduce(|| 0, |a, b| a ^ b)
        });
        println!(
            "| {meters} | {fhe:.2} | {plain:.4} | {read:.2} | {:.1} MB |",
            (meters * bytes_per_list) as f64 / 1e6
        );
    }
}
