//! keyshare-svc: holds one party's replicated shares of the decryption keys and answers
//! partial-decryption requests from compute nodes, recording every decision in a hash-chained
//! audit log. The binary is a thin wrapper over [`run`].

pub mod audit;
pub mod layout;
pub mod linear;
pub mod peers;
pub mod policy;
pub mod reexec;
pub mod rules;

use std::collections::BTreeMap;
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
    AuditRecord, ComputationKind, ConfirmEnrollmentsRequest, ConfirmEnrollmentsResponse,
    ConfirmReleaseRequest, ConfirmReleaseResponse, EnrollmentConfirmation, EnrollmentReceipt,
    EnrollmentState, GetAuditLogRequest, GetReceiptsRequest, GetReceiptsResponse,
    GetReleaseRecordsRequest, HeldKey, KeyshareStatus, LinearRelease, PartialDecryptRequest,
    PartialDecryptResponse, ReceiptAnswer, ReleaseRecordPage, ReleaseRequest, ReleaseResponse,
    SharePartials, StatusRequest, TfheRelease,
};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};

use crate::audit::{AuditLog, Decision};
use crate::linear::{LinearState, Party};
use crate::peers::{Peers, RecordBody};
use crate::policy::{
    check_billing_cycle, check_manifest, kind_name, refuse, Checked, PolicyConfig, RateLimiter,
    Refusal, Releases,
};
use crate::reexec::Reexecutor;
use crate::rules::Rule;
use psm_core::linear::envelope::{EnrollmentSecret, PublishedKey};
use psm_core::linear::release::release_from_proto;
use psm_core::registry::Registry;
use psm_core::signing::SecretKey;

