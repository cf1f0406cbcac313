//! Client channels over mutual TLS, for services that call each other and for the CLI.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::TlsPaths;
use crate::NetError;

/// Options of a client connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Per-call deadline applied to every RPC on the channel.
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// A lazily connecting mTLS channel to `url` (`https://host:port`). `server_name` is the DNS
/// name expected in the server certificate (the dev PKI puts `localhost` and the service name).
pub fn channel(
    url: &str,
    server_name: &str,
    tls: &TlsPaths,
    opts: &ClientOptions,
) -> Result<Channel, NetError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| NetError::Config(format!("bad endpoint URL {url:?}: {e}")))?
        .tls_config(tls.client_config(server_name)?)?
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// Polls `grpc.health.v1.Health/Check` for `service` until it reports SERVING or `deadline`
/// passes; returns the last error on timeout. Used by `psm demo` and the end-to-end tests to wait
/// for freshly started processes.
pub async fn wait_serving(
    channel: Channel,
    service: &str,
    deadline: Duration,
) -> Result<(), NetError> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let start = tokio::time::Instant::now();
    let mut client = HealthClient::new(channel);
    loop {
        let last = match client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
        {
            Ok(resp)
                if resp.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
            {
                return Ok(())
            }
            Ok(resp) => format!("status {:?}", resp.get_ref().status()),
            Err(e) => format!("{}: {}", e.code(), e.message()),
        };
        if start.elapsed() >= deadline {
            return Err(NetError::Config(format!(
                "{service} not SERVING after {deadline:?}: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a StreamReadings call to ingest for `meters` over `range` on `track` (compute and
/// keyshares both read stored batches this way). Transport errors become UNAVAILABLE naming
/// ingest.
pub async fn stream_readings(
    ingest: Channel,
    meters: Vec<String>,
    range: psm_proto::v1::TimeRange,
    track: psm_proto::v1::Track,
) -> Result<tonic::Streaming<psm_proto::v1::ReadingBatch>, tonic::Status> {
    Ok(psm_proto::v1::ingest_client::IngestClient::new(ingest)
        .max_decoding_message_size(crate::config::DEFAULT_MAX_RESPONSE_BYTES)
        .stream_readings(psm_proto::v1::StreamReadingsRequest {
            meter_ids: meters,
            range: Some(range),
            track: track as i32,
        })
        .await
        .map_err(|e| tonic::Status::unavailable(format!("ingest: {}", e.message())))?
        .into_inner())
}

/// The next batch of a StreamReadings stream; transport errors become UNAVAILABLE.
pub async fn next_reading(
    stream: &mut tonic::Streaming<psm_proto::v1::ReadingBatch>,
) -> Result<Option<psm_proto::v1::ReadingBatch>, tonic::Status> {
    stream
        .message()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("ingest: {}", e.message())))
}
