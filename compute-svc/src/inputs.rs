//! Request checks and stored-input handling shared by the computations.

use psm_core::lwe::words_from_le_bytes;
use psm_core::readings::{check_linear_shape, DAY_SECONDS};
use psm_proto::v1::ingest_client::IngestClient;
use psm_proto::v1::{ReadingBatch, StreamReadingsRequest, TimeRange, Track};
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
    Ok(IngestClient::new(ingest)
        .max_decoding_message_size(psm_net::config::DEFAULT_MAX_RESPONSE_BYTES)
        .stream_readings(StreamReadingsRequest {
            meter_ids: meters,
            range: Some(range),
            track: Track::Linear as i32,
        })
        .await
        .map_err(|e| Status::unavailable(format!("ingest: {}", e.message())))?
        .into_inner())
}

/// The next batch of a stream, mapping transport errors.
pub async fn next(
    stream: &mut tonic::Streaming<ReadingBatch>,
) -> Result<Option<ReadingBatch>, Status> {
    stream
        .message()
        .await
        .map_err(|e| Status::unavailable(format!("ingest: {}", e.message())))
}

/// The compact-list words of a stored batch, after checking its key and shape again (compute
/// does not trust the store blindly).
pub fn checked_words(b: &ReadingBatch, linear_key_id: &str) -> Result<Vec<u128>, Status> {
    let kid = b
        .key
        .as_ref()
        .map(|k| k.key_id.as_str())
        .unwrap_or_default();
    if kid != linear_key_id {
        return Err(Status::failed_precondition(format!(
            "{} {} is under key {kid:?}, not {linear_key_id}",
            b.meter_id, b.day
        )));
    }
    check_linear_shape(b.interval_seconds, b.count, b.ciphertext.len())
        .map_err(|e| Status::internal(format!("stored batch {} {}: {e}", b.meter_id, b.day)))?;
    words_from_le_bytes(&b.ciphertext).map_err(|e| Status::internal(e.to_string()))
}
