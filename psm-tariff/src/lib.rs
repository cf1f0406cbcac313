//! Tariffs and pricing: what a bill charges, from the per-band totals the keyshares release.
//!
//! Every 5-minute slot is placed in a band by the local month, day type (weekday, or holiday
//! from the tariff's date list) and hour of its start, in the tariff's IANA time zone, so days
//! with 23 or 25 local hours are handled by construction; a bill needs each of the meter's
//! intervals to fall in one band. Keyshares derive slots from the same code, so what compute
//! sums and what a keyshare releases cannot drift apart. Money is in integer minor units;
//! prices are milli-minor units per kWh. Tariff files (TOML) are in [`file`].

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{Datelike, Months, NaiveDate, TimeZone, Timelike};
use chrono_tz::Tz;

pub mod file;

/// Why a tariff was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tariff: {0}")]
pub struct TariffError(pub String);

fn bad(m: impl Into<String>) -> TariffError {
    TariffError(m.into())
}

/// Day-type bit of holidays in [`Band::weekday_mask`] (bits 0..=6 are Monday..=Sunday).
pub const HOLIDAY_BIT: u32 = 1 << 7;

/// One time-of-use band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    pub name: String,
    /// Bit 0 = Monday … bit 6 = Sunday, bit 7 = the tariff's holidays (which then take the
    /// place of their weekday).
    pub weekday_mask: u32,
    /// Bit 0 = January … bit 11 = December; 0 = every month (seasons).
    pub month_mask: u32,
    /// Local hours [start_hour, end_hour).
    pub start_hour: u32,
    pub end_hour: u32,
    pub import_price_milli: i64,
    pub export_price_milli: i64,
}

/// A validated tariff.
#[derive(Debug, Clone)]
pub struct Tariff {
    pub name: String,
    pub tz: Tz,
    pub bands: Vec<Band>,
    pub standing_charge_per_day: i64,
    /// Charged per month of the period (pro rata for a part month), minor units.
    pub fixed_charge_per_month: i64,
    /// The least a month of the period costs before VAT, minor units; 0 = none.
    pub minimum_charge_per_month: i64,
    pub vat_basis_points: u32,
    pub currency: String,
    /// Local dates on which the holiday bands apply.
    pub holidays: BTreeSet<NaiveDate>,
    /// Local dates [from, to) the tariff is in force; a bill's period must lie inside.
    pub effective_from: Option<NaiveDate>,
    pub effective_to: Option<NaiveDate>,
    /// Demand charge per kW of the period's highest daily peak (tfhe track); 0 = none.
    pub demand_rate_per_kw_milli: i64,
    /// Tiered charge on the period's total import (tfhe track); empty = none.
    pub tiers: Vec<Tier>,
    /// Net each band's export against its import before pricing.
    pub net_per_band: bool,
    /// Dynamic import prices: import is charged Σ price × energy per interval instead of per
    /// band.
    pub import_prices: Option<PriceSeries>,
    /// Band index of every (month, day type, hour): day type 7 is a holiday.
    grid: Box<[[[u8; 24]; 8]; 12]>,
}

/// Largest price accepted (milli-minor units per kWh): 1,000 currency units per kWh.
pub const MAX_PRICE_MILLI: i64 = 100_000_000;

/// Largest dynamic price, milli-minor units per kWh: the largest weight a linear release takes
/// (psm_core::linear::MAX_WEIGHT), about 1,049 currency units per kWh.
pub const MAX_DYNAMIC_PRICE_MILLI: i64 = 1 << 20;

/// Most prices in a series: 62 days of 5-minute intervals (the longest bill).
pub const MAX_SERIES_PRICES: usize = 62 * 288;

/// Interval lengths a price series may have, seconds.
pub const SERIES_INTERVALS: [i64; 4] = [300, 900, 1800, 3600];

/// A validated series of per-interval prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSeries {
    pub interval_seconds: i64,
    pub start_unix: i64,
    /// Milli-minor units per kWh, each 1..=[`MAX_DYNAMIC_PRICE_MILLI`].
    pub price_milli: Vec<i64>,
}

impl PriceSeries {
    /// End of the last interval, UTC seconds.
    pub fn end_unix(&self) -> i64 {
        self.start_unix + self.interval_seconds * self.price_milli.len() as i64
    }

    /// The price of the interval holding `unix`, if the series covers it.
    pub fn at(&self, unix: i64) -> Option<i64> {
        if unix < self.start_unix {
            return None;
        }
        let i = ((unix - self.start_unix) / self.interval_seconds) as usize;
        self.price_milli.get(i).copied()
    }

