//! AEMO NEM12 (the "Meter Data File Format" specification): `100` header, then per NMI data
//! stream a `200` record (NMI, register, NMI suffix, unit, interval length) and one `300`
//! record per day of interval values, with `400` records giving the quality of parts of a day
//! of variable quality, `500` and `900` ending it. Interval dates are in market time, AEST
//! (UTC+10, no daylight saving), and interval 1 starts at 00:00.
//!
//! NMI suffix E<n> is energy delivered to the customer (import), B<n> energy received from it
//! (export); other suffixes (reactive energy, K/Q) are left out and noted. Meter ids are the NMI
//! for data stream 1 (`E1`/`B1`) and `<NMI>-<n>` for stream n. Null data (quality `N`) is left
//! out and noted.

use psm_core::readings::is_label;

use super::{err, Flow, ImportError, Lines, Note, Parsed, Reading, Series};

/// AEST, the NEM's market time: UTC+10 all year.
const MARKET_OFFSET_SECONDS: i64 = 10 * 3600;

/// Whether `text` is a NEM12 file (its first record is `100,NEM12`).
pub fn is_nem12(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            f.first() == Some(&"100") && f.get(1).is_some_and(|v| v.eq_ignore_ascii_case("NEM12"))
        })
}

/// The data stream a `200` record opens.
struct Stream {
    meter_id: String,
    flow: Option<Flow>,
    suffix: String,
    /// Wh per unit of the stream's values.
    factor: f64,
    interval_minutes: u32,
    series: usize,
}

