//! Threshold decryption of result ciphertexts through the keyshares: fan out PartialDecrypt
//! over mTLS, combine any quorum, name parties that failed or disagreed.

use std::time::Duration;

use psm_core::keys::Manifest;
use psm_core::lwe::{words_from_le_bytes, Encoding, LweBatch};
use psm_core::threshold::{combine, PartyResponse, Scheme, SharePartial, ThresholdError};
use psm_core::wire::batch_to_proto;
use psm_net::quorum::{gather, Peer, QuorumError, QuorumPolicy};
use psm_net::tls::TlsPaths;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    ComputationManifest, KeyRef, PartialDecryptRequest, PartialDecryptResponse, PartyFault,
    QuorumReport,
};
use serde::Deserialize;

/// A keyshare to ask: its certificate name (also its party name in the key manifest) and URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyshareEndpoint {
    pub name: String,
    pub url: String,
}

/// Why a decryption did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Quorum(#[from] QuorumError),
    #[error("combining partial decryptions: {0}")]
    Combine(#[from] ThresholdError),
    #[error(transparent)]
    Net(#[from] psm_net::NetError),
}

impl DecryptError {
    /// The status a caller sees: a keyshare's policy refusal keeps its code (and the keyshares'
    /// reasons), anything else is UNAVAILABLE.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            DecryptError::Quorum(q) => match q.refusal_code() {
                Some(code) => tonic::Status::new(code, format!("the keyshares refused: {q}")),
                None => tonic::Status::unavailable(format!("threshold decryption failed: {q}")),
            },
            other => tonic::Status::unavailable(format!("threshold decryption failed: {other}")),
        }
    }
}

/// The manifest of a release over whole UTC days `first_day..first_day + days`: the program
/// with its BLAKE3 hash (which keyshares allow and audit), the inputs in evaluation order. The
/// output hash is filled in by [`ThresholdDecryptor::decrypt`].
pub fn manifest(
    kind: psm_proto::v1::ComputationKind,
    program: Vec<u8>,
    inputs: Vec<psm_proto::v1::InputRef>,
    first_day: i64,
    days: i64,
    reissue_reason: &str,
) -> ComputationManifest {
    use psm_core::readings::DAY_SECONDS;
    ComputationManifest {
        kind: kind as i32,
        program_hash: blake3::hash(&program).as_bytes().to_vec(),
        program,
        inputs,
        output_hash: Vec::new(),
        range: Some(psm_proto::v1::TimeRange {
            start_unix: first_day * DAY_SECONDS,
            end_unix: (first_day + days) * DAY_SECONDS,
        }),
        reissue_reason: reissue_reason.to_owned(),
    }
}

/// Clear values and who produced them.
#[derive(Debug, Clone)]
pub struct Decrypted {
    pub values: Vec<i128>,
    pub report: QuorumReport,
}

/// Asks the keyshares of one key set for partial decryptions and combines them.
pub struct ThresholdDecryptor {
    peers: Vec<Peer>,
    scheme: Scheme,
    party_names: Vec<String>,
    manifest: Manifest,
    policy: QuorumPolicy,
}

impl ThresholdDecryptor {
    /// `endpoints` must name parties of the key manifest.
    pub fn new(
        manifest: Manifest,
        endpoints: &[KeyshareEndpoint],
        tls: &TlsPaths,
        grace: Duration,
        timeout: Duration,
    ) -> Result<Self, DecryptError> {
        let scheme = Scheme::new(manifest.parties, manifest.threshold)?;
        let mut peers = Vec::new();
        for e in endpoints {
            if !manifest.party_names.contains(&e.name) {
                return Err(DecryptError::Config(format!(
                    "keyshare {:?} is not a party of key set {} (parties: {:?})",
                    e.name, manifest.tfhe_key_id, manifest.party_names
                )));
            }
            let opts = psm_net::client::ClientOptions {
                connect_timeout: Duration::from_secs(5),
                request_timeout: timeout,
            };
            peers.push(Peer {
                name: e.name.clone(),
                channel: psm_net::client::channel(&e.url, &e.name, tls, &opts)?,
            });
        }
        Ok(ThresholdDecryptor {
            peers,
            scheme,
            party_names: manifest.party_names.clone(),
            policy: QuorumPolicy {
                needed: scheme.threshold(),
                grace,
                timeout,
            },
            manifest,
        })
    }