    /// Checks that the series prices every instant of [start, end); returns the lowest and
    /// highest price over it.
    pub fn over(&self, start_unix: i64, end_unix: i64) -> Result<(i64, i64), TariffError> {
        if end_unix <= start_unix || start_unix < self.start_unix || end_unix > self.end_unix() {
            return Err(bad(format!(
                "the price series covers {} .. {} (UTC seconds), not the whole period {start_unix} .. {end_unix}",
                self.start_unix,
                self.end_unix()
            )));
        }
        let first = ((start_unix - self.start_unix) / self.interval_seconds) as usize;
        let last = ((end_unix - 1 - self.start_unix) / self.interval_seconds) as usize;
        let prices = &self.price_milli[first..=last];
        Ok((
            prices.iter().copied().min().unwrap_or(0),
            prices.iter().copied().max().unwrap_or(0),
        ))
    }

    fn from_proto(p: &psm_proto::v1::PriceSeries) -> Result<Self, TariffError> {
        let interval = i64::from(p.interval_seconds);
        if !SERIES_INTERVALS.contains(&interval) {
            return Err(bad(format!(
                "price series interval {interval} s: 300, 900, 1800 or 3600"
            )));
        }
        if !(0..=1 << 40).contains(&p.start_unix) || p.start_unix % interval != 0 {
            return Err(bad(format!(
                "the price series starts at {}, not on a {interval}-s boundary",
                p.start_unix
            )));
        }
        if p.price_milli.is_empty() || p.price_milli.len() > MAX_SERIES_PRICES {
            return Err(bad(format!(
                "a price series has 1..={MAX_SERIES_PRICES} prices, not {}",
                p.price_milli.len()
            )));
        }
        if let Some((i, x)) = p
            .price_milli
            .iter()
            .enumerate()
            .find(|(_, x)| !(1..=MAX_DYNAMIC_PRICE_MILLI).contains(*x))
        {
            return Err(bad(format!(
                "price {i} of the series is {x} milli-minor units per kWh; dynamic prices are 1..={MAX_DYNAMIC_PRICE_MILLI} (positive: a release's weights)"
            )));
        }
        Ok(PriceSeries {
            interval_seconds: interval,
            start_unix: p.start_unix,
            price_milli: p.price_milli.clone(),
        })
    }
}

/// The bill line of dynamic import prices, from the released Σ price × Wh.
pub fn dynamic_import_line(weighted: i128, prices: usize) -> Line {
    Line {
        description: format!("import at dynamic prices ({prices} prices)"),
        energy_wh: 0,
        amount: div_round(weighted, 1_000_000) as i64,
    }
}

/// Largest standing, fixed or minimum charge (minor units per day or month).
pub const MAX_CHARGE: i64 = 100_000_000;

/// Most bands of a tariff (one release output each).
pub const MAX_BANDS: usize = 32;

/// Most holiday dates of a tariff.
pub const MAX_HOLIDAYS: usize = 1_000;

/// Longest period a tiered cost is computed over, days (the longest bill).
pub const MAX_TIERED_DAYS: u64 = 62;

/// Largest tier price: the tiered cost is Σ (energy in tier) × price in an encrypted u64, and the
/// period total can reach MAX_TIERED_DAYS × (2^32 − 1) Wh (every daily register at its maximum),
/// so no price may let that product wrap. About 690 currency units per kWh.
pub const MAX_TIER_PRICE_MILLI: u64 = u64::MAX / (MAX_TIERED_DAYS * u32::MAX as u64);

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAY_TYPES: [&str; 8] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "holidays",
];

/// Parses a canonical local date ("2027-01-31").
pub fn parse_date(s: &str) -> Result<NaiveDate, TariffError> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|d| d.format("%Y-%m-%d").to_string() == s)
        .ok_or_else(|| bad(format!("{s:?} is not a date written YYYY-MM-DD")))
}

/// The first instant of a local date in `tz` (local midnight, or the end of a daylight-saving
/// gap that swallows it), UTC seconds: where local-date periods start and end.
pub fn day_start(tz: Tz, date: NaiveDate) -> Option<i64> {
    (0..288).find_map(|k| {
        tz.from_local_datetime(&date.and_hms_opt(k / 12, k % 12 * 5, 0)?)
            .earliest()
            .map(|t| t.timestamp())
    })
}

fn local(tz: Tz, unix: i64) -> Option<chrono::DateTime<Tz>> {
    tz.timestamp_opt(unix, 0).single()
}

/// The billing cycle of a meter billed on `billing_day` (1..=28) that starts in the local
/// month of `year`-`month`: from the start of that local day to the start of the same day
/// of the next month.
pub fn cycle(tz: Tz, billing_day: u8, year: i32, month: u32) -> Option<(i64, i64)> {
    let first = NaiveDate::from_ymd_opt(year, month, u32::from(billing_day))?;
    let next = first.checked_add_months(Months::new(1))?;
    Some((day_start(tz, first)?, day_start(tz, next)?))
}

