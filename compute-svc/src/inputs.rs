//! Request checks and stored-input handling shared by the computations.

use crate::error::ComputeError;
use psm_core::linear::envelope::MAX_EPOCH;
use psm_core::readings::DAY_SECONDS;
use psm_core::wire::LinearBatch;
use psm_proto::v1::{ReadingBatch, TimeRange, Track};
use tonic::transport::Channel;

/// 1..=128 printable ASCII characters.
pub fn check_idempotency_key(k: &str) -> Result<(), ComputeError> {
    if (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ComputeError::invalid(
            "idempotency_key must be 1..=128 printable ASCII characters",
        ))
    }
}

/// A request's cohort: distinct, valid meter ids, at least `min` (the cohort minimum, named
/// in the refusal as what `what` releases) and at most `max`.
pub fn check_cohort<'a>(
    meter_ids: &'a [String],
    min: usize,
    max: usize,
    what: &str,
) -> Result<std::collections::BTreeSet<&'a str>, ComputeError> {
    let cohort: std::collections::BTreeSet<&str> = meter_ids.iter().map(String::as_str).collect();
    if cohort.len() != meter_ids.len() {
        return Err(ComputeError::invalid("meter_ids lists a meter twice"));
    }
    for m in &cohort {
        psm_core::readings::validate_meter_id(m)
            .map_err(|e| ComputeError::invalid(e.to_string()))?;
    }
    if cohort.len() < min {
        return Err(ComputeError::precondition(format!(
            "cohort of {} meters is below the minimum of {min}: {what} of fewer meters are not released",
            cohort.len()
        )));
    }
    if cohort.len() > max {
        return Err(ComputeError::exhausted(format!(
            "cohort of {} meters; the limit is {max}",
            cohort.len()
        )));
    }
    Ok(cohort)
}

/// A range of whole UTC days, at most `max_days` long: (first day number, number of days).
pub fn whole_days(range: Option<&TimeRange>, max_days: i64) -> Result<(i64, i64), ComputeError> {
    let r = range.ok_or_else(|| ComputeError::invalid("a time range is required"))?;
    if r.start_unix % DAY_SECONDS != 0
        || r.end_unix % DAY_SECONDS != 0
        || r.end_unix <= r.start_unix
    {
        return Err(ComputeError::invalid(
            "the range must be whole UTC days: start and end at 00:00 UTC, end after start",
        ));
    }
    let days = r
        .end_unix
        .checked_sub(r.start_unix)
        .map_or(i64::MAX, |d| d / DAY_SECONDS);
    if days > max_days {
        return Err(ComputeError::invalid(format!(
            "range spans {days} days; the limit is {max_days}"
        )));
    }
    Ok((r.start_unix / DAY_SECONDS, days))
}

/// Streams the linear-track batches of `meters` over `range` from ingest.
pub async fn stream_linear(
    ingest: Channel,
    meters: Vec<String>,
    range: TimeRange,
) -> Result<tonic::Streaming<ReadingBatch>, ComputeError> {
    Ok(psm_net::client::stream_readings(ingest, meters, range, Track::Linear).await?)
}

/// The next batch of a stream, mapping transport errors.
pub use psm_net::client::next_reading as next;

/// A stored linear-track batch, checked ([`psm_core::wire::linear_batch`]): ingest checked it
/// on the way in, so one that fails now is store corruption, not the caller's mistake.
pub fn checked_linear(b: &ReadingBatch) -> Result<LinearBatch, ComputeError> {
    psm_core::wire::linear_batch(b).map_err(|e| {
        ComputeError::internal(format!(
            "stored batch of meter {:?} for {:?}: {e}",
            b.meter_id, b.day
        ))
    })
}

/// A request's key epoch: required (the meters' readings are under one), at most
/// [`MAX_EPOCH`].
pub fn check_epoch(epoch: u32) -> Result<u32, ComputeError> {
    match epoch {
        0 => Err(ComputeError::invalid(
            "epoch is required: the key epoch (>= 1) the meters' readings are under",
        )),
        e if e > MAX_EPOCH => Err(ComputeError::invalid(format!(
            "epoch {e} is outside 1..={MAX_EPOCH}"
        ))),
        e => Ok(e),
    }
}

/// Earliest instant a range may start: 2000-01-01T00:00Z (stored days are 2000..=2199).
pub const EARLIEST_UNIX: i64 = 946_684_800;
/// Latest instant a range may end: 2200-01-01T00:00Z.
pub const LATEST_UNIX: i64 = 7_258_118_400;

