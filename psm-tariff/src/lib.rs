//! Tariffs and pricing: time-of-use tariffs and the itemized bill computed from decrypted
//! per-band totals.
//!
//! Every 5-minute slot is placed in a band by the local weekday and hour (in the tariff's IANA
//! time zone) of its start, so days with 23 or 25 local hours are handled by construction; a
//! bill needs each of the meter's intervals to fall in one band. Money is in integer minor
//! units; prices are milli-minor units per kWh.

use std::str::FromStr;

use chrono::{Datelike, TimeZone, Timelike};
use chrono_tz::Tz;

/// Why a tariff was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tariff: {0}")]
pub struct TariffError(pub String);

/// One time-of-use band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    pub name: String,
    /// Bit 0 = Monday … bit 6 = Sunday.
    pub weekday_mask: u32,
    /// Local hours [start_hour, end_hour).
    pub start_hour: u32,
    pub end_hour: u32,
    pub import_price_milli: i64,
    pub export_price_milli: i64,
}

/// A validated time-of-use tariff.
#[derive(Debug, Clone)]
pub struct Tariff {
    pub name: String,
    pub tz: Tz,
    pub bands: Vec<Band>,
    pub standing_charge_per_day: i64,
    pub vat_basis_points: u32,
    pub currency: String,
    /// Band index of every (weekday, hour) of the week.
    grid: [[usize; 24]; 7],
}

/// Largest price accepted (milli-minor units per kWh): 1,000 currency units per kWh.
const MAX_PRICE_MILLI: i64 = 100_000_000;

/// Longest period a tiered cost is computed over, days (the longest bill).
pub const MAX_TIERED_DAYS: u64 = 62;

/// Largest tier price: the tiered cost is Σ (energy in tier) × price in an encrypted u64, and the
/// period total can reach MAX_TIERED_DAYS × (2^32 − 1) Wh (every daily register at its maximum),
/// so no price may let that product wrap. About 690 currency units per kWh.
pub const MAX_TIER_PRICE_MILLI: u64 = u64::MAX / (MAX_TIERED_DAYS * u32::MAX as u64);

impl Tariff {
    /// Checks the time zone and that every local hour of the week falls in exactly one band.
    pub fn new(
        name: &str,
        time_zone: &str,
        bands: Vec<Band>,
        standing_charge_per_day: i64,
        vat_basis_points: u32,
        currency: &str,
    ) -> Result<Self, TariffError> {
        let tz = Tz::from_str(time_zone)
            .map_err(|_| TariffError(format!("unknown IANA time zone {time_zone:?}")))?;
        if bands.is_empty() || bands.len() > 32 {
            return Err(TariffError("a tariff needs 1..=32 bands".into()));
        }
        if !(0..=100_000_000).contains(&standing_charge_per_day) || vat_basis_points > 10_000 {
            return Err(TariffError("standing charge or VAT out of range".into()));
        }
        let mut grid = [[usize::MAX; 24]; 7];
        for (i, b) in bands.iter().enumerate() {
            if b.start_hour >= b.end_hour
                || b.end_hour > 24
                || b.weekday_mask == 0
                || b.weekday_mask > 0x7F
            {
                return Err(TariffError(format!("band {:?}: hours must be start < end <= 24 and weekdays a non-empty mask of 7 bits", b.name)));
            }
            if b.import_price_milli.abs() > MAX_PRICE_MILLI
                || b.export_price_milli.abs() > MAX_PRICE_MILLI
            {
                return Err(TariffError(format!(
                    "band {:?}: price out of range",
                    b.name
                )));
            }
            for (d, row) in grid.iter_mut().enumerate() {
                if b.weekday_mask & (1 << d) == 0 {
                    continue;
                }
                for slot in &mut row[b.start_hour as usize..b.end_hour as usize] {
                    if *slot != usize::MAX {
                        return Err(TariffError(format!(
                            "bands {:?} and {:?} overlap",
                            bands[*slot].name, b.name
                        )));
                    }
                    *slot = i;
                }
            }
        }
        for (d, row) in grid.iter().enumerate() {
            if let Some(h) = row.iter().position(|s| *s == usize::MAX) {
                return Err(TariffError(format!(
                    "no band covers weekday {} (0 = Monday) hour {h}",
                    d
                )));
            }
        }
        Ok(Tariff {
            name: name.to_owned(),
            tz,
            bands,
            standing_charge_per_day,
            vat_basis_points,
            currency: currency.to_owned(),
            grid,
        })
    }

