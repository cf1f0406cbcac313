//! `psm bill`, `psm aggregate`, `psm analytics`: the operator's requests to compute-svc, with
//! periods in local dates, tables for people, `--json` for scripts and progress for long jobs.
//!
//! Every request gets an idempotency key derived from what it asks (unless `--key` names one),
//! so running the same command again returns the stored result instead of a second release.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use psm_proto::v1::compute_client::ComputeClient;
use psm_proto::v1::{
    AggregateRequest, AnalyticsRequest, BillRequest, Channel, QuorumReport, TimeRange,
    WatchJobRequest,
};
use serde_json::json;
use tonic::transport::Channel as GrpcChannel;

use crate::client_args::ClientArgs;

/// The certificate the requests go out with unless `--identity` says otherwise.
const IDENTITY: &str = "operator/billing";

/// Most meters one `--meters-file` may list (the largest cohort compute accepts).
const MAX_METERS: usize = psm_core::linear::MAX_COHORT;

#[derive(clap::Args)]
pub struct BillArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The meter to bill.
    #[arg(long)]
    meter: String,
    /// The tariff file (TOML, docs/tariffs.md); its time zone places the dates.
    #[arg(long)]
    tariff: PathBuf,
    /// First local day of the period (YYYY-MM-DD), from local midnight.
    #[arg(long)]
    from: String,
    /// Local day after the period (YYYY-MM-DD), up to local midnight: a billing cycle on the
    /// 15th runs --from 2027-01-15 --to 2027-02-15.
    #[arg(long)]
    to: String,
    /// The meter's key epoch.
    #[arg(long, default_value_t = 1)]
    epoch: u32,
    /// Re-issue a bill for exactly the same period, stating why (keyshares log it).
    #[arg(long, default_value = "")]
    reissue_reason: String,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(clap::Args)]
pub struct AggregateArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    cohort: CohortArgs,
    /// First local day (YYYY-MM-DD).
    #[arg(long)]
    from: String,
    /// Local day after the range (YYYY-MM-DD); at most 31 days.
    #[arg(long)]
    to: String,
    /// IANA time zone of the dates and of the printed interval starts.
    #[arg(long, default_value = "UTC")]
    time_zone: String,
    /// Output interval in seconds: a multiple of 300 that divides a day.
    #[arg(long, default_value_t = 3600)]
    granularity: u32,
    /// import, export, or net (import minus export, from one release per channel).
    #[arg(long, value_enum, default_value_t = ChannelArg::Import)]
    channel: ChannelArg,
    /// The meters' key epoch.
    #[arg(long, default_value_t = 1)]
    epoch: u32,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(clap::Args)]
pub struct AnalyticsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    cohort: CohortArgs,
    /// First UTC day (YYYY-MM-DD): analytics read the meters' daily registers, kept per UTC day.
    #[arg(long)]
    from: String,
    /// UTC day after the range (YYYY-MM-DD).
    #[arg(long)]
    to: String,
    /// Histogram band edges on each meter's period total, kWh, ascending: "0,100,200,400".
    #[arg(long, value_delimiter = ',', required = true)]
    edges_kwh: Vec<u64>,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(clap::Args)]
struct CohortArgs {
    /// A meter of the cohort (repeat, or give a comma-separated list).
    #[arg(long = "meter", value_delimiter = ',')]
    meters: Vec<String>,
    /// A file with one meter id per line ('#' starts a comment).
    #[arg(long)]
    meters_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct OutputArgs {
    /// Print the result as JSON on stdout (no table, no progress).
    #[arg(long)]
    json: bool,
    /// The request's idempotency key; by default one derived from the request, so the same
    /// command returns the same stored result.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ChannelArg {
    Import,
    Export,
    Net,
}

/// A derived idempotency key: "cli-<what>-" and 32 hex digits of a hash of the request.
fn derived_key(what: &str, request: &impl prost::Message) -> String {
    let h = blake3::hash(&request.encode_to_vec());
    format!("cli-{what}-{}", &h.to_hex()[..32])
}

fn parse_date(s: &str, flag: &str) -> anyhow::Result<NaiveDate> {
    psm_tariff::parse_date(s).map_err(|_| anyhow::anyhow!("{flag} {s:?} is not a date YYYY-MM-DD"))
}

/// [local midnight of `from`, local midnight of `to`) in `tz`, UTC seconds.
fn local_period(tz: Tz, from: &str, to: &str) -> anyhow::Result<TimeRange> {
    let start = day_start(tz, parse_date(from, "--from")?)?;
    let end = day_start(tz, parse_date(to, "--to")?)?;
    if end <= start {
        bail!("--to {to} must be after --from {from}");
    }
    Ok(TimeRange {
        start_unix: start,
        end_unix: end,
    })
}

fn day_start(tz: Tz, d: NaiveDate) -> anyhow::Result<i64> {
    psm_tariff::day_start(tz, d).with_context(|| format!("{d} has no start in {tz}"))
}

fn local_time(tz: Tz, unix: i64) -> String {
    tz.timestamp_opt(unix, 0)
        .single()
        .map_or(unix.to_string(), |t| {
            t.format("%Y-%m-%d %H:%M %Z").to_string()
        })
}

/// Minor units as a decimal amount: ISO 4217 exponents (0 for JPY and the like, 3 for BHD…).
fn money(minor: i64, currency: &str) -> String {
    let exponent = match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    };
    if exponent == 0 {
        return minor.to_string();
    }
    let unit = 10i64.pow(exponent);
    let sign = if minor < 0 { "-" } else { "" };
    format!(
        "{sign}{}.{:0width$}",
        minor.unsigned_abs() / unit as u64,
        minor.unsigned_abs() % unit as u64,
        width = exponent as usize
    )
}

