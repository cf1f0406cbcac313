//! Meter-day reading batches: identity, shape rules and the checks ingest applies before
//! anything is stored.

/// Seconds in a UTC day.
pub const DAY_SECONDS: i64 = 86_400;

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ReadingError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> ReadingError {
    ReadingError {
        field,
        reason: reason.into(),
    }
}

/// Whether `s` is a label safe in store keys, file names and certificate names:
/// 1..=128 characters of [A-Za-z0-9._-], not starting with '.'. Meter ids and party names are.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.')
}

/// Meter ids are labels (see [`is_label`]).
pub fn validate_meter_id(id: &str) -> Result<(), ReadingError> {
    if is_label(id) {
        Ok(())
    } else {
        Err(err(
            "meter_id",
            format!("{id:?} must be 1..=128 characters of [A-Za-z0-9._-]"),
        ))
    }
}

/// Days since 1970-01-01 of an ISO 8601 date "YYYY-MM-DD" (2000..=2199), in its canonical form
/// only (ten characters, digits and two dashes), so one day has exactly one spelling.
pub fn parse_day(day: &str) -> Result<i64, ReadingError> {
    let bad = || {
        err(
            "day",
            format!("{day:?} is not a date YYYY-MM-DD between 2000 and 2199"),
        )
    };
    let b = day.as_bytes();
    if b.len() != 10
        || b[4] != b'-'
        || b[7] != b'-'
        || b.iter()
            .enumerate()
            .any(|(i, c)| i != 4 && i != 7 && !c.is_ascii_digit())
    {
        return Err(bad());
    }
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let (y, m, d) = (num(&day[0..4])?, num(&day[5..7])?, num(&day[8..10])?);
    if !(2000..=2199).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad());
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let dim = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d < 1 || d > dim[(m - 1) as usize] {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok(era * 146_097 + doe - 719_468)
}

/// The ISO date of a day number.
pub fn format_day(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip() {
        assert_eq!(parse_day("1970-01-01").ok(), None, "outside 2000..=2199");
        assert_eq!(parse_day("2000-01-01").unwrap(), 10_957);
        for d in [10_957, 19_000, 20_000, 20_513, 60_000] {
            assert_eq!(parse_day(&format_day(d)).unwrap(), d);
        }
        assert_eq!(format_day(parse_day("2024-02-29").unwrap()), "2024-02-29");
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-1-01",
            "26-11-2026",
            "2026-11-26T00",
            "2026-01-+1",
            "+026-01-01",
        ] {
            assert!(parse_day(bad).is_err(), "{bad}");
        }
    }
}