/// A request's time range: present, start and end multiples of `align` seconds (UTC), end after
/// start, at most `max_seconds` long, within the years stored days can have. `what` names the
/// field in messages ("range", "period").
pub fn check_range(
    range: Option<&TimeRange>,
    align: i64,
    max_seconds: i64,
    what: &str,
) -> Result<TimeRange, ComputeError> {
    let r = range.ok_or_else(|| ComputeError::invalid(format!("a {what} is required")))?;
    if r.start_unix % align != 0 || r.end_unix % align != 0 || r.end_unix <= r.start_unix {
        return Err(ComputeError::invalid(format!(
            "the {what} must start and end on multiples of {align} s (UTC) and end after it starts"
        )));
    }
    if r.start_unix < EARLIEST_UNIX || r.end_unix > LATEST_UNIX {
        return Err(ComputeError::invalid(format!(
            "the {what} must lie within 2000-01-01..2200-01-01 (UTC)"
        )));
    }
    if r.end_unix - r.start_unix > max_seconds {
        return Err(ComputeError::invalid(format!(
            "the {what} spans {} s; the limit is {max_seconds} s ({} days)",
            r.end_unix - r.start_unix,
            max_seconds / DAY_SECONDS
        )));
    }
    Ok(*r)
}

/// The whole UTC days overlapping [start, end): what to stream from ingest, which keys its
/// batches by day.
pub fn covering_days(start_unix: i64, end_unix: i64) -> TimeRange {
    TimeRange {
        start_unix: start_unix.div_euclid(DAY_SECONDS) * DAY_SECONDS,
        end_unix: (end_unix + DAY_SECONDS - 1).div_euclid(DAY_SECONDS) * DAY_SECONDS,
    }
}

/// An instant as an ISO 8601 UTC time, for messages ("2026-03-29T01:15Z").
pub fn format_utc(unix: i64) -> String {
    let day = unix.div_euclid(DAY_SECONDS);
    let secs = unix.rem_euclid(DAY_SECONDS);
    format!(
        "{}T{:02}:{:02}Z",
        psm_core::readings::format_day(day),
        secs / 3600,
        secs % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_days_and_times() {
        assert_eq!(
            tonic::Status::from(check_epoch(0).unwrap_err()).message(),
            "epoch is required: the key epoch (>= 1) the meters' readings are under"
        );
        assert!(check_epoch(MAX_EPOCH + 1).is_err());
        assert_eq!(check_epoch(3).unwrap(), 3);
        let d = 20_000 * DAY_SECONDS;
        assert_eq!(
            covering_days(d + 300, d + DAY_SECONDS + 600),
            TimeRange {
                start_unix: d,
                end_unix: d + 2 * DAY_SECONDS
            }
        );
        assert_eq!(
            covering_days(d, d + DAY_SECONDS),
            TimeRange {
                start_unix: d,
                end_unix: d + DAY_SECONDS
            }
        );
        assert_eq!(format_utc(1_774_747_800), "2026-03-29T01:30Z");
        assert_eq!(
            psm_core::readings::parse_day("2000-01-01").unwrap() * DAY_SECONDS,
            EARLIEST_UNIX
        );
        assert_eq!(
            (psm_core::readings::parse_day("2199-12-31").unwrap() + 1) * DAY_SECONDS,
            LATEST_UNIX
        );
        let r = |s: i64, e: i64| TimeRange {
            start_unix: s,
            end_unix: e,
        };
        assert!(check_range(Some(&r(d, d + 900)), 900, DAY_SECONDS, "range").is_ok());
        assert!(check_range(Some(&r(d + 300, d + 900)), 900, DAY_SECONDS, "range").is_err());
        assert!(check_range(Some(&r(d, d)), 300, DAY_SECONDS, "range").is_err());
        assert!(check_range(Some(&r(d, d + 2 * DAY_SECONDS)), 300, DAY_SECONDS, "range").is_err());
        assert!(check_range(Some(&r(-DAY_SECONDS, 0)), 300, DAY_SECONDS, "range").is_err());
        assert!(check_range(Some(&r(i64::MAX - 7, i64::MAX)), 1, DAY_SECONDS, "range").is_err());
        assert!(check_range(None, 300, DAY_SECONDS, "period")
            .unwrap_err()
            .to_string()
            .contains("period"));
    }
}
