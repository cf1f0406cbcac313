use super::*;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{SAMPLES}/{name}"))
        .unwrap_or_else(|e| panic!("sample {name}: {e}"))
}

fn report<'a>(i: &'a Imported, meter: &str, flow: Flow, day: &str) -> &'a DayReport {
    i.report
        .iter()
        .find(|r| r.meter_id == meter && r.flow == flow && r.day == day)
        .unwrap_or_else(|| panic!("no report for {meter} {flow:?} {day}: {:#?}", i.report))
}

/// (start, duration, value) of an IntervalReading.
type Espi = (i64, i64, i64);

/// A minimal ESPI feed: one usage point, one MeterReading per (flowDirection, readings).
fn espi(streams: &[(u32, &[Espi])]) -> String {
    let mut x = String::from(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi">
<entry><link rel="self" href="/espi/1_1/resource/RetailCustomer/7/UsagePoint/1"/>
<content><espi:UsagePoint/></content></entry>
"#,
    );
    for (i, (flow, readings)) in streams.iter().enumerate() {
        let mr = format!("/espi/1_1/resource/RetailCustomer/7/UsagePoint/1/MeterReading/{i}");
        x.push_str(&format!(
            r#"<entry><link rel="self" href="{mr}"/><link rel="related" href="/espi/1_1/resource/ReadingType/{i}"/>
<content><espi:MeterReading/></content></entry>
<entry><link rel="self" href="/espi/1_1/resource/ReadingType/{i}"/>
<content><espi:ReadingType><espi:flowDirection>{flow}</espi:flowDirection><espi:intervalLength>3600</espi:intervalLength><espi:powerOfTenMultiplier>0</espi:powerOfTenMultiplier><espi:uom>72</espi:uom></espi:ReadingType></content></entry>
<entry><link rel="up" href="{mr}/IntervalBlock"/><content><espi:IntervalBlock>
"#
        ));
        for (start, duration, value) in readings.iter() {
            x.push_str(&format!(
                "<espi:IntervalReading><espi:timePeriod><espi:duration>{duration}</espi:duration><espi:start>{start}</espi:start></espi:timePeriod><espi:value>{value}</espi:value></espi:IntervalReading>\n"
            ));
        }
        x.push_str("</espi:IntervalBlock></content></entry>\n");
    }
    x.push_str("</feed>\n");
    x
}

#[test]
fn green_button_single_point_15_min() {
    let parsed = parse_green_button(&read("greenbutton/15minLP_15Days.xml"), "gb").unwrap();
    assert_eq!(parsed.series.len(), 1);
    let s = &parsed.series[0];
    assert_eq!(
        (s.meter_id.as_str(), s.flow),
        ("gb-9b6c7063-01", Flow::Import)
    );
    assert_eq!(s.readings.len(), 1340);
    assert_eq!(
        (s.readings[0].start, s.readings[0].wh),
        (1_330_578_000, 324)
    );
    let i = to_days(&parsed);
    assert!(i.days.iter().all(|d| d.interval_seconds == 900));
    // Every reading is stored: whole UTC days and the runs at the file's edges.
    assert_eq!(i.readings(), 1340);
    let (complete, partial, skipped) = i.counts();
    assert_eq!((complete, skipped), (13, 0));
    assert!(partial >= 1, "the sample starts and ends mid-day");
    assert!(i
        .report
        .iter()
        .all(|r| r.notes.iter().all(|n| !n.contains("left out"))));
}

#[test]
fn green_button_five_points_hourly() {
    let parsed =
        parse_green_button(&read("greenbutton/1hrLP_32DaysFiveUsagePoints_M.xml"), "gb").unwrap();
    assert_eq!(parsed.series.len(), 5);
    let i = to_days(&parsed);
    assert_eq!(i.readings(), 3840);
    let ids: std::collections::BTreeSet<&str> =
        i.days.iter().map(|d| d.meter_id.as_str()).collect();
    assert_eq!(ids.len(), 5, "one meter per usage point");
}

