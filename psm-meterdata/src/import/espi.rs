//! Green Button ESPI (NAESB REQ.21) Atom feeds: one meter per UsagePoint, one register per
//! ReadingType flowDirection (1 delivered = import, 19 received = export).

use std::collections::HashMap;

use psm_core::readings::is_label;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::{err, line_at, Flow, ImportError, Note, Parsed, Reading, Series};

#[derive(Default)]
struct Entry {
    self_href: String,
    up_href: String,
    related: Vec<String>,
    kind: String,
    interval_length: Option<u32>,
    power_of_ten: i32,
    uom: Option<u32>,
    flow_direction: Option<u32>,
    /// start, duration, value, line
    readings: Vec<(i64, i64, i64, usize)>,
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

/// Parses a Green Button ESPI feed: every UsagePoint becomes a meter (`<prefix>-<customer>-
/// <point>`), its MeterReadings' IntervalBlocks give the readings, scaled by the linked
/// ReadingType (`uom` 72 = Wh, `powerOfTenMultiplier`), each with its own duration. Times are
/// UTC epoch seconds (LocalTimeParameters only describe local display time, so they do not move
/// data). A MeterReading in another unit is left out and noted; XML errors name the line.
pub fn parse_green_button(xml: &str, prefix: &str) -> Result<Parsed, ImportError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut entries: Vec<Entry> = Vec::new();
    let mut cur: Option<Entry> = None;
    let mut path: Vec<String> = Vec::new();
    let mut reading = (None::<i64>, 0i64, None::<i64>);
    // Line numbers, counted as the reader moves on (once over the text in all).
    let (mut line, mut counted) = (1usize, 0usize);
    loop {
        let ev = reader.read_event().map_err(|e| {
            let at = reader.buffer_position() as usize;
            err(format!("line {}: XML error: {e}", line_at(xml, at)))
        })?;
        let pos = (reader.buffer_position() as usize).min(xml.len());
        line += xml.as_bytes()[counted.min(pos)..pos]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        counted = counted.max(pos);
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
                    reading = (None, 0, None);
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
                    s.parse::<i64>().map_err(|_| {
                        err(format!("line {line}: <{last}> holds {s:?}, not an integer"))
                    })
                };
                match (entry.kind.as_str(), parent, last) {
                    ("ReadingType", _, "intervalLength") => {
                        entry.interval_length = Some(num(&text)? as u32)
                    }
                    ("ReadingType", "ReadingType", "powerOfTenMultiplier") => {
                        entry.power_of_ten = num(&text)? as i32
                    }
                    ("ReadingType", "ReadingType", "uom") => entry.uom = Some(num(&text)? as u32),
                    ("ReadingType", "ReadingType", "flowDirection") => {
                        entry.flow_direction = Some(num(&text)? as u32)
                    }
                    ("IntervalBlock", "timePeriod", "start")
                        if path.iter().any(|p| p == "IntervalReading") =>
                    {
                        reading.0 = Some(num(&text)?)
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
                    match (cur.as_mut(), reading.0, reading.2) {
                        (Some(entry), Some(start), Some(v)) => {
                            entry.readings.push((start, reading.1, v, line))
                        }
                        (Some(_), None, Some(_)) => {
                            return Err(err(format!(
                                "line {line}: an IntervalReading without a timePeriod start"
                            )))
                        }
                        _ => {}
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

    // One link, one reading type: two different ones under one href (feeds joined from two
    // customers) would give one customer's readings the other's direction or scale.
    let mut reading_types: HashMap<&str, &Entry> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == "ReadingType") {
        if let Some(seen) = reading_types.insert(e.self_href.as_str(), e) {
            let shape = |t: &Entry| (t.flow_direction, t.uom, t.power_of_ten, t.interval_length);
            if shape(seen) != shape(e) {
                return Err(err(format!(
                    "reading type {:?} appears twice with different flowDirection, uom, powerOfTenMultiplier or intervalLength; give each its own link",
                    e.self_href
                )));
            }
        }
    }
    // Meter readings by their usage point, interval blocks by their meter reading, each in
    // document order: one pass, whatever the number of usage points.
    let mut meter_readings: HashMap<&str, Vec<&Entry>> = HashMap::new();
    let mut blocks: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in &entries {
        match e.kind.as_str() {
            "MeterReading" => {
                if let Some(at) = e.self_href.rfind("/MeterReading") {
                    meter_readings
                        .entry(&e.self_href[..at])
                        .or_default()
                        .push(e);
                }
            }
            "IntervalBlock" => blocks.entry(e.up_href.as_str()).or_default().push(e),
            _ => {}
        }
    }
    // Two usage points whose links give one id ("a-b"/"c" and "a"/"b-c") would merge two
    // customers' readings.
    let mut ids: HashMap<String, &str> = HashMap::new();
    let mut out = Parsed::default();
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
        if let Some(other) = ids.insert(id.clone(), up.self_href.as_str()) {
            if other != up.self_href {
                return Err(err(format!(
                    "usage points {other:?} and {:?} both give meter id {id:?}; import them with distinct prefixes or rename one",
                    up.self_href
                )));
            }
        }
        for mr in meter_readings
            .get(up.self_href.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
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
            let blocks_up = format!("{}/IntervalBlock", mr.self_href);
            let readings: Vec<&(i64, i64, i64, usize)> = blocks
                .get(blocks_up.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .flat_map(|b| &b.readings)
                .collect();
            // flowDirection 1 = forward (delivered to the customer), 19 = reverse (received
            // from the customer); none stated is forward.
            let flow = match rt.flow_direction {
                None | Some(1) => Flow::Import,
                Some(19) => Flow::Export,
                Some(other) => {
                    if let Some(first) = readings.first() {
                        out.notes.push(Note {
                            meter_id: id.clone(),
                            flow: Flow::Import,
                            unix: first.0,
                            text: format!(
                                "{}: flowDirection {other} is neither delivered (1) nor received (19), {} readings left out",
                                mr.self_href,
                                readings.len()
                            ),
                        });
                    }
                    continue;
                }
            };
            if rt.uom != Some(72) {
                if let Some(first) = readings.first() {
                    out.notes.push(Note {
                        meter_id: id.clone(),
                        flow,
                        unix: first.0,
                        text: format!(
                            "{}: unit of measure {:?} is not Wh (uom 72), {} readings left out",
                            mr.self_href,
                            rt.uom,
                            readings.len()
                        ),
                    });
                }
                continue;
            }
            let scale = |v: i64| -> i64 {
                if rt.power_of_ten >= 0 {
                    v.saturating_mul(10i64.saturating_pow(rt.power_of_ten as u32))
                } else {
                    let d = 10i128.pow(rt.power_of_ten.unsigned_abs().min(18));
                    psm_tariff::div_round(i128::from(v), d) as i64
                }
            };
            out.series.push(Series {
                meter_id: id.clone(),
                flow,
                interval_hint: None,
                readings: readings
                    .iter()
                    .map(|(start, duration, value, line)| Reading {
                        start: *start,
                        seconds: (*duration > 0).then_some(*duration),
                        wh: scale(*value),
                        line: *line,
                    })
                    .collect(),
            });
        }
    }
    if out.series.is_empty() && out.notes.is_empty() {
        return Err(err("no usage point with interval readings in this file"));
    }
    Ok(out)
}
