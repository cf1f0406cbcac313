//! Verification by re-execution of tfhe-track programs (the linear track needs none: a keyshare
//! derives what it releases itself). The keyshare fetches the inputs a manifest names from ingest,
//! checks they are the stored bytes, evaluates the program itself with the same code compute
//! uses, and compares the output. Evaluation is deterministic, so an honest compute node's output
//! is reproduced exactly; anything else is refused.

use std::sync::Arc;

use prost::Message;
use psm_core::lwe::LweBatch;
use psm_core::readings::DAY_SECONDS;
use psm_net::client::{fetch_days, FetchError, Wanted};
use psm_proto::v1::{ComputationKind, ComputationManifest, TimeRange, Track};
use tonic::transport::Channel;
use tonic::Code;

use crate::policy::{refuse, Checked, Refusal};
use crate::rules::Rule;

const RULE: Rule = Rule::ReExecution;

/// Re-executes programs against ingest's stored readings.
pub struct Reexecutor {
    /// None when no ingest is configured: requests needing re-execution are then refused.
    pub ingest: Option<Channel>,
    /// The public bundle, for the tfhe track's server key and CRS (loaded on first use).
    pub public_dir: Option<std::path::PathBuf>,
    pub tfhe_keys: tokio::sync::OnceCell<Arc<TfheKeys>>,
}

/// What re-executing a tfhe-track program needs.
pub struct TfheKeys {
    pub server_key: tfhe::ServerKey,
    pub verifier: psm_core::registers::RegisterVerifier,
}

fn mismatch(msg: impl std::fmt::Display) -> Refusal {
    refuse(RULE, Code::FailedPrecondition, msg)
}

impl Reexecutor {
    fn ingest(&self) -> Result<Channel, Refusal> {
        self.ingest.clone().ok_or_else(|| {
            refuse(
                RULE,
                Code::FailedPrecondition,
                "this keyshare has no [keyshare] ingest_url, so it cannot re-execute computations and releases none that need it",
            )
        })
    }

