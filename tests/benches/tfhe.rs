//! The tfhe track on this machine, each against its baseline in the same run: register proofs
//! per meter-day (vs an unproven list), the demand peak of a meter-month (tree vs sequential
//! max, vs plaintext), the tiered cost of one meter's month, a histogram of 16 meters into 4
//! bands, and squash + threshold decryption of the results (3 keyshares over mTLS vs in-process).
//!
//! Run: cargo build --release --bins && cargo bench -p psm-e2e --bench tfhe

use std::time::{Duration, Instant};

use psm_core::ceremony::{decrypt_via_files, PublicBundle};
use psm_core::keys::ShareFile;
use psm_core::lwe::SQUASHED_BLOCK;
use psm_core::registers::{prove, Registers};
use psm_core::squashed::recompose;
use psm_core::tfhe_program::{
    band_counts_clear, bill_registers, concat, histogram, install_server_key, max_sequential,
    max_tree, sum_tree, tiered_cost, tiered_cost_clear,
};
use psm_tariff::tiers;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tfhe::{CompactCiphertextList, FheUint32};

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn day(i: usize) -> String {
    psm_core::readings::format_day(psm_core::readings::parse_day("2026-01-01").unwrap() + i as i64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = psm_e2e::keys::key_set(3, 2);
    let bundle = PublicBundle::open(&keys.public_dir).unwrap();
    let cpk = bundle.compact_public_key().unwrap();
    let crs = bundle.crs().unwrap();
    let verifier = bundle.register_verifier().unwrap();
    let tid = keys.manifest.tfhe_key_id.clone();
    let t = Instant::now();
    let sk = bundle.compressed_server_key().unwrap().decompress();
    install_server_key(&sk);
    println!(
        "server key decompressed and installed: {:.1} s",
        secs(t.elapsed())
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);

    // 1. Proofs per meter-day.
    let r = Registers {
        peak_w: 5_400,
        total_wh: 23_000,
    };
    let mut prove_t = Vec::new();
    let mut verify_t = Vec::new();
    let mut plain_t = Vec::new();
    let mut list = Vec::new();
    let mut plain_len = 0;
    for i in 0..5 {
        let t = Instant::now();
        list = prove(&cpk, &crs, &tid, "meter-1", &day(i), r).unwrap();
        prove_t.push(t.elapsed());
        let t = Instant::now();
        verifier.verify("meter-1", &day(i), &list).unwrap();
        verify_t.push(t.elapsed());
        let t = Instant::now();
        let unproven = CompactCiphertextList::builder(&cpk)
            .push(r.peak_w)
            .push(r.total_wh)
            .build();
        plain_t.push(t.elapsed());
        let mut bytes = Vec::new();
        tfhe::safe_serialization::safe_serialize(&unproven, &mut bytes, 1 << 20).unwrap();
        plain_len = bytes.len();
    }
    let t = Instant::now();
    let _ = verifier.expand("meter-1", &day(4), &list).unwrap();
    let expand_t = t.elapsed();
    println!("\n| per meter-day (2 × u32 registers) | time | size |");
    println!("|---|---|---|");
    println!(
        "| prove (ZkComputeLoad::Proof), median of 5 | {:.2} s | {} B |",
        secs(median(prove_t)),
        list.len()
    );
    println!(
        "| verify (ingest), median of 5 | {:.3} s | |",
        secs(median(verify_t))
    );
    println!(
        "| verify and expand (compute) | {:.2} s | |",
        secs(expand_t)
    );
    println!(
        "| baseline: unproven compact list, median of 5 | {:.4} s | {plain_len} B |",
        secs(median(plain_t))
    );

    // 2. Demand peak of a 30-day month.
    let month: Vec<Registers> = (0..30)
        .map(|_| Registers {
            peak_w: rng.gen_range(1_000..90_000),
            total_wh: rng.gen_range(5_000..600_000),
        })
        .collect();
    let t = Instant::now();
    let lists: Vec<Vec<u8>> = month
        .par_iter()
        .enumerate()
        .map(|(i, r)| prove(&cpk, &crs, &tid, "shop-1", &day(i), *r).unwrap())
        .collect();
    let prove_month = t.elapsed();
    let t = Instant::now();
    let days: Vec<(FheUint32, FheUint32)> = lists
        .par_iter()
        .enumerate()
        .map(|(i, l)| verifier.expand("shop-1", &day(i), l).unwrap())
        .collect();
    let expand_month = t.elapsed();
    let peaks: Vec<FheUint32> = days.iter().map(|d| d.0.clone()).collect();
    let totals: Vec<FheUint32> = days.iter().map(|d| d.1.clone()).collect();
    let t = Instant::now();
    let seq = max_sequential(&peaks).unwrap();
    let seq_t = t.elapsed();
    let t = Instant::now();
    let tree = max_tree(peaks.clone()).unwrap();
    let tree_t = t.elapsed();
    let t = Instant::now();
    let plain_max = month.iter().map(|r| r.peak_w).max().unwrap();
    let plain_max_t = t.elapsed();
    // Both are the same maximum; the bill program below decrypts the tree's and checks it.
    drop((seq, tree));
    println!("\n| demand peak of one meter-month (30 days) | time |");
    println!("|---|---|");
    println!(
        "| prove 30 meter-days (both cores) | {:.1} s |",
        secs(prove_month)
    );
    println!(
        "| verify and expand 30 lists (both cores) | {:.1} s |",
        secs(expand_month)
    );
    println!(
        "| max, sequential (29 dependent maxima) | {:.1} s |",
        secs(seq_t)
    );
    println!(
        "| max, balanced tree (depth 5, halves in parallel) | {:.1} s |",
        secs(tree_t)
    );
    println!("| baseline: plaintext max | {:.6} s |", secs(plain_max_t));

    // 3. Tiered cost of the month's total.
    let tier_spec = tiers(&[(150, 9_000), (500, 18_000), (0, 30_000)]).unwrap();
    let t = Instant::now();
    let total = sum_tree(totals.clone()).unwrap();
    let sum_t = t.elapsed();
    let t = Instant::now();
    let cost = tiered_cost(&total, &tier_spec).unwrap();
    drop(cost); // decrypted below as part of the bill program
    let tier_t = t.elapsed();
    let plain_total: u64 = month.iter().map(|r| u64::from(r.total_wh)).sum();
    let t = Instant::now();
    let plain_cost = tiered_cost_clear(plain_total, &tier_spec);
    let plain_tier_t = t.elapsed();
    println!("\n| tiered tariff, one meter-month, 3 tiers | time |");
    println!("|---|---|");
    println!(
        "| period total: tree sum of 30 u32 into u64 | {:.1} s |",
        secs(sum_t)
    );
    println!("| cost on the encrypted total | {:.1} s |", secs(tier_t));
    println!("| baseline: plaintext | {:.6} s |", secs(plain_tier_t));

    // 4. Histogram: 16 meters (one day each) into 4 bands.
    let home_totals: Vec<u32> = (0..16).map(|_| rng.gen_range(0..40_000)).collect();
    let home_lists: Vec<Vec<u8>> = home_totals
        .par_iter()
        .enumerate()
        .map(|(i, t)| {
            prove(
                &cpk,
                &crs,
                &tid,
                &format!("home-{i}"),
                &day(0),
                Registers {
                    peak_w: 1,
                    total_wh: *t,
                },
            )
            .unwrap()
        })
        .collect();
    let t = Instant::now();
    let homes: Vec<Vec<FheUint32>> = home_lists
        .par_iter()
        .enumerate()
        .map(|(i, l)| vec![verifier.expand(&format!("home-{i}"), &day(0), l).unwrap().1])
        .collect();
    let hist_expand = t.elapsed();
    let edges = [0u64, 5_000, 10_000, 20_000, 1 << 32];
    let t = Instant::now();
    let hist = histogram(homes, &edges, &|_, _| {}).unwrap();
    let hist_t = t.elapsed();
    let plain: Vec<u64> = home_totals.iter().map(|t| u64::from(*t)).collect();
    let t = Instant::now();
    let plain_counts = band_counts_clear(&plain, &edges);
    let plain_hist_t = t.elapsed();
    println!("\n| histogram, 16 meters into 4 bands | time |");
    println!("|---|---|");
    println!(
        "| verify and expand 16 lists | {:.1} s |",
        secs(hist_expand)
    );
    println!(
        "| comparisons, band sums and squashing of the 4 counts | {:.1} s |",
        secs(hist_t)
    );
    println!("| baseline: plaintext | {:.6} s |", secs(plain_hist_t));

    // 5. Squash + threshold decryption of the bill's results and the histogram.
    let t = Instant::now();
    let bill_parts = bill_registers(days, true, &tier_spec, &|_, _| {}).unwrap();
    let bill_eval = t.elapsed();
    let (bill_batch, _) = concat(&bill_parts);
    let (hist_batch, _) = concat(&hist);
    let files: Vec<ShareFile> = keys
        .share_files
        .iter()
        .map(|p| ShareFile::read(p).unwrap())
        .collect();
    let shares: Vec<&ShareFile> = files.iter().collect();
    let t = Instant::now();
    let local = decrypt_via_files(&shares[..2], &tid, &bill_batch, SQUASHED_BLOCK).unwrap();
    let local_t = t.elapsed();
    assert_eq!(recompose(&local[..8], 32), u128::from(plain_max));
    assert_eq!(recompose(&local[8..], 64), plain_cost);

    // Through the keyshares every tfhe-track decryption is preceded by each keyshare's
    // re-execution of the program on ingest's stored registers (the same evaluation again);
    // tests/tests/tfhe_track.rs runs that path end to end.
    println!("\n| squash and threshold decryption (2-of-3) | time |");
    println!("|---|---|");
    println!(
        "| bill program: tree max + tiers + squash of peak (u32) and cost (u64) | {:.1} s |",
        secs(bill_eval)
    );
    println!(
        "| decrypt those 24 blocks in-process (2 share files) | {:.3} s |",
        secs(local_t)
    );
    let t = Instant::now();
    let counts = decrypt_via_files(&shares[..2], &tid, &hist_batch, SQUASHED_BLOCK).unwrap();
    let hist_t = t.elapsed();
    let got: Vec<u32> = counts.chunks(4).map(|c| recompose(c, 16) as u32).collect();
    assert_eq!(got, plain_counts);
    println!(
        "| decrypt the histogram's 16 blocks in-process (2 share files) | {:.3} s |",
        secs(hist_t)
    );
}
