//! `psm tariff check`: validate a tariff file and print the hash keyshares allow it by.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use psm_proto::v1::TariffBand;
use serde_json::json;

#[derive(clap::Subcommand)]
pub enum TariffCommand {
    /// Validate a tariff file (TOML, docs/tariffs.md) and print its hash: the value to put in
    /// each keyshare's `allowed_programs`, or give them the file in `allowed_tariffs`.
    Check {
        file: PathBuf,
        /// Print the hash and the checked tariff as JSON.
        #[arg(long)]
        json: bool,
    },
}

const DAYS: [&str; 8] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "holidays"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn names(mask: u32, all: &[&str]) -> String {
    let picked: Vec<&str> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    picked.join(" ")
}

fn months(b: &TariffBand) -> String {
    if b.month_mask == 0 || b.month_mask == 0xFFF {
        "all".into()
    } else {
        names(b.month_mask, &MONTHS)
    }
}

/// Distinct prices of a series: keyshares judge each as a band (at most
/// [`psm_tariff::MAX_BANDS`] in a bill's period), so an operator sees before billing whether a
/// feed comes in levels.
fn levels(prices: &[i64]) -> usize {
    prices
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn price(milli: i64) -> String {
    format!("{:.3}", milli as f64 / 1000.0)
}

pub fn run(cmd: TariffCommand) -> anyhow::Result<()> {
    match cmd {
        TariffCommand::Check { file, json } => {
            let c = psm_tariff::file::load(&file)?;
            let hash = hex::encode(c.hash);
            let w = &c.wire;
            if json {
                let out = json!({
                    "file": file.display().to_string(),
                    "hash": hash,
                    "name": w.name,
                    "time_zone": w.time_zone,
                    "currency": w.currency,
                    "effective_from": w.effective_from,
                    "effective_to": w.effective_to,
                    "holidays": w.holidays,
                    "bands": w.bands.iter().map(|b| json!({
                        "name": b.name,
                        "months": months(b),
                        "days": names(b.weekday_mask, &DAYS),
                        "hours": [b.start_hour, b.end_hour],
                        "import_price_milli": b.import_price_milli,
                        "export_price_milli": b.export_price_milli,
                    })).collect::<Vec<_>>(),
                    "standing_charge_per_day": w.standing_charge_per_day,
                    "fixed_charge_per_month": w.fixed_charge_per_month,
                    "minimum_charge_per_month": w.minimum_charge_per_month,
                    "net_per_band": w.net_per_band,
                    "vat_basis_points": w.vat_basis_points,
                    "demand_rate_per_kw_milli": w.demand_rate_per_kw_milli,
                    "tiers": w.tiers.iter().map(|t| json!({"up_to_kwh": t.up_to_kwh, "price_milli": t.price_milli})).collect::<Vec<_>>(),
                    "import_prices": c.tariff.import_prices.as_ref().map(|p| json!({
                        "interval_seconds": p.interval_seconds,
                        "start_unix": p.start_unix,
                        "end_unix": p.end_unix(),
                        "count": p.price_milli.len(),
                        "min_milli": p.price_milli.iter().min(),
                        "max_milli": p.price_milli.iter().max(),
                        "levels": levels(&p.price_milli),
                    })),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("{}: valid", file.display());
            println!("hash {hash}");
            println!(
                "{:?} in {}, {}; in force {} to {}",
                w.name,
                w.time_zone,
                w.currency,
                if w.effective_from.is_empty() {
                    "always"
                } else {
                    &w.effective_from
                },
                if w.effective_to.is_empty() {
                    "open"
                } else {
                    &w.effective_to
                },
            );
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
                "band",
                "months",
                "days",
                "hours",
                "import /kWh",
                "export /kWh",
            ]);
            for b in &w.bands {
                t.add_row(vec![
                    b.name.clone(),
                    months(b),
                    names(b.weekday_mask, &DAYS),
                    format!("{:02}-{:02}", b.start_hour, b.end_hour),
                    price(b.import_price_milli),
                    price(b.export_price_milli),
                ]);
            }
            println!("{t}");
            println!(
                "standing charge {} per day, fixed charge {} per month, minimum {} per month, VAT {} bp (minor units){}",
                w.standing_charge_per_day,
                w.fixed_charge_per_month,
                w.minimum_charge_per_month,
                w.vat_basis_points,
                if w.net_per_band { "; net metering per band" } else { "" }
            );
            if !w.holidays.is_empty() {
                println!("holidays: {}", w.holidays.join(", "));
            }
            if let Some(p) = &c.tariff.import_prices {
                let (lo, hi) = (
                    p.price_milli.iter().min().copied().unwrap_or(0),
                    p.price_milli.iter().max().copied().unwrap_or(0),
                );
                println!(
                    "dynamic import prices: {} of {} s from {} (UTC seconds), {} to {} per kWh (ratio {:.2}); keyshares bill them only with an approval date before the period",
                    p.price_milli.len(),
                    p.interval_seconds,
                    p.start_unix,
                    price(lo),
                    price(hi),
                    hi as f64 / lo.max(1) as f64
                );
                let n = levels(&p.price_milli);
                println!(
                    "{n} price levels{}",
                    if n > psm_tariff::MAX_BANDS {
                        format!(
                            "; keyshares refuse a bill whose period sees more than {} of them (each level is judged as a band, docs/tariffs.md)",
                            psm_tariff::MAX_BANDS
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if w.demand_rate_per_kw_milli > 0 || !w.tiers.is_empty() {
                println!(
                    "demand charge {} per kW; {} tiers (tfhe track: bills on whole UTC days)",
                    price(w.demand_rate_per_kw_milli),
                    w.tiers.len()
                );
            }
        }
    }
    Ok(())
}