/// Parses a NEM12 file; a record that cannot be read is an error naming its line.
pub fn parse_nem12(text: &str) -> Result<Parsed, ImportError> {
    if !is_nem12(text) {
        return Err(err(
            "line 1: a NEM12 file starts with a 100,NEM12 header record",
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut out = Parsed::default();
    let mut stream: Option<Stream> = None;
    // The last 300 record of a variable-quality day: (series, first reading index, day start).
    let mut variable: Option<(usize, usize, i64)> = None;
    let mut lines = Lines::new(text);
    for rec in reader.records() {
        let rec = rec.map_err(|e| err(format!("line {}: {e}", lines.of_position(e.position()))))?;
        let line = lines.of_position(rec.position());
        let f: Vec<&str> = rec.iter().collect();
        match f.first().copied().unwrap_or("") {
            "" => {}
            "100" | "500" | "900" => variable = None,
            "200" => {
                variable = None;
                let get = |i: usize, what: &str| {
                    f.get(i)
                        .copied()
                        .ok_or_else(|| err(format!("line {line}: 200 record without {what}")))
                };
                let nmi = get(1, "an NMI")?;
                let suffix = get(4, "an NMI suffix")?.to_ascii_uppercase();
                let unit = get(7, "a unit of measure")?.to_ascii_lowercase();
                let minutes: u32 = get(8, "an interval length")?.parse().map_err(|_| {
                    err(format!(
                        "line {line}: interval length {:?} is not a number of minutes",
                        f[8]
                    ))
                })?;
                if minutes == 0 || 1440 % minutes != 0 {
                    return Err(err(format!(
                        "line {line}: interval length {minutes} minutes does not divide a day"
                    )));
                }
                let digit = suffix.get(1..).unwrap_or("");
                let meter_id = if digit == "1" || digit.is_empty() {
                    nmi.to_owned()
                } else {
                    format!("{nmi}-{digit}")
                };
                if !is_label(&meter_id) {
                    return Err(err(format!(
                        "line {line}: NMI {nmi:?} does not make a meter id"
                    )));
                }
                let flow = match suffix.chars().next() {
                    Some('E') => Some(Flow::Import),
                    Some('B') => Some(Flow::Export),
                    _ => None,
                };
                let factor = match unit.as_str() {
                    "wh" => 1.0,
                    "kwh" => 1_000.0,
                    "mwh" => 1_000_000.0,
                    _ => 0.0,
                };
                let series = out.series.len();
                if let Some(flow) = flow.filter(|_| factor > 0.0) {
                    out.series.push(Series {
                        meter_id: meter_id.clone(),
                        flow,
                        interval_hint: Some(minutes * 60),
                        readings: Vec::new(),
                    });
                }
                stream = Some(Stream {
                    meter_id,
                    flow: flow.filter(|_| factor > 0.0),
                    suffix,
                    factor,
                    interval_minutes: minutes,
                    series,
                });
            }
            "300" => {
                let Some(s) = stream.as_ref() else {
                    return Err(err(format!(
                        "line {line}: a 300 record before any 200 record"
                    )));
                };
                let n = (1440 / s.interval_minutes) as usize;
                if f.len() < 3 {
                    return Err(err(format!(
                        "line {line}: a 300 record needs a date, {n} values and a quality flag"
                    )));
                }
                // The values run up to the quality method (A, E52, F14, N, S53, V).
                let is_quality =
                    |v: &&str| v.len() <= 3 && v.starts_with(|c: char| "AEFNSVaefnsv".contains(c));
                let values = f[2..].iter().take_while(|v| !is_quality(v)).count();
                if values != n || f.len() < 2 + n + 1 {
                    return Err(err(format!(
                        "line {line}: a 300 record of {}-minute intervals has {n} values and a quality flag; this one has {values} values",
                        s.interval_minutes
                    )));
                }
                let date = chrono::NaiveDate::parse_from_str(f[1], "%Y%m%d").map_err(|_| {
                    err(format!(
                        "line {line}: interval date {:?} is not YYYYMMDD",
                        f[1]
                    ))
                })?;
                let day_start = date
                    .and_hms_opt(0, 0, 0)
                    .map_or(0, |t| t.and_utc().timestamp())
                    - MARKET_OFFSET_SECONDS;
                let quality = f[2 + n].to_ascii_uppercase();
                let Some(flow) = s.flow else {
                    out.notes.push(Note {
                        meter_id: s.meter_id.clone(),
                        flow: Flow::Import,
                        unix: day_start,
                        text: format!(
                            "NMI suffix {} is not energy delivered (E) or received (B) in Wh, kWh or MWh, left out",
                            s.suffix
                        ),
                    });
                    continue;
                };
                let step = i64::from(s.interval_minutes) * 60;
                let first = out.series[s.series].readings.len();
                for (k, v) in f[2..2 + n].iter().enumerate() {
                    let x: f64 =
                        v.parse()
                            .ok()
                            .filter(|x: &f64| x.is_finite())
                            .ok_or_else(|| {
                                err(format!(
                                    "line {line}: interval value {} is {v:?}, not a number",
                                    k + 1
                                ))
                            })?;
                    out.series[s.series].readings.push(Reading {
                        start: day_start + k as i64 * step,
                        seconds: Some(step),
                        wh: (x * s.factor).round() as i64,
                        line,
                    });
                }
                variable = None;
                match quality.chars().next() {
                    Some('N') => {
                        out.series[s.series].readings.truncate(first);
                        out.notes.push(Note {
                            meter_id: s.meter_id.clone(),
                            flow,
                            unix: day_start,
                            text: format!("null data (quality N) on line {line}, left out"),
                        });
                    }
                    Some('V') => variable = Some((s.series, first, day_start)),
                    _ => {}
                }
            }
            "400" => {
                let (Some(s), Some((series, first, day_start))) = (stream.as_ref(), variable)
                else {
                    return Err(err(format!(
                        "line {line}: a 400 record follows a 300 record of variable quality (V)"
                    )));
                };
                let num = |i: usize| -> Result<usize, ImportError> {
                    f.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| {
                        err(format!("line {line}: 400 record without interval numbers"))
                    })
                };
                let (from, to) = (num(1)?, num(2)?);
                let n = (1440 / s.interval_minutes) as usize;
                if from == 0 || to < from || to > n {
                    return Err(err(format!(
                        "line {line}: intervals {from}..{to} are outside 1..{n}"
                    )));
                }
                let quality = f.get(3).copied().unwrap_or("").to_ascii_uppercase();
                if quality.starts_with('N') {
                    // Null intervals: mark them for removal (an impossible value is filtered
                    // below, once the day's 400 records are all read).
                    for r in &mut out.series[series].readings[first + from - 1..first + to] {
                        r.wh = i64::MIN;
                    }
                    if let Some(flow) = s.flow {
                        out.notes.push(Note {
                            meter_id: s.meter_id.clone(),
                            flow,
                            unix: day_start
                                + (from as i64 - 1) * i64::from(s.interval_minutes) * 60,
                            text: format!(
                                "null data (quality N) for intervals {from}..{to} on line {line}, left out"
                            ),
                        });
                    }
                }
            }
            other => {
                return Err(err(format!(
                    "line {line}: record indicator {other:?} is not 100, 200, 300, 400, 500 or 900"
                )))
            }
        }
    }
    for s in &mut out.series {
        s.readings.retain(|r| r.wh != i64::MIN);
    }
    out.series.retain(|s| !s.readings.is_empty());
    Ok(out)
}
