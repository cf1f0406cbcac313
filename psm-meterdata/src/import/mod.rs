//! Importing real meter data: Green Button (NAESB ESPI Atom/XML and a utility's CSV export), a
//! plain CSV of (meter id, timestamp, Wh[, channel]) and AEMO NEM12, turned into UTC meter-days
//! ready to encrypt.
//!
//! Importers keep going: a file that parses is never rejected for what its readings say.
//! Readings that cannot be stored as they are — an interval of the wrong length (a 2-hour
//! reading on a daylight-saving day), off its boundary, a monthly reading, two different values
//! for one interval, a value out of range — are left out, and the day they fall on is reported
//! partial (or skipped, with nothing left) with the reason. Identical duplicates are merged.
//! Only input that cannot be read at all (bad syntax, an unparsable number or time) is an error,
//! and it names the line.

use std::collections::BTreeMap;

use psm_core::linear::{INTERVALS, MAX_READING_WH};
use psm_core::readings::{format_day, DAY_SECONDS};
use serde::Serialize;

mod csv;
mod espi;
mod gbcsv;
mod nem12;

pub use self::csv::parse_plain_csv;
pub use espi::parse_green_button;
pub use gbcsv::{is_green_button_csv, parse_green_button_csv};
pub use nem12::{is_nem12, parse_nem12};

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ImportError(pub String);

fn err(m: impl Into<String>) -> ImportError {
    ImportError(m.into())
}

/// Which register a series is: energy delivered to the customer (import), fed back to the grid
/// (export), or one signed net value per interval (import = max(v, 0), export = max(−v, 0)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    Net,
    Import,
    Export,
}

impl Flow {
    pub fn name(self) -> &'static str {
        match self {
            Flow::Net => "net",
            Flow::Import => "import",
            Flow::Export => "export",
        }
    }
}

/// One reading as a file states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// UTC start, Unix seconds.
    pub start: i64,
    /// Its length in seconds when the file says; otherwise the series' interval.
    pub seconds: Option<i64>,
    pub wh: i64,
    /// The line of the file it came from (1-based), for reports.
    pub line: usize,
}

/// One meter's readings of one register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub meter_id: String,
    pub flow: Flow,
    /// The interval length the file declares (ESPI intervalLength, NEM12 IntervalLength);
    /// without one, the most common reading length, or the smallest spacing of the readings.
    pub interval_hint: Option<u32>,
    pub readings: Vec<Reading>,
}

/// Something a parser left out before readings reached a day (a local time that does not
/// exist, a register that is not energy), reported on the UTC day of `unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub meter_id: String,
    pub flow: Flow,
    pub unix: i64,
    pub text: String,
}

/// What a parser read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub series: Vec<Series>,
    pub notes: Vec<Note>,
}

/// Consecutive intervals of one UTC meter-day and register: a whole day, or one run of an
/// incomplete day. One linear-track batch per channel carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterDay {
    pub meter_id: String,
    pub flow: Flow,
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

/// How much of a meter-day is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DayStatus {
    /// Every interval of the UTC day.
    Complete,
    /// Some intervals: the day's edges are outside the file, or readings were left out.
    Partial,
    /// Readings fell on the day, none could be stored.
    Skipped,
}

/// The account of one meter-day and register: what is stored and what was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayReport {
    pub meter_id: String,
    pub flow: Flow,
    /// "YYYY-MM-DD" (UTC).
    pub day: String,
    pub status: DayStatus,
    /// The series' interval length (0 when it has none that can be stored).
    pub interval_seconds: u32,
    /// Intervals stored, and how many the UTC day has.
    pub stored: usize,
    pub expected: usize,
    /// Each reason, once per kind, with the times it applies to.
    pub notes: Vec<String>,
}

/// Meter-days ready to encrypt, and the report of every meter-day the file touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    pub days: Vec<MeterDay>,
    pub report: Vec<DayReport>,
}

impl Imported {
    /// Meter-days by status: (complete, partial, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |s| self.report.iter().filter(|r| r.status == s).count();
        (
            n(DayStatus::Complete),
            n(DayStatus::Partial),
            n(DayStatus::Skipped),
        )
    }

    /// Readings stored.
    pub fn readings(&self) -> usize {
        self.days.iter().map(|d| d.values.len()).sum()
    }
}

fn hhmm(unix: i64) -> String {
    let s = unix.rem_euclid(DAY_SECONDS);
    format!("{:02}:{:02}", s / 3600, s % 3600 / 60)
}

/// Notes of one meter-day, grouped by kind: "kind: 01:00, 02:00 (2)".
#[derive(Default)]
struct DayNotes(BTreeMap<String, Vec<String>>);

impl DayNotes {
    fn add(&mut self, kind: &str, at: String) {
        self.0.entry(kind.to_owned()).or_default().push(at);
    }

    fn render(self) -> Vec<String> {
        self.0
            .into_iter()
            .map(|(kind, at)| {
                const SHOWN: usize = 6;
                let mut list = at
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if at.len() > SHOWN {
                    list.push_str(&format!(" and {} more", at.len() - SHOWN));
                }
                if list.is_empty() {
                    kind
                } else {
                    format!("{kind}: {list}")
                }
            })
            .collect()
    }
}