fn kwh(wh: i64) -> String {
    format!("{:.3}", wh as f64 / 1000.0)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn quorum_json(q: Option<&QuorumReport>) -> serde_json::Value {
    match q {
        Some(q) => json!({
            "used": q.used,
            "faults": q.faults.iter().map(|f| json!({"party": f.party, "reason": f.reason})).collect::<Vec<_>>(),
            "cross_checked": q.cross_checked,
        }),
        None => serde_json::Value::Null,
    }
}

fn quorum_text(q: Option<&QuorumReport>) -> String {
    let Some(q) = q else {
        return "quorum: not reported".into();
    };
    let mut s = format!(
        "decrypted by {}{}",
        q.used.join(", "),
        if q.cross_checked {
            " (cross-checked)"
        } else {
            " (not cross-checked: one keyshare alone could have shifted a share)"
        }
    );
    for f in &q.faults {
        s.push_str(&format!(
            "\nfaulty or unavailable: {}: {}",
            f.party, f.reason
        ));
    }
    s
}

fn cohort(args: &CohortArgs) -> anyhow::Result<Vec<String>> {
    let mut meters = args.meters.clone();
    if let Some(path) = &args.meters_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                meters.push(line.to_owned());
            }
        }
    }
    if meters.is_empty() {
        bail!("name the cohort with --meter or --meters-file");
    }
    if meters.len() > MAX_METERS {
        bail!(
            "{} meters; a request covers at most {MAX_METERS}",
            meters.len()
        );
    }
    for m in &meters {
        psm_core::readings::validate_meter_id(m).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    meters.sort();
    meters.dedup();
    Ok(meters)
}