    /// The key set's t-of-n scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The smallest noise bound keyshares use for a key (they never flood less), so the
    /// combiner's agreement check uses the same flooding bound.
    fn noise_floor(&self, key_id: &str) -> Result<u32, DecryptError> {
        if key_id == self.manifest.tfhe_key_id {
            Ok(psm_core::ceremony::SQUASHED_NOISE_LOG2)
        } else if key_id == self.manifest.linear_key_id {
            Ok(self.manifest.linear_fresh_noise_log2)
        } else {
            Err(DecryptError::Config(format!("unknown key id {key_id:?}")))
        }
    }

    /// Decrypts `batch`. The manifest's output hash is filled in here.
    pub async fn decrypt(
        &self,
        key_id: &str,
        batch: &LweBatch,
        encoding: Encoding,
        noise_bound_log2: u32,
        mut manifest: ComputationManifest,
        idempotency_key: &str,
    ) -> Result<Decrypted, DecryptError> {
        let noise = noise_bound_log2.max(self.noise_floor(key_id)?);
        manifest.output_hash = batch.hash().to_vec();
        let request = PartialDecryptRequest {
            idempotency_key: idempotency_key.to_owned(),
            key: Some(KeyRef {
                key_id: key_id.to_owned(),
            }),
            batch: Some(batch_to_proto(batch, encoding, noise)),
            manifest: Some(manifest),
        };
        let gathered = gather(&self.peers, self.policy, |ch| {
            let req = request.clone();
            async move {
                KeyshareClient::new(ch)
                    .max_decoding_message_size(psm_net::config::DEFAULT_MAX_RESPONSE_BYTES)
                    .max_encoding_message_size(psm_net::config::DEFAULT_MAX_REQUEST_BYTES)
                    .partial_decrypt(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await?;
        let mut faults: Vec<PartyFault> = gathered
            .failures
            .iter()
            .map(|f| PartyFault {
                party: f.peer.clone(),
                reason: f.reason.clone(),
            })
            .collect();
        let mut responses = Vec::new();
        for (name, resp) in &gathered.answers {
            match self.to_party_response(name, resp, batch.len()) {
                Ok(r) => responses.push(r),
                Err(reason) => faults.push(PartyFault {
                    party: name.clone(),
                    reason,
                }),
            }
        }
        let combined = combine(self.scheme, batch, encoding, noise, &responses)?;
        for (p, reason) in &combined.faulty {
            faults.push(PartyFault {
                party: self.party_names[*p].clone(),
                reason: reason.clone(),
            });
        }
        Ok(Decrypted {
            values: combined.values,
            report: QuorumReport {
                used: combined
                    .used
                    .iter()
                    .map(|p| self.party_names[*p].clone())
                    .collect(),
                faults,
            },
        })
    }

    /// Checks that a response comes from the party it claims and has the right shape.
    fn to_party_response(
        &self,
        name: &str,
        resp: &PartialDecryptResponse,
        count: usize,
    ) -> Result<PartyResponse, String> {
        let index = self
            .party_names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("{name} is not a party of this key set"))?;
        if resp.party != name || resp.party_index as usize != index + 1 {
            return Err(format!(
                "answered as {} (#{}), expected {name} (#{})",
                resp.party,
                resp.party_index,
                index + 1
            ));
        }
        let mut shares = Vec::new();
        for s in &resp.shares {
            if !self.scheme.holds(index, s.share_index as usize) {
                return Err(format!(
                    "sent share {} which party #{} does not hold",
                    s.share_index,
                    index + 1
                ));
            }
            let values = words_from_le_bytes(&s.partials).map_err(|e| e.to_string())?;
            if values.len() != count {
                return Err(format!("{} partials for {count} ciphertexts", values.len()));
            }
            shares.push(SharePartial {
                share_index: s.share_index as usize,
                values,
            });
        }
        Ok(PartyResponse {
            party: index,
            shares,
        })
    }
}