    /// Local days (in the tariff's time zone) that [start, end) touches: what a standing
    /// charge per started day is charged for. A week from local midnight to local midnight is 7
    /// days even when a daylight-saving change makes it 167 or 169 hours long.
    pub fn started_days(&self, start_unix: i64, end_unix: i64) -> i64 {
        if end_unix <= start_unix {
            return 0;
        }
        let date = |u: i64| self.tz.timestamp_opt(u, 0).single().map(|d| d.date_naive());
        match (date(start_unix), date(end_unix - 1)) {
            (Some(a), Some(b)) => (b - a).num_days() + 1,
            // Unreachable for whole-second UTC instants in chrono's range.
            _ => (end_unix - start_unix + 86_399) / 86_400,
        }
    }

    /// The band of the interval starting at `unix` (UTC seconds).
    pub fn band_at(&self, unix: i64) -> usize {
        match self.tz.timestamp_opt(unix, 0).single() {
            Some(local) => {
                self.grid[local.weekday().num_days_from_monday() as usize][local.hour() as usize]
            }
            None => 0, // unreachable for whole-second UTC instants
        }
    }
}

/// A tariff from the wire, validated (demand charges and tiers are not part of the linear
/// track's bill and are not checked here).
pub fn from_proto(t: &psm_proto::v1::Tariff) -> Result<Tariff, TariffError> {
    let bands = t
        .bands
        .iter()
        .map(|b| Band {
            name: b.name.clone(),
            weekday_mask: b.weekday_mask,
            start_hour: b.start_hour,
            end_hour: b.end_hour,
            import_price_milli: b.import_price_milli,
            export_price_milli: b.export_price_milli,
        })
        .collect();
    Tariff::new(
        &t.name,
        &t.time_zone,
        bands,
        t.standing_charge_per_day,
        t.vat_basis_points,
        &t.currency,
    )
}

/// One block of a tiered tariff: energy of the period up to `up_to_wh` (the previous tier's
/// bound excluded) at `price_milli` milli-minor units per kWh; `None` = unbounded (last tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub up_to_wh: Option<u64>,
    pub price_milli: u64,
}

/// Checks tiers: 1..=8, strictly ascending bounds, only the last unbounded, prices in range.
pub fn tiers(t: &[(u64, i64)]) -> Result<Vec<Tier>, TariffError> {
    if t.len() > 8 {
        return Err(TariffError("at most 8 tiers".into()));
    }
    let mut out = Vec::new();
    let mut last = 0u64;
    for (i, (up_to_kwh, price)) in t.iter().enumerate() {
        let is_last = i + 1 == t.len();
        if !(0..=MAX_TIER_PRICE_MILLI as i64).contains(price) {
            return Err(TariffError(format!(
                "tier {i}: price must be 0..={MAX_TIER_PRICE_MILLI} (so the encrypted tiered cost of {MAX_TIERED_DAYS} days at the registers' maximum cannot wrap)"
            )));
        }
        let up_to_wh = match (*up_to_kwh, is_last) {
            (0, true) => None,
            (0, false) => {
                return Err(TariffError(format!(
                    "tier {i}: only the last tier may be unbounded (up_to_kwh = 0)"
                )))
            }
            (k, _) if k > 4_000_000_000 => {
                return Err(TariffError(format!("tier {i}: bound too large")))
            }
            (k, _) => Some(k * 1000),
        };
        if let Some(u) = up_to_wh {
            if u <= last {
                return Err(TariffError(format!(
                    "tier {i}: bounds must be strictly ascending"
                )));
            }
            last = u;
        }
        out.push(Tier {
            up_to_wh,
            price_milli: *price as u64,
        });
    }
    Ok(out)
}

/// The bill line of a demand charge: the period's highest daily peak (W) × rate per kW.
pub fn demand_line(peak_w: u64, rate_per_kw_milli: i64) -> Line {
    Line {
        description: format!("demand charge, peak {:.1} kW", peak_w as f64 / 1000.0),
        energy_wh: 0,
        amount: div_round(
            i128::from(peak_w) * i128::from(rate_per_kw_milli),
            1_000_000,
        ) as i64,
    }
}

/// The bill line of a tiered tariff from its encrypted-then-released cost (Wh × milli per kWh).
pub fn tier_line(cost: u128, tiers: usize) -> Line {
    Line {
        description: format!("tiered energy charge ({tiers} tiers)"),
        energy_wh: 0,
        amount: div_round(cost as i128, 1_000_000) as i64,
    }
}

