//! keyshare-svc: holds one party's replicated shares of the decryption keys and answers
//! partial-decryption requests from compute nodes, recording every decision in a hash-chained
//! audit log. The binary is a thin wrapper over [`run`].

pub mod audit;
pub mod linear;
pub mod policy;
pub mod reexec;
pub mod registry;
pub mod rules;

use std::path::PathBuf;
use std::sync::Arc;

use prost::Message;
use std::collections::BTreeSet;

use psm_core::keys::{enforced_encoding, KeyKind, ShareFile};
use psm_core::threshold::{partial_decrypt, ThresholdError};
use psm_core::wire::{batch_from_proto, encoding_from_proto};
use psm_net::auth::caller;
use psm_net::config::{ServerSettings, DEFAULT_MAX_RESPONSE_BYTES};
use psm_net::SpiffeId;
use psm_proto::v1::keyshare_server::{Keyshare, KeyshareServer};
use psm_proto::v1::{
    AuditRecord, ComputationKind, GetAuditLogRequest, HeldKey, KeyshareStatus,
    PartialDecryptRequest, PartialDecryptResponse, ReleaseRequest, ReleaseResponse, SharePartials,
    StatusRequest,
};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};

use crate::audit::{AuditLog, Decision};
use crate::linear::{LinearState, Party};
use crate::policy::{
    check_manifest, kind_name, refuse, PolicyConfig, RateLimiter, Refusal, Releases,
};
use crate::reexec::Reexecutor;
use crate::registry::Registry;
use crate::rules::Rule;
use psm_core::linear::envelope::{EnrollmentSecret, PublishedKey};
use psm_core::linear::release::release_from_proto;

/// Default API address of a keyshare.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";
/// Most ciphertexts in one PartialDecrypt request.
pub const MAX_CIPHERTEXTS_PER_REQUEST: usize = 100_000;
/// Most audit records in one GetAuditLog answer.
pub const MAX_AUDIT_RECORDS: usize = 10_000;
/// Requests re-executed and partially decrypted at once (each holds a batch in memory and uses
/// all cores). A permit is held by the blocking work itself, so a cancelled request keeps its
/// permit until its re-execution or decryption has actually stopped.
const CONCURRENT_DECRYPTIONS: usize = 2;

/// A work permit shared by a request's blocking tasks; released when the last of them ends.
pub type WorkPermit = Arc<tokio::sync::OwnedSemaphorePermit>;

/// The `[keyshare]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyshareSection {
    /// This party's share file from `psm ceremony` (mode 0600).
    pub share_file: Option<PathBuf>,
    /// Ingest to fetch stored readings from when re-executing a computation
    /// ("https://ingest.example:7401"). Without it, linear-track requests are refused.
    pub ingest_url: Option<String>,
    /// The name in ingest's certificate (default "ingest").
    pub ingest_server_name: Option<String>,
    /// The public key bundle (`<ceremony out>/public`): the server key and CRS for re-executing
    /// tfhe-track programs (loaded on first use, ~1 GB). Without it, tfhe-track requests are
    /// refused: they are decrypted only after re-execution.
    pub public_dir: Option<PathBuf>,
    /// This regulator's registry of the meters it serves (TOML: `[[meters]]` with `id` and
    /// `encryption = "meter" | "headend"`). Without one, every enrollment and linear release is
    /// refused.
    pub registry: Option<PathBuf>,
    /// This keyshare's enrollment (HPKE) secret key; created on first start (mode 0600) with its
    /// public key published next to it as `enrollment.pub`. Default `<data_dir>/enrollment.key`.
    pub enrollment_key: Option<PathBuf>,
    /// Seconds between enrollment syncs from ingest (default 10); a release naming a meter not
    /// yet enrolled here also syncs first.
    pub enrollment_sync_secs: Option<u64>,
    /// This regulator's rules.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// Errors starting a keyshare.
