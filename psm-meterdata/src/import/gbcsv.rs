//! A utility's Green Button CSV export ("Download my data"): an account preamble, then
//! `TYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES` rows in local time, or
//! `IMPORT (kWh)` and `EXPORT (kWh)` columns for a net-metered customer.

use chrono::{NaiveDate, NaiveTime, TimeZone};
use psm_core::readings::is_label;

use super::{err, Flow, ImportError, Lines, Note, Parsed, Reading, Series};

/// Whether `text` looks like a utility's Green Button CSV export (a header row with DATE and
/// START TIME and a USAGE or IMPORT column after the account preamble).
pub fn is_green_button_csv(text: &str) -> bool {
    text.lines().take(50).any(is_header)
}

fn is_header(l: &str) -> bool {
    let u = l.to_ascii_uppercase();
    u.contains("DATE") && u.contains("START TIME") && (u.contains("USAGE") || u.contains("IMPORT"))
}

fn date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(s, "%m/%d/%Y"))
        .ok()
}

fn time(s: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(s, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M:%S"))
        .ok()
}

/// Parses the export of one meter (the file names none: `meter_id` does). Times are local to
/// `time_zone`; a repeated local hour at the end of daylight saving is resolved by order (first
/// the earlier instant, then the later); a local time that does not exist is left out and
/// noted. An interval's length is END TIME − START TIME (the end is the interval's last
/// minute). USAGE (or IMPORT/EXPORT) is kWh unless UNITS says Wh; a negative USAGE is exported
/// energy.
pub fn parse_green_button_csv(
    text: &str,
    meter_id: &str,
    time_zone: &str,
) -> Result<Parsed, ImportError> {
    if !is_label(meter_id) {
        return Err(err(format!("meter id {meter_id:?} must be [A-Za-z0-9._-]")));
    }
    let tz: chrono_tz::Tz = time_zone
        .parse()
        .map_err(|_| err(format!("unknown IANA time zone {time_zone:?}")))?;
    // The header's line number and byte offset (lines end in \n or \r\n).
    let (header_line, offset) = text
        .split_inclusive('\n')
        .scan(0usize, |at, l| {
            let start = *at;
            *at += l.len();
            Some((l, start))
        })
        .enumerate()
        .find(|(_, (l, _))| is_header(l))
        .map(|(i, (_, start))| (i, start))
        .ok_or_else(|| err("no header row with DATE, START TIME and USAGE (or IMPORT)"))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(&text.as_bytes()[offset..]);
    let cols: Vec<String> = reader
        .headers()
        .map_err(|e| err(format!("line {}: {e}", header_line + 1)))?
        .iter()
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c == name || c.starts_with(&format!("{name} (")))
    };
    let c_date = col("DATE").ok_or_else(|| err("no DATE column"))?;
    let c_start = col("START TIME").ok_or_else(|| err("no START TIME column"))?;
    let c_end = col("END TIME");
    let c_units = col("UNITS");
    let c_type = col("TYPE");
    // (column, register, whether the header says Wh)
    let mut values: Vec<(usize, Flow, bool)> = Vec::new();
    for (name, flow) in [
        ("USAGE", Flow::Net),
        ("IMPORT", Flow::Import),
        ("EXPORT", Flow::Export),
    ] {
        if let Some(c) = col(name) {
            values.push((c, flow, cols[c].contains("(WH)")));
        }
    }
    if values.is_empty() {
        return Err(err("no USAGE, IMPORT or EXPORT column"));
    }
    let mut out = Parsed::default();
    let mut series: Vec<Series> = values
        .iter()
        .map(|(_, flow, _)| Series {
            meter_id: meter_id.to_owned(),
            flow: *flow,
            interval_hint: None,
            readings: Vec::new(),
        })
        .collect();
    let mut seen_local = std::collections::HashSet::new();
    let body = &text[offset..];
    let mut lines = Lines::new(body);
    for rec in reader.records() {
        let rec = rec.map_err(|e| {
            let line = lines.of_position(e.position()) + header_line;
            err(format!("line {line}: {e}"))
        })?;
        let line = lines.of_position(rec.position()) + header_line;
        if rec.iter().all(str::is_empty) {
            continue;
        }
        let get = |i: usize| {
            rec.get(i)
                .ok_or_else(|| err(format!("line {line}: too few columns")))
        };
        // Only electricity: an export can hold gas or water rows too.
        if let Some(kind) = c_type.and_then(|c| rec.get(c)).filter(|k| !k.is_empty()) {
            if !kind.to_ascii_lowercase().contains("electric") {
                for (_, flow, _) in &values {
                    out.notes.push(Note {
                        meter_id: meter_id.to_owned(),
                        flow: *flow,
                        unix: date(rec.get(c_date).unwrap_or(""))
                            .and_then(|d| d.and_hms_opt(12, 0, 0))
                            .map_or(0, |t| t.and_utc().timestamp()),
                        text: format!("rows of TYPE {kind:?} (not electricity) left out"),
                    });
                }
                continue;
            }
        }
        let d = get(c_date)?;
        let d = date(d).ok_or_else(|| {
            err(format!(
                "line {line}: date {d:?} is not YYYY-MM-DD or MM/DD/YYYY"
            ))
        })?;
        let s = get(c_start)?;
        let start_time =
            time(s).ok_or_else(|| err(format!("line {line}: start time {s:?} is not HH:MM")))?;
        let seconds = match c_end.and_then(|c| rec.get(c)).filter(|e| !e.is_empty()) {
            Some(e) => {
                let end = time(e)
                    .ok_or_else(|| err(format!("line {line}: end time {e:?} is not HH:MM")))?;
                // The end is the interval's last minute (00:00-00:14 is 15 minutes).
                let mut len = (end - start_time).num_seconds() + 60;
                if len <= 0 {
                    len += 86_400;
                }
                Some(len)
            }
            None => None,
        };
        let local = d.and_time(start_time);
        let instant = match tz.from_local_datetime(&local) {
            chrono::LocalResult::Single(t) => t,
            chrono::LocalResult::Ambiguous(a, b) => {
                if seen_local.contains(&local) {
                    b.max(a)
                } else {
                    a.min(b)
                }
            }
            chrono::LocalResult::None => {
                for (_, flow, _) in &values {
                    out.notes.push(Note {
                        meter_id: meter_id.to_owned(),
                        flow: *flow,
                        unix: d.and_hms_opt(12, 0, 0).map_or(0, |t| t.and_utc().timestamp()),
                        text: format!(
                            "local time {local} does not exist in {time_zone} (a daylight-saving gap), line {line} left out"
                        ),
                    });
                }
                continue;
            }
        };
        seen_local.insert(local);
        let unit_wh = match c_units
            .and_then(|c| rec.get(c))
            .map(str::to_ascii_lowercase)
        {
            Some(u) if u == "wh" => true,
            Some(u) if u == "kwh" || u.is_empty() => false,
            None => false,
            Some(u) => return Err(err(format!("line {line}: units {u:?}: only kWh or Wh"))),
        };
        for ((c, _, header_wh), s) in values.iter().zip(series.iter_mut()) {
            let v = get(*c)?;
            if v.is_empty() {
                continue;
            }
            let x: f64 = v
                .trim_start_matches('$')
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite())
                .ok_or_else(|| err(format!("line {line}: {:?} is not a number", v)))?;
            let factor = if unit_wh || *header_wh { 1.0 } else { 1000.0 };
            s.readings.push(Reading {
                start: instant.timestamp(),
                seconds,
                wh: (x * factor).round() as i64,
                line,
            });
        }
    }
    out.series = series
        .into_iter()
        .filter(|s| !s.readings.is_empty())
        .collect();
    Ok(out)
}