/// Rounds a/b to the nearest integer, halves away from zero.
pub fn div_round(a: i128, b: i128) -> i128 {
    let q = a / b;
    let r = a % b;
    if 2 * r.abs() >= b.abs() {
        q + if (a < 0) != (b < 0) { -1 } else { 1 }
    } else {
        q
    }
}

/// One priced line of a bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub description: String,
    pub energy_wh: i64,
    pub amount: i64,
}

/// An itemized bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    pub lines: Vec<Line>,
    pub standing_charge: i64,
    pub subtotal: i64,
    pub vat: i64,
    pub total: i64,
}

/// Prices per-band totals, each line rounded half away from zero: an import line per band at
/// its import price (`import_wh[i]`, 0 where missing) and, per band with export
/// (`export_wh[i]` > 0; empty when the meter exports nothing), an export line of negative energy
/// credited at the band's export price. Import and export are billed separately, never netted:
/// they are separate registers with separate prices. The standing charge is per started day
/// (`days`, from [`Tariff::started_days`]); VAT applies to a positive subtotal only
/// (export credits carry none). `extra` lines (demand charge, tiered charge) are added before
/// the subtotal.
pub fn price(
    t: &Tariff,
    import_wh: &[i64],
    export_wh: &[i64],
    days: i64,
    extra: Vec<Line>,
) -> Bill {
    let mut lines: Vec<Line> = Vec::new();
    for (i, b) in t.bands.iter().enumerate() {
        let wh = import_wh.get(i).copied().unwrap_or(0);
        lines.push(Line {
            description: format!("{} import", b.name),
            energy_wh: wh,
            amount: div_round(i128::from(wh) * i128::from(b.import_price_milli), 1_000_000) as i64,
        });
        let out = export_wh.get(i).copied().unwrap_or(0);
        if out > 0 {
            lines.push(Line {
                description: format!("{} export", b.name),
                energy_wh: -out,
                amount: div_round(
                    -i128::from(out) * i128::from(b.export_price_milli),
                    1_000_000,
                ) as i64,
            });
        }
    }
    lines.extend(extra);
    let standing_charge = t.standing_charge_per_day * days;
    let subtotal = lines.iter().map(|l| l.amount).sum::<i64>() + standing_charge;
    let vat = if subtotal > 0 {
        div_round(
            i128::from(subtotal) * i128::from(t.vat_basis_points),
            10_000,
        ) as i64
    } else {
        0
    };
    Bill {
        lines,
        standing_charge,
        subtotal,
        vat,
        total: subtotal + vat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_prices_cannot_wrap_the_encrypted_cost() {
        // The worst case fits: every register at its maximum for the longest period.
        let worst =
            u128::from(MAX_TIERED_DAYS) * u128::from(u32::MAX) * u128::from(MAX_TIER_PRICE_MILLI);
        assert!(worst <= u128::from(u64::MAX));
        assert!(tiers(&[(0, MAX_TIER_PRICE_MILLI as i64)]).is_ok());
        // One milli more, or the band price limit, could wrap: refused.
        let e = tiers(&[(0, MAX_TIER_PRICE_MILLI as i64 + 1)]).unwrap_err();
        assert!(e.to_string().contains("cannot wrap"), "{e}");
        assert!(tiers(&[(100, 1), (0, MAX_PRICE_MILLI)]).is_err());
    }

    fn band(name: &str, mask: u32, s: u32, e: u32, imp: i64, exp: i64) -> Band {
        Band {
            name: name.into(),
            weekday_mask: mask,
            start_hour: s,
            end_hour: e,
            import_price_milli: imp,
            export_price_milli: exp,
        }
    }

    #[test]
    fn coverage_is_checked() {
        let ok = vec![
            band("peak", 0x1F, 16, 19, 40_000, 5_000),
            band("off", 0x1F, 0, 16, 20_000, 5_000),
            band("eve", 0x1F, 19, 24, 20_000, 5_000),
            band("weekend", 0x60, 0, 24, 15_000, 5_000),
        ];
        assert!(Tariff::new("t", "Europe/London", ok.clone(), 50, 500, "GBP").is_ok());
        let mut gap = ok.clone();
        gap.pop();
        assert!(Tariff::new("t", "Europe/London", gap, 50, 500, "GBP")
            .unwrap_err()
            .0
            .contains("weekday 5"));
        let mut overlap = ok.clone();
        overlap.push(band("x", 1, 3, 4, 1, 1));
        assert!(Tariff::new("t", "Europe/London", overlap, 50, 500, "GBP")
            .unwrap_err()
            .0
            .contains("overlap"));
        assert!(Tariff::new("t", "Mars/Olympus", ok, 50, 500, "GBP").is_err());
    }

    #[test]
    fn dst_days_have_23_and_25_local_hours() {
        let t = Tariff::new(
            "t",
            "Europe/London",
            (0..24)
                .map(|h| band(&format!("h{h}"), 0x7F, h, h + 1, 1, 1))
                .collect(),
            0,
            0,
            "GBP",
        )
        .unwrap();
        let hours_in = |day_start: i64| {
            // Local days of 2026-03-29 (spring forward) and 2026-10-25 (fall back): count the
            // UTC hours whose local hour-of-day falls in each band over the 24 UTC hours
            // starting at local midnight.
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0;
            let mut u = day_start;
            loop {
                let local = t.tz.timestamp_opt(u, 0).single().unwrap();
                if local.date_naive()
                    != t.tz
                        .timestamp_opt(day_start, 0)
                        .single()
                        .unwrap()
                        .date_naive()
                {
                    break;
                }
                seen.insert(t.band_at(u));
                n += 1;
                u += 3600;
            }
            (n, seen.len())
        };
        assert_eq!(hours_in(1_774_742_400), (23, 23)); // 2026-03-29 00:00 GMT
        assert_eq!(hours_in(1_792_882_800), (25, 24)); // 2026-10-25 00:00 BST (= 23:00 UTC the day before)
    }

    #[test]
    fn started_days_are_local_days() {
        let t = Tariff::new(
            "t",
            "Europe/London",
            vec![band("all", 0x7F, 0, 24, 1, 1)],
            0,
            0,
            "GBP",
        )
        .unwrap();
        // 2026-03-23 00:00 GMT to 2026-03-30 00:00 BST: 167 hours, 7 local days.
        assert_eq!(t.started_days(1_774_224_000, 1_774_825_200), 7);
        // 2026-10-19 00:00 BST to 2026-10-26 00:00 GMT: 169 hours, 7 local days.
        assert_eq!(t.started_days(1_792_364_400, 1_792_972_800), 7);
        // A started day counts: 00:00 to 00:05 the next day is 2.
        assert_eq!(t.started_days(1_774_224_000, 1_774_224_000 + 86_700), 2);
        assert_eq!(t.started_days(1_774_224_000, 1_774_224_000), 0);
        let utc = Tariff::new(
            "t",
            "UTC",
            vec![band("all", 0x7F, 0, 24, 1, 1)],
            0,
            0,
            "EUR",
        )
        .unwrap();
        assert_eq!(utc.started_days(0, 30 * 86_400), 30);
    }

    #[test]
    fn pricing_rounds_and_credits() {
        let t = Tariff::new(
            "t",
            "UTC",
            vec![
                band("day", 0x7F, 7, 23, 30_500, 15_000),
                band("night", 0x7F, 0, 7, 12_000, 4_000),
                band("late", 0x7F, 23, 24, 12_000, 4_000),
            ],
            45,
            500,
            "EUR",
        )
        .unwrap();
        // Import in every band; export in the night band only.
        let b = price(&t, &[10_000, 2_000, 1], &[0, 2_500, 0], 30, Vec::new());
        let lines: Vec<(&str, i64, i64)> = b
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("day import", 10_000, 305),   // 10 kWh × 30.5
                ("night import", 2_000, 24),   // 2 kWh × 12.0
                ("night export", -2_500, -10), // 2.5 kWh × 4.0, credited
                ("late import", 1, 0),
            ]
        );
        assert_eq!(b.standing_charge, 1_350);
        assert_eq!(b.subtotal, 305 + 24 - 10 + 1_350);
        assert_eq!(b.vat, 83); // 5 % of 1,669 = 83.45
        assert_eq!(b.total, 1_669 + 83);
        // No export register: import lines only; a credit larger than the charges carries no
        // VAT.
        let b = price(&t, &[0, 0, 0], &[], 1, Vec::new());
        assert_eq!(b.lines.len(), 3);
        assert_eq!(b.total, 45 + 2);
        let b = price(&t, &[0, 0, 0], &[1_000_000, 0, 0], 1, Vec::new());
        assert_eq!(b.lines[1].amount, -15_000);
        assert_eq!((b.subtotal, b.vat, b.total), (45 - 15_000, 0, 45 - 15_000));
        // Halves round away from zero on credits too.
        let b = price(&t, &[], &[100, 0, 0], 0, Vec::new());
        assert_eq!(b.lines[0].amount, 0);
        assert_eq!(b.lines[1].amount, -2); // 0.1 kWh × 15.0 = 1.5 → −2
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(5, 2), 3);
    }
}