#[test]
fn espi_irregular_readings_make_a_day_partial_and_never_abort() {
    let d = 20_000 * 86_400; // a UTC midnight
    let h = 3600;
    let mut import: Vec<(i64, i64, i64)> = (0..24).map(|k| (d + k * h, h, 100 + k)).collect();
    // A 2-hour reading (as on a daylight-saving day) instead of hours 5 and 6.
    import.retain(|(s, _, _)| *s != d + 5 * h && *s != d + 6 * h);
    import.push((d + 5 * h, 2 * h, 999));
    // An identical duplicate, and a reading out of order.
    import.push((d + 3 * h, h, 103));
    import.swap(0, 10);
    // Two different values for hour 9: both left out.
    import.push((d + 9 * h, h, 7));
    // The next day, complete.
    import.extend((0..24).map(|k| (d + 86_400 + k * h, h, 50)));
    // Export (flowDirection 19) at midday, and a monthly reading on another MeterReading of the
    // same register, which cannot be stored.
    let export: Vec<(i64, i64, i64)> = (10..16).map(|k| (d + k * h, h, 40)).collect();
    let monthly = [(d - 30 * 86_400, 30 * 86_400, 900_000)];
    let xml = espi(&[(1, &import), (19, &export), (1, &monthly)]);
    let parsed = parse_green_button(&xml, "gb").unwrap();
    let i = to_days(&parsed);

    let first = report(&i, "gb-7-1", Flow::Import, &format_day(20_000));
    assert_eq!(first.status, DayStatus::Partial);
    assert_eq!(
        first.stored,
        24 - 2 - 1,
        "hours 5-6 (one reading of 2 h) and 9 left out"
    );
    let notes = first.notes.join("\n");
    assert!(
        notes.contains("readings not 3600 s long, left out: 05:00 (7200 s, line"),
        "{notes}"
    );
    assert!(
        notes.contains("different readings for one interval, both left out: 09:00 (109 Wh"),
        "{notes}"
    );
    assert!(
        notes.contains("identical duplicate readings merged: 03:00"),
        "{notes}"
    );
    assert_eq!(
        report(&i, "gb-7-1", Flow::Import, &format_day(20_001)).status,
        DayStatus::Complete
    );
    // The monthly reading's day: nothing stored, and why.
    let month = report(&i, "gb-7-1", Flow::Import, &format_day(19_970));
    assert_eq!(month.status, DayStatus::Skipped);
    assert!(
        month.notes[0].contains("readings not 3600 s long"),
        "{:?}",
        month.notes
    );
    // Export is its own register.
    let ex = report(&i, "gb-7-1", Flow::Export, &format_day(20_000));
    assert_eq!((ex.status, ex.stored), (DayStatus::Partial, 6));
    let stored: Vec<(u32, Vec<i64>)> = i
        .days
        .iter()
        .filter(|m| m.flow == Flow::Import && m.day == 20_000)
        .map(|m| (m.first_interval, m.values.clone()))
        .collect();
    assert_eq!(
        stored,
        vec![
            (0, vec![100, 101, 102, 103, 104]),
            (7, vec![107, 108]),
            (10, (110..124).collect())
        ]
    );
    // Malformed XML names the line.
    let broken = xml.replacen(
        "<espi:value>101</espi:value>",
        "<espi:value>1o1</espi:value>",
        1,
    );
    let e = parse_green_button(&broken, "gb").unwrap_err();
    assert!(e.0.starts_with("line ") && e.0.contains("\"1o1\""), "{e}");
    let e = parse_green_button(
        &xml.replacen("</espi:IntervalBlock>", "</espi:Interval>", 1),
        "gb",
    )
    .unwrap_err();
    assert!(e.0.starts_with("line "), "{e}");
}

