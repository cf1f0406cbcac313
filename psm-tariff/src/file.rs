//! Tariff files: a rate sheet in TOML (docs/tariffs.md), converted to the wire form that bills
//! carry and keyshares allow by hash. Unknown keys are errors, so a typo never silently drops a
//! charge; every value is then checked by [`crate::from_proto`].

use std::collections::BTreeMap;
use std::path::Path;

use psm_proto::v1::{Tariff as Wire, TariffBand, TariffTier};
use serde::Deserialize;

use crate::{bad, from_proto, Tariff, TariffError, HOLIDAY_BIT};

/// Largest tariff file read, bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    time_zone: String,
    currency: String,
    #[serde(default)]
    effective_from: Option<String>,
    #[serde(default)]
    effective_to: Option<String>,
    #[serde(default)]
    standing_charge_per_day: i64,
    #[serde(default)]
    fixed_charge_per_month: i64,
    #[serde(default)]
    minimum_charge_per_month: i64,
    #[serde(default)]
    vat_percent: f64,
    #[serde(default)]
    demand_rate_per_kw: f64,
    #[serde(default)]
    net_per_band: bool,
    /// A CSV of `start,price` (next to the tariff file unless absolute).
    #[serde(default)]
    import_prices: Option<String>,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    seasons: BTreeMap<String, Vec<Month>>,
    #[serde(default)]
    band: Vec<BandFile>,
    #[serde(default)]
    tier: Vec<TierFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Month {
    Number(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BandFile {
    name: String,
    #[serde(default)]
    season: Option<String>,
    #[serde(default)]
    months: Option<Vec<Month>>,
    days: Vec<String>,
    hours: [u32; 2],
    import_price: f64,
    #[serde(default)]
    export_price: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    #[serde(default)]
    up_to_kwh: Option<u64>,
    price: f64,
}

/// A checked tariff file: its wire form, the validated tariff and the hash keyshares allow.
#[derive(Debug, Clone)]
pub struct Checked {
    pub wire: Wire,
    pub tariff: Tariff,
    pub hash: [u8; 32],
}

/// `x` × 10^`places` as an exact integer, or an error naming `what` when `x` has more decimals.
fn fixed_point(x: f64, places: u32, what: &str) -> Result<i64, TariffError> {
    let scaled = x * 10f64.powi(places as i32);
    let r = scaled.round();
    if !x.is_finite() || (scaled - r).abs() > 1e-6 * r.abs().max(1.0) || r.abs() > 9.0e15 {
        return Err(bad(format!(
            "{what} = {x}: at most {places} decimal places, and finite"
        )));
    }
    Ok(r as i64)
}

fn month(m: &Month) -> Result<u32, TariffError> {
    let i = match m {
        Month::Number(n) if (1..=12).contains(n) => *n - 1,
        Month::Name(s) => {
            let l = s.to_ascii_lowercase();
            crate::MONTHS
                .iter()
                .position(|f| {
                    let f = f.to_ascii_lowercase();
                    l == f || l == f[..3]
                })
                .ok_or_else(|| {
                    bad(format!(
                        "month {s:?}: use jan..dec, a full month name, or 1..12"
                    ))
                })? as u32
        }
        Month::Number(n) => return Err(bad(format!("month {n}: use 1..12"))),
    };
    Ok(1 << i)
}

fn days(list: &[String], band: &str) -> Result<u32, TariffError> {
    let mut mask = 0u32;
    for d in list {
        mask |= match d.to_ascii_lowercase().as_str() {
            "mon" | "monday" => 1,
            "tue" | "tuesday" => 1 << 1,
            "wed" | "wednesday" => 1 << 2,
            "thu" | "thursday" => 1 << 3,
            "fri" | "friday" => 1 << 4,
            "sat" | "saturday" => 1 << 5,
            "sun" | "sunday" => 1 << 6,
            "weekdays" => 0x1F,
            "weekend" => 0x60,
            "holidays" => HOLIDAY_BIT,
            "all" => 0x7F | HOLIDAY_BIT,
            other => {
                return Err(bad(format!(
                "band {band:?}: day {other:?} is not mon..sun, weekdays, weekend, holidays or all"
            )))
            }
        };
    }
    Ok(mask)
}

/// Most bytes of a price series file.
pub const MAX_PRICES_BYTES: u64 = 4 << 20;

/// Parses a price series: `start,price` rows (a header is allowed), `start` in Unix seconds or
/// RFC 3339 with an offset, `price` in minor units per kWh with at most 3 decimals, one row per
/// interval without gaps. Errors name the line.
pub fn parse_prices(text: &str) -> Result<psm_proto::v1::PriceSeries, TariffError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut rows: Vec<(i64, i64, u64)> = Vec::new();
    for (n, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| bad(format!("prices: {e}")))?;
        let line = rec.position().map_or(n as u64 + 1, |p| p.line());
        let (Some(start), Some(price)) = (rec.get(0), rec.get(1)) else {
            return Err(bad(format!("prices line {line}: expected start,price")));
        };
        if n == 0 && !start.chars().any(|c| c.is_ascii_digit()) {
            continue; // a header
        }
        let t = match start.parse::<i64>() {
            Ok(t) => t,
            Err(_) => chrono::DateTime::parse_from_rfc3339(start)
                .map_err(|e| bad(format!("prices line {line}: start {start:?}: {e}")))?
                .timestamp(),
        };
        let x: f64 = price.parse().map_err(|_| {
            bad(format!(
                "prices line {line}: price {price:?} is not a number"
            ))
        })?;
        rows.push((
            t,
            fixed_point(x, 3, &format!("prices line {line}: price"))?,
            line,
        ));
    }
    let (Some(first), Some(second)) = (rows.first(), rows.get(1)) else {
        return Err(bad("prices: at least two rows, one per interval"));
    };
    let interval = second.0.saturating_sub(first.0);
    for w in rows.windows(2) {
        if w[1].0.saturating_sub(w[0].0) != interval {
            return Err(bad(format!(
                "prices line {}: starts {} s after the row before; the series' intervals are {interval} s, one row each, without gaps",
                w[1].2,
                w[1].0 - w[0].0
            )));
        }
    }
    Ok(psm_proto::v1::PriceSeries {
        interval_seconds: u32::try_from(interval)
            .map_err(|_| bad(format!("prices: interval {interval} s")))?,
        start_unix: first.0,
        price_milli: rows.iter().map(|r| r.1).collect(),
    })
}

