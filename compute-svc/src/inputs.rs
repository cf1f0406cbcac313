//! Request checks and stored-input handling shared by the computations.

use psm_core::readings::DAY_SECONDS;
use psm_proto::v1::{ReadingBatch, TimeRange, Track};
use tonic::transport::Channel;
use tonic::Status;

/// 1..=128 printable ASCII characters.
pub fn check_idempotency_key(k: &str) -> Result<(), Status> {
    if (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
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
) -> Result<std::collections::BTreeSet<&'a str>, Status> {
    let cohort: std::collections::BTreeSet<&str> = meter_ids.iter().map(String::as_str).collect();
    if cohort.len() != meter_ids.len() {
        return Err(Status::invalid_argument("meter_ids lists a meter twice"));
    }
    for m in &cohort {
        psm_core::readings::validate_meter_id(m)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if cohort.len() < min {
        return Err(Status::failed_precondition(format!(
            "cohort of {} meters is below the minimum of {min}: {what} of fewer meters are not released",
            cohort.len()
        )));
    }
    if cohort.len() > max {
        return Err(Status::resource_exhausted(format!(
            "cohort of {} meters; the limit is {max}",
            cohort.len()
        )));
    }
    Ok(cohort)
}

/// A range of whole UTC days, at most `max_days` long: (first day number, number of days).
pub fn whole_days(range: Option<&TimeRange>, max_days: i64) -> Result<(i64, i64), Status> {
    let r = range.ok_or_else(|| Status::invalid_argument("a time range is required"))?;
    if r.start_unix % DAY_SECONDS != 0
        || r.end_unix % DAY_SECONDS != 0
        || r.end_unix <= r.start_unix
    {
        return Err(Status::invalid_argument(
            "the range must be whole UTC days: start and end at 00:00 UTC, end after start",
        ));
    }
    let days = (r.end_unix - r.start_unix) / DAY_SECONDS;
    if days > max_days {
        return Err(Status::invalid_argument(format!(
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
) -> Result<tonic::Streaming<ReadingBatch>, Status> {
    psm_net::client::stream_readings(ingest, meters, range, Track::Linear).await
}

/// The next batch of a stream, mapping transport errors.
pub use psm_net::client::next_reading as next;

/// The compact-list words of a stored batch, checked ([`psm_core::wire::linear_words`]).
pub fn checked_words(b: &ReadingBatch, linear_key_id: &str) -> Result<Vec<u128>, Status> {
    psm_core::wire::linear_words(b, linear_key_id).map_err(|e| match e.field {
        "key" => Status::failed_precondition(e.to_string()),
        _ => Status::internal(format!("stored batch {e}")),
    })
}