/// The series' interval: declared, else the most common stated length, else the smallest
/// spacing of its starts (ties to the shorter).
fn interval_of(s: &Series) -> Option<i64> {
    if let Some(i) = s.interval_hint {
        return Some(i64::from(i));
    }
    let mut lengths: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &s.readings {
        if let Some(l) = r.seconds {
            *lengths.entry(l).or_default() += 1;
        }
    }
    if let Some((l, _)) = lengths
        .iter()
        .max_by_key(|(l, n)| (**n, std::cmp::Reverse(**l)))
    {
        return Some(*l);
    }
    let mut starts: Vec<i64> = s.readings.iter().map(|r| r.start).collect();
    starts.sort_unstable();
    starts.dedup();
    starts.windows(2).map(|w| w[1] - w[0]).min()
}

/// Places every series' readings into UTC meter-days, leaving out (and reporting) what cannot
/// be stored. Never fails: a file that parsed imports everything valid in it.
pub fn to_days(parsed: &Parsed) -> Imported {
    // Per (meter, flow): day → (interval, slot → value, notes).
    type Key = (String, Flow);
    let mut out = Imported::default();
    let mut notes: BTreeMap<(Key, i64), DayNotes> = BTreeMap::new();
    for n in &parsed.notes {
        notes
            .entry(((n.meter_id.clone(), n.flow), n.unix.div_euclid(DAY_SECONDS)))
            .or_default()
            .add(&n.text, String::new());
    }
    // A meter is either net (one signed value per interval, split into both channels) or has
    // import/export registers: both at once would put two bodies on one channel's slots.
    let registers: std::collections::BTreeSet<&str> = parsed
        .series
        .iter()
        .filter(|s| s.flow != Flow::Net && !s.readings.is_empty())
        .map(|s| s.meter_id.as_str())
        .collect();
    // Series of the same meter and register are one series (an ESPI usage point may hold the
    // same register in several MeterReadings).
    let mut merged: BTreeMap<Key, Series> = BTreeMap::new();
    for s in &parsed.series {
        if s.flow == Flow::Net && registers.contains(s.meter_id.as_str()) {
            for r in &s.readings {
                let day = r.start.div_euclid(DAY_SECONDS);
                notes.entry(((s.meter_id.clone(), Flow::Net), day)).or_default().add(
                    "net readings left out: the file also has import/export registers for this meter",
                    format!("{} (line {})", hhmm(r.start), r.line),
                );
            }
            continue;
        }
        let e = merged
            .entry((s.meter_id.clone(), s.flow))
            .or_insert_with(|| Series {
                readings: Vec::new(),
                ..s.clone()
            });
        if e.interval_hint.is_none() {
            e.interval_hint = s.interval_hint;
        }
        e.readings.extend_from_slice(&s.readings);
    }
    let mut intervals: BTreeMap<Key, u32> = BTreeMap::new();
    let mut days: BTreeMap<(Key, i64), Vec<(u32, i64)>> = BTreeMap::new();
    for (key, s) in &merged {
        let interval = interval_of(s);
        let stored_interval = interval
            .and_then(|i| u32::try_from(i).ok())
            .filter(|i| INTERVALS.contains(i));
        let Some(iv) = stored_interval else {
            let why = match interval {
                Some(i) => {
                    format!("readings of {i} s: only 5, 15, 30 or 60-minute intervals are stored")
                }
                None => "a single reading: its interval length cannot be told".to_owned(),
            };
            for r in &s.readings {
                let day = r.start.div_euclid(DAY_SECONDS);
                notes
                    .entry((key.clone(), day))
                    .or_default()
                    .add(&why, hhmm(r.start));
                days.entry((key.clone(), day)).or_default();
            }
            continue;
        };
        intervals.insert(key.clone(), iv);
        let step = i64::from(iv);
        // Per day of this series: notes, and (slot, value) in slot order. Readings sorted by
        // start, so duplicates are neighbours and a day's slots come in order.
        let mut series_notes: BTreeMap<i64, DayNotes> = BTreeMap::new();
        let mut series_days: BTreeMap<i64, Vec<(u32, i64)>> = BTreeMap::new();
        let store = |start: i64, v: i64, days: &mut BTreeMap<i64, Vec<(u32, i64)>>| {
            let day = start.div_euclid(DAY_SECONDS);
            let slot = (start.rem_euclid(DAY_SECONDS) / step) as u32;
            days.entry(day).or_default().push((slot, v));
        };
        let mut readings = s.readings.clone();
        readings.sort_by_key(|r| (r.start, r.line));
        // The reading kept for the start being read: (start, value, line, conflicting).
        let mut last: Option<(i64, i64, usize, bool)> = None;
        for r in readings {
            let day = r.start.div_euclid(DAY_SECONDS);
            let n = series_notes.entry(day).or_default();
            series_days.entry(day).or_default();
            let len = r.seconds.unwrap_or(step);
            if r.start < 0 {
                n.add(
                    "readings before 1970, left out",
                    format!("{} (line {})", r.start, r.line),
                );
                continue;
            }
            if len != step {
                n.add(
                    &format!("readings not {iv} s long, left out"),
                    format!("{} ({len} s, line {})", hhmm(r.start), r.line),
                );
                continue;
            }
            if r.start.rem_euclid(step) != 0 {
                n.add(
                    &format!("readings off the {iv}-s boundaries, left out"),
                    format!("{} (line {})", hhmm(r.start), r.line),
                );
                continue;
            }
            let negative_register = r.wh < 0 && s.flow != Flow::Net;
            if negative_register || r.wh.abs() > MAX_READING_WH {
                n.add(
                    &format!(
                        "values outside 0..={MAX_READING_WH} Wh{}, left out",
                        if s.flow == Flow::Net {
                            " (either sign)"
                        } else {
                            ""
                        }
                    ),
                    format!("{} ({} Wh, line {})", hhmm(r.start), r.wh, r.line),
                );
                continue;
            }
            match &mut last {
                Some((start, v, _, _)) if *start == r.start && *v == r.wh => n.add(
                    "identical duplicate readings merged",
                    format!("{} (line {})", hhmm(r.start), r.line),
                ),
                Some((start, v, line, conflict)) if *start == r.start => {
                    if !*conflict {
                        n.add(
                            "different readings for one interval, both left out",
                            format!(
                                "{} ({} Wh line {line}, {} Wh line {})",
                                hhmm(r.start),
                                v,
                                r.wh,
                                r.line
                            ),
                        );
                    }
                    *conflict = true;
                }
                _ => {
                    if let Some((start, v, _, false)) = last {
                        store(start, v, &mut series_days);
                    }
                    last = Some((r.start, r.wh, r.line, false));
                }
            }
        }
        if let Some((start, v, _, false)) = last {
            store(start, v, &mut series_days);
        }
        for (day, n) in series_notes {
            if !n.0.is_empty() {
                let into = notes.entry((key.clone(), day)).or_default();
                for (kind, at) in n.0 {
                    into.0.entry(kind).or_default().extend(at);
                }
            }
        }
        for (day, slots) in series_days {
            days.entry((key.clone(), day)).or_default().extend(slots);
        }
    }
    let mut all_days: Vec<(Key, i64)> = days.keys().cloned().collect();
    for k in notes.keys() {
        if !days.contains_key(k) {
            all_days.push(k.clone());
        }
    }
    all_days.sort();
    for key_day in all_days {
        let ((meter, flow), day) = &key_day;
        let slots = days.remove(&key_day).unwrap_or_default();
        let slots: BTreeMap<u32, i64> = slots.into_iter().collect();
        let iv = intervals.get(&(meter.clone(), *flow)).copied().unwrap_or(0);
        let expected = if iv == 0 {
            0
        } else {
            (DAY_SECONDS / i64::from(iv)) as usize
        };
        let mut runs: Vec<MeterDay> = Vec::new();
        for (i, v) in &slots {
            match runs.last_mut() {
                Some(r) if r.first_interval as usize + r.values.len() == *i as usize => {
                    r.values.push(*v)
                }
                _ => runs.push(MeterDay {
                    meter_id: meter.clone(),
                    flow: *flow,
                    day: *day,
                    interval_seconds: iv,
                    first_interval: *i,
                    values: vec![*v],
                }),
            }
        }
        let stored = slots.len();
        let status = match stored {
            0 => DayStatus::Skipped,
            n if n == expected => DayStatus::Complete,
            _ => DayStatus::Partial,
        };
        let mut day_notes = notes.remove(&key_day).unwrap_or_default().render();
        if status == DayStatus::Partial && runs.len() > 1 {
            day_notes.push(format!(
                "{} runs of consecutive intervals (gaps between them)",
                runs.len()
            ));
        }
        out.report.push(DayReport {
            meter_id: meter.clone(),
            flow: *flow,
            day: format_day(*day),
            status,
            interval_seconds: iv,
            stored,
            expected,
            notes: day_notes,
        });
        out.days.extend(runs);
    }
    out
}

/// Line numbers of byte offsets met in increasing order (the CSV reader's record positions),
/// counted once over the text.
struct Lines<'a> {
    text: &'a [u8],
    at: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Lines {
            text: text.as_bytes(),
            at: 0,
            line: 1,
        }
    }

    /// The line (1-based) of byte offset `byte`.
    fn of(&mut self, byte: u64) -> usize {
        let to = (byte as usize).min(self.text.len());
        if to >= self.at {
            self.line += self.text[self.at..to]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            self.at = to;
            self.line
        } else {
            line_at(std::str::from_utf8(self.text).unwrap_or(""), to)
        }
    }

    /// The line of a CSV record or error position.
    /// The reader may place a record after blank lines at their start: skip them.
    fn of_position(&mut self, p: Option<&::csv::Position>) -> usize {
        let Some(p) = p else { return 0 };
        let mut b = p.byte() as usize;
        while self.text.get(b).is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b += 1;
        }
        self.of(b as u64)
    }
}

/// Line number (1-based) of byte offset `at` in `text`.
fn line_at(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