/// Runs `call` while following the job's progress on stderr (unless `quiet`).
async fn with_progress<T>(
    channel: &GrpcChannel,
    key: &str,
    quiet: bool,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    let watch = {
        let (bar, mut client, key) = (
            bar.clone(),
            ComputeClient::new(channel.clone()),
            key.to_owned(),
        );
        async move {
            // The job appears when compute has accepted the request; until then, and between
            // streams, ask again.
            loop {
                if let Ok(resp) = client
                    .watch_job(WatchJobRequest {
                        idempotency_key: key.clone(),
                    })
                    .await
                {
                    let mut s = resp.into_inner();
                    while let Ok(Some(p)) = s.message().await {
                        bar.set_position(u64::from(p.percent.min(100)));
                        bar.set_message(p.step);
                        if p.done {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    // The watch ends when the job is done, possibly before the answer arrives: then wait for
    // the answer alone.
    tokio::pin!(call);
    let result = tokio::select! {
        r = &mut call => r,
        _ = watch => call.await,
    };
    bar.finish_and_clear();
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn bill(a: BillArgs) -> anyhow::Result<()> {
    let tariff = psm_tariff::file::load(&a.tariff)?;
    let period = local_period(tariff.tariff.tz, &a.from, &a.to)?;
    let mut req = BillRequest {
        idempotency_key: String::new(),
        meter_id: a.meter.clone(),
        period: Some(period),
        tariff: Some(tariff.wire.clone()),
        reissue_reason: a.reissue_reason.clone(),
        epoch: a.epoch,
    };
    req.idempotency_key = a
        .out
        .key
        .clone()
        .unwrap_or_else(|| derived_key("bill", &req));
    let key = req.idempotency_key.clone();
    let rt = runtime()?;
    let resp = rt.block_on(async {
        let channel = a.client.channel(IDENTITY)?;
        let mut client = ComputeClient::new(channel.clone());
        let call = client.bill(req);
        with_progress(&channel, &key, a.out.json, call).await
    })?;
    let tz = tariff.tariff.tz;
    let p = resp.period.unwrap_or(period);
    if a.out.json {
        let out = json!({
            "idempotency_key": key,
            "meter_id": resp.meter_id,
            "tariff": tariff.wire.name,
            "tariff_hash": hex::encode(tariff.hash),
            "period": {
                "start_unix": p.start_unix,
                "end_unix": p.end_unix,
                "start_local": local_time(tz, p.start_unix),
                "end_local": local_time(tz, p.end_unix),
            },
            "currency": resp.currency,
            "lines": resp.lines.iter().map(|l| json!({
                "description": l.description,
                "energy_wh": l.energy_wh,
                "amount": l.amount,
            })).collect::<Vec<_>>(),
            "standing_charge": resp.standing_charge,
            "subtotal": resp.subtotal,
            "vat": resp.vat,
            "total": resp.total,
            "quorum": quorum_json(resp.quorum.as_ref()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let cur = resp.currency.as_str();
    println!(
        "Bill for {} under {:?}, {} to {}",
        resp.meter_id,
        tariff.wire.name,
        local_time(tz, p.start_unix),
        local_time(tz, p.end_unix)
    );
    let mut t = table(&["", "kWh", &format!("amount ({cur})")]);
    for l in &resp.lines {
        let energy = if l.energy_wh == 0 && !l.description.ends_with("import") {
            String::new()
        } else {
            kwh(l.energy_wh)
        };
        t.add_row(vec![
            Cell::new(&l.description),
            Cell::new(energy).set_alignment(CellAlignment::Right),
            Cell::new(money(l.amount, cur)).set_alignment(CellAlignment::Right),
        ]);
    }
    for (what, v) in [
        ("standing charge", resp.standing_charge),
        ("subtotal", resp.subtotal),
        ("VAT", resp.vat),
        ("total", resp.total),
    ] {
        t.add_row(vec![
            Cell::new(what),
            Cell::new(""),
            Cell::new(money(v, cur)).set_alignment(CellAlignment::Right),
        ]);
    }
    println!("{t}");
    println!("{}", quorum_text(resp.quorum.as_ref()));
    Ok(())
}

pub fn aggregate(a: AggregateArgs) -> anyhow::Result<()> {
    let tz: Tz = a
        .time_zone
        .parse()
        .map_err(|_| anyhow::anyhow!("--time-zone {:?} is not an IANA time zone", a.time_zone))?;
    let range = local_period(tz, &a.from, &a.to)?;
    let meters = cohort(&a.cohort)?;
    let channels: &[Channel] = match a.channel {
        ChannelArg::Import => &[Channel::Import],
        ChannelArg::Export => &[Channel::Export],
        ChannelArg::Net => &[Channel::Import, Channel::Export],
    };
    let rt = runtime()?;
    let channel = {
        let _g = rt.enter();
        a.client.channel(IDENTITY)?
    };
    let mut results = Vec::new();
    for ch in channels {
        let mut req = AggregateRequest {
            idempotency_key: String::new(),
            meter_ids: meters.clone(),
            range: Some(range),
            granularity_seconds: a.granularity,
            epoch: a.epoch,
            channel: *ch as i32,
        };
        req.idempotency_key = match &a.out.key {
            Some(k) if channels.len() == 1 => k.clone(),
            Some(k) => format!("{k}/{}", ch.as_str_name().to_ascii_lowercase()),
            None => derived_key("aggregate", &req),
        };
        let key = req.idempotency_key.clone();
        let resp = rt.block_on(async {
            let mut client = ComputeClient::new(channel.clone());
            let call = client.aggregate(req);
            with_progress(&channel, &key, a.out.json, call).await
        })?;
        results.push((key, resp));
    }
    let (first_key, first) = &results[0];
    // Per interval: (energy, effective cohort) of each channel; net where both are released.
    let rows: Vec<(i64, Option<i64>, u32, Vec<i64>)> = first
        .interval_start_unix
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let per: Vec<(i64, u32)> = results
                .iter()
                .map(|(_, r)| {
                    (
                        r.energy_wh.get(i).copied().unwrap_or(0),
                        r.interval_cohort_size.get(i).copied().unwrap_or(0),
                    )
                })
                .collect();
            let released = per.iter().all(|(_, c)| *c > 0);
            let value = released.then(|| match per.as_slice() {
                [(imp, _), (exp, _)] => imp - exp,
                [(v, _)] => *v,
                _ => 0,
            });
            let cohort = per.iter().map(|(_, c)| *c).min().unwrap_or(0);
            (*s, value, cohort, per.iter().map(|(v, _)| *v).collect())
        })
        .collect();
    let name = match a.channel {
        ChannelArg::Import => "import",
        ChannelArg::Export => "export",
        ChannelArg::Net => "net",
    };
    if a.out.json {
        let out = json!({
            "idempotency_keys": results.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "channel": name,
            "granularity_seconds": a.granularity,
            "cohort_size": first.cohort_size,
            "headend_encrypted": first.headend_encrypted,
            "intervals": rows.iter().map(|(s, v, c, per)| {
                let mut o = json!({
                    "start_unix": s,
                    "start_local": local_time(tz, *s),
                    "energy_wh": v,
                    "cohort": c,
                });
                if per.len() == 2 {
                    o["import_wh"] = json!(per[0]);
                    o["export_wh"] = json!(per[1]);
                }
                o
            }).collect::<Vec<_>>(),
            "quorum": results.iter().map(|(_, r)| quorum_json(r.quorum.as_ref())).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{name} energy of {} meters, {} intervals of {} s (key {first_key})",
        first.cohort_size,
        rows.len(),
        a.granularity
    );
    let mut t = table(&["interval start", &format!("{name} kWh"), "cohort"]);
    for (s, v, c, _) in &rows {
        t.add_row(vec![
            Cell::new(local_time(tz, *s)),
            Cell::new(v.map_or("withheld".into(), kwh)).set_alignment(CellAlignment::Right),
            Cell::new(c).set_alignment(CellAlignment::Right),
        ]);
    }
    println!("{t}");
    if !first.headend_encrypted.is_empty() {
        println!(
            "encrypted by a head-end (plaintext to the utility): {}",
            first.headend_encrypted.join(", ")
        );
    }
    for (_, r) in &results {
        println!("{}", quorum_text(r.quorum.as_ref()));
    }
    Ok(())
}

pub fn analytics(a: AnalyticsArgs) -> anyhow::Result<()> {
    let range = local_period(chrono_tz::UTC, &a.from, &a.to)?;
    let meters = cohort(&a.cohort)?;
    let edges: Vec<u64> = a
        .edges_kwh
        .iter()
        .map(|k| k.checked_mul(1000).context("an edge is too large"))
        .collect::<anyhow::Result<_>>()?;
    let mut req = AnalyticsRequest {
        idempotency_key: String::new(),
        meter_ids: meters,
        range: Some(range),
        band_edges_wh: edges.clone(),
    };
    req.idempotency_key = a
        .out
        .key
        .clone()
        .unwrap_or_else(|| derived_key("analytics", &req));
    let key = req.idempotency_key.clone();
    let rt = runtime()?;
    let resp = rt.block_on(async {
        let channel = a.client.channel(IDENTITY)?;
        let mut client = ComputeClient::new(channel.clone());
        let call = client.analytics(req);
        with_progress(&channel, &key, a.out.json, call).await
    })?;
    let band = |i: usize| {
        let lo = a.edges_kwh[i];
        match a.edges_kwh.get(i + 1) {
            Some(hi) => format!("{lo} to {hi} kWh"),
            None => format!("{lo} kWh and more"),
        }
    };
    if a.out.json {
        let out = json!({
            "idempotency_key": key,
            "cohort_size": resp.cohort_size,
            "bands": resp.counts.iter().enumerate().map(|(i, c)| json!({
                "from_wh": edges.get(i),
                "to_wh": edges.get(i + 1),
                "count": c,
            })).collect::<Vec<_>>(),
            "quorum": quorum_json(resp.quorum.as_ref()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "period totals of {} meters, {} to {} (UTC days)",
        resp.cohort_size, a.from, a.to
    );
    let mut t = table(&["band", "meters"]);
    for (i, c) in resp.counts.iter().enumerate() {
        t.add_row(vec![
            Cell::new(band(i)),
            Cell::new(c).set_alignment(CellAlignment::Right),
        ]);
    }
    println!("{t}");
    println!("{}", quorum_text(resp.quorum.as_ref()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_follows_the_currency_exponent() {
        assert_eq!(money(123_456, "USD"), "1234.56");
        assert_eq!(money(-5, "GBP"), "-0.05");
        assert_eq!(money(1_500, "JPY"), "1500");
        assert_eq!(money(1_005, "KWD"), "1.005");
    }

    #[test]
    fn periods_are_local_midnights() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let p = local_period(ny, "2027-01-15", "2027-02-15").unwrap();
        assert_eq!(p.start_unix % 86_400, 5 * 3600);
        assert_eq!(p.end_unix - p.start_unix, 31 * 86_400);
        assert!(local_period(ny, "2027-02-15", "2027-01-15").is_err());
        assert!(local_period(ny, "2027-1-15", "2027-02-15").is_err());
        // Where a DST change swallows midnight (Santiago, September), the day starts at 01:00.
        let scl: Tz = "America/Santiago".parse().unwrap();
        let d = NaiveDate::from_ymd_opt(2026, 9, 6).unwrap();
        let s = day_start(scl, d).unwrap();
        assert_eq!(
            scl.timestamp_opt(s, 0).unwrap().format("%H:%M").to_string(),
            "01:00"
        );
    }
}