#[test]
fn plain_csv_with_quotes_channels_and_a_header_in_any_order() {
    let d = 20_418 * 86_400;
    let mut csv = String::from("wh_first_is_not_a_header\n");
    csv.clear();
    csv.push_str("meter_id,channel,wh,timestamp\n");
    for k in 0..96 {
        csv.push_str(&format!("\"m-1\",import,{},{}\n", k, d + k * 900));
    }
    for k in 40..50 {
        csv.push_str(&format!("m-1,\"export\",{},{}\n", 5, d + k * 900));
    }
    // Out of order and a merged duplicate.
    csv.push_str(&format!("m-2,,-3,{}\n", d + 3600));
    csv.push_str(&format!("m-2,,5,\"{}\"\n", "2025-11-26T00:00:00Z"));
    csv.push_str(&format!("m-2,,5,{}\n", d));
    let i = to_days(&parse_plain_csv(&csv).unwrap());
    assert_eq!(
        report(&i, "m-1", Flow::Import, "2025-11-26").status,
        DayStatus::Complete
    );
    let ex = report(&i, "m-1", Flow::Export, "2025-11-26");
    assert_eq!(
        (ex.status, ex.stored, ex.expected),
        (DayStatus::Partial, 10, 96)
    );
    let net = report(&i, "m-2", Flow::Net, "2025-11-26");
    assert_eq!((net.interval_seconds, net.stored), (3600, 2));
    assert!(
        net.notes[0].contains("identical duplicate"),
        "{:?}",
        net.notes
    );
    assert!(i
        .days
        .iter()
        .any(|m| m.meter_id == "m-2" && m.values == vec![5, -3]));
    // A header is optional; errors name the line.
    assert_eq!(
        parse_plain_csv("m-1,0,1\nm-1,900,2\n")
            .unwrap()
            .series
            .len(),
        1
    );
    let e = parse_plain_csv("m-1,0,1\nm-1,yesterday,2\n").unwrap_err();
    assert!(e.0.starts_with("line 2: timestamp \"yesterday\""), "{e}");
    let e = parse_plain_csv("m-1,0,1\n\nm-1,900,1.5\n").unwrap_err();
    assert!(e.0.starts_with("line 3:") && e.0.contains("1.5"), "{e}");
    let e = parse_plain_csv("m-1,0,1,sideways\n").unwrap_err();
    assert!(e.0.contains("line 1: channel \"sideways\""), "{e}");
    assert!(parse_plain_csv("m 1,0,1\n")
        .unwrap_err()
        .0
        .starts_with("line 1"));
    assert!(parse_plain_csv("m-1,0\n")
        .unwrap_err()
        .0
        .contains("no wh column"));
    // 10-minute spacing is reported, not refused.
    let i = to_days(&parse_plain_csv("m-1,0,1\nm-1,600,2\n").unwrap());
    assert_eq!(i.report[0].status, DayStatus::Skipped);
    assert!(
        i.report[0].notes[0].contains("readings of 600 s"),
        "{:?}",
        i.report
    );
    // Values a meter cannot report are left out, the rest kept.
    let i = to_days(
        &parse_plain_csv("m-1,0,1,import\nm-1,900,-4,import\nm-1,1800,1000000,import\n").unwrap(),
    );
    assert_eq!(i.readings(), 1);
    assert!(
        i.report[0].notes[0].contains("values outside"),
        "{:?}",
        i.report
    );
}

#[test]
fn green_button_csv_dst_both_ways_and_net_columns() {
    // 2026-11-01 in New York: 01:00-02:00 local happens twice.
    let mut csv = String::from("Name,Jane Doe\nAccount Number,123\n\nTYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES\n");
    for (i, (t, end)) in [
        ("00:00", "00:59"),
        ("01:00", "01:59"),
        ("01:00", "01:59"),
        ("02:00", "02:59"),
    ]
    .iter()
    .enumerate()
    {
        csv.push_str(&format!(
            "Electric usage,2026-11-01,{t},{end},0.{i}5,kWh,\"$0,01\",\n"
        ));
    }
    assert!(is_green_button_csv(&csv));
    let p = parse_green_button_csv(&csv, "home-7", "America/New_York").unwrap();
    let starts: Vec<i64> = p.series[0].readings.iter().map(|r| r.start).collect();
    let base = 1_793_505_600; // 00:00 EDT = 04:00Z
    assert_eq!(starts, vec![base, base + 3600, base + 7200, base + 10_800]);
    assert_eq!(
        p.series[0]
            .readings
            .iter()
            .map(|r| r.wh)
            .collect::<Vec<_>>(),
        vec![50, 150, 250, 350]
    );
    // Spring forward, 2026-03-08: 02:00 does not exist, and the utility wrote a 2-hour row.
    let mut spring =
        String::from("TYPE,DATE,START TIME,END TIME,IMPORT (kWh),EXPORT (kWh),NOTES\n");
    for (t, end, imp, exp) in [
        ("00:00", "00:59", "1.0", "0"),
        ("01:00", "02:59", "2.0", "0"),
        ("02:00", "02:59", "9.9", "0"),
        ("03:00", "03:59", "1.5", "0.25"),
    ] {
        spring.push_str(&format!(
            "Electric usage,2026-03-08,{t},{end},{imp},{exp},\n"
        ));
    }
    let p = parse_green_button_csv(&spring, "home-7", "America/New_York").unwrap();
    let i = to_days(&p);
    let imp = report(&i, "home-7", Flow::Import, "2026-03-08");
    assert_eq!(imp.stored, 2, "00:00 and 03:00 local");
    let notes = imp.notes.join("\n");
    assert!(
        notes.contains("does not exist in America/New_York"),
        "{notes}"
    );
    assert!(notes.contains("readings not 3600 s long"), "{notes}");
    assert!(i
        .days
        .iter()
        .any(|d| d.flow == Flow::Export && d.values.contains(&250)));
    // Errors name the line.
    let e = parse_green_button_csv(&csv.replace("0.25", "lots"), "home-7", "America/New_York")
        .unwrap_err();
    assert!(e.0.starts_with("line 7:"), "{e}");
    assert!(parse_green_button_csv(&csv, "home-7", "Nowhere/City").is_err());
    assert!(parse_green_button_csv("TYPE,DATE\n", "home-7", "UTC").is_err());
}