/// Parses a tariff file's text into its wire form (not yet validated), reading a price series
/// it names from `dir`.
pub fn parse_in(text: &str, dir: Option<&Path>) -> Result<Wire, TariffError> {
    let (mut wire, prices) = parse_file(text)?;
    if let Some(name) = prices {
        let path = match dir {
            Some(d) => d.join(&name),
            None => Path::new(&name).to_path_buf(),
        };
        let named = |e: String| bad(format!("{}: {e}", path.display()));
        let len = std::fs::metadata(&path)
            .map_err(|e| named(e.to_string()))?
            .len();
        if len > MAX_PRICES_BYTES {
            return Err(named(format!("{len} bytes; at most {MAX_PRICES_BYTES}")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| named(e.to_string()))?;
        wire.import_prices = Some(parse_prices(&text).map_err(|e| named(e.0))?);
    }
    Ok(wire)
}

/// The wire form of a tariff file's text, and the price series file it names.
fn parse_file(text: &str) -> Result<(Wire, Option<String>), TariffError> {
    let f: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut seasons = BTreeMap::new();
    for (name, months) in &f.seasons {
        let mut mask = 0;
        for m in months {
            mask |= month(m)?;
        }
        if mask == 0 {
            return Err(bad(format!("season {name:?} has no months")));
        }
        seasons.insert(name.as_str(), mask);
    }
    let mut bands = Vec::with_capacity(f.band.len());
    for b in &f.band {
        let month_mask = match (&b.season, &b.months) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "band {:?}: give a season or months, not both",
                    b.name
                )))
            }
            (Some(s), None) => *seasons.get(s.as_str()).ok_or_else(|| {
                bad(format!(
                    "band {:?}: season {s:?} is not in [seasons]",
                    b.name
                ))
            })?,
            (None, Some(ms)) => {
                let mut mask = 0;
                for m in ms {
                    mask |= month(m)?;
                }
                mask
            }
            (None, None) => 0,
        };
        let has_holidays = !f.holidays.is_empty();
        let mut weekday_mask = days(&b.days, &b.name)?;
        if !has_holidays {
            // "all" names holidays too; without a holiday list it means every weekday.
            if b.days.iter().any(|d| d.eq_ignore_ascii_case("all")) {
                weekday_mask &= !HOLIDAY_BIT;
            }
        }
        bands.push(TariffBand {
            name: b.name.clone(),
            weekday_mask,
            start_hour: b.hours[0],
            end_hour: b.hours[1],
            import_price_milli: fixed_point(b.import_price, 3, "import_price")?,
            export_price_milli: fixed_point(b.export_price, 3, "export_price")?,
            month_mask,
        });
    }
    let mut tiers = Vec::with_capacity(f.tier.len());
    for t in &f.tier {
        tiers.push(TariffTier {
            up_to_kwh: match t.up_to_kwh {
                Some(0) => {
                    return Err(bad(
                        "tier up_to_kwh must be positive; leave it out on the last, unbounded tier",
                    ))
                }
                Some(k) => k,
                None => 0,
            },
            price_milli: fixed_point(t.price, 3, "tier price")?,
        });
    }
    let vat = fixed_point(f.vat_percent, 2, "vat_percent")?;
    let wire = Wire {
        name: f.name,
        time_zone: f.time_zone,
        bands,
        standing_charge_per_day: f.standing_charge_per_day,
        vat_basis_points: u32::try_from(vat).map_err(|_| bad("vat_percent must be 0..=100"))?,
        demand_rate_per_kw_milli: fixed_point(f.demand_rate_per_kw, 3, "demand_rate_per_kw")?,
        tiers,
        currency: f.currency,
        holidays: f.holidays,
        effective_from: f.effective_from.unwrap_or_default(),
        effective_to: f.effective_to.unwrap_or_default(),
        fixed_charge_per_month: f.fixed_charge_per_month,
        minimum_charge_per_month: f.minimum_charge_per_month,
        net_per_band: f.net_per_band,
        import_prices: None,
    };
    Ok((wire, f.import_prices))
}

