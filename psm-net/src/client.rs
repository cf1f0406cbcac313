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

/// A lazily connecting mTLS channel to `url` (`https://host:port`). The server must present a
/// certificate for DNS name `server_name` (the dev PKI puts `localhost` and the service name)
/// whose SPIFFE id is `server_name` under `server_role` (any service role when None) in our
/// trust domain ([`TlsPaths::client_config`]).
pub fn channel(
    url: &str,
    server_name: &str,
    server_role: Option<crate::Role>,
    tls: &TlsPaths,
    opts: &ClientOptions,
) -> Result<Channel, NetError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        NetError::Config(format!("endpoint URL {url:?} must start with https://"))
    })?;
    let config = std::sync::Arc::new(tls.client_config(server_name, server_role)?);
    let sni = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| NetError::Config(format!("server name {server_name:?}: {e}")))?;
    let connect_timeout = opts.connect_timeout;
    // TLS is done here, with the SPIFFE-checking verifier; tonic sees a plain connection.
    let connector = tower::service_fn(move |uri: http::Uri| {
        let (config, sni) = (config.clone(), sni.clone());
        async move {
            let io = |m: String| std::io::Error::other(m);
            let host = uri.host().ok_or_else(|| io(format!("no host in {uri}")))?;
            let port = uri.port_u16().unwrap_or(443);
            let tls = tokio::time::timeout(connect_timeout, async {
                let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config)
                    .connect(sni, tcp)
                    .await
            })
            .await
            .map_err(|_| {
                io(format!(
                    "no TLS connection to {host}:{port} within {connect_timeout:?}"
                ))
            })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|e| NetError::Config(format!("bad endpoint URL {url:?}: {e}")))?
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout);
    Ok(endpoint.connect_with_connector_lazy(connector))
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

/// Why stored readings could not be fetched exactly as asked ([`fetch_days`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Ingest could not be reached or failed the stream.
    #[error("ingest: {0}")]
    Unavailable(String),
    /// A stored batch whose bytes are not its hash, or stored twice: store corruption.
    #[error("the stored readings of {meter} {day} {reason}")]
    Corrupt {
        meter: String,
        day: String,
        reason: &'static str,
    },
    /// The stored batch is not the one the caller named (another ciphertext hash).
    #[error("input {meter} {day} does not match the reading stored at ingest")]
    NotNamed { meter: String, day: String },
    /// No batch stored for a wanted (meter, day).
    #[error("input {meter} {day} is not stored at ingest")]
    Missing { meter: String, day: String },
}

/// (meter id, canonical day) → the ciphertext hash the caller expects there, if it names one.
pub type Wanted = std::collections::BTreeMap<(String, String), Option<Vec<u8>>>;

/// Streams the `track` batches of every wanted (meter, day) within `range` from ingest, keeps
/// exactly those, checks each against its own hash (and the expected one, when named), and
/// requires every one: the one loop compute and the re-executing keyshares fetch inputs with.
pub async fn fetch_days(
    ingest: Channel,
    wanted: &Wanted,
    range: psm_proto::v1::TimeRange,
    track: psm_proto::v1::Track,
) -> Result<std::collections::BTreeMap<(String, String), psm_proto::v1::ReadingBatch>, FetchError> {
    let meters: std::collections::BTreeSet<&String> = wanted.keys().map(|(m, _)| m).collect();
    let unavailable = |s: tonic::Status| FetchError::Unavailable(s.message().to_owned());
    let mut stream = stream_readings(ingest, meters.into_iter().cloned().collect(), range, track)
        .await
        .map_err(unavailable)?;
    let mut got = std::collections::BTreeMap::new();
    while let Some(b) = next_reading(&mut stream).await.map_err(unavailable)? {
        let key = (b.meter_id.clone(), b.day.clone());
        let Some(expected) = wanted.get(&key) else {
            continue;
        };
        let corrupt = |reason| FetchError::Corrupt {
            meter: b.meter_id.clone(),
            day: b.day.clone(),
            reason,
        };
        if blake3::hash(&b.ciphertext).as_bytes().as_slice() != b.ciphertext_hash.as_slice() {
            return Err(corrupt("do not match their hash"));
        }
        if expected.as_ref().is_some_and(|h| *h != b.ciphertext_hash) {
            return Err(FetchError::NotNamed {
                meter: b.meter_id,
                day: b.day,
            });
        }
        if got.contains_key(&key) {
            return Err(corrupt("are stored twice"));
        }
        got.insert(key, b);
    }
    if let Some((meter, day)) = wanted.keys().find(|k| !got.contains_key(*k)) {
        return Err(FetchError::Missing {
            meter: meter.clone(),
            day: day.clone(),
        });
    }
    Ok(got)
}