/// Local dates in `tz` on which the UTC ranges [start, end) hold an hour or more: how many days
/// a band's slots are spread over (a few minutes at a period's edge are not a day).
pub fn local_days(tz: Tz, ranges: impl IntoIterator<Item = (i64, i64)>) -> usize {
    let mut seconds: std::collections::BTreeMap<NaiveDate, i64> = Default::default();
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let Some(date) = local(tz, at).map(|d| d.date_naive()) else {
                break;
            };
            let next = date
                .succ_opt()
                .and_then(|n| day_start(tz, n))
                .filter(|n| *n > at)
                .unwrap_or(end);
            *seconds.entry(date).or_default() += next.min(end) - at;
            at = next;
        }
    }
    seconds.values().filter(|s| **s >= 3600).count()
}

/// Checks that [start, end) is exactly one billing cycle of a meter billed on
/// `billing_day`, in `tz`. Fixed cycles are what keep bills from
/// slicing a meter's readings finer than a month at the utility's choice.
pub fn check_cycle(
    tz: Tz,
    billing_day: u8,
    start_unix: i64,
    end_unix: i64,
) -> Result<(), TariffError> {
    let start =
        local(tz, start_unix).ok_or_else(|| bad("the period starts outside the calendar"))?;
    let near = |k: i32| {
        let d = start.date_naive().with_day(1)?;
        let d = if k < 0 {
            d.checked_sub_months(Months::new(1))?
        } else {
            d.checked_add_months(Months::new(k as u32))?
        };
        cycle(tz, billing_day, d.year(), d.month())
    };
    if near(0) == Some((start_unix, end_unix)) {
        return Ok(());
    }
    let show = |c: Option<(i64, i64)>| match c {
        Some((s, e)) => format!(
            "{} .. {}",
            local(tz, s).map_or(s.to_string(), |d| d.format("%Y-%m-%d %H:%M %Z").to_string()),
            local(tz, e).map_or(e.to_string(), |d| d.format("%Y-%m-%d %H:%M %Z").to_string())
        ),
        None => "none".into(),
    };
    // Name the cycle starting nearest the period, so the caller can correct the request.
    let near = [-1, 0, 1]
        .into_iter()
        .filter_map(near)
        .min_by_key(|(s, _)| (s - start_unix).abs());
    Err(bad(format!(
        "the period {} is not a billing cycle of a meter billed on day {billing_day} in {}; the nearest cycle is {}",
        show(Some((start_unix, end_unix))),
        tz.name(),
        show(near)
    )))
}

impl Tariff {
    /// The local date and time of a UTC instant.
    fn local(&self, unix: i64) -> Option<chrono::DateTime<Tz>> {
        local(self.tz, unix)
    }

    /// Local days (in the tariff's time zone) that [start, end) touches: what a standing
    /// charge per started day is charged for. A week from local midnight to local midnight is 7
    /// days even when a daylight-saving change makes it 167 or 169 hours long.
    pub fn started_days(&self, start_unix: i64, end_unix: i64) -> i64 {
        if end_unix <= start_unix {
            return 0;
        }
        let date = |u: i64| self.local(u).map(|d| d.date_naive());
        match (date(start_unix), date(end_unix - 1)) {
            (Some(a), Some(b)) => (b - a).num_days() + 1,
            // Unreachable for whole-second UTC instants in chrono's range.
            _ => (end_unix - start_unix + 86_399) / 86_400,
        }
    }

    /// Local dates on which the UTC ranges [start, end) hold an hour or more ([`local_days`] in
    /// the tariff's zone).
    pub fn local_days(&self, ranges: impl IntoIterator<Item = (i64, i64)>) -> usize {
        local_days(self.tz, ranges)
    }

    /// Months of [start, end) as a fraction (numerator, denominator): whole months from the
    /// first local day (the 15th to the 15th is one), then the started days left over as a
    /// share of the month they fall in. What fixed and minimum monthly charges scale by.
    pub fn months(&self, start_unix: i64, end_unix: i64) -> (i64, i64) {
        let days = self.started_days(start_unix, end_unix);
        let Some(first) = self.local(start_unix).map(|d| d.date_naive()) else {
            return (days, 30);
        };
        let Some(end) = first.checked_add_days(chrono::Days::new(days.max(0) as u64)) else {
            return (days, 30);
        };
        let mut whole = 0u32;
        while first
            .checked_add_months(Months::new(whole + 1))
            .is_some_and(|d| d <= end)
        {
            whole += 1;
        }
        let (Some(from), Some(next)) = (
            first.checked_add_months(Months::new(whole)),
            first.checked_add_months(Months::new(whole + 1)),
        ) else {
            return (days, 30);
        };
        let (den, rest) = ((next - from).num_days(), (end - from).num_days());
        if rest == 0 {
            return (i64::from(whole), 1);
        }
        (i64::from(whole) * den + rest, den)
    }

