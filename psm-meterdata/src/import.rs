//! Importing real meter data: Green Button (NAESB ESPI Atom/XML) and a plain CSV of
//! (meter id, timestamp, Wh), turned into UTC meter-days ready to encrypt: complete days, and
//! the runs of consecutive intervals of incomplete ones (a linear-track batch may cover part of
//! a day).

use std::collections::{BTreeMap, HashMap};

use quick_xml::events::Event;
use quick_xml::Reader;

use psm_core::linear::INTERVALS;
use psm_core::readings::{is_label, DAY_SECONDS};

/// Why an import failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ImportError(pub String);

fn err(m: impl Into<String>) -> ImportError {
    ImportError(m.into())
}

/// One meter's readings: (UTC start, Wh) with a fixed interval length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterSeries {
    pub meter_id: String,
    pub interval_seconds: u32,
    pub readings: Vec<(i64, i64)>,
}

/// Consecutive intervals of one UTC meter-day: a whole day, or one run of an incomplete day.
/// One linear-track batch per channel carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterDay {
    pub meter_id: String,
    /// Days since 1970-01-01.
    pub day: i64,
    pub interval_seconds: u32,
    /// Index within the UTC day of the first interval (0 for a complete day).
    pub first_interval: u32,
    /// Wh per interval, from `first_interval` on.
    pub values: Vec<i64>,
}

impl MeterDay {
    /// Intervals of `interval_seconds` in a UTC day.
    pub fn intervals_per_day(&self) -> usize {
        (DAY_SECONDS / i64::from(self.interval_seconds.max(1))) as usize
    }

    /// Whether it covers the whole UTC day.
    pub fn is_complete(&self) -> bool {
        self.first_interval == 0 && self.values.len() == self.intervals_per_day()
    }
}

/// An incomplete UTC meter-day (at the edges of an export, or with gaps): its maximal runs of
/// consecutive intervals, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialDay {
    pub meter_id: String,
    /// Days since 1970-01-01.
    pub day: i64,
    pub runs: Vec<MeterDay>,
}

impl PartialDay {
    /// Readings present.
    pub fn readings(&self) -> usize {
        self.runs.iter().map(|r| r.values.len()).sum()
    }
}

/// Splits series into UTC days: complete days, and incomplete days (at the edges of an export,
/// or with gaps) as runs of consecutive intervals, so the caller can report and submit both.
pub fn to_days(series: &[MeterSeries]) -> Result<(Vec<MeterDay>, Vec<PartialDay>), ImportError> {
    let mut days = Vec::new();
    let mut partial = Vec::new();
    for s in series {
        if !INTERVALS.contains(&s.interval_seconds) {
            return Err(err(format!(
                "{}: interval {} s is not one of {INTERVALS:?}",
                s.meter_id, s.interval_seconds
            )));
        }
        let per_day = (DAY_SECONDS / i64::from(s.interval_seconds)) as usize;
        let mut by_day: BTreeMap<i64, BTreeMap<u32, i64>> = BTreeMap::new();
        for (start, wh) in &s.readings {
            if start % i64::from(s.interval_seconds) != 0 {
                return Err(err(format!(
                    "{}: reading at {start} is not on a {} s boundary",
                    s.meter_id, s.interval_seconds
                )));
            }
            let day = start.div_euclid(DAY_SECONDS);
            let slot = (start.rem_euclid(DAY_SECONDS) / i64::from(s.interval_seconds)) as u32;
            if by_day
                .entry(day)
                .or_default()
                .insert(slot, *wh)
                .is_some_and(|old| old != *wh)
            {
                return Err(err(format!(
                    "{}: two different readings for {start}",
                    s.meter_id
                )));
            }
        }
        for (day, slots) in by_day {
            let run = |first_interval: u32, values: Vec<i64>| MeterDay {
                meter_id: s.meter_id.clone(),
                day,
                interval_seconds: s.interval_seconds,
                first_interval,
                values,
            };
            if slots.len() == per_day {
                days.push(run(0, slots.into_values().collect()));
                continue;
            }
            let mut runs: Vec<MeterDay> = Vec::new();
            for (i, v) in slots {
                match runs.last_mut() {
                    Some(r) if r.first_interval as usize + r.values.len() == i as usize => {
                        r.values.push(v)
                    }
                    _ => runs.push(run(i, vec![v])),
                }
            }
            partial.push(PartialDay {
                meter_id: s.meter_id.clone(),
                day,
                runs,
            });
        }
    }
    Ok((days, partial))
}