#[derive(Debug, thiserror::Error)]
pub enum KeyshareError {
    #[error(transparent)]
    Net(#[from] psm_net::NetError),
    #[error(transparent)]
    Keys(#[from] psm_core::keys::KeyFileError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("release store: {0}")]
    Releases(#[from] sled::Error),
    #[error("enrollment key: {0}")]
    EnrollmentKey(String),
    #[error("{0}")]
    Mismatch(String),
}

/// The Keyshare gRPC service.
pub struct KeyshareService {
    me: SpiffeId,
    share: Arc<ShareFile>,
    audit: Arc<AuditLog>,
    permits: Arc<Semaphore>,
    policy: PolicyConfig,
    allowed_programs: BTreeSet<[u8; 32]>,
    limiter: RateLimiter,
    releases: Arc<Releases>,
    reexec: Reexecutor,
    /// The linear track (None without a public bundle: the party names come from its manifest).
    linear: Option<Arc<LinearState>>,
    enrollment_public_key: Vec<u8>,
}

fn invalid(e: ThresholdError) -> Refusal {
    let rule = match e {
        ThresholdError::Invariant(_) => Rule::NoiseBound,
        _ => Rule::WellFormed,
    };
    refuse(rule, Code::InvalidArgument, e)
}

fn valid_idempotency_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

impl KeyshareService {
    /// Loads the share file and opens the audit log under the data directory. The share file
    /// must be for the party named in this service's certificate.
    pub fn open(
        settings: &ServerSettings,
        section: &KeyshareSection,
        share_file: &std::path::Path,
    ) -> Result<Self, KeyshareError> {
        let me = settings.tls.own_id()?;
        let share = ShareFile::read(share_file)?;
        if share.party != me.name {
            return Err(KeyshareError::Mismatch(format!(
                "share file {} is for party {:?} but this service's certificate is {me}",
                share_file.display(),
                share.party
            )));
        }
        let audit = AuditLog::open(&settings.data_dir.join("audit"))?;
        tracing::info!(party = %share.party, index = share.party_index, scheme = %format!("{}-of-{}", share.threshold, share.parties), "share file loaded");
        let policy = section.policy.clone();
        let allowed_programs = policy.validate().map_err(KeyshareError::Mismatch)?;
        let releases = Arc::new(Releases::open(&settings.data_dir.join("releases"))?);
        let ingest = match &section.ingest_url {
            Some(url) => Some(psm_net::client::channel(
                url,
                section.ingest_server_name.as_deref().unwrap_or("ingest"),
                Some(psm_net::Role::Ingest),
                &settings.tls,
                &psm_net::client::ClientOptions {
                    connect_timeout: std::time::Duration::from_secs(5),
                    request_timeout: std::time::Duration::from_secs(120),
                },
            )?),
            None => {
                tracing::warn!("no [keyshare] ingest_url: no enrollments can be fetched and tfhe-track computations cannot be re-executed; such requests are refused");
                None
            }
        };
        if section.public_dir.is_none() {
            tracing::warn!("[keyshare] public_dir is not set: tfhe-track requests cannot be re-executed and are refused");
        }
        if policy.allow_any_program {
            tracing::warn!("allow_any_program = true: any tariff or analytics query is allowed (development only)");
        }
        tracing::info!(
            min_cohort = policy.min_cohort,
            allowed_programs = allowed_programs.len(),
            rate_limit_per_minute = policy.rate_limit_per_minute,
            "policy loaded"
        );
        let scheme = share
            .scheme()
            .map_err(|e| KeyshareError::Mismatch(e.to_string()))?;
        let key_path = section
            .enrollment_key
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("enrollment.key"));
        let (enrollment_secret, enrollment_public_key) =
            load_enrollment_key(&key_path, &share.party)?;
        let registry =
            Registry::load(section.registry.as_deref()).map_err(KeyshareError::Mismatch)?;
        match &section.registry {
            None => tracing::warn!(
                "no [keyshare] registry: every enrollment and linear-track release is refused"
            ),
            Some(p) if registry.allows_all() => {
                tracing::warn!(registry = %p.display(), "registry has development_allow_all = true: every meter id counts as registered and meter-encrypted (development only)")
            }
            Some(p) => {
                tracing::info!(registry = %p.display(), meters = registry.len(), "registry loaded")
            }
        }
        let linear = match &section.public_dir {
            Some(dir) => {
                let manifest = psm_core::ceremony::PublicBundle::open(dir)
                    .map_err(|e| KeyshareError::Mismatch(e.to_string()))?
                    .manifest;
                if manifest.party_names.len() != share.parties
                    || manifest.party_names.get(share.party_index - 1) != Some(&share.party)
                {
                    return Err(KeyshareError::Mismatch(format!(
                        "the public bundle's parties {:?} do not match share file party {} (#{})",
                        manifest.party_names, share.party, share.party_index
                    )));
                }
                Some(Arc::new(LinearState::open(
                    releases.clone(),
                    Party {
                        scheme,
                        index: share.party_index - 1,
                        names: manifest.party_names,
                        flood_key: share.flood_key(),
                        enrollment_secret,
                    },
                    registry,
                    ingest.clone(),
                )?))
            }
            None => {
                tracing::warn!("no [keyshare] public_dir: the party names are unknown, so enrollments and linear-track releases are refused");
                None
            }
        };
        Ok(KeyshareService {
            me,
            share: Arc::new(share),
            audit: Arc::new(audit),
            permits: Arc::new(Semaphore::new(CONCURRENT_DECRYPTIONS)),
            limiter: RateLimiter::new(policy.rate_limit_per_minute),
            policy,
            allowed_programs,
            releases,
            reexec: Reexecutor {
                ingest,
                public_dir: section.public_dir.clone(),
                tfhe_keys: tokio::sync::OnceCell::new(),
            },
            linear,
            enrollment_public_key,
        })
    }

    /// Fetches and decides new enrollments from ingest (also run periodically by [`run`]). The
    /// sync runs as its own task, so a caller that goes away cannot cut it between storing
    /// decisions and auditing them.
    pub async fn sync_enrollments(&self) -> Result<linear::SyncReport, Refusal> {
        let (lin, audit) = (self.linear()?.clone(), self.audit.clone());
        tokio::spawn(async move { lin.sync(&audit).await })
            .await
            .map_err(|e| {
                refuse(
                    Rule::Internal,
                    Code::Internal,
                    format!("enrollment sync task failed: {e}"),
                )
            })?
    }

    fn linear(&self) -> Result<&Arc<LinearState>, Refusal> {
        self.linear.as_ref().ok_or_else(|| {
            refuse(
                Rule::LinearTrack,
                Code::FailedPrecondition,
                "this keyshare has no [keyshare] public_dir, so it serves no linear-track releases",
            )
        })
    }

    /// Decides one linear-track release; on success returns the contributions and the audit
    /// reason.
    async fn decide_release(
        &self,
        who: &str,
        req: &ReleaseRequest,
    ) -> Result<(ReleaseResponse, String), Refusal> {
        self.limiter.admit(who)?;
        if !valid_idempotency_key(&req.idempotency_key) {
            return Err(refuse(
                Rule::WellFormed,
                Code::InvalidArgument,
                "idempotency_key must be 1..=128 printable ASCII characters",
            ));
        }
        let lin = self.linear()?;
        let pb = req.release.as_ref().ok_or_else(|| {
            refuse(
                Rule::Release,
                Code::InvalidArgument,
                "the request has no release",
            )
        })?;
        let release = release_from_proto(pb)
            .map_err(|e| refuse(Rule::Release, Code::InvalidArgument, e.detail()))?;
        let allowed =
            |h: &[u8; 32]| self.policy.allow_any_program || self.allowed_programs.contains(h);
        let limits = self.policy.linear_limits();
        let admitted = lin.admit(release, limits, allowed)?;
        lin.precheck(&admitted, limits).await?;
        let permit = self.work_permit().await?;
        if !lin.missing_enrollments(&admitted)?.is_empty() {
            self.sync_enrollments().await?;
            let missing = lin.missing_enrollments(&admitted)?;
            if !missing.is_empty() {
                return Err(refuse(
                    Rule::Enrollment,
                    Code::FailedPrecondition,
                    format!(
                        "{} member(s) have no enrollment for epoch {} accepted by this keyshare (first: {}); they must enroll (Ingest.Enroll) before their readings are released",
                        missing.len(),
                        admitted.release.spec.epoch,
                        missing[0]
                    ),
                ));
            }
        }
        let admitted = Arc::new(admitted);
        let (state, a) = (lin.clone(), admitted.clone());
        let shares = tokio::task::spawn_blocking(move || {
            let _held = permit;
            state.contributions(&a)
        })
        .await
        .map_err(|e| {
            refuse(
                Rule::Internal,
                Code::Internal,
                format!("release task failed: {e}"),
            )
        })??;
        // Record the release (re-checking the stateful rules atomically) before it leaves.
        lin.record(&admitted, limits).await?;
        let spec = &admitted.release.spec;
        let members: usize = admitted.release.cohorts.iter().map(Vec::len).sum();
        let subject = match spec.kind {
            ComputationKind::Bill => format!("meter {}", admitted.release.cohorts[0][0]),
            _ => format!(
                "{} cohort(s) of {}",
                admitted.release.cohorts.len(),
                admitted
                    .release
                    .cohorts
                    .iter()
                    .map(|c| c.len().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut reason = format!(
            "{} for {subject}, epoch {}, {}, slots {}..{}, program {}: {} output(s), {members} member(s)",
            kind_name(spec.kind),
            spec.epoch,
            spec.channel.name(),
            spec.start_slot,
            spec.end_slot,
            &hex::encode(spec.program_hash)[..16],
            admitted.release.outputs.len()
        );
        if !admitted.headend_encrypted.is_empty() {
            reason.push_str(&format!(
                "; {} head-end-encrypted member(s), plaintext to the utility: {}",
                admitted.headend_encrypted.len(),
                admitted.headend_encrypted.join(", ")
            ));
        }
        let reissue = admitted.release.reissue_reason.trim();
        if !reissue.is_empty() {
            reason.push_str(&format!("; re-issued: {reissue}"));
        }
        Ok((
            ReleaseResponse {
                party: self.share.party.clone(),
                party_index: self.share.party_index as u32,
                shares: shares
                    .into_iter()
                    .map(|(u, values)| SharePartials {
                        share_index: u as u32,
                        partials: psm_core::lwe::words_to_le_bytes(&values),
                    })
                    .collect(),
                audit_seq: 0,
                headend_encrypted: admitted.headend_encrypted.clone(),
            },
            reason,
        ))
    }

    /// Decides one request; on success returns the partials and the audit reason.
    async fn decide(
        &self,
        who: &str,
        req: &PartialDecryptRequest,
        request_hash: &[u8; 32],
    ) -> Result<(PartialDecryptResponse, String), Refusal> {
        self.limiter.admit(who)?;
        if !valid_idempotency_key(&req.idempotency_key) {
            return Err(refuse(
                Rule::WellFormed,
                Code::InvalidArgument,
                "idempotency_key must be 1..=128 printable ASCII characters",
            ));
        }
        let key_id = req
            .key
            .as_ref()
            .map(|k| k.key_id.as_str())
            .unwrap_or_default();
        let key = self.share.key(key_id).ok_or_else(|| {
            let held: Vec<&str> = self.share.keys.iter().map(|k| k.key_id.as_str()).collect();
            refuse(
                Rule::KnownKey,
                Code::NotFound,
                format!("unknown key id {key_id:?}; this keyshare holds {held:?}"),
            )
        })?;
        let pb = req.batch.as_ref().ok_or_else(|| {
            refuse(
                Rule::WellFormed,
                Code::InvalidArgument,
                "request has no ciphertext batch",
            )
        })?;
        if pb.lwe_dimension as usize != key.lwe_dimension {
            return Err(refuse(
                Rule::WellFormed,
                Code::InvalidArgument,
                format!(
                    "ciphertext dimension {} does not match key {key_id} (dimension {})",
                    pb.lwe_dimension, key.lwe_dimension
                ),
            ));
        }
        let batch = batch_from_proto(pb).map_err(invalid)?;
        if batch.len() > MAX_CIPHERTEXTS_PER_REQUEST {
            return Err(refuse(
                Rule::SizeLimit,
                Code::ResourceExhausted,
                format!(
                    "{} ciphertexts in one request; the limit is {MAX_CIPHERTEXTS_PER_REQUEST}",
                    batch.len()
                ),
            ));
        }
        let (requested, stated_noise) =
            encoding_from_proto(pb.encoding.as_ref()).map_err(invalid)?;
        let (encoding, noise) = enforced_encoding(key, requested, stated_noise).map_err(invalid)?;

        let manifest = req.manifest.as_ref().ok_or_else(|| {
            refuse(
                Rule::ManifestRequired,
                Code::FailedPrecondition,
                "a partial decryption must name its computation (manifest)",
            )
        })?;
        let checked = check_manifest(&self.policy, &self.allowed_programs, manifest, key.kind)?;
        // The registry decides which meters exist and who encrypts for them, on this track too:
        // invented meters and head-end-encrypted ones do not make a cohort anonymous.
        let registry = self
            .linear
            .as_ref()
            .ok_or_else(|| {
                refuse(
                    Rule::Registry,
                    Code::FailedPrecondition,
                    "this keyshare has no [keyshare] public_dir and registry state, so it serves no tfhe-track decryptions",
                )
            })?
            .registry();
        let private = registry
            .split(&checked.meters)
            .map_err(linear::not_registered)?
            .0
            .len();
        if checked.kind == ComputationKind::Analytics && private < self.policy.min_cohort {
            return Err(refuse(
                Rule::KAnonymity,
                Code::FailedPrecondition,
                format!(
                    "the histogram covers {private} meter-encrypted meter(s) of {}; this keyshare releases cohorts of at least {} (head-end-encrypted meters do not count)",
                    checked.meters.len(),
                    self.policy.min_cohort
                ),
            ));
        }
        let output_hash = batch.hash();
        if manifest.output_hash != output_hash {
            return Err(refuse(
                Rule::OutputHash,
                Code::FailedPrecondition,
                "manifest output_hash does not match the ciphertexts to decrypt",
            ));
        }
        let reissue = manifest.reissue_reason.as_str();
        self.releases
            .precheck(&checked, &self.policy, request_hash, reissue)
            .await?;

        // The heavy part — re-execution and partial decryption — runs for at most
        // CONCURRENT_DECRYPTIONS requests at a time.
        let permit = self.work_permit().await?;
        // Re-execute, always: the output must be bit-identical to what the approved program
        // gives on ingest's proof-checked inputs, or nothing is decrypted.
        let recomputed = match key.kind {
            KeyKind::Tfhe => self.reexec.tfhe(manifest, &checked, permit.clone()).await?,
        };
        if recomputed.hash() != output_hash {
            return Err(refuse(
                Rule::ReExecution,
                Code::FailedPrecondition,
                format!(
                    "the {} re-executed from the {} named stored input(s) does not match the ciphertexts to decrypt",
                    kind_name(checked.kind),
                    manifest.inputs.len()
                ),
            ));
        }

        let share = self.share.clone();
        let key_id = key_id.to_owned();
        let partials = tokio::task::spawn_blocking(move || {
            let _held = permit;
            let key = share
                .key(&key_id)
                .ok_or(ThresholdError::BadScheme("key vanished".into()))?;
            let scheme = share.scheme()?;
            partial_decrypt(
                &share.party_shares(key),
                scheme,
                &share.flood_key(),
                &key_id,
                &batch,
                encoding,
                noise,
            )
        })
        .await
        .map_err(|e| {
            refuse(
                Rule::Internal,
                Code::Internal,
                format!("decryption task failed: {e}"),
            )
        })?
        .map_err(invalid)?;
        // Record the release (re-checking the stateful rules atomically) before it leaves.
        self.releases
            .admit(&checked, &self.policy, request_hash, reissue)
            .await?;
        let subject = match checked.kind {
            ComputationKind::Bill => format!("meter {}", checked.meters[0]),
            _ => format!("cohort of {} meters", checked.meters.len()),
        };
        let program = checked
            .program_hash
            .map(|h| format!(", program {}", &hex::encode(h)[..16]))
            .unwrap_or_default();
        let mut reason = format!(
            "{} for {subject}, {}{program}: {} input(s) re-executed; {} ciphertext(s) under {}",
            kind_name(checked.kind),
            checked.days(),
            manifest.inputs.len(),
            pb_count(pb),
            req.key
                .as_ref()
                .map(|k| k.key_id.as_str())
                .unwrap_or_default()
        );
        if !reissue.trim().is_empty() {
            reason.push_str(&format!("; re-issued: {}", reissue.trim()));
        }
        Ok((
            PartialDecryptResponse {
                party: self.share.party.clone(),
                party_index: self.share.party_index as u32,
                shares: partials
                    .into_iter()
                    .map(|p| SharePartials {
                        share_index: p.share_index as u32,
                        partials: psm_core::lwe::words_to_le_bytes(&p.values),
                    })
                    .collect(),
                audit_seq: 0,
            },
            reason,
        ))
    }
}

fn pb_count(b: &psm_proto::v1::LweCiphertextBatch) -> u32 {
    match &b.payload {
        Some(psm_proto::v1::lwe_ciphertext_batch::Payload::List(l)) => l.count,
        None => 0,
    }
}

/// BLAKE3 of what was asked: key id, ciphertexts and manifest.
fn request_hash(req: &PartialDecryptRequest) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v1/partial-decrypt-request");
    let key = req
        .key
        .as_ref()
        .map(|k| k.key_id.as_str())
        .unwrap_or_default();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    let batch = req
        .batch
        .as_ref()
        .map(|b| b.encode_to_vec())
        .unwrap_or_default();
    h.update(blake3::hash(&batch).as_bytes());
    let manifest = req
        .manifest
        .as_ref()
        .map(|m| m.encode_to_vec())
        .unwrap_or_default();
    h.update(blake3::hash(&manifest).as_bytes());
    *h.finalize().as_bytes()
}

fn audit_failure(e: audit::AuditError) -> Status {
    tracing::error!(error = %e, "cannot write the audit log; refusing to answer");
    Status::unavailable("the audit log cannot be written; no decision was released")
}

impl KeyshareService {
    /// Waits for one of the CONCURRENT_DECRYPTIONS work permits.
    async fn work_permit(&self) -> Result<WorkPermit, Refusal> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map(Arc::new)
            .map_err(|_| {
                refuse(
                    Rule::Available,
                    Code::Unavailable,
                    "keyshare is shutting down",
                )
            })
    }

    /// Records a decision in the audit log, then answers: an allowed answer leaves only after its
    /// record is durable, and a refusal is recorded before it is returned. Rate-limit refusals
    /// are recorded at most once per caller per minute; the others are counted, and the count is
    /// recorded with that caller's next record.
    async fn audited<T>(
        &self,
        who: &str,
        request_hash: &[u8; 32],
        what: &str,
        outcome: Result<(T, String), Refusal>,
        set_seq: impl FnOnce(&mut T, u64),
    ) -> Result<Response<T>, Status> {
        let (allow, rule, mut reason) = match &outcome {
            Ok((_, reason)) => (true, "allowed", reason.clone()),
            Err(r) => (false, r.rule, r.status.message().to_owned()),
        };
        let unrecorded = if rule == Rule::RateLimit.name() {
            match self.limiter.refusal_to_record(who) {
                Some(n) => n,
                None => {
                    tracing::debug!(caller = %who, "{what} refused by the rate limit (counted)");
                    return Err(outcome
                        .err()
                        .map_or_else(|| Status::internal("rate-limit outcome"), |r| r.status));
                }
            }
        } else {
            self.limiter.take_unrecorded(who)
        };
        let summary = format!(
            "{unrecorded} further request(s) from {who} were refused by the rate limit and not recorded one by one"
        );
        if rule == Rule::RateLimit.name() && unrecorded > 0 {
            reason.push_str(&format!("; {summary}"));
        }
        let decision = Decision {
            caller: who,
            allow,
            rule,
            reason: &reason,
            request_hash,
        };
        let seq = if rule != Rule::RateLimit.name() && unrecorded > 0 {
            let tally = Decision {
                caller: who,
                allow: false,
                rule: Rule::RateLimit.name(),
                reason: &summary,
                request_hash: &[],
            };
            self.audit
                .append_many(&[tally, decision])
                .await
                .map(|s| s + 1)
        } else {
            self.audit.append(decision).await
        }
        .map_err(audit_failure)?;
        match outcome {
            Ok((mut resp, reason)) => {
                set_seq(&mut resp, seq);
                tracing::info!(caller = %who, seq, %reason, "{what} allowed");
                Ok(Response::new(resp))
            }
            Err(r) => {
                tracing::info!(caller = %who, rule = r.rule, reason = r.status.message(), "{what} refused");
                Err(r.status)
            }
        }
    }
}

/// Loads this keyshare's enrollment secret key, creating it (mode 0600) on first start, and
/// (re)writes its published public key next to it as `enrollment.pub`.
fn load_enrollment_key(
    path: &std::path::Path,
    party: &str,
) -> Result<(EnrollmentSecret, Vec<u8>), KeyshareError> {
    let bad = |m: String| KeyshareError::EnrollmentKey(format!("{}: {m}", path.display()));
    let secret = if path.exists() {
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        psm_core::keys::check_private_mode(path, &meta).map_err(bad)?;
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        EnrollmentSecret(bytes)
    } else {
        let (sk, _) = psm_core::linear::envelope::generate_keypair();
        psm_core::keys::write_atomic(path, &sk.0, 0o600).map_err(|e| bad(e.to_string()))?;
        tracing::info!(path = %path.display(), "enrollment key pair created");
        sk
    };
    let public = psm_core::linear::envelope::public_key(&secret).map_err(|e| bad(e.to_string()))?;
    let published = path.with_file_name("enrollment.pub");
    PublishedKey::new(party, &public)
        .write(&published)
        .map_err(|e| bad(e.to_string()))?;
    Ok((secret, public))
}

#[tonic::async_trait]
impl Keyshare for KeyshareService {
    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let who = caller(&request)?.to_string();
        let req = request.into_inner();
        let hash = *blake3::hash(
            &req.release
                .as_ref()
                .map(|r| r.encode_to_vec())
                .unwrap_or_default(),
        )
        .as_bytes();
        let outcome = self.decide_release(&who, &req).await;
        self.audited(&who, &hash, "linear release", outcome, |r, seq| {
            r.audit_seq = seq
        })
        .await
    }

    async fn partial_decrypt(
        &self,
        request: Request<PartialDecryptRequest>,
    ) -> Result<Response<PartialDecryptResponse>, Status> {
        let who = caller(&request)?.to_string();
        let req = request.into_inner();
        let hash = request_hash(&req);
        let outcome = self.decide(&who, &req, &hash).await;
        self.audited(&who, &hash, "partial decryption", outcome, |r, seq| {
            r.audit_seq = seq
        })
        .await
    }

    type GetAuditLogStream = tokio_stream::wrappers::ReceiverStream<Result<AuditRecord, Status>>;

    async fn get_audit_log(
        &self,
        request: Request<GetAuditLogRequest>,
    ) -> Result<Response<Self::GetAuditLogStream>, Status> {
        let r = request.into_inner();
        let limit = match r.limit as usize {
            0 => MAX_AUDIT_RECORDS,
            n => n.min(MAX_AUDIT_RECORDS),
        };
        Ok(Response::new(self.audit.stream(r.from_seq, limit)))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<KeyshareStatus>, Status> {
        let (len, head) = self.audit.head().await;
        Ok(Response::new(KeyshareStatus {
            party: self.me.name.clone(),
            party_index: self.share.party_index as u32,
            parties: self.share.parties as u32,
            threshold: self.share.threshold as u32,
            keys: self
                .share
                .keys
                .iter()
                .map(|k| HeldKey {
                    key_id: k.key_id.clone(),
                    share_indices: k.shares.iter().map(|(i, _)| *i as u32).collect(),
                    lwe_dimension: k.lwe_dimension as u32,
                })
                .collect(),
            audit_len: len,
            audit_head: head.to_vec(),
            enrollment_public_key: self.enrollment_public_key.clone(),
        }))
    }
}

/// The service's routes with its message-size limits applied.
pub fn routes(settings: &ServerSettings, svc: Arc<KeyshareService>) -> Routes {
    Routes::new(
        KeyshareServer::from_arc(svc)
            .max_decoding_message_size(settings.max_request_bytes)
            .max_encoding_message_size(DEFAULT_MAX_RESPONSE_BYTES),
    )
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(
    settings: ServerSettings,
    section: &KeyshareSection,
    share_file: &std::path::Path,
) -> Result<(), KeyshareError> {
    let svc = Arc::new(KeyshareService::open(&settings, section, share_file)?);
    if svc.linear.is_some() {
        let every =
            std::time::Duration::from_secs(section.enrollment_sync_secs.unwrap_or(10).max(1));
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            loop {
                let Some(svc) = weak.upgrade() else { break };
                if let Err(r) = svc.sync_enrollments().await {
                    tracing::warn!(
                        reason = r.status.message(),
                        "enrollment sync failed; retrying later"
                    );
                }
                drop(svc);
                tokio::time::sleep(every).await;
            }
        });
    }
    psm_net::server::run(
        &settings,
        routes(&settings, svc),
        &[psm_proto::service_names::KEYSHARE],
    )
    .await?;
    Ok(())
}