/// Parses and validates a tariff file's text (a price series it names is read from `dir`).
pub fn check_in(text: &str, dir: Option<&Path>) -> Result<Checked, TariffError> {
    let wire = parse_in(text, dir)?;
    if !(wire.currency.len() == 3 && wire.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err(bad(format!(
            "currency {:?} is not an ISO 4217 code (three capital letters)",
            wire.currency
        )));
    }
    let tariff = from_proto(&wire)?;
    Ok(Checked {
        hash: crate::hash(&wire),
        wire,
        tariff,
    })
}

/// Reads, parses and validates a tariff file; errors name the file.
pub fn load(path: &Path) -> Result<Checked, TariffError> {
    let named = |e: String| bad(format!("{}: {e}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| named(e.to_string()))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(named(format!(
            "{len} bytes; a tariff file is at most {MAX_FILE_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
    check_in(&text, path.parent()).map_err(|e| named(e.0))
}

/// Parses and validates a tariff file's text that names no price series file.
pub fn check(text: &str) -> Result<Checked, TariffError> {
    check_in(text, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::day_start;
    use chrono::TimeZone;

    fn local_date(tz: chrono_tz::Tz, u: i64) -> chrono::NaiveDate {
        tz.timestamp_opt(u, 0).unwrap().date_naive()
    }

    const EXAMPLE: &str = include_str!("../../deploy/tariffs/us-seasonal-tou.toml");

    fn at(tz: chrono_tz::Tz, y: i32, m: u32, d: u32, h: u32) -> i64 {
        tz.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp()
    }

    #[test]
    fn the_example_places_seasons_holidays_and_hours() {
        let c = check(EXAMPLE).unwrap();
        let t = &c.tariff;
        let ny = t.tz;
        // Bills in the season of their first day: a July bill, a January bill.
        let name = |u: i64| {
            let first = day_start(ny, local_date(ny, u)).unwrap();
            t.bands[t.band_at(first, u)].name.as_str()
        };
        // Wednesday 2026-07-01 15:00 local: summer weekday peak; Friday 2026-07-03 (a holiday)
        // at the same hour: the holiday band.
        assert_eq!(name(at(ny, 2026, 7, 1, 15)), "summer on-peak");
        assert_eq!(name(at(ny, 2026, 7, 3, 15)), "summer weekend and holiday");
        // Monday 2026-01-05 08:00: winter peak; 2026-01-01 (Thursday, holiday): holiday band.
        assert_eq!(name(at(ny, 2026, 1, 5, 8)), "winter on-peak");
        assert_eq!(name(at(ny, 2026, 1, 1, 8)), "winter weekend and holiday");
        // 23:00 local on 2026-05-31 is 03:00 UTC on June 1: the local month decides (May is
        // winter), and the local Sunday.
        assert_eq!(name(at(ny, 2026, 5, 31, 23)), "winter weekend and holiday");
        // A bill from 15 May keeps May's season through June: the same Monday hour is winter
        // peak in it, summer off-peak in a bill from 1 June.
        let june = at(ny, 2026, 6, 8, 8);
        assert_eq!(
            t.bands[t.band_at(at(ny, 2026, 5, 15, 0), june)].name,
            "winter on-peak"
        );
        assert_eq!(
            t.bands[t.band_at(at(ny, 2026, 6, 1, 0), june)].name,
            "summer off-peak"
        );
        assert_eq!(t.fixed_charge_per_month, 1250);
        assert_eq!(t.vat_basis_points, 625);
        assert_eq!(t.bands[0].import_price_milli, 31_500);
        assert_eq!(c.hash, crate::hash(&c.wire));
        // The hash is of the wire form: the same file always gives the same hash, and a changed
        // price another.
        assert_eq!(check(EXAMPLE).unwrap().hash, c.hash);
        let other = EXAMPLE.replace("import_price = 31.5", "import_price = 31.6");
        assert_ne!(check(&other).unwrap().hash, c.hash);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| check(text).unwrap_err().0;
        // A typo in a key is an error, not a charge silently left out.
        let e = err(&EXAMPLE.replace("fixed_charge_per_month", "fixed_charge_per_mnth"));
        assert!(
            e.contains("unknown field") && e.contains("fixed_charge_per_mnth"),
            "{e}"
        );
        // TOML syntax errors name the line.
        let e = err(&EXAMPLE.replace("hours = [14, 19]", "hours = [14, 19"));
        assert!(e.contains("line"), "{e}");
        // Sub-milli prices cannot be exact.
        let e = err(&EXAMPLE.replace("31.5", "31.5004"));
        assert!(e.contains("import_price") && e.contains("3 decimal"), "{e}");
        // A season nobody defined, a month that does not exist, a day type that does not.
        assert!(err(&EXAMPLE.replace(
            "season = \"summer\"\ndays = [\"weekdays\"]\nhours = [14",
            "season = \"sumer\"\ndays = [\"weekdays\"]\nhours = [14"
        ))
        .contains("\"sumer\" is not in [seasons]"));
        assert!(err(&EXAMPLE.replace("\"sep\"]", "\"sept\"]")).contains("month \"sept\""));
        assert!(
            err(&EXAMPLE.replace("[\"weekend\", \"holidays\"]", "[\"weekends\"]"))
                .contains("\"weekends\"")
        );
        // Removing September from summer leaves September uncovered.
        let e = err(&EXAMPLE.replace(", \"sep\"]", "]"));
        assert!(e.contains("no band covers September"), "{e}");
        // Holiday bands with no holidays listed.
        let no_holidays = EXAMPLE
            .lines()
            .filter(|l| !l.starts_with("holidays") && !l.starts_with("            \"2027"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(err(&no_holidays).contains("lists no holidays"));
        assert!(err(&EXAMPLE.replace("2026-07-03", "2026-7-3")).contains("YYYY-MM-DD"));
        assert!(err(&EXAMPLE.replace("2026-07-03", "2026-01-01")).contains("listed twice"));
        assert!(err(&EXAMPLE.replace(
            "effective_to = \"2028-01-01\"",
            "effective_to = \"2025-01-01\""
        ))
        .contains("after effective_from"));
        assert!(err(&EXAMPLE.replace("\"USD\"", "\"usd\"")).contains("ISO 4217"));
        assert!(err(&EXAMPLE.replace(
            "minimum_charge_per_month = 2000",
            "minimum_charge_per_month = -1"
        ))
        .contains("minimum_charge_per_month"));
    }

    #[test]
    fn tiers_and_demand_from_a_file() {
        let text = r#"
name = "tiered"
time_zone = "UTC"
currency = "EUR"
demand_rate_per_kw = 850.5
[[band]]
name = "all"
days = ["all"]
hours = [0, 24]
import_price = 0
[[tier]]
up_to_kwh = 300
price = 20
[[tier]]
price = 30.25
"#;
        let c = check(text).unwrap();
        assert_eq!(c.tariff.demand_rate_per_kw_milli, 850_500);
        assert_eq!(c.tariff.tiers.len(), 2);
        assert_eq!(c.tariff.tiers[0].up_to_wh, Some(300_000));
        assert_eq!(c.tariff.tiers[1].price_milli, 30_250);
        // "all" without holidays means every weekday.
        assert_eq!(c.wire.bands[0].weekday_mask, 0x7F);
        assert!(
            check(&text.replace("price = 30.25", "up_to_kwh = 0\nprice = 30.25"))
                .unwrap_err()
                .0
                .contains("leave it out")
        );
    }
}

#[cfg(test)]
mod price_tests {
    use super::*;

    const FLAT: &str = r#"
name = "agile-like"
time_zone = "Europe/London"
currency = "GBP"
standing_charge_per_day = 45
import_prices = "prices.csv"
[[band]]
name = "all"
days = ["all"]
hours = [0, 24]
import_price = 0
export_price = 15
"#;

    #[test]
    fn a_tariff_file_names_its_price_series() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("start,price\n");
        for h in 0..48 {
            csv.push_str(&format!(
                "{},{}.{:03}\n",
                1_767_225_600 + h * 1800,
                10 + h,
                h
            ));
        }
        std::fs::write(dir.path().join("prices.csv"), &csv).unwrap();
        std::fs::write(dir.path().join("t.toml"), FLAT).unwrap();
        let c = load(&dir.path().join("t.toml")).unwrap();
        let p = c.tariff.import_prices.as_ref().unwrap();
        assert_eq!((p.interval_seconds, p.start_unix), (1800, 1_767_225_600));
        assert_eq!(p.price_milli[1], 11_001);
        assert_eq!(p.at(1_767_225_600 + 1799), Some(10_000));
        assert_eq!(p.at(1_767_225_600 + 48 * 1800), None);
        assert_eq!(
            p.over(1_767_225_600, 1_767_225_600 + 3600).unwrap(),
            (10_000, 11_001)
        );
        assert!(p.over(1_767_225_600 - 1800, 1_767_225_600).is_err());
        // The hash covers every price.
        std::fs::write(
            dir.path().join("prices.csv"),
            csv.replace(",11.001", ",11.002"),
        )
        .unwrap();
        assert_ne!(load(&dir.path().join("t.toml")).unwrap().hash, c.hash);
        // Without the file at hand the tariff cannot be checked.
        assert!(check(FLAT).unwrap_err().0.contains("prices.csv"));
    }

    #[test]
    fn price_series_mistakes_are_named() {
        let e = parse_prices("0,1\n1800,2\n5400,3\n").unwrap_err();
        assert!(
            e.0.contains("line 3") && e.0.contains("without gaps"),
            "{e}"
        );
        let e = parse_prices("0,1\n1800,abc\n").unwrap_err();
        assert!(e.0.contains("line 2"), "{e}");
        assert!(parse_prices("0,1\n").is_err());
        let series = |prices: Vec<i64>, start: i64, interval: u32| psm_proto::v1::Tariff {
            name: "t".into(),
            time_zone: "UTC".into(),
            bands: vec![psm_proto::v1::TariffBand {
                name: "all".into(),
                weekday_mask: 0x7F,
                start_hour: 0,
                end_hour: 24,
                ..Default::default()
            }],
            import_prices: Some(psm_proto::v1::PriceSeries {
                interval_seconds: interval,
                start_unix: start,
                price_milli: prices,
            }),
            ..Default::default()
        };
        let err = |t| crate::from_proto(&t).unwrap_err().0;
        assert!(err(series(vec![0, 5], 0, 1800)).contains("positive"));
        assert!(err(series(vec![-5, 5], 0, 1800)).contains("positive"));
        assert!(err(series(vec![(1 << 20) + 1], 0, 1800)).contains("1..=1048576"));
        assert!(err(series(vec![5], 900, 1800)).contains("boundary"));
        assert!(err(series(vec![5], 0, 600)).contains("600 s"));
        assert!(err(series(vec![], 0, 1800)).contains("1..="));
        assert!(crate::from_proto(&series(vec![5, 6], 0, 1800)).is_ok());
        assert!(err(series(vec![5], i64::MAX - i64::MAX % 3600, 3600)).contains("boundary"));
        let mut tiered = series(vec![5, 6], 0, 1800);
        tiered.tiers = vec![psm_proto::v1::TariffTier {
            up_to_kwh: 0,
            price_milli: 1,
        }];
        assert!(err(tiered).contains("no tiers"));
        let p = crate::from_proto(&series(vec![5, 6], 0, 1800)).unwrap();
        assert!(p.import_prices.unwrap().over(1800, 900).is_err());
    }
}
