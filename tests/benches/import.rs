//! Importer throughput (issue 14): a year of hourly readings for PSM_BENCH_METERS [1000] meters,
//! as a plain CSV and as NEM12 (30-minute), parsed and placed into UTC meter-days with the
//! per-day report — against a plaintext baseline in the same run that only splits the lines and
//! sums the values (what any reader of the file has to do at least). Encryption is measured in
//! the linear bench; this is the part before it.
//!
//! Run: cargo bench -p psm-e2e --bench import

use std::fmt::Write as _;
use std::time::Instant;

use psm_meterdata::import::{parse_nem12, parse_plain_csv, to_days};

const FIRST_DAY: i64 = 20_454; // 2026-01-01
const DAYS: i64 = 365;

fn wh(meter: usize, i: i64) -> i64 {
    ((meter as i64 * 7919 + i * 104_729) % 1_500).abs()
}

fn plain_csv(meters: usize) -> String {
    let mut s = String::with_capacity(meters * 8760 * 32);
    s.push_str("meter_id,timestamp,wh\n");
    for m in 0..meters {
        for h in 0..DAYS * 24 {
            let t = FIRST_DAY * 86_400 + h * 3600;
            let _ = writeln!(s, "m-{m:05},{t},{}", wh(m, h));
        }
    }
    s
}

fn nem12(meters: usize) -> String {
    let mut s = String::from("100,NEM12,202701011200,MDP1,RETAILER1\n");
    for m in 0..meters {
        let _ = writeln!(s, "200,QB{m:08},E1,E1,E1,N1,M{m},kWh,30,20270201");
        for d in 0..DAYS {
            let date =
                chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + chrono::Days::new(d as u64);
            let _ = write!(s, "300,{}", date.format("%Y%m%d"));
            for k in 0..48 {
                let _ = write!(s, ",{:.3}", wh(m, d * 48 + k) as f64 / 1000.0);
            }
            s.push_str(",A,,,20270101000000,20270101000000\n");
        }
    }
    s.push_str("900\n");
    s
}

/// The baseline: split lines and fields, parse and sum the values.
fn baseline_csv(text: &str) -> (usize, i64) {
    let mut n = 0;
    let mut total = 0;
    for line in text.lines().skip(1) {
        if let Some(v) = line.rsplit(',').next().and_then(|v| v.parse::<i64>().ok()) {
            n += 1;
            total += v;
        }
    }
    (n, total)
}

fn baseline_nem12(text: &str) -> (usize, i64) {
    let mut n = 0;
    let mut total = 0;
    for line in text.lines().filter(|l| l.starts_with("300,")) {
        for v in line.split(',').skip(2).take(48) {
            if let Ok(x) = v.parse::<f64>() {
                n += 1;
                total += (x * 1000.0).round() as i64;
            }
        }
    }
    (n, total)
}

fn main() {
    let meters = psm_e2e::bench_size("PSM_BENCH_METERS", 1_000);
    println!("importer throughput, {meters} meters × {DAYS} days");
    println!(
        "{:<34} {:>12} {:>10} {:>14}",
        "", "readings", "seconds", "readings/s"
    );
    let row = |what: &str, n: usize, secs: f64| {
        println!("{what:<34} {n:>12} {secs:>10.2} {:>14.0}", n as f64 / secs);
    };

    let text = plain_csv(meters);
    println!("plain CSV: {:.0} MB", text.len() as f64 / 1e6);
    let t = Instant::now();
    let (n, base_total) = baseline_csv(&text);
    row("CSV baseline (split and sum)", n, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let parsed = parse_plain_csv(&text).expect("csv");
    let parse = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let imported = to_days(&parsed);
    let place = t.elapsed().as_secs_f64();
    let total: i64 = imported.days.iter().flat_map(|d| &d.values).sum();
    assert_eq!((imported.readings(), total), (n, base_total));
    row("CSV parse", n, parse);
    row("CSV meter-days and report", n, place);
    row("CSV import in all", n, parse + place);
    drop((text, parsed, imported));

    let text = nem12(meters);
    println!("NEM12 (30-minute): {:.0} MB", text.len() as f64 / 1e6);
    let t = Instant::now();
    let (n, base_total) = baseline_nem12(&text);
    row(
        "NEM12 baseline (split and sum)",
        n,
        t.elapsed().as_secs_f64(),
    );
    let t = Instant::now();
    let parsed = parse_nem12(&text).expect("nem12");
    let parse = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let imported = to_days(&parsed);
    let place = t.elapsed().as_secs_f64();
    let total: i64 = imported.days.iter().flat_map(|d| &d.values).sum();
    assert_eq!((imported.readings(), total), (n, base_total));
    row("NEM12 parse", n, parse);
    row("NEM12 meter-days and report", n, place);
    row("NEM12 import in all", n, parse + place);
}