    /// Loads the server key once; `permit` is held by the loading task itself, so a cancelled
    /// request cannot leave a load running outside the permits and start another.
    async fn load_tfhe(&self, permit: crate::WorkPermit) -> Result<Arc<TfheKeys>, Refusal> {
        let dir = self.public_dir.clone().ok_or_else(|| {
            refuse(
                RULE,
                Code::FailedPrecondition,
                "re-executing tfhe-track programs needs [keyshare] public_dir (the public key bundle)",
            )
        })?;
        self.tfhe_keys
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let _held = permit;
                    let bundle =
                        psm_core::ceremony::PublicBundle::open(&dir).map_err(|e| e.to_string())?;
                    let server_key = bundle
                        .compressed_server_key()
                        .map_err(|e| e.to_string())?
                        .decompress();
                    psm_core::tfhe_program::install_server_key(&server_key);
                    let verifier = bundle.register_verifier().map_err(|e| e.to_string())?;
                    Ok::<_, String>(Arc::new(TfheKeys {
                        server_key,
                        verifier,
                    }))
                })
                .await
                .map_err(|e| e.to_string())?
            })
            .await
            .cloned()
            .map_err(|e| {
                refuse(
                    RULE,
                    Code::Unavailable,
                    format!("cannot load the tfhe keys: {e}"),
                )
            })
    }

    /// Fetches a tfhe-track manifest's register lists, expands them and re-runs its program
    /// (a bill's demand and tier part, or a histogram) exactly as compute does.
    /// `permit` is held by the evaluation itself, which outlives a cancelled request.
    /// Every input must carry its meter's device signature under `registry`'s key, so neither a
    /// head-end nor ingest can substitute registers.
    pub async fn tfhe(
        &self,
        m: &ComputationManifest,
        c: &Checked,
        registry: &psm_core::registry::Registry,
        permit: crate::WorkPermit,
    ) -> Result<LweBatch, Refusal> {
        let ingest = self.ingest()?;
        let range = TimeRange {
            start_unix: c.first_day * DAY_SECONDS,
            end_unix: c.end_day * DAY_SECONDS,
        };
        let wanted: Wanted = m
            .inputs
            .iter()
            .map(|r| {
                (
                    (r.meter_id.clone(), r.day.clone()),
                    Some(r.ciphertext_hash.clone()),
                )
            })
            .collect();
        let mut got = fetch_days(ingest, &wanted, range, Track::Tfhe)
            .await
            .map_err(|e| match e {
                FetchError::Unavailable(_) => refuse(RULE, Code::Unavailable, e),
                _ => mismatch(e),
            })?;
        for b in got.values() {
            let device = registry
                .lookup(&b.meter_id)
                .ok_or_else(|| crate::linear::not_registered(&b.meter_id))?
                .device_key;
            if let Some(device) = device {
                psm_core::signing::verify_batch(b, &device)
                    .map_err(|e| refuse(Rule::DeviceSignature, Code::PermissionDenied, e))?;
            }
        }
        let lists: Vec<Vec<u8>> = m
            .inputs
            .iter()
            .filter_map(|r| got.remove(&(r.meter_id.clone(), r.day.clone())))
            .map(|b| b.ciphertext)
            .collect();
        // The inputs are the stored bytes: only now is the server key worth loading.
        let keys = self.load_tfhe(permit.clone()).await?;
        let inputs = m.inputs.clone();
        let kind = c.kind;
        let program = m.program.clone();
        let parts = tokio::task::spawn_blocking(move || {
            let _held = permit;
            use rayon::prelude::*;
            tfhe::set_server_key(keys.server_key.clone());
            let expanded = inputs
                .par_iter()
                .zip(lists.par_iter())
                .map(|(r, bytes)| keys.verifier.expand(&r.meter_id, &r.day, bytes))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| mismatch(format!("stored registers: {e}")))?;
            let quiet = |_: &str, _: u32| {};
            let eval =
                |e: tfhe::Error| refuse(RULE, Code::Internal, format!("tfhe evaluation: {e}"));
            match kind {
                ComputationKind::Bill => {
                    let t = psm_proto::v1::Tariff::decode(program.as_slice()).map_err(|e| {
                        refuse(
                            Rule::Manifest,
                            Code::InvalidArgument,
                            format!("tariff: {e}"),
                        )
                    })?;
                    let t = psm_tariff::from_proto(&t)
                        .map_err(|e| refuse(Rule::Manifest, Code::InvalidArgument, e))?;
                    psm_core::tfhe_program::bill_registers(
                        expanded,
                        t.demand_rate_per_kw_milli > 0,
                        &t.tiers,
                        &quiet,
                    )
                    .map_err(eval)
                }
                ComputationKind::Analytics => {
                    let q = psm_proto::v1::AnalyticsRequest::decode(program.as_slice()).map_err(
                        |e| refuse(Rule::Manifest, Code::InvalidArgument, format!("query: {e}")),
                    )?;
                    // One group per meter id, whatever order the inputs came in (the manifest
                    // check requires canonical order, and every day of the range per meter).
                    let mut by_meter: std::collections::BTreeMap<&str, Vec<tfhe::FheUint32>> =
                        std::collections::BTreeMap::new();
                    for (r, (_, total)) in inputs.iter().zip(expanded) {
                        by_meter.entry(r.meter_id.as_str()).or_default().push(total);
                    }
                    let per_meter: Vec<Vec<tfhe::FheUint32>> = by_meter.into_values().collect();
                    psm_core::tfhe_program::histogram(per_meter, &q.band_edges_wh, &quiet)
                        .map_err(eval)
                }
                _ => Err(mismatch("only bills and analytics are tfhe-track programs")),
            }
        })
        .await
        .map_err(|e| {
            refuse(
                RULE,
                Code::Internal,
                format!("re-execution task failed: {e}"),
            )
        })??;
        Ok(psm_core::tfhe_program::concat(&parts).0)
    }
}