/// Default API address of a keyshare.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";
/// Most ciphertexts in one PartialDecrypt request.
pub const MAX_CIPHERTEXTS_PER_REQUEST: usize = 100_000;
/// Most audit records in one GetAuditLog answer.
pub const MAX_AUDIT_RECORDS: usize = 10_000;
/// Most meters in one GetReceipts request.
pub const MAX_RECEIPT_METERS: usize = 10_000;
/// Seconds between passes that reach every co-holder and import its release records.
const CONTACT_SECS: u64 = 5;
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
    /// This regulator's registry of the meters it serves (TOML: `[[meters]]` with `id`,
    /// `encryption = "meter" | "headend"`, `device_key` and `billing_day`; edit it with
    /// `psm registry`). Without one, every enrollment and release is refused. Changes are
    /// audited at start.
    pub registry: Option<PathBuf>,
    /// This keyshare's anchor (Ed25519) secret key, the regulator's (`psm anchor init`): it signs
    /// the enrollment key, enrollment receipts and every answer to a co-holder. Default
    /// `<data_dir>/anchor.key`, created on first start when missing (mode 0600); its public half
    /// is (re)written as `<data_dir>/anchor.pub` — what the regulator provisions into meters and
    /// gives the other keyshares, independently of the utility.
    pub anchor_key: Option<PathBuf>,
    /// The other keyshares by party name: `url` ("https://keyshare-2.example:7411") and
    /// `anchor` (its regulator's `anchor.pub`, obtained from that regulator); every co-holder
    /// must be listed. Keyshares confirm enrollments and releases with each other directly; each
    /// checks the other's keyshare certificate, and every answer must be signed by the
    /// co-holder's anchor, so the utility's CA cannot stand in for a co-holder.
    #[serde(default)]
    pub peers: BTreeMap<String, peers::PeerConfig>,
    /// Milliseconds to wait for a co-holder before counting it unreachable (default 3000).
    pub peer_timeout_ms: Option<u64>,
    /// Answer a release alone (recording it for the co-holder to import) when a co-holder that
    /// was reached since this keyshare started cannot be reached now (default true: one keyshare
    /// down does not stop decryption). False: refuse instead.
    pub answer_alone: Option<bool>,
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
    #[error("anchor key: {0}")]
    Anchor(#[from] psm_core::signing::SigningError),
    #[error(transparent)]
    Registry(#[from] psm_core::registry::RegistryError),
    #[error("peers: {0}")]
    Peers(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("linear ledger: {0}")]
    Ledger(String),
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
    /// The co-holders (with the linear state: the party names come from the bundle).
    peers: Option<Arc<Peers>>,
    enrollment_public_key: Vec<u8>,
    anchor: SecretKey,
    enrollment_key_signature: Vec<u8>,
}

fn invalid(e: ThresholdError) -> Refusal {
    let rule = match e {
        ThresholdError::Invariant(_) => Rule::NoiseBound,
        _ => Rule::WellFormed,
    };
    refuse(rule, Code::InvalidArgument, e)
}

/// Runs an enrollment sync as its own task, so a caller that goes away cannot cut it between
/// storing decisions and auditing them.
async fn own_task(
    sync: impl std::future::Future<Output = Result<linear::SyncReport, Refusal>> + Send + 'static,
) -> Result<linear::SyncReport, Refusal> {
    tokio::spawn(sync).await.map_err(|e| {
        refuse(
            Rule::Internal,
            Code::Internal,
            format!("enrollment sync task failed: {e}"),
        )
    })?
}

fn linear_store(e: sled::Error) -> Refusal {
    refuse(
        Rule::Internal,
        Code::Unavailable,
        format!("release store: {e}"),
    )
}

/// A tfhe-track release's identity in the ledger: its key and manifest (whose output hash names
/// the ciphertexts), so a co-holder that sees only these knows it as the same release.
fn tfhe_release_hash(key_id: &str, manifest: &psm_proto::v1::ComputationManifest) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/tfhe-release");
    h.update(&(key_id.len() as u64).to_le_bytes());
    h.update(key_id.as_bytes());
    h.update(&manifest.encode_to_vec());
    *h.finalize().as_bytes()
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
        let allowed = policy.validate().map_err(KeyshareError::Mismatch)?;
        let allowed_programs = allowed.programs.clone();
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
        if policy.billing_cycle == crate::policy::BillingCycle::Any {
            tracing::warn!("billing_cycle = \"any\": bills may cover any period of at least min_bill_days, not only the meters' registered billing cycles (development only)");
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
        let anchor_path = section
            .anchor_key
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("anchor.key"));
        let (anchor, created) = psm_core::signing::AnchorFile::init(
            &share.party,
            &anchor_path,
            &settings.data_dir.join("anchor.pub"),
        )?;
        if created {
            tracing::info!(path = %anchor_path.display(), "anchor key created: give anchor.pub to the regulator's meter provisioning");
        }
        let key_path = section
            .enrollment_key
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("enrollment.key"));
        let (enrollment_secret, enrollment_public_key, enrollment_key_signature) =
            load_enrollment_key(&key_path, &share.party, &anchor)?;
        let registry = Registry::load(section.registry.as_deref())?;
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
        let mut peers = None;
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
                peers = Some(Arc::new(
                    Peers::new(
                        &releases.db(),
                        scheme,
                        share.party_index - 1,
                        manifest.party_names.clone(),
                        &section.peers,
                        &settings.tls,
                        std::time::Duration::from_millis(
                            section.peer_timeout_ms.unwrap_or(3000).max(1),
                        ),
                        section.answer_alone.unwrap_or(true),
                    )
                    .map_err(KeyshareError::Peers)?,
                ));
                Some(Arc::new(
                    LinearState::open(
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
                    )?
                    .with_approvals(allowed.approved.clone()),
                ))
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
            peers,
            enrollment_public_key,
            anchor,
            enrollment_key_signature,
        })
    }

    /// Fetches and decides new enrollments from ingest and confirms the pending ones with the
    /// co-holders (also run periodically by [`run`]). The sync runs as its own task, so a caller
    /// that goes away cannot cut it between storing decisions and auditing them.
    pub async fn sync_enrollments(&self) -> Result<linear::SyncReport, Refusal> {
        let (lin, audit, peers) = (
            self.linear()?.clone(),
            self.audit.clone(),
            self.peers()?.clone(),
        );
        own_task(async move { lin.sync(&audit, &peers).await }).await
    }

    /// Fetches and decides new enrollments without confirming them (what answering a
    /// co-holder's confirmation may do: it never calls a co-holder back).
    async fn decide_enrollments(&self) -> Result<linear::SyncReport, Refusal> {
        let (lin, audit) = (self.linear()?.clone(), self.audit.clone());
        own_task(async move { lin.fetch_and_decide(&audit).await }).await
    }

    fn peers(&self) -> Result<&Arc<Peers>, Refusal> {
        self.peers.as_ref().ok_or_else(|| {
            refuse(
                Rule::LinearTrack,
                Code::FailedPrecondition,
                "this keyshare has no [keyshare] public_dir, so it knows no co-holders",
            )
        })
    }

    /// Audits every change of the registry since the last start (each added, removed or changed
    /// meter its own record), then remembers this registry.
    pub async fn audit_registry_changes(&self) -> Result<usize, KeyshareError> {
        let Some(lin) = &self.linear else {
            return Ok(0);
        };
        let tree = self.releases.db().open_tree("registry_snapshot")?;
        let now = lin.registry();
        let old = match tree.get(b"registry")? {
            Some(v) => Registry::parse(&String::from_utf8_lossy(&v)).unwrap_or_default(),
            None => Registry::default(),
        };
        let changes = now.changes_from(&old);
        if changes.is_empty() {
            return Ok(0);
        }
        let reasons: Vec<String> = changes
            .iter()
            .map(|c| format!("registry change: {c} (file {})", &now.file_hash))
            .collect();
        let records: Vec<Decision> = reasons
            .iter()
            .map(|r| Decision {
                caller: "regulator (registry file)",
                allow: true,
                rule: Rule::Registry.name(),
                reason: r,
                request_hash: &[],
            })
            .collect();
        for chunk in records.chunks(1000) {
            self.audit.append_many(chunk).await?;
        }
        tree.insert(b"registry", now.to_toml()?.as_bytes())?;
        tree.flush_async().await?;
        tracing::info!(changes = changes.len(), "registry changes audited");
        Ok(changes.len())
    }

    /// Judges a linear release exactly as for compute (policy and ledger) and records it; what a
    /// co-holder confirmation and an imported record do.
    async fn judge_linear(&self, pb: &LinearRelease) -> Result<String, Refusal> {
        let lin = self.linear()?;
        let release = release_from_proto(pb)
            .map_err(|e| refuse(Rule::Release, Code::InvalidArgument, e.detail()))?;
        let allowed =
            |h: &[u8; 32]| self.policy.allow_any_program || self.allowed_programs.contains(h);
        let limits = self.policy.linear_limits();
        let a = lin.admit(release, limits, allowed)?;
        lin.record(&a, limits).await?;
        let spec = &a.release.spec;
        Ok(format!(
            "{} (epoch {}, {}, slots {}..{}, {} cohort(s), release {})",
            kind_name(spec.kind),
            spec.epoch,
            spec.channel.name(),
            spec.start_slot,
            spec.end_slot,
            a.release.cohorts.len(),
            &hex::encode(a.release_hash)[..16]
        ))
    }

    /// The registry rules of a tfhe-track manifest: every member registered, and a histogram's
    /// meter-encrypted members at least `min_cohort`.
    fn tfhe_cohort_rules(
        &self,
        checked: &Checked,
        manifest: &psm_proto::v1::ComputationManifest,
    ) -> Result<(), Refusal> {
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
        if checked.kind == ComputationKind::Bill {
            let tariff = psm_proto::v1::Tariff::decode(manifest.program.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|t| psm_tariff::from_proto(&t).map_err(|e| e.0))
                .map_err(|e| {
                    refuse(
                        Rule::Manifest,
                        Code::InvalidArgument,
                        format!("the bill's program is not a valid tariff: {e}"),
                    )
                })?;
            let period = (
                checked.first_day * psm_core::readings::DAY_SECONDS,
                checked.end_day * psm_core::readings::DAY_SECONDS,
            );
            // As the linear track does in release_from_proto: a tariff bills only while in force.
            tariff
                .check_in_force(period.0, period.1)
                .map_err(|e| refuse(Rule::Manifest, Code::InvalidArgument, e))?;
            check_billing_cycle(
                self.policy.billing_cycle,
                registry,
                checked.meters.first().map_or("", String::as_str),
                &tariff,
                period,
            )?;
        }
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
        Ok(())
    }

    /// Judges a tfhe-track release (manifest and key, without re-executing: the contributing
    /// keyshare re-executes) and records it in the ledger.
    async fn judge_tfhe(&self, t: &TfheRelease) -> Result<String, Refusal> {
        let key_id = t
            .key
            .as_ref()
            .map(|k| k.key_id.as_str())
            .unwrap_or_default();
        let key = self.share.key(key_id).ok_or_else(|| {
            refuse(
                Rule::KnownKey,
                Code::NotFound,
                format!("unknown key id {key_id:?}"),
            )
        })?;
        let manifest = t.manifest.as_ref().ok_or_else(|| {
            refuse(
                Rule::ManifestRequired,
                Code::FailedPrecondition,
                "a tfhe-track release must name its computation (manifest)",
            )
        })?;
        let checked = check_manifest(&self.policy, &self.allowed_programs, manifest, key.kind)?;
        self.tfhe_cohort_rules(&checked, manifest)?;
        let id = tfhe_release_hash(key_id, manifest);
        let judge = self.tfhe_bill_judge(&checked);
        self.releases
            .admit(
                &checked,
                &self.policy,
                &id,
                &manifest.reissue_reason,
                judge.as_deref(),
            )
            .await?;
        Ok(format!(
            "{} for {} meter(s), {} (release {})",
            kind_name(checked.kind),
            checked.meters.len(),
            checked.days(),
            &hex::encode(id)[..16]
        ))
    }

    async fn judge(&self, body: &RecordBody) -> Result<String, Refusal> {
        match body {
            RecordBody::Linear(l) => self.judge_linear(l).await,
            RecordBody::Tfhe(t) => self.judge_tfhe(t).await,
        }
    }

    /// Before a release leaves: every co-holder judges the identical release against its own
    /// ledger (and records it). A share is contributed only when every other holder of it
    /// admitted the release, or — only if it was reached since this start and `answer_alone` —
    /// cannot be reached at all (its port accepts no connection), in which case the release is
    /// appended, durably, to the records it will import. A slow co-holder, one that fails after
    /// the request reached it, or an answer not signed by its anchor, counts as a refusal.
    /// Returns the note for the audit record and the shares to withhold; refuses when every
    /// share is withheld.
    async fn confirm_with_coholders(
        &self,
        body: RecordBody,
    ) -> Result<(String, BTreeSet<usize>), Refusal> {
        let peers = self.peers()?.clone();
        let coholders = peers.coholders();
        let answers = futures::future::join_all(
            coholders
                .iter()
                .map(|p| peers.confirm_release(*p, body.clone())),
        )
        .await;
        let (mut confirmed, mut alone) = (Vec::new(), Vec::new());
        // Co-holders whose shares must not be contributed, with why.
        let mut blocked: Vec<(usize, Code, String)> = Vec::new();
        for (p, a) in coholders.iter().copied().zip(answers) {
            let name = peers.name(p).to_owned();
            match a {
                Ok(r) if r.admitted => {
                    let (imported, _) = peers.imported(p).map_err(linear_store)?;
                    if r.records_for_you < imported {
                        blocked.push((
                            p,
                            Code::FailedPrecondition,
                            format!(
                                "co-holder {name} holds {} release record(s) for this keyshare, fewer than the {imported} already imported from it (its store was restored or replaced?); reconcile before releasing shares held with it",
                                r.records_for_you
                            ),
                        ));
                        continue;
                    }
                    if r.records_for_you > imported {
                        if let Err(x) = self.import_records(p).await {
                            blocked.push((p, Code::Unavailable, x.status.message().to_owned()));
                            continue;
                        }
                    }
                    // Its signed count says this keyshare holds all its records: in contact.
                    peers.set_contact(p);
                    confirmed.push(name);
                }
                Ok(r) => blocked.push((
                    p,
                    Code::FailedPrecondition,
                    format!(
                        "co-holder {name} refused this release ({}: {})",
                        r.rule, r.reason
                    ),
                )),
                Err(peers::PeerError::Unreachable(why))
                    if peers.answer_alone && peers.in_contact(p) =>
                {
                    alone.push((p, name, why))
                }
                Err(peers::PeerError::Unreachable(why)) => blocked.push((
                    p,
                    Code::Unavailable,
                    format!(
                        "co-holder {name} cannot be reached ({why}) and {}",
                        if peers.answer_alone {
                            "has not been reached since this keyshare started, so its release records may be missing here"
                        } else {
                            "answer_alone = false"
                        }
                    ),
                )),
                Err(peers::PeerError::Failed(why)) => blocked.push((
                    p,
                    Code::FailedPrecondition,
                    format!("co-holder {name} did not confirm this release: {why}"),
                )),
            }
        }
        let scheme = self.share.scheme().map_err(invalid)?;
        let me = self.share.party_index - 1;
        let withheld: BTreeSet<usize> = scheme
            .held_by(me)
            .into_iter()
            .filter(|u| {
                peers::holders_of(scheme, *u, me)
                    .iter()
                    .any(|h| blocked.iter().any(|(b, _, _)| b == h))
            })
            .collect();
        if withheld.len() == scheme.held_by(me).len() {
            let (_, code, why) = blocked.into_iter().next().unwrap_or((
                0,
                Code::Internal,
                "no share to contribute".into(),
            ));
            return Err(refuse(Rule::CoHolder, code, why));
        }
        let mut note = String::new();
        if !confirmed.is_empty() {
            note.push_str(&format!("; confirmed by {}", confirmed.join(", ")));
        }
        for (_, _, why) in &blocked {
            note.push_str(&format!("; {why}"));
        }
        if !withheld.is_empty() {
            note.push_str(&format!("; shares {withheld:?} withheld"));
        }
        for (p, name, why) in alone {
            let used = scheme
                .held_by(me)
                .into_iter()
                .any(|u| !withheld.contains(&u) && scheme.holds(p, u));
            if !used {
                continue;
            }
            let seq = peers
                .append_record(p, body.clone())
                .await
                .map_err(linear_store)?;
            note.push_str(&format!(
                "; answered without {name} (unreachable: {why}): release record {seq} kept for it"
            ));
        }
        Ok((note, withheld))
    }

    /// Imports co-holder `p`'s records of releases it answered without this keyshare (pages
    /// signed by its anchor, records hash-chained) into this keyshare's ledger; each is audited,
    /// and one the ledger refuses is audited as a `co-holder-conflict`. Marks `p` as reached.
    /// Returns how many were imported.
    pub async fn import_records(&self, p: usize) -> Result<usize, Refusal> {
        let peers = self.peers()?.clone();
        let _g = peers.import_lock(p).lock().await;
        let name = peers.name(p).to_owned();
        let who = format!("{name} (imported release record)");
        let mut n = 0;
        for pages in 0.. {
            if pages >= peers::PAGES_PER_IMPORT {
                return Err(refuse(
                    Rule::CoHolder,
                    Code::Unavailable,
                    format!(
                        "{name} has more release records for this keyshare than one import takes ({n} imported now); the rest follows on the next pass"
                    ),
                ));
            }
            let (last, mut prev) = peers.imported(p).map_err(linear_store)?;
            let page = peers.fetch_records(p, last + 1).await.map_err(|e| {
                refuse(
                    Rule::CoHolder,
                    Code::Unavailable,
                    format!("cannot fetch the release records of {name}: {e}"),
                )
            })?;
            if page.last_seq < last {
                return Err(refuse(
                    Rule::CoHolder,
                    Code::FailedPrecondition,
                    format!(
                        "{name} holds {} release record(s) for this keyshare, fewer than the {last} already imported (its store was restored or replaced?)",
                        page.last_seq
                    ),
                ));
            }
            if page.records.is_empty() {
                if page.last_seq > last {
                    return Err(refuse(
                        Rule::CoHolder,
                        Code::FailedPrecondition,
                        format!(
                            "{name} claims {} records but sent none after {last}",
                            page.last_seq
                        ),
                    ));
                }
                break;
            }
            for (i, r) in page.records.iter().enumerate() {
                let want = last + 1 + i as u64;
                let hash = peers::record_hash(r);
                if r.seq != want || r.prev_hash != prev[..] || r.record_hash != hash {
                    return Err(refuse(
                        Rule::CoHolder,
                        Code::FailedPrecondition,
                        format!(
                            "the release records of {name} do not chain at record {want} (got {}): not imported",
                            r.seq
                        ),
                    ));
                }
                let body = r.release.clone().ok_or_else(|| {
                    refuse(
                        Rule::CoHolder,
                        Code::FailedPrecondition,
                        format!("release record {want} of {name} holds no release"),
                    )
                })?;
                let outcome = self.judge(&body).await;
                let (allow, rule, reason) = match &outcome {
                    Ok(reason) => (
                        true,
                        Rule::CoHolder.name(),
                        format!("release record {want} of {name}, answered while this keyshare was unreachable: {reason}"),
                    ),
                    Err(refusal) => (
                        false,
                        Rule::CoHolderConflict.name(),
                        format!(
                            "release record {want}: {name} answered alone, while this keyshare was unreachable, a release this keyshare's ledger refuses ({})",
                            refusal.status.message()
                        ),
                    ),
                };
                if !allow {
                    tracing::error!(co_holder = %name, record = want, %reason, "co-holder conflict");
                }
                self.audit
                    .append(Decision {
                        caller: &who,
                        allow,
                        rule,
                        reason: &reason,
                        request_hash: &hash,
                    })
                    .await
                    .map_err(|e| {
                        refuse(Rule::Internal, Code::Unavailable, format!("audit log: {e}"))
                    })?;
                peers
                    .set_imported(p, want, &hash)
                    .await
                    .map_err(linear_store)?;
                prev = hash;
                n += 1;
            }
        }
        peers.set_contact(p);
        Ok(n)
    }

    /// Signs an answer to co-holder `caller` with the anchor.
    fn sign_peer(&self, kind: &str, caller: &str, nonce: &[u8], body: &[u8; 32]) -> Vec<u8> {
        self.anchor
            .sign(&psm_core::signing::peer_message(
                kind,
                &self.share.party,
                caller,
                nonce,
                body,
            ))
            .to_vec()
    }

    /// Reaches every co-holder and imports its records (run periodically by [`run`]); returns
    /// whether every co-holder has been reached since start.
    pub async fn contact_coholders(&self) -> bool {
        let Ok(peers) = self.peers() else {
            return true;
        };
        let coholders = peers.coholders();
        let results =
            futures::future::join_all(coholders.iter().map(|p| self.import_records(*p))).await;
        for (p, r) in coholders.iter().zip(results) {
            match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    co_holder = peers.name(*p),
                    imported = n,
                    "release records imported"
                ),
                Err(r) => tracing::debug!(
                    co_holder = peers.name(*p),
                    reason = r.status.message(),
                    "co-holder not reached"
                ),
            }
        }
        coholders.iter().all(|p| peers.in_contact(*p))
    }

    /// How a tfhe-track bill meets the linear track's aggregates (`cohort-bills`): its tiered
    /// cost gives the period's total, as a one-band bill would.
    fn tfhe_bill_judge(&self, checked: &Checked) -> Option<Box<policy::BillsWithAggregates>> {
        if checked.kind != ComputationKind::Bill {
            return None;
        }
        let lin = self.linear.clone()?;
        let limits = self.policy.linear_limits();
        let meter = checked.meters.first()?.clone();
        let days = (checked.first_day, checked.end_day);
        Some(Box::new(move |record| {
            lin.judge_tfhe_bill(limits, &meter, days, record)
        }))
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
        // Record the release (re-checking the stateful rules atomically) before it leaves, and
        // have every co-holder judge and record the identical release.
        lin.record(&admitted, limits).await?;
        let (confirmed, withheld) = self
            .confirm_with_coholders(RecordBody::Linear(pb.clone()))
            .await?;
        let shares: Vec<(usize, Vec<u128>)> = shares
            .into_iter()
            .filter(|(u, _)| !withheld.contains(u))
            .collect();
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
        reason.push_str(&confirmed);
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
        self.tfhe_cohort_rules(&checked, manifest)?;
        let output_hash = batch.hash();
        if manifest.output_hash != output_hash {
            return Err(refuse(
                Rule::OutputHash,
                Code::FailedPrecondition,
                "manifest output_hash does not match the ciphertexts to decrypt",
            ));
        }
        let reissue = manifest.reissue_reason.as_str();
        // The ledger knows a release by (key, manifest): what co-holders can judge too.
        let release_id = tfhe_release_hash(key_id, manifest);
        let judge = self.tfhe_bill_judge(&checked);
        self.releases
            .precheck(
                &checked,
                &self.policy,
                &release_id,
                reissue,
                judge.as_deref(),
            )
            .await?;

        // The heavy part — re-execution and partial decryption — runs for at most
        // CONCURRENT_DECRYPTIONS requests at a time.
        let permit = self.work_permit().await?;
        // Re-execute, always: the output must be bit-identical to what the approved program
        // gives on ingest's proof-checked inputs, or nothing is decrypted.
        let recomputed = match key.kind {
            KeyKind::Tfhe => {
                let registry = self.linear()?.registry();
                let started = std::time::Instant::now();
                let r = self
                    .reexec
                    .tfhe(manifest, &checked, registry, permit.clone())
                    .await;
                metrics::histogram!("psm_keyshare_reexecution_seconds", "track" => "tfhe")
                    .record(started.elapsed().as_secs_f64());
                r?
            }
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
        // Record the release (re-checking the stateful rules atomically) before it leaves, and
        // have every co-holder judge and record the identical release.
        self.releases
            .admit(
                &checked,
                &self.policy,
                &release_id,
                reissue,
                judge.as_deref(),
            )
            .await?;
        let (confirmed, withheld) = self
            .confirm_with_coholders(RecordBody::Tfhe(TfheRelease {
                key: req.key.clone(),
                manifest: Some(manifest.clone()),
            }))
            .await?;
        let partials: Vec<_> = partials
            .into_iter()
            .filter(|p| !withheld.contains(&p.share_index))
            .collect();
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
        reason.push_str(&confirmed);
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
/// (re)writes its public key, signed by the anchor, next to it as `enrollment.pub`. Returns the
/// secret, the public key and the anchor's signature.
fn load_enrollment_key(
    path: &std::path::Path,
    party: &str,
    anchor: &SecretKey,
) -> Result<(EnrollmentSecret, Vec<u8>, Vec<u8>), KeyshareError> {
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
    let file = PublishedKey::new(party, &public, anchor);
    file.write(&published).map_err(|e| bad(e.to_string()))?;
    let sig = hex::decode(&file.anchor_signature).map_err(|e| bad(e.to_string()))?;
    Ok((secret, public, sig))
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
        let outcome = self.decide(&who, &req).await;
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
            anchor_public_key: self.anchor.public().to_vec(),
            enrollment_key_signature: self.enrollment_key_signature.clone(),
            coholders_reached: self.peers.as_ref().map_or_else(Vec::new, |p| {
                p.coholders()
                    .into_iter()
                    .filter(|c| p.in_contact(*c))
                    .map(|c| p.name(c).to_owned())
                    .collect()
            }),
        }))
    }

    async fn get_receipts(
        &self,
        request: Request<GetReceiptsRequest>,
    ) -> Result<Response<GetReceiptsResponse>, Status> {
        let who = caller(&request)?.clone();
        self.limiter.admit(&who.to_string()).map_err(|r| r.status)?;
        let r = request.into_inner();
        if r.meter_ids.len() > MAX_RECEIPT_METERS {
            return Err(Status::resource_exhausted(format!(
                "{} meter ids in one request; the limit is {MAX_RECEIPT_METERS}",
                r.meter_ids.len()
            )));
        }
        if who.role == psm_net::Role::Meter && r.meter_ids.iter().any(|m| *m != who.name) {
            return Err(Status::permission_denied(
                "a meter certificate may ask only for its own receipts",
            ));
        }
        let lin = self.linear().map_err(|r| r.status)?;
        let unsettled = |lin: &LinearState| -> Result<bool, Status> {
            for m in &r.meter_ids {
                match lin.status(m, r.epoch).map_err(|x| x.status)? {
                    Some(s) if s.state != EnrollmentState::Pending => {}
                    _ => return Ok(true),
                }
            }
            Ok(false)
        };
        if unsettled(lin)? {
            if let Err(x) = self.sync_enrollments().await {
                tracing::warn!(
                    reason = x.status.message(),
                    "enrollment sync for receipts failed"
                );
            }
        }
        let mut answers = Vec::with_capacity(r.meter_ids.len());
        for m in &r.meter_ids {
            let st = lin.status(m, r.epoch).map_err(|x| x.status)?;
            answers.push(match st {
                None => ReceiptAnswer {
                    meter_id: m.clone(),
                    state: EnrollmentState::Unknown as i32,
                    receipt: None,
                    reason: if lin.registry().lookup(m).is_none() {
                        format!("meter {m} is not on this keyshare's registry")
                    } else {
                        format!("no enrollment of meter {m} for epoch {} has reached this keyshare (or its device signature did not verify)", r.epoch)
                    },
                },
                Some(s) if s.state == EnrollmentState::Active => ReceiptAnswer {
                    meter_id: m.clone(),
                    state: s.state as i32,
                    receipt: Some(EnrollmentReceipt {
                        party: self.share.party.clone(),
                        meter_id: m.clone(),
                        epoch: r.epoch,
                        manifest_hash: s.manifest_hash.to_vec(),
                        signature: self
                            .anchor
                            .sign(&psm_core::signing::receipt_message(
                                &self.share.party,
                                m,
                                r.epoch,
                                &s.manifest_hash,
                            ))
                            .to_vec(),
                    }),
                    reason: String::new(),
                },
                Some(s) => ReceiptAnswer {
                    meter_id: m.clone(),
                    state: s.state as i32,
                    receipt: None,
                    reason: if s.state == EnrollmentState::Pending {
                        "waiting for the co-holders' confirmation".into()
                    } else {
                        s.reason
                    },
                },
            });
        }
        Ok(Response::new(GetReceiptsResponse { answers }))
    }

    async fn confirm_enrollments(
        &self,
        request: Request<ConfirmEnrollmentsRequest>,
    ) -> Result<Response<ConfirmEnrollmentsResponse>, Status> {
        let who = caller(&request)?.clone();
        let peers = self.peers().map_err(|r| r.status)?;
        if peers.party_of(&who).is_none() {
            return Err(Status::permission_denied(format!(
                "{who} is not a co-holder of this keyshare"
            )));
        }
        self.limiter.admit(&who.to_string()).map_err(|r| r.status)?;
        let req = request.into_inner();
        let (refs, nonce) = (req.enrollments, req.nonce);
        if refs.len() > linear::CONFIRM_BATCH {
            return Err(Status::resource_exhausted(format!(
                "{} enrollments in one request; the limit is {}",
                refs.len(),
                linear::CONFIRM_BATCH
            )));
        }
        let lin = self.linear().map_err(|r| r.status)?;
        let mut unknown = false;
        for e in &refs {
            unknown |= lin
                .status(&e.meter_id, e.epoch)
                .map_err(|x| x.status)?
                .is_none();
        }
        if unknown {
            if let Err(x) = self.decide_enrollments().await {
                tracing::warn!(
                    reason = x.status.message(),
                    "enrollment sync for a co-holder failed"
                );
            }
        }
        let mut confirmations = Vec::with_capacity(refs.len());
        for e in refs {
            let st = lin.status(&e.meter_id, e.epoch).map_err(|x| x.status)?;
            confirmations.push(match st {
                None => EnrollmentConfirmation {
                    meter_id: e.meter_id,
                    epoch: e.epoch,
                    state: EnrollmentState::Unknown as i32,
                    manifest_hash: Vec::new(),
                    reason: String::new(),
                },
                Some(s) => EnrollmentConfirmation {
                    meter_id: e.meter_id,
                    epoch: e.epoch,
                    state: s.state as i32,
                    manifest_hash: s.manifest_hash.to_vec(),
                    reason: s.reason,
                },
            });
        }
        let signature = self.sign_peer(
            "enrollments",
            &who.name,
            &nonce,
            &peers::enrollments_answer_hash(&confirmations),
        );
        Ok(Response::new(ConfirmEnrollmentsResponse {
            confirmations,
            signature,
        }))
    }

    async fn confirm_release(
        &self,
        request: Request<ConfirmReleaseRequest>,
    ) -> Result<Response<ConfirmReleaseResponse>, Status> {
        let who_id = caller(&request)?.clone();
        let who = format!("{who_id} (co-holder confirmation)");
        let peers = self.peers().map_err(|r| r.status)?.clone();
        let Some(p) = peers.party_of(&who_id) else {
            return Err(Status::permission_denied(format!(
                "{who_id} is not a co-holder of this keyshare"
            )));
        };
        let req = request.into_inner();
        let body = match req.release {
            Some(psm_proto::v1::confirm_release_request::Release::Linear(l)) => {
                RecordBody::Linear(l)
            }
            Some(psm_proto::v1::confirm_release_request::Release::Tfhe(t)) => RecordBody::Tfhe(t),
            None => {
                return Err(Status::invalid_argument(
                    "the confirmation names no release",
                ))
            }
        };
        let hash = peers::release_hash(&body);
        let outcome: Result<(ConfirmReleaseResponse, String), Refusal> = async {
            self.limiter.admit(&who_id.to_string())?;
            // A co-holder that answered without this keyshare: its records come first (fetched
            // from it and checked against its anchor; the claim here only says when to look).
            let (imported, _) = peers.imported(p).map_err(linear_store)?;
            if req.records_for_you > imported {
                self.import_records(p).await?;
            }
            let reason = self.judge(&body).await?;
            Ok((
                ConfirmReleaseResponse {
                    admitted: true,
                    ..Default::default()
                },
                format!("confirmed for co-holder {}: {reason}", peers.name(p)),
            ))
        }
        .await;
        let refused = outcome
            .as_ref()
            .err()
            .map(|r| (r.rule.to_owned(), r.status.message().to_owned()));
        let records_for_you = peers.records_for(p).unwrap_or(0);
        let signed = |mut r: ConfirmReleaseResponse| {
            r.records_for_you = records_for_you;
            r.signature = self.sign_peer(
                "release",
                &who_id.name,
                &req.nonce,
                &peers::release_answer_hash(&r, &hash),
            );
            r
        };
        match self
            .audited(&who, &hash, "co-holder confirmation", outcome, |_, _| {})
            .await
        {
            Ok(r) => Ok(Response::new(signed(r.into_inner()))),
            Err(st) => match refused {
                Some((rule, reason)) if st.message() == reason => {
                    Ok(Response::new(signed(ConfirmReleaseResponse {
                        admitted: false,
                        rule,
                        reason,
                        ..Default::default()
                    })))
                }
                _ => Err(st),
            },
        }
    }

    async fn get_release_records(
        &self,
        request: Request<GetReleaseRecordsRequest>,
    ) -> Result<Response<ReleaseRecordPage>, Status> {
        let who = caller(&request)?.clone();
        let peers = self.peers().map_err(|r| r.status)?.clone();
        let Some(p) = peers.party_of(&who) else {
            return Err(Status::permission_denied(format!(
                "{who} is not a co-holder of this keyshare"
            )));
        };
        self.limiter.admit(&who.to_string()).map_err(|r| r.status)?;
        let r = request.into_inner();
        let (from, page_peers) = (r.from_seq, peers.clone());
        let (records, last_seq) = tokio::task::spawn_blocking(move || {
            Ok::<_, String>((
                page_peers.records_from(p, from, peers::RECORDS_PER_PAGE)?,
                page_peers.records_for(p).map_err(|e| e.to_string())?,
            ))
        })
        .await
        .map_err(|e| Status::internal(format!("release records: {e}")))?
        .map_err(|e| Status::unavailable(format!("release records: {e}")))?;
        let mut page = ReleaseRecordPage {
            records,
            last_seq,
            signature: Vec::new(),
        };
        page.signature = self.sign_peer(
            "records",
            &who.name,
            &r.nonce,
            &peers::page_hash(from, &page),
        );
        Ok(Response::new(page))
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
    svc.audit_registry_changes().await?;
    if svc.peers.is_some() {
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            loop {
                let Some(svc) = weak.upgrade() else { break };
                let all = svc.contact_coholders().await;
                drop(svc);
                // Every second until every co-holder has been reached once, then at leisure.
                let every = if all { CONTACT_SECS } else { 1 };
                tokio::time::sleep(std::time::Duration::from_secs(every)).await;
            }
        });
    }
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