#[test]
fn nem12_import_export_quality_and_market_time() {
    let text = read("nem12/net-30min.csv");
    assert!(is_nem12(&text));
    let p = parse_nem12(&text).unwrap();
    let i = to_days(&p);
    let stored = |flow| {
        i.days
            .iter()
            .filter(|d| d.meter_id == "QB00000001" && d.flow == flow)
            .map(|d| d.values.len())
            .sum::<usize>()
    };
    // 33 market days of 48 intervals; 4 null import intervals, one null export day.
    assert_eq!(stored(Flow::Import), 33 * 48 - 4);
    assert_eq!(stored(Flow::Export), 32 * 48);
    // Market time is UTC+10: 2025-12-31 00:00 AEST is 2025-12-30 14:00 UTC.
    let first = p.series[0].readings[0];
    assert_eq!(
        first.start,
        chrono::NaiveDate::from_ymd_opt(2025, 12, 30)
            .unwrap()
            .and_hms_opt(14, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp()
    );
    assert_eq!(first.seconds, Some(1800));
    // Intervals 21..24 of 31 December (market time) are 00:00-02:00 UTC on the 31st.
    let jan15 = report(&i, "QB00000001", Flow::Import, "2025-12-31");
    assert!(
        jan15.notes.iter().any(|n| n.contains("intervals 21..24")),
        "{:?}",
        jan15.notes
    );
    assert_eq!((jan15.status, jan15.stored), (DayStatus::Partial, 44));
    let e = report(&i, "QB00000001", Flow::Export, "2026-01-31");
    assert!(
        e.notes.iter().any(|n| n.contains("null data (quality N)")),
        "{:?}",
        e.notes
    );
    // Values are kWh with three decimals: exact Wh.
    let raw: f64 = text
        .lines()
        .nth(2)
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(first.wh, (raw * 1000.0).round() as i64);

    let five = to_days(&parse_nem12(&read("nem12/5min.csv")).unwrap());
    assert_eq!(five.readings(), 288);
    assert!(five.days.iter().all(|d| d.interval_seconds == 300));

    // Malformed records name their line.
    let e = parse_nem12("100,NEM12,1,A,B\n300,20270114,1\n").unwrap_err();
    assert!(e.0.starts_with("line 2: a 300 record before"), "{e}");
    let short = text.replacen(",0.971,", ",", 1);
    let e = parse_nem12(&short).unwrap_err();
    assert!(
        e.0.starts_with("line 3:") && e.0.contains("48 values"),
        "{e}"
    );
    let e = parse_nem12(&text.replacen("0.550", "x.550", 1)).unwrap_err();
    assert!(e.0.starts_with("line 3: interval value 2"), "{e}");
    assert!(parse_nem12("200,X\n").is_err());
}

#[test]
fn a_meter_is_net_or_has_registers_never_both() {
    // Rows without a channel (net) and rows of an import register for one meter would both be
    // encrypted on the import channel over the same slots: the net rows are left out.
    let d = 20_418 * 86_400;
    let mut csv = String::new();
    for k in 0..24 {
        csv.push_str(&format!("m-1,{},{},import\n", d + k * 3600, 10 + k));
        csv.push_str(&format!("m-1,{},{}\n", d + k * 3600, -5));
    }
    let i = to_days(&parse_plain_csv(&csv).unwrap());
    assert!(i.days.iter().all(|m| m.flow == Flow::Import));
    assert_eq!(i.readings(), 24);
    let net = report(&i, "m-1", Flow::Net, "2025-11-26");
    assert_eq!((net.status, net.stored), (DayStatus::Skipped, 0));
    assert!(
        net.notes[0].contains("net readings left out"),
        "{:?}",
        net.notes
    );
    // The same in a Green Button CSV with USAGE and EXPORT columns.
    let mut gb = String::from("TYPE,DATE,START TIME,END TIME,USAGE,EXPORT (kWh),NOTES\n");
    for h in 0..24 {
        gb.push_str(&format!(
            "Electric usage,2025-11-26,{h:02}:00,{h:02}:59,0.5,0.1,\n"
        ));
    }
    let i = to_days(&parse_green_button_csv(&gb, "home-1", "UTC").unwrap());
    assert!(i.days.iter().all(|m| m.flow == Flow::Export));
    assert_eq!(i.readings(), 24);
}

#[test]
fn outside_input_that_once_panicked_or_misread() {
    // A NEM12 300 record with nothing after it.
    let e =
        parse_nem12("100,NEM12,1,A,B\n200,QB1,E1,E1,E1,N1,M,kWh,30,20260201\n300\n").unwrap_err();
    assert!(e.0.starts_with("line 3:"), "{e}");
    // A Green Button CSV with Windows line ends and a non-ASCII preamble.
    let mut gb = String::from("Name,José Müller\r\nAccount,4711\r\n\r\nTYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES\r\n");
    for h in 0..24 {
        gb.push_str(&format!(
            "Electric usage,2025-11-26,{h:02}:00,{h:02}:59,0.25,kWh,$0.01,\r\n"
        ));
    }
    gb.push_str("Natural gas usage,2025-11-26,00:00,23:59,3.1,therms,$2.00,\r\n");
    let p = parse_green_button_csv(&gb, "home-2", "UTC").unwrap();
    let i = to_days(&p);
    assert_eq!(i.readings(), 24);
    assert_eq!(i.report[0].status, DayStatus::Complete);
    assert!(
        i.report[0]
            .notes
            .iter()
            .any(|n| n.contains("not electricity")),
        "{:?}",
        i.report
    );
    // An ESPI reading without a start is an error naming its line, not a reading at 1970.
    let xml = espi(&[(1, &[(86_400, 3600, 5)])]).replace("<espi:start>86400</espi:start>", "");
    let e = parse_green_button(&xml, "gb").unwrap_err();
    assert!(
        e.0.starts_with("line ") && e.0.contains("without a timePeriod start"),
        "{e}"
    );
    // Readings before 1970 are left out, not an abort later.
    let i = to_days(&parse_plain_csv("m-1,-3600,1\nm-1,0,2\nm-1,3600,3\n").unwrap());
    assert_eq!(i.readings(), 2);
    assert!(i
        .report
        .iter()
        .any(|r| r.notes.iter().any(|n| n.contains("before 1970"))));
}

#[test]
fn espi_usage_points_that_give_one_meter_id_are_refused() {
    let d = 20_418 * 86_400;
    let one = espi(&[(1, &[(d, 3600, 5)])]);
    let a = one.replace(
        "RetailCustomer/7/UsagePoint/1",
        "RetailCustomer/7-1/UsagePoint/1",
    );
    let b = one.replace(
        "RetailCustomer/7/UsagePoint/1",
        "RetailCustomer/7/UsagePoint/1-1",
    );
    let body = b.split_once("<entry>").unwrap().1;
    let both = format!("{}<entry>{body}", a.trim_end().trim_end_matches("</feed>"));
    // Each alone imports as meter gb-7-1-1; together they would merge two customers.
    for x in [&a, &b] {
        let p = parse_green_button(x, "gb").unwrap();
        assert_eq!(p.series.len(), 1);
        assert_eq!(p.series[0].meter_id, "gb-7-1-1");
    }
    let e = parse_green_button(&both, "gb").unwrap_err();
    assert!(
        e.0.contains("both give meter id \"gb-7-1-1\"") && e.0.contains("7-1/UsagePoint/1"),
        "{e}"
    );
}

#[test]
fn espi_one_reading_type_link_with_two_meanings_is_refused() {
    let d = 20_418 * 86_400;
    // Two customers' feeds joined: both MeterReadings link ReadingType/0, one delivered, one
    // received. Either could otherwise take the other's direction.
    let a = espi(&[(1, &[(d, 3600, 5)])]);
    let b = espi(&[(19, &[(d, 3600, 7)])]).replace(
        "RetailCustomer/7/UsagePoint/1",
        "RetailCustomer/8/UsagePoint/1",
    );
    let body = b.split_once("<entry>").unwrap().1;
    let both = format!("{}<entry>{body}", a.trim_end().trim_end_matches("</feed>"));
    let e = parse_green_button(&both, "gb").unwrap_err();
    assert!(
        e.0.contains("ReadingType/0") && e.0.contains("appears twice"),
        "{e}"
    );
    // The same reading type twice (one customer's feed repeated) is still one meaning.
    let same = both.replace(
        "<espi:flowDirection>19</espi:flowDirection>",
        "<espi:flowDirection>1</espi:flowDirection>",
    );
    let p = parse_green_button(&same, "gb").unwrap();
    assert_eq!(p.series.len(), 2);
}