    /// Checks that [start, end) is exactly one billing cycle of a meter billed on
    /// `billing_day`, in the tariff's time zone ([`check_cycle`]).
    pub fn check_cycle(
        &self,
        billing_day: u8,
        start_unix: i64,
        end_unix: i64,
    ) -> Result<(), TariffError> {
        check_cycle(self.tz, billing_day, start_unix, end_unix)
    }

    /// Checks that [start, end) lies inside the tariff's effective dates.
    pub fn check_in_force(&self, start_unix: i64, end_unix: i64) -> Result<(), TariffError> {
        let first = self.local(start_unix).map(|d| d.date_naive());
        let last = self.local(end_unix - 1).map(|d| d.date_naive());
        if first.is_none() || last.is_none() {
            return Err(bad("the period is outside the calendar"));
        }
        if let (Some(from), Some(first)) = (self.effective_from, first) {
            if first < from {
                return Err(bad(format!(
                    "tariff {:?} is in force from {from}; the period starts {first}",
                    self.name
                )));
            }
        }
        if let (Some(to), Some(last)) = (self.effective_to, last) {
            if last >= to {
                return Err(bad(format!(
                    "tariff {:?} is in force until {to} (exclusive); the period runs to {last}",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// The band of the interval starting at `unix` (UTC seconds) in a bill whose period starts
    /// at `period_start`: the local day type (holiday or weekday) and hour of the interval, in
    /// the season of the period's first local day. A bill is in one season throughout — a
    /// season's sliver at the edge of a billing cycle would be a band of a day or two, which
    /// would release those days' totals.
    pub fn band_at(&self, period_start: i64, unix: i64) -> usize {
        let season = self.local(period_start).map_or(0, |d| d.month0() as usize);
        match self.local(unix) {
            Some(local) => {
                let day = if self.holidays.contains(&local.date_naive()) {
                    7
                } else {
                    local.weekday().num_days_from_monday() as usize
                };
                usize::from(self.grid[season][day][local.hour() as usize])
            }
            None => 0, // unreachable for whole-second UTC instants
        }
    }
}

/// A tariff from the wire, validated: the one way a tariff is built (files convert to the wire
/// form first, so a file and the request made from it hash alike). Checks the time zone, that
/// every local hour of every month and day type falls in exactly one band, prices and charges
/// in range, holidays and effective dates, demand rate and tiers.
pub fn from_proto(t: &psm_proto::v1::Tariff) -> Result<Tariff, TariffError> {
    let tz = Tz::from_str(&t.time_zone)
        .map_err(|_| bad(format!("unknown IANA time zone {:?}", t.time_zone)))?;
    if t.bands.is_empty() || t.bands.len() > MAX_BANDS {
        return Err(bad(format!("a tariff needs 1..={MAX_BANDS} bands")));
    }
    for (what, v) in [
        ("standing_charge_per_day", t.standing_charge_per_day),
        ("fixed_charge_per_month", t.fixed_charge_per_month),
        ("minimum_charge_per_month", t.minimum_charge_per_month),
    ] {
        if !(0..=MAX_CHARGE).contains(&v) {
            return Err(bad(format!("{what} must be 0..={MAX_CHARGE} minor units")));
        }
    }
    if t.vat_basis_points > 10_000 {
        return Err(bad("VAT must be 0..=10000 basis points"));
    }
    if !(0..=MAX_PRICE_MILLI).contains(&t.demand_rate_per_kw_milli) {
        return Err(bad("demand rate out of range"));
    }
    if t.holidays.len() > MAX_HOLIDAYS {
        return Err(bad(format!("at most {MAX_HOLIDAYS} holidays")));
    }
    let mut holidays = BTreeSet::new();
    for h in &t.holidays {
        if !holidays.insert(parse_date(h)?) {
            return Err(bad(format!("holiday {h} is listed twice")));
        }
    }
    let date = |s: &str| (!s.is_empty()).then(|| parse_date(s)).transpose();
    let (effective_from, effective_to) = (date(&t.effective_from)?, date(&t.effective_to)?);
    if let (Some(f), Some(e)) = (effective_from, effective_to) {
        if e <= f {
            return Err(bad("effective_to must be after effective_from"));
        }
    }
    let day_types = if holidays.is_empty() { 7 } else { 8 };
    let mut grid = Box::new([[[u8::MAX; 24]; 8]; 12]);
    let mut bands = Vec::with_capacity(t.bands.len());
    for (i, b) in t.bands.iter().enumerate() {
        if b.start_hour >= b.end_hour
            || b.end_hour > 24
            || b.weekday_mask == 0
            || b.weekday_mask > 0xFF
            || b.month_mask > 0xFFF
        {
            return Err(bad(format!("band {:?}: hours must be start < end <= 24, days a non-empty mask of 8 bits (Monday..Sunday, holidays), months a mask of 12 bits", b.name)));
        }
        if b.weekday_mask & HOLIDAY_BIT != 0 && holidays.is_empty() {
            return Err(bad(format!(
                "band {:?} applies on holidays, but the tariff lists no holidays",
                b.name
            )));
        }
        if b.import_price_milli.abs() > MAX_PRICE_MILLI
            || b.export_price_milli.abs() > MAX_PRICE_MILLI
        {
            return Err(bad(format!("band {:?}: price out of range", b.name)));
        }
        let months = if b.month_mask == 0 {
            0xFFF
        } else {
            b.month_mask
        };
        for (m, per_month) in grid.iter_mut().enumerate() {
            if months & (1 << m) == 0 {
                continue;
            }
            for (d, row) in per_month.iter_mut().enumerate().take(day_types) {
                if b.weekday_mask & (1 << d) == 0 {
                    continue;
                }
                for slot in &mut row[b.start_hour as usize..b.end_hour as usize] {
                    if *slot != u8::MAX {
                        return Err(bad(format!(
                            "bands {:?} and {:?} overlap ({} {})",
                            t.bands[*slot as usize].name, b.name, MONTHS[m], DAY_TYPES[d]
                        )));
                    }
                    *slot = i as u8;
                }
            }
        }
        bands.push(Band {
            name: b.name.clone(),
            weekday_mask: b.weekday_mask,
            month_mask: b.month_mask,
            start_hour: b.start_hour,
            end_hour: b.end_hour,
            import_price_milli: b.import_price_milli,
            export_price_milli: b.export_price_milli,
        });
    }
    for (m, per_month) in grid.iter().enumerate() {
        for (d, row) in per_month.iter().enumerate().take(day_types) {
            if let Some(h) = row.iter().position(|s| *s == u8::MAX) {
                return Err(bad(format!(
                    "no band covers {} on {} at hour {h}",
                    MONTHS[m], DAY_TYPES[d]
                )));
            }
        }
    }
    let tier_list: Vec<(u64, i64)> = t
        .tiers
        .iter()
        .map(|x| (x.up_to_kwh, x.price_milli))
        .collect();
    if t.import_prices.is_some() && (!tier_list.is_empty() || t.demand_rate_per_kw_milli > 0) {
        // A tiered cost gives the period's total; with the weighted sum it would separate the
        // price levels further than the keyshares judge them.
        return Err(bad(
            "a tariff with dynamic prices has no tiers or demand charge",
        ));
    }
    Ok(Tariff {
        name: t.name.clone(),
        tz,
        bands,
        standing_charge_per_day: t.standing_charge_per_day,
        fixed_charge_per_month: t.fixed_charge_per_month,
        minimum_charge_per_month: t.minimum_charge_per_month,
        vat_basis_points: t.vat_basis_points,
        currency: t.currency.clone(),
        holidays,
        effective_from,
        effective_to,
        demand_rate_per_kw_milli: t.demand_rate_per_kw_milli,
        tiers: tiers(&tier_list)?,
        net_per_band: t.net_per_band,
        import_prices: t
            .import_prices
            .as_ref()
            .map(PriceSeries::from_proto)
            .transpose()?,
        grid,
    })
}

/// BLAKE3-256 of a tariff's wire encoding: what keyshares allow a tariff by.
pub fn hash(t: &psm_proto::v1::Tariff) -> [u8; 32] {
    use prost::Message;
    *blake3::hash(&t.encode_to_vec()).as_bytes()
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

/// "1 month", "2 months", "1 month and 3/31".
fn months_text(months: i64, per: i64) -> String {
    let (whole, rest) = (months / per.max(1), months % per.max(1));
    let unit = if whole == 1 { "month" } else { "months" };
    match (whole, rest) {
        (_, 0) => format!("{whole} {unit}"),
        (0, r) => format!("{r}/{per} month"),
        (w, r) => format!("{w} {unit} and {r}/{per}"),
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

/// Prices per-band totals over the period [start, end) (UTC seconds), each line rounded half
/// away from zero: an import line per band at its import price (`import_wh[i]`, 0 where
/// missing) and, per band with export (`export_wh[i]` > 0; empty when the meter exports
/// nothing), an export line of negative energy credited at the band's export price. Import and
/// export are billed separately, never netted: they are separate registers with separate
/// prices — unless the tariff nets per band: then one line per band of import − export, priced at
/// the import price when positive and credited at the export price when negative. `extra` lines (demand charge, tiered charge) follow; then the fixed monthly charge
/// (pro rata, [`Tariff::months`]) as a line. The standing charge is per started local day.
/// A subtotal under the monthly minimum (pro rata) is raised to it by an adjustment line. VAT
/// applies to a positive subtotal only (export credits carry none).
pub fn price(
    t: &Tariff,
    import_wh: &[i64],
    export_wh: &[i64],
    (start_unix, end_unix): (i64, i64),
    extra: Vec<Line>,
) -> Bill {
    let mut lines: Vec<Line> = Vec::new();
    for (i, b) in t.bands.iter().enumerate() {
        let wh = import_wh.get(i).copied().unwrap_or(0);
        if t.import_prices.is_some() {
            // Import is priced per interval (a `dynamic_import_line` among `extra`); export per
            // band.
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
            continue;
        }
        if t.net_per_band {
            let net = wh - export_wh.get(i).copied().unwrap_or(0);
            let rate = if net >= 0 {
                b.import_price_milli
            } else {
                b.export_price_milli
            };
            lines.push(Line {
                description: format!("{} net", b.name),
                energy_wh: net,
                amount: div_round(i128::from(net) * i128::from(rate), 1_000_000) as i64,
            });
            continue;
        }
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
    let days = t.started_days(start_unix, end_unix);
    let (months, per) = t.months(start_unix, end_unix);
    let share = |monthly: i64| {
        div_round(
            i128::from(monthly) * i128::from(months),
            i128::from(per.max(1)),
        ) as i64
    };
    if t.fixed_charge_per_month > 0 {
        lines.push(Line {
            description: format!("fixed charge, {}", months_text(months, per)),
            energy_wh: 0,
            amount: share(t.fixed_charge_per_month),
        });
    }
    let standing_charge = t.standing_charge_per_day * days;
    let mut subtotal = lines.iter().map(|l| l.amount).sum::<i64>() + standing_charge;
    let minimum = share(t.minimum_charge_per_month);
    if t.minimum_charge_per_month > 0 && subtotal < minimum {
        lines.push(Line {
            description: format!("minimum bill, {}", months_text(months, per)),
            energy_wh: 0,
            amount: minimum - subtotal,
        });
        subtotal = minimum;
    }
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

    use psm_proto::v1::{Tariff as Wire, TariffBand};

    fn band(name: &str, mask: u32, s: u32, e: u32, imp: i64, exp: i64) -> TariffBand {
        TariffBand {
            name: name.into(),
            weekday_mask: mask,
            start_hour: s,
            end_hour: e,
            import_price_milli: imp,
            export_price_milli: exp,
            month_mask: 0,
        }
    }

    fn wire(tz: &str, bands: Vec<TariffBand>, standing: i64, vat: u32) -> Wire {
        Wire {
            name: "t".into(),
            time_zone: tz.into(),
            bands,
            standing_charge_per_day: standing,
            vat_basis_points: vat,
            currency: "GBP".into(),
            ..Default::default()
        }
    }

    fn build(
        _name: &str,
        tz: &str,
        bands: Vec<TariffBand>,
        standing: i64,
        vat: u32,
        _cur: &str,
    ) -> Result<Tariff, TariffError> {
        from_proto(&wire(tz, bands, standing, vat))
    }

    #[test]
    fn coverage_is_checked() {
        let ok = vec![
            band("peak", 0x1F, 16, 19, 40_000, 5_000),
            band("off", 0x1F, 0, 16, 20_000, 5_000),
            band("eve", 0x1F, 19, 24, 20_000, 5_000),
            band("weekend", 0x60, 0, 24, 15_000, 5_000),
        ];
        assert!(build("t", "Europe/London", ok.clone(), 50, 500, "GBP").is_ok());
        let mut gap = ok.clone();
        gap.pop();
        assert!(build("t", "Europe/London", gap, 50, 500, "GBP")
            .unwrap_err()
            .0
            .contains("no band covers January on Saturday at hour 0"));
        let mut overlap = ok.clone();
        overlap.push(band("x", 1, 3, 4, 1, 1));
        assert!(build("t", "Europe/London", overlap, 50, 500, "GBP")
            .unwrap_err()
            .0
            .contains("overlap"));
        assert!(build("t", "Mars/Olympus", ok, 50, 500, "GBP").is_err());
    }

    #[test]
    fn dst_days_have_23_and_25_local_hours() {
        let t = build(
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
                seen.insert(t.band_at(day_start, u));
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
        let t = build(
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
        let utc = build(
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
        let t = build(
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
        let b = price(
            &t,
            &[10_000, 2_000, 1],
            &[0, 2_500, 0],
            (0, 30 * 86_400),
            Vec::new(),
        );
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
        let b = price(&t, &[0, 0, 0], &[], (0, 86_400), Vec::new());
        assert_eq!(b.lines.len(), 3);
        assert_eq!(b.total, 45 + 2);
        let b = price(&t, &[0, 0, 0], &[1_000_000, 0, 0], (0, 86_400), Vec::new());
        assert_eq!(b.lines[1].amount, -15_000);
        assert_eq!((b.subtotal, b.vat, b.total), (45 - 15_000, 0, 45 - 15_000));
        // Per-band net metering: 2,500 Wh export against 2,000 Wh import in the night band is a
        // net export of 500 Wh at the export price 4.0.
        let mut w = wire(
            "UTC",
            vec![
                band("day", 0x7F, 7, 23, 30_500, 15_000),
                band("night", 0x7F, 0, 7, 12_000, 4_000),
                band("late", 0x7F, 23, 24, 12_000, 4_000),
            ],
            45,
            500,
        );
        w.net_per_band = true;
        let net = from_proto(&w).unwrap();
        let b = price(
            &net,
            &[10_000, 2_000, 1],
            &[0, 2_500, 0],
            (0, 86_400),
            Vec::new(),
        );
        let lines: Vec<(&str, i64, i64)> = b
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("day net", 10_000, 305),
                ("night net", -500, -2),
                ("late net", 1, 0)
            ]
        );
        // Halves round away from zero on credits too.
        let b = price(&t, &[], &[100, 0, 0], (0, 0), Vec::new());
        assert_eq!(b.lines[0].amount, 0);
        assert_eq!(b.lines[1].amount, -2); // 0.1 kWh × 15.0 = 1.5 → −2
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(5, 2), 3);
    }

    #[test]
    fn months_are_whole_from_the_first_day_then_pro_rata() {
        let t = build(
            "t",
            "America/New_York",
            vec![band("all", 0x7F, 0, 24, 1, 1)],
            0,
            0,
            "USD",
        )
        .unwrap();
        let ny = |y, m, d| {
            t.tz.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .single()
                .unwrap()
                .timestamp()
        };
        // Local midnight to local midnight: January is one month, so is a 15th-to-15th cycle
        // over the March DST change, and February.
        assert_eq!(t.months(ny(2027, 1, 1), ny(2027, 2, 1)), (1, 1));
        assert_eq!(t.months(ny(2027, 2, 15), ny(2027, 3, 15)), (1, 1));
        assert_eq!(t.months(ny(2027, 2, 1), ny(2027, 4, 1)), (2, 1));
        // Ten days of April: 10/30. From January 31: one month to February 28 (the month's
        // last day), then 3 days of the 31 to March 31.
        assert_eq!(t.months(ny(2027, 4, 1), ny(2027, 4, 11)), (10, 30));
        assert_eq!(t.months(ny(2027, 1, 31), ny(2027, 3, 3)), (31 + 3, 31));
    }

    #[test]
    fn fixed_and_minimum_monthly_charges() {
        let mut w = wire("UTC", vec![band("all", 0x7F, 0, 24, 10_000, 0)], 10, 1_000);
        w.fixed_charge_per_month = 1_000;
        w.minimum_charge_per_month = 2_000;
        let t = from_proto(&w).unwrap();
        let jan = (1_798_761_600, 1_798_761_600 + 31 * 86_400); // 2027-01-01 .. 2027-02-01 UTC
                                                                // 50 kWh at 10.0 = 500, standing 31 × 10 = 310, fixed 1,000: 1,810 < 2,000, so the
                                                                // minimum line adds 190, and VAT is 10 % of 2,000.
        let b = price(&t, &[50_000], &[], jan, Vec::new());
        let lines: Vec<(&str, i64)> = b
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.amount))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("all import", 500),
                ("fixed charge, 1 month", 1_000),
                ("minimum bill, 1 month", 190)
            ]
        );
        assert_eq!(
            (b.standing_charge, b.subtotal, b.vat, b.total),
            (310, 2_000, 200, 2_200)
        );
        // Above the minimum: no adjustment. Half of a 30-day month: half the fixed charge.
        let b = price(&t, &[500_000], &[], jan, Vec::new());
        assert_eq!(b.lines.len(), 2);
        let apr = (1_806_537_600, 1_806_537_600 + 15 * 86_400); // 2027-04-01 + 15 days
        let b = price(&t, &[500_000], &[], apr, Vec::new());
        assert_eq!(b.lines[1].description, "fixed charge, 15/30 month");
        assert_eq!(b.lines[1].amount, 500);
    }

    #[test]
    fn effective_dates_bound_the_period() {
        let mut w = wire("Europe/London", vec![band("all", 0x7F, 0, 24, 1, 1)], 0, 0);
        w.effective_from = "2027-01-01".into();
        w.effective_to = "2027-07-01".into();
        let t = from_proto(&w).unwrap();
        let london = |y, m, d| {
            t.tz.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .single()
                .unwrap()
                .timestamp()
        };
        assert!(t
            .check_in_force(london(2027, 1, 1), london(2027, 2, 1))
            .is_ok());
        assert!(t
            .check_in_force(london(2027, 6, 1), london(2027, 7, 1))
            .is_ok());
        let e = t
            .check_in_force(london(2026, 12, 31), london(2027, 2, 1))
            .unwrap_err();
        assert!(e.0.contains("in force from 2027-01-01"), "{e}");
        // One slot past the end is outside.
        assert!(t
            .check_in_force(london(2027, 6, 1), london(2027, 7, 1) + 300)
            .is_err());
    }

    #[test]
    fn billing_cycles_run_from_the_billing_day_in_local_time() {
        let t = build(
            "t",
            "America/New_York",
            vec![band("all", 0x7F, 0, 24, 1, 1)],
            0,
            0,
            "USD",
        )
        .unwrap();
        let ny = |y, m, d, h| {
            t.tz.with_ymd_and_hms(y, m, d, h, 0, 0)
                .single()
                .unwrap()
                .timestamp()
        };
        // January in New York: 05:00 UTC on Jan 1 to 05:00 UTC on Feb 1.
        let jan = (ny(2027, 1, 1, 0), ny(2027, 2, 1, 0));
        assert_eq!(jan.0 % 86_400, 5 * 3600);
        assert_eq!(cycle(t.tz, 1, 2027, 1), Some(jan));
        assert!(t.check_cycle(1, jan.0, jan.1).is_ok());
        // Over the spring change: 15 March 00:00 EDT is 04:00 UTC, 15 February 05:00 UTC.
        let cycle = (ny(2027, 2, 15, 0), ny(2027, 3, 15, 0));
        assert!(t.check_cycle(15, cycle.0, cycle.1).is_ok());
        assert_eq!((cycle.1 - cycle.0) % 86_400, 86_400 - 3600);
        // Everything else is refused, naming the cycle to use: the UTC month, a period shifted
        // by one slot, two cycles, half a cycle, a cycle of another billing day.
        let utc_jan = (1_798_761_600, 1_798_761_600 + 31 * 86_400);
        let e = t.check_cycle(1, utc_jan.0, utc_jan.1).unwrap_err();
        assert!(
            e.0.contains("nearest cycle is 2027-01-01 00:00 EST .. 2027-02-01 00:00 EST"),
            "{e}"
        );
        assert!(t.check_cycle(1, jan.0 + 300, jan.1 + 300).is_err());
        assert!(t.check_cycle(1, jan.0, ny(2027, 3, 1, 0)).is_err());
        assert!(t.check_cycle(1, jan.0, ny(2027, 1, 16, 0)).is_err());
        let e = t.check_cycle(15, jan.0, jan.1).unwrap_err();
        assert!(
            e.0.contains("nearest cycle is 2027-01-15 00:00 EST .. 2027-02-15"),
            "{e}"
        );
        let e = t.check_cycle(28, jan.0, jan.1).unwrap_err();
        assert!(e.0.contains("nearest cycle is 2026-12-28"), "{e}");
    }

    #[test]
    fn dynamic_import_is_one_line_and_export_stays_per_band() {
        let mut w = wire("UTC", vec![band("all", 0x7F, 0, 24, 99_999, 4_000)], 10, 0);
        w.import_prices = Some(psm_proto::v1::PriceSeries {
            interval_seconds: 3600,
            start_unix: 0,
            price_milli: vec![20_000; 24],
        });
        let t = from_proto(&w).unwrap();
        // 10 kWh at 20.0 released as Σ price × Wh = 200,000,000.
        let dynamic = dynamic_import_line(200_000_000, 24);
        let b = price(&t, &[], &[2_500], (0, 86_400), vec![dynamic]);
        let lines: Vec<(&str, i64, i64)> = b
            .lines
            .iter()
            .map(|l| (l.description.as_str(), l.energy_wh, l.amount))
            .collect();
        assert_eq!(
            lines,
            vec![
                ("all export", -2_500, -10),
                ("import at dynamic prices (24 prices)", 0, 200)
            ]
        );
        assert_eq!(b.total, 200 - 10 + 10);
    }
}
