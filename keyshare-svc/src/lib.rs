//! keyshare-svc: holds one party's replicated shares of the decryption keys and answers
//! partial-decryption requests from compute nodes. The binary is a thin wrapper over [`run`].

use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_net::SpiffeId;
use psm_proto::v1::keyshare_server::{Keyshare, KeyshareServer};
use psm_proto::v1::{
    AuditRecord, GetAuditLogRequest, KeyshareStatus, PartialDecryptRequest, PartialDecryptResponse,
    StatusRequest,
};
use serde::Deserialize;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// Default API address of a keyshare.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

/// The `[keyshare]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyshareSection {}

/// The Keyshare gRPC service.
pub struct KeyshareService {
    me: SpiffeId,
}

impl KeyshareService {
    pub fn new(settings: &ServerSettings) -> Result<Self, psm_net::NetError> {
        Ok(KeyshareService {
            me: settings.tls.own_id()?,
        })
    }
}

#[tonic::async_trait]
impl Keyshare for KeyshareService {
    async fn partial_decrypt(
        &self,
        _request: Request<PartialDecryptRequest>,
    ) -> Result<Response<PartialDecryptResponse>, Status> {
        Err(Status::failed_precondition(format!(
            "keyshare {} holds no key share: threshold decryption is not available in this build",
            self.me.name
        )))
    }

    type GetAuditLogStream = tokio_stream::Iter<std::vec::IntoIter<Result<AuditRecord, Status>>>;

    async fn get_audit_log(
        &self,
        _request: Request<GetAuditLogRequest>,
    ) -> Result<Response<Self::GetAuditLogStream>, Status> {
        // No decision has been taken yet, so the log is empty.
        Ok(Response::new(tokio_stream::iter(Vec::new())))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<KeyshareStatus>, Status> {
        Ok(Response::new(KeyshareStatus {
            party: self.me.name.clone(),
            ..Default::default()
        }))
    }
}

/// The service's routes with its message-size limits applied.
pub fn routes(settings: &ServerSettings, svc: KeyshareService) -> Routes {
    Routes::new(
        KeyshareServer::new(svc)
            .max_decoding_message_size(settings.max_request_bytes)
            .max_encoding_message_size(DEFAULT_MAX_RESPONSE_BYTES),
    )
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: ServerSettings) -> Result<(), psm_net::NetError> {
    let svc = KeyshareService::new(&settings)?;
    psm_net::server::run(
        &settings,
        routes(&settings, svc),
        &[psm_proto::service_names::KEYSHARE],
    )
    .await
}
