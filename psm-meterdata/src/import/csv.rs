//! Plain CSV: `meter_id,timestamp,wh[,channel]`, read with a real CSV parser (quoted fields,
//! a header row naming the columns in any order, or none).

use std::collections::BTreeMap;

use psm_core::readings::is_label;

use super::{err, Flow, ImportError, Lines, Parsed, Reading, Series};

/// Column positions of a plain CSV.
struct Columns {
    meter: usize,
    time: usize,
    wh: usize,
    channel: Option<usize>,
}

fn header(fields: &csv::StringRecord) -> Option<Columns> {
    let names: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
    if !names.first().is_some_and(|f| f.starts_with("meter")) {
        return None;
    }
    let find = |alts: &[&str]| names.iter().position(|n| alts.contains(&n.as_str()));
    Some(Columns {
        meter: find(&["meter_id", "meter", "meterid"]).unwrap_or(0),
        time: find(&["timestamp", "time", "start", "interval_start"]).unwrap_or(1),
        wh: find(&["wh", "value", "energy_wh"]).unwrap_or(2),
        channel: find(&["channel", "flow", "direction"]),
    })
}

/// Parses `meter_id,timestamp,wh[,channel]` records. Timestamps are Unix seconds or RFC 3339
/// with an offset, each the start of its interval; the interval length of each meter is the
/// spacing of its readings. The channel is `import` or `export` (one register each, never
/// negative); without one a value is net (negative = exported). A header row is recognised by a
/// first field starting with "meter"; its names place the columns.
pub fn parse_plain_csv(text: &str) -> Result<Parsed, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut cols = Columns {
        meter: 0,
        time: 1,
        wh: 2,
        channel: Some(3),
    };
    let mut by: BTreeMap<(String, Flow), Vec<Reading>> = BTreeMap::new();
    let mut lines = Lines::new(text);
    for (n, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| {
            let line = lines.of_position(e.position());
            err(format!("line {line}: {e}"))
        })?;
        let line = lines.of_position(rec.position());
        if n == 0 {
            if let Some(h) = header(&rec) {
                cols = h;
                continue;
            }
        }
        if rec.iter().all(str::is_empty) {
            continue;
        }
        let get = |i: usize, what: &str| {
            rec.get(i).ok_or_else(|| {
                err(format!(
                    "line {line}: no {what} column (expected meter_id,timestamp,wh[,channel])"
                ))
            })
        };
        let meter = get(cols.meter, "meter_id")?;
        if !is_label(meter) {
            return Err(err(format!(
                "line {line}: meter id {meter:?} must be 1..=128 of [A-Za-z0-9._-]"
            )));
        }
        let ts = get(cols.time, "timestamp")?;
        let start = match ts.parse::<i64>() {
            Ok(t) => t,
            Err(_) => chrono::DateTime::parse_from_rfc3339(ts)
                .map_err(|e| err(format!("line {line}: timestamp {ts:?}: {e}")))?
                .timestamp(),
        };
        let wh_text = get(cols.wh, "wh")?;
        let wh = wh_text
            .parse::<i64>()
            .map_err(|_| err(format!("line {line}: {wh_text:?} is not an integer Wh")))?;
        let flow = match cols
            .channel
            .and_then(|c| rec.get(c))
            .map(str::to_ascii_lowercase)
        {
            None => Flow::Net,
            Some(c) if c.is_empty() || c == "net" => Flow::Net,
            Some(c) if c == "import" || c == "delivered" => Flow::Import,
            Some(c) if c == "export" || c == "received" => Flow::Export,
            Some(c) => {
                return Err(err(format!(
                    "line {line}: channel {c:?} is not import, export or net"
                )))
            }
        };
        by.entry((meter.to_owned(), flow))
            .or_default()
            .push(Reading {
                start,
                seconds: None,
                wh,
                line,
            });
    }
    Ok(Parsed {
        series: by
            .into_iter()
            .map(|((meter_id, flow), readings)| Series {
                meter_id,
                flow,
                interval_hint: None,
                readings,
            })
            .collect(),
        notes: Vec::new(),
    })
}