#[derive(Default)]
struct Entry {
    self_href: String,
    up_href: String,
    related: Vec<String>,
    kind: String,
    interval_length: Option<u32>,
    power_of_ten: i32,
    uom: Option<u32>,
    readings: Vec<(i64, i64, i64)>, // start, duration, value
}

/// Keeps an entry's self, up and related links.
fn record_link(entry: &mut Entry, e: &quick_xml::events::BytesStart<'_>) {
    let mut rel = String::new();
    let mut href = String::new();
    for a in e.attributes().flatten() {
        let v = String::from_utf8_lossy(&a.value).into_owned();
        match a.key.local_name().as_ref() {
            b"rel" => rel = v,
            b"href" => href = v,
            _ => {}
        }
    }
    match rel.as_str() {
        "self" => entry.self_href = norm(&href),
        "up" => entry.up_href = norm(&href),
        "related" => entry.related.push(norm(&href)),
        _ => {}
    }
}

fn norm(href: &str) -> String {
    href.trim().trim_start_matches('/').to_owned()
}

/// Parses a Green Button ESPI feed: every UsagePoint becomes a meter (`gb-<customer>-<point>`,
/// or `<prefix>-...`), its MeterReadings' IntervalBlocks give the readings, scaled by the linked
/// ReadingType (`uom` 72 = Wh, `powerOfTenMultiplier`, `intervalLength`). Times are UTC epoch
/// seconds (LocalTimeParameters only describe local display time, so they do not move data).
pub fn parse_green_button(xml: &str, prefix: &str) -> Result<Vec<MeterSeries>, ImportError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut entries: Vec<Entry> = Vec::new();
    let mut cur: Option<Entry> = None;
    let mut path: Vec<String> = Vec::new();
    let mut reading = (0i64, 0i64, None::<i64>);
    loop {
        let ev = reader.read_event().map_err(|e| {
            err(format!(
                "XML error at byte {}: {e}",
                reader.buffer_position()
            ))
        })?;
        match ev {
            Event::Start(e) => {
                let n = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if n == "link" {
                    if let Some(entry) = cur.as_mut() {
                        record_link(entry, &e);
                    }
                }
                if n == "entry" {
                    cur = Some(Entry::default());
                }
                if let Some(entry) = cur.as_mut() {
                    if path.last().is_some_and(|p| p == "content") && entry.kind.is_empty() {
                        entry.kind = n.clone();
                    }
                }
                if n == "IntervalReading" {
                    reading = (0, 0, None);
                }
                path.push(n);
            }
            Event::Empty(e) => {
                let n = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if n == "link" {
                    if let Some(entry) = cur.as_mut() {
                        record_link(entry, &e);
                    }
                }
                if let Some(entry) = cur.as_mut() {
                    if path.last().is_some_and(|p| p == "content") && entry.kind.is_empty() {
                        entry.kind = n;
                    }
                }
            }
            Event::Text(t) => {
                let text = t
                    .decode()
                    .map_err(|e| err(e.to_string()))?
                    .trim()
                    .to_owned();
                let Some(entry) = cur.as_mut() else { continue };
                let last = path.last().map(String::as_str).unwrap_or("");
                let parent = path
                    .len()
                    .checked_sub(2)
                    .and_then(|i| path.get(i))
                    .map(String::as_str)
                    .unwrap_or("");
                let num = |s: &str| {
                    s.parse::<i64>()
                        .map_err(|_| err(format!("<{last}> holds {s:?}, not an integer")))
                };
                match (entry.kind.as_str(), parent, last) {
                    ("ReadingType", _, "intervalLength") => {
                        entry.interval_length = Some(num(&text)? as u32)
                    }
                    ("ReadingType", "ReadingType", "powerOfTenMultiplier") => {
                        entry.power_of_ten = num(&text)? as i32
                    }
                    ("ReadingType", "ReadingType", "uom") => entry.uom = Some(num(&text)? as u32),
                    ("IntervalBlock", "timePeriod", "start")
                        if path.iter().any(|p| p == "IntervalReading") =>
                    {
                        reading.0 = num(&text)?
                    }
                    ("IntervalBlock", "timePeriod", "duration")
                        if path.iter().any(|p| p == "IntervalReading") =>
                    {
                        reading.1 = num(&text)?
                    }
                    ("IntervalBlock", "IntervalReading", "value") => reading.2 = Some(num(&text)?),
                    _ => {}
                }
            }
            Event::End(e) => {
                let n = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                path.pop();
                if n == "IntervalReading" {
                    if let (Some(entry), Some(v)) = (cur.as_mut(), reading.2) {
                        entry.readings.push((reading.0, reading.1, v));
                    }
                }
                if n == "entry" {
                    if let Some(e) = cur.take() {
                        entries.push(e);
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }

    let reading_types: HashMap<&str, &Entry> = entries
        .iter()
        .filter(|e| e.kind == "ReadingType")
        .map(|e| (e.self_href.as_str(), e))
        .collect();
    let mut out = Vec::new();
    for up in entries.iter().filter(|e| e.kind == "UsagePoint") {
        // ".../RetailCustomer/<c>/UsagePoint/<p>" → "<prefix>-<c>-<p>"
        let parts: Vec<&str> = up.self_href.split('/').collect();
        let id = match parts.as_slice() {
            [.., c, "UsagePoint", p] => format!("{prefix}-{c}-{p}"),
            _ => {
                return Err(err(format!(
                    "usage point link {:?} is not .../<customer>/UsagePoint/<id>",
                    up.self_href
                )))
            }
        };
        if !is_label(&id) {
            return Err(err(format!(
                "meter id {id:?} derived from {:?} is not a valid label",
                up.self_href
            )));
        }
        let mut readings = Vec::new();
        let mut interval = None;
        for mr in entries.iter().filter(|e| {
            e.kind == "MeterReading"
                && e.self_href
                    .starts_with(&format!("{}/MeterReading", up.self_href))
        }) {
            let rt = mr
                .related
                .iter()
                .find_map(|h| reading_types.get(h.as_str()))
                .ok_or_else(|| {
                    err(format!(
                        "meter reading {} links no ReadingType in the file",
                        mr.self_href
                    ))
                })?;
            match rt.uom {
                Some(72) => {}
                other => {
                    return Err(err(format!(
                        "{}: unit of measure {other:?} is not Wh (uom 72); only energy imports",
                        mr.self_href
                    )))
                }
            }
            let len = rt.interval_length.ok_or_else(|| {
                err(format!(
                    "{}: ReadingType has no intervalLength",
                    mr.self_href
                ))
            })?;
            if interval.is_some_and(|i| i != len) {
                return Err(err(format!(
                    "{id}: meter readings with different interval lengths"
                )));
            }
            interval = Some(len);
            let scale = |v: i64| -> i64 {
                if rt.power_of_ten >= 0 {
                    v.saturating_mul(10i64.saturating_pow(rt.power_of_ten as u32))
                } else {
                    let d = 10i128.pow(rt.power_of_ten.unsigned_abs().min(18));
                    psm_tariff::div_round(i128::from(v), d) as i64
                }
            };
            let blocks_up = format!("{}/IntervalBlock", mr.self_href);
            for b in entries
                .iter()
                .filter(|e| e.kind == "IntervalBlock" && e.up_href == blocks_up)
            {
                for (start, duration, value) in &b.readings {
                    if *duration != i64::from(len) {
                        return Err(err(format!(
                            "{id}: reading at {start} lasts {duration} s, ReadingType says {len} s"
                        )));
                    }
                    readings.push((*start, scale(*value)));
                }
            }
        }
        if let Some(interval_seconds) = interval {
            readings.sort();
            out.push(MeterSeries {
                meter_id: id,
                interval_seconds,
                readings,
            });
        }
    }
    if out.is_empty() {
        return Err(err("no usage point with interval readings in this file"));
    }
    Ok(out)
}

/// Sorts readings by time and infers the interval length from their smallest spacing.
fn sort_and_interval(readings: &mut [(i64, i64)], meter_id: &str) -> Result<u32, ImportError> {
    readings.sort();
    let interval = readings
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > 0)
        .min()
        .unwrap_or(0);
    u32::try_from(interval)
        .ok()
        .filter(|i| INTERVALS.contains(i))
        .ok_or_else(|| {
            err(format!(
                "{meter_id}: readings are {interval} s apart; expected one of {INTERVALS:?}"
            ))
        })
}

/// Parses `meter_id,timestamp,wh` lines (a header line is skipped; timestamps are Unix seconds
/// or RFC 3339 with an offset). The interval length of each meter is the spacing of its
/// readings and must be one of [`INTERVALS`] (300, 900, 1800 or 3600 s).
pub fn parse_plain_csv(text: &str) -> Result<Vec<MeterSeries>, ImportError> {
    let mut by_meter: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.to_ascii_lowercase().starts_with("meter")) {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [meter, ts, wh] = f.as_slice() else {
            return Err(err(format!(
                "line {}: expected meter_id,timestamp,wh",
                n + 1
            )));
        };
        if !is_label(meter) {
            return Err(err(format!(
                "line {}: meter id {meter:?} must be [A-Za-z0-9._-]",
                n + 1
            )));
        }
        let t = match ts.parse::<i64>() {
            Ok(t) => t,
            Err(_) => chrono::DateTime::parse_from_rfc3339(ts)
                .map_err(|e| err(format!("line {}: timestamp {ts:?}: {e}", n + 1)))?
                .timestamp(),
        };
        let v = wh
            .parse::<i64>()
            .map_err(|_| err(format!("line {}: {wh:?} is not an integer Wh", n + 1)))?;
        by_meter.entry(meter.to_string()).or_default().push((t, v));
    }
    by_meter
        .into_iter()
        .map(|(meter_id, mut readings)| {
            let interval_seconds = sort_and_interval(&mut readings, &meter_id)?;
            Ok(MeterSeries {
                meter_id,
                interval_seconds,
                readings,
            })
        })
        .collect()
}

/// Whether `text` looks like a utility's Green Button CSV export (a header row with DATE,
/// START TIME and USAGE columns after the account preamble).
pub fn is_green_button_csv(text: &str) -> bool {
    text.lines().take(50).any(|l| {
        let u = l.to_ascii_uppercase();
        u.contains("DATE") && u.contains("START TIME") && u.contains("USAGE")
    })
}

/// Parses a utility Green Button CSV export ("TYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,
/// NOTES" after an account preamble). Times are local to `time_zone`; a repeated local hour at
/// the end of daylight saving is resolved by order (first the earlier instant, then the later).
/// USAGE is kWh (or Wh when UNITS says so). The file names no meter: `meter_id` does.
pub fn parse_green_button_csv(
    text: &str,
    meter_id: &str,
    time_zone: &str,
) -> Result<MeterSeries, ImportError> {
    use chrono::TimeZone;
    if !is_label(meter_id) {
        return Err(err(format!("meter id {meter_id:?} must be [A-Za-z0-9._-]")));
    }
    let tz: chrono_tz::Tz = time_zone
        .parse()
        .map_err(|_| err(format!("unknown IANA time zone {time_zone:?}")))?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .by_ref()
        .find(|(_, l)| is_green_button_csv(l))
        .ok_or_else(|| err("no header row with DATE, START TIME and USAGE"))?
        .1;
    let cols: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_uppercase())
        .collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c == name)
            .ok_or_else(|| err(format!("no {name} column")))
    };
    let (c_date, c_start, c_usage) = (col("DATE")?, col("START TIME")?, col("USAGE")?);
    let c_units = col("UNITS").ok();
    let mut readings: Vec<(i64, i64)> = Vec::new();
    let mut seen_local = std::collections::HashSet::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .ok_or_else(|| err(format!("line {}: too few columns", n + 1)))
        };
        let date = get(c_date)?;
        let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
            .or_else(|_| chrono::NaiveDate::parse_from_str(date, "%m/%d/%Y"))
            .map_err(|_| {
                err(format!(
                    "line {}: date {date:?} is not YYYY-MM-DD or MM/DD/YYYY",
                    n + 1
                ))
            })?;
        let time = chrono::NaiveTime::parse_from_str(get(c_start)?, "%H:%M").map_err(|_| {
            err(format!(
                "line {}: start time {:?} is not HH:MM",
                n + 1,
                f[c_start]
            ))
        })?;
        let local = date.and_time(time);
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
                return Err(err(format!(
                    "line {}: {local} does not exist in {time_zone}",
                    n + 1
                )))
            }
        };
        seen_local.insert(local);
        let usage: f64 = get(c_usage)?.parse().map_err(|_| {
            err(format!(
                "line {}: usage {:?} is not a number",
                n + 1,
                f[c_usage]
            ))
        })?;
        let factor = match c_units
            .and_then(|c| f.get(c))
            .map(|u| u.to_ascii_lowercase())
        {
            Some(u) if u == "wh" => 1.0,
            Some(u) if u == "kwh" || u.is_empty() => 1000.0,
            None => 1000.0,
            Some(u) => return Err(err(format!("line {}: units {u:?}: only kWh or Wh", n + 1))),
        };
        readings.push((instant.timestamp(), (usage * factor).round() as i64));
    }
    let interval_seconds = sort_and_interval(&mut readings, meter_id)?;
    Ok(MeterSeries {
        meter_id: meter_id.to_owned(),
        interval_seconds,
        readings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/greenbutton");

    #[test]
    fn green_button_single_point_15_min() {
        let Ok(xml) = std::fs::read_to_string(format!("{SAMPLES}/15minLP_15Days.xml")) else {
            panic!("sample data missing at {SAMPLES}");
        };
        let series = parse_green_button(&xml, "gb").unwrap();
        assert_eq!(series.len(), 1);
        let s = &series[0];
        assert_eq!(s.meter_id, "gb-9b6c7063-01");
        assert_eq!(s.interval_seconds, 900);
        assert_eq!(s.readings.len(), 1340);
        assert_eq!(s.readings[0], (1_330_578_000, 324)); // 2012-03-01 05:00 UTC, 324 Wh
        let (days, partial) = to_days(&series).unwrap();
        assert!(!days.is_empty());
        assert!(days.iter().all(|d| d.values.len() == 96 && d.is_complete()));
        assert!(partial
            .iter()
            .flat_map(|p| &p.runs)
            .all(|r| !r.is_complete()
                && r.first_interval as usize + r.values.len() <= r.intervals_per_day()));
        let total: usize = days.iter().map(|d| d.values.len()).sum::<usize>()
            + partial.iter().map(PartialDay::readings).sum::<usize>();
        assert_eq!(
            total, 1340,
            "every reading is in a full or a reported partial day"
        );
    }

    #[test]
    fn green_button_five_points_hourly() {
        let xml = std::fs::read_to_string(format!("{SAMPLES}/1hrLP_32DaysFiveUsagePoints_M.xml"))
            .unwrap();
        let series = parse_green_button(&xml, "gb").unwrap();
        assert_eq!(series.len(), 5);
        assert!(series.iter().all(|s| s.interval_seconds == 3600));
        assert_eq!(series.iter().map(|s| s.readings.len()).sum::<usize>(), 3840);
        let ids: std::collections::BTreeSet<&str> =
            series.iter().map(|s| s.meter_id.as_str()).collect();
        assert_eq!(ids.len(), 5, "one meter per usage point");
    }

    #[test]
    fn plain_csv_and_errors() {
        let mut csv = String::from("meter_id,timestamp,wh\n");
        for i in 0..96 {
            csv.push_str(&format!("m-1,{},{}\n", 1_764_115_200 + i * 900, i - 10));
        }
        csv.push_str("m-2,2025-11-26T00:00:00Z,5\nm-2,2025-11-26T01:00:00+00:00,6\n");
        let s = parse_plain_csv(&csv).unwrap();
        assert_eq!(s[0].interval_seconds, 900);
        assert_eq!(s[1].interval_seconds, 3600);
        let (days, partial) = to_days(&s).unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].values[11], 1);
        assert_eq!(
            partial,
            vec![PartialDay {
                meter_id: "m-2".into(),
                day: 20_418,
                runs: vec![MeterDay {
                    meter_id: "m-2".into(),
                    day: 20_418,
                    interval_seconds: 3600,
                    first_interval: 0,
                    values: vec![5, 6],
                }],
            }]
        );
        assert!(
            parse_plain_csv("m-1,0,1\nm-1,600,2\n").is_err(),
            "10-minute spacing"
        );
        // A day with a gap: two runs, each starting where its readings do.
        let gappy = parse_plain_csv("m-3,0,1\nm-3,3600,2\nm-3,10800,3\nm-3,14400,4\n").unwrap();
        let (days, partial) = to_days(&gappy).unwrap();
        assert!(days.is_empty());
        let runs: Vec<(u32, Vec<i64>)> = partial[0]
            .runs
            .iter()
            .map(|r| (r.first_interval, r.values.clone()))
            .collect();
        assert_eq!(runs, vec![(0, vec![1, 2]), (3, vec![3, 4])]);
        assert_eq!(partial[0].readings(), 4);
        assert!(parse_plain_csv("m 1,0,1\n").is_err());
        assert!(parse_plain_csv("m-1,0,1.5\n").is_err());
        assert!(parse_green_button("<feed><entry>", "gb").is_err());
    }

    #[test]
    fn green_button_csv_with_dst_fall_back() {
        // 2026-11-01 in New York: 01:00-02:00 local happens twice.
        let mut csv = String::from("Name,Jane Doe\nAccount Number,123\n\nTYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES\n");
        let local = ["00:00", "01:00", "01:00", "02:00"];
        for (i, t) in local.iter().enumerate() {
            csv.push_str(&format!(
                "Electric usage,2026-11-01,{t},{t},0.{i}5,kWh,$0.01,\n"
            ));
        }
        assert!(is_green_button_csv(&csv));
        let s = parse_green_button_csv(&csv, "home-7", "America/New_York").unwrap();
        assert_eq!(s.interval_seconds, 3600);
        let starts: Vec<i64> = s.readings.iter().map(|r| r.0).collect();
        // 00:00 EDT = 04:00Z, 01:00 EDT = 05:00Z, 01:00 EST = 06:00Z, 02:00 EST = 07:00Z.
        let base = 1_793_505_600;
        assert_eq!(starts, vec![base, base + 3600, base + 7200, base + 10_800]);
        assert_eq!(
            s.readings.iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![50, 150, 250, 350]
        );
        assert!(parse_green_button_csv(&csv, "home-7", "Nowhere/City").is_err());
        assert!(parse_green_button_csv("TYPE,DATE\n", "home-7", "UTC").is_err());
    }
}
