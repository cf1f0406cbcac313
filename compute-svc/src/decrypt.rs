//! Threshold decryption through the keyshares: fan out over mTLS, combine any quorum, name
//! parties that failed or disagreed. The tfhe track asks for partial decryptions of squashed
//! ciphertexts (PartialDecrypt); the linear track asks for contributions to a release (Release)
//! and subtracts them from the body sums compute holds.

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message;
use psm_core::keys::Manifest;
use psm_core::linear::release::{check_noise, release_from_proto};
use psm_core::linear::LinearError;
use psm_core::lwe::{words_from_le_bytes, Encoding, LweBatch};
use psm_core::threshold::{
    combine, combine_bodies, Combined, PartyResponse, Scheme, SharePartial, ThresholdError,
};
use psm_core::wire::batch_to_proto;
use psm_net::quorum::{gather, Peer, QuorumError, QuorumPolicy};
use psm_net::tls::TlsPaths;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    ComputationManifest, KeyRef, LinearRelease, PartialDecryptRequest, PartyFault, QuorumReport,
    ReleaseRequest, ReleaseResponse, SharePartials,
};
use serde::Deserialize;

/// Largest encoded release compute sends: the keyshares' request limit, less room for the
/// envelope.
pub const MAX_RELEASE_BYTES: usize = psm_net::config::DEFAULT_MAX_REQUEST_BYTES - (1 << 20);

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
    /// A release compute would not ask for: malformed, or beyond the noise bound. Refused
    /// locally rather than sent to keyshares that would refuse it.
    #[error("{0}")]
    Release(#[from] LinearError),
    /// A release too large for one request.
    #[error("{0}")]
    TooLarge(String),
    /// compute's own inconsistency (a bug, not the caller's).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DecryptError> for tonic::Status {
    /// Through [`crate::error::ComputeError`], the service's one mapping.
    fn from(e: DecryptError) -> Self {
        crate::error::ComputeError::from(e).into()
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

/// A keyshare client with the message limits of the keyshares' requests and answers.
fn keyshare(ch: tonic::transport::Channel) -> KeyshareClient<tonic::transport::Channel> {
    KeyshareClient::new(ch)
        .max_decoding_message_size(psm_net::config::DEFAULT_MAX_RESPONSE_BYTES)
        .max_encoding_message_size(psm_net::config::DEFAULT_MAX_REQUEST_BYTES)
}

/// Clear values and who produced them.
#[derive(Debug, Clone)]
pub struct Decrypted {
    pub values: Vec<i128>,
    pub report: QuorumReport,
}

/// A linear release's clear values (one per output asked for, in request order), who produced
/// them, and which cohort members the keyshares' registries say a head-end encrypts (their
/// readings are plaintext to the utility; responses must say so).
#[derive(Debug, Clone)]
pub struct Released {
    pub values: Vec<i128>,
    pub report: QuorumReport,
    /// Sorted, without repeats; only members of the release's cohorts.
    pub headend_encrypted: Vec<String>,
}

/// Adds one decryption's quorum report to a request's (a request that needs several
/// decryptions reports every party used and every fault once, and is cross-checked only if every
/// decryption was). Start from [`empty_report`].
pub fn merge_report(into: &mut QuorumReport, r: QuorumReport) {
    into.cross_checked &= r.cross_checked;
    for u in r.used {
        if !into.used.contains(&u) {
            into.used.push(u);
        }
    }
    for f in r.faults {
        if !into
            .faults
            .iter()
            .any(|g| g.party == f.party && g.reason == f.reason)
        {
            into.faults.push(f);
        }
    }
}

/// Peers that failed, as reported.
fn failures(f: &[psm_net::quorum::Failure]) -> Vec<PartyFault> {
    f.iter()
        .map(|f| PartyFault {
            party: f.peer.clone(),
            reason: f.reason.clone(),
        })
        .collect()
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
                channel: psm_net::client::channel(
                    &e.url,
                    &e.name,
                    Some(psm_net::Role::Keyshare),
                    tls,
                    &opts,
                )?,
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
        } else {
            Err(DecryptError::Config(format!(
                "unknown key id {key_id:?} (the key set's tfhe key is {}; the linear track has no dealt key)",
                self.manifest.tfhe_key_id
            )))
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
                keyshare(ch)
                    .partial_decrypt(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await?;
        let mut faults = failures(&gathered.failures);
        let mut responses = Vec::new();
        for (name, resp) in &gathered.answers {
            match party_response(
                self.scheme,
                &self.party_names,
                name,
                &resp.party,
                resp.party_index,
                &resp.shares,
                batch.len(),
            ) {
                Ok(r) => responses.push(r),
                Err(reason) => faults.push(PartyFault {
                    party: name.clone(),
                    reason,
                }),
            }
        }
        let combined = combine(self.scheme, batch, encoding, noise, &responses)?;
        let report = report(&self.party_names, faults, &combined);
        Ok(Decrypted {
            values: combined.values,
            report,
        })
    }

    /// Asks the keyshares for their contributions to a linear release and combines them with
    /// the body sums compute holds: `sums[i]` is the wrapping sum of the bodies of the i-th
    /// output's effective cohort over that output's slots, in the order of `release.outputs`.
    /// The release is checked here first (shape, and every output against the noise bound),
    /// so nothing is asked for that the keyshares would refuse as malformed or that would not
    /// decode.
    pub async fn release(
        &self,
        release: LinearRelease,
        sums: &[u128],
        idempotency_key: &str,
    ) -> Result<Released, DecryptError> {
        let checked = release_from_proto(&release)?;
        if sums.len() != checked.outputs.len() {
            return Err(DecryptError::Internal(format!(
                "{} body sums for a release of {} outputs",
                sums.len(),
                checked.outputs.len()
            )));
        }
        let indices: Vec<usize> = checked.outputs.iter().map(|(i, _)| *i).collect();
        for ((index, cohort), runs) in checked.outputs.iter().zip(checked.spec.runs_of(&indices)) {
            check_noise(self.scheme, checked.cohorts[*cohort].len(), &runs)
                .map_err(|e| LinearError::NoiseBound(format!("output {index}: {}", e.detail())))?;
        }
        let request = ReleaseRequest {
            idempotency_key: idempotency_key.to_owned(),
            release: Some(release),
        };
        let size = request.encoded_len();
        if size > MAX_RELEASE_BYTES {
            return Err(DecryptError::TooLarge(format!(
                "the release would be {size} bytes (its cohorts list {} meter ids); one request holds at most {MAX_RELEASE_BYTES}: ask for fewer meters or a shorter range",
                checked.cohorts.iter().map(Vec::len).sum::<usize>()
            )));
        }
        let gathered = gather(&self.peers, self.policy, |ch| {
            let req = request.clone();
            async move { keyshare(ch).release(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        let faults = failures(&gathered.failures);
        combine_release(
            self.scheme,
            &self.party_names,
            &checked.cohorts,
            sums,
            &gathered.answers,
            faults,
        )
    }
}

/// Checks that a response comes from the party it claims (name and 1-based index) and has the
/// right shape: only shares that party holds, each once, `count` values each.
fn party_response(
    scheme: Scheme,
    party_names: &[String],
    name: &str,
    party: &str,
    party_index: u32,
    partials: &[SharePartials],
    count: usize,
) -> Result<PartyResponse, String> {
    let index = party_names
        .iter()
        .position(|n| n == name)
        .ok_or_else(|| format!("{name} is not a party of this key set"))?;
    if party != name || party_index as usize != index + 1 {
        return Err(format!(
            "answered as {party} (#{party_index}), expected {name} (#{})",
            index + 1
        ));
    }
    let mut shares = Vec::new();
    let mut seen = BTreeSet::new();
    for s in partials {
        if !seen.insert(s.share_index) {
            return Err(format!("sent share {} twice", s.share_index));
        }
        if !scheme.holds(index, s.share_index as usize) {
            return Err(format!(
                "sent share {} which party #{} does not hold",
                s.share_index,
                index + 1
            ));
        }
        if s.partials.len() != count * 16 {
            return Err(format!(
                "share {}: {} bytes of partials; {count} values are {} bytes",
                s.share_index,
                s.partials.len(),
                count * 16
            ));
        }
        let values = words_from_le_bytes(&s.partials).map_err(|e| e.to_string())?;
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

/// The report of a request before any decryption: nothing used, nothing unchecked.
pub fn empty_report() -> QuorumReport {
    QuorumReport {
        cross_checked: true,
        ..QuorumReport::default()
    }
}

/// The quorum report: failures and malformed answers, parties the combiner excluded, and the
/// parties whose contributions were used.
fn report(
    party_names: &[String],
    mut faults: Vec<PartyFault>,
    combined: &Combined,
) -> QuorumReport {
    let name = |p: usize| {
        party_names
            .get(p)
            .cloned()
            .unwrap_or_else(|| format!("party #{}", p + 1))
    };
    for (p, reason) in &combined.faulty {
        faults.push(PartyFault {
            party: name(*p),
            reason: reason.clone(),
        });
    }
    QuorumReport {
        used: combined.used.iter().map(|p| name(*p)).collect(),
        faults,
        cross_checked: combined.cross_checked,
    }
}

/// Validates the keyshares' answers to a release (a malformed one is reported as a fault and
/// not used) and combines them with the body sums: value i = decode(sums[i] − Σ_U d_U,i).
fn combine_release(
    scheme: Scheme,
    party_names: &[String],
    cohorts: &[Vec<String>],
    sums: &[u128],
    answers: &[(String, ReleaseResponse)],
    mut faults: Vec<PartyFault>,
) -> Result<Released, DecryptError> {
    let is_member = |m: &str| {
        cohorts
            .iter()
            .any(|c| c.binary_search_by(|x| x.as_str().cmp(m)).is_ok())
    };
    let mut responses = Vec::new();
    let mut headend = BTreeSet::new();
    for (name, resp) in answers {
        let checked = party_response(
            scheme,
            party_names,
            name,
            &resp.party,
            resp.party_index,
            &resp.shares,
            sums.len(),
        )
        .and_then(
            |r| match resp.headend_encrypted.iter().find(|m| !is_member(m)) {
                Some(m) => Err(format!(
                    "lists {m:?} as head-end encrypted, which is in no cohort of the release"
                )),
                None => Ok(r),
            },
        );
        match checked {
            Ok(r) => {
                responses.push(r);
                headend.extend(resp.headend_encrypted.iter().cloned());
            }
            Err(reason) => faults.push(PartyFault {
                party: name.clone(),
                reason,
            }),
        }
    }
    let combined = combine_bodies(
        scheme,
        sums,
        psm_core::linear::ENCODING,
        psm_core::linear::FLOOD_LOG2,
        &responses,
    )?;
    let report = report(party_names, faults, &combined);
    Ok(Released {
        values: combined.values,
        report,
        headend_encrypted: headend.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use psm_core::linear::encrypt::IntervalMasks;
    use psm_core::linear::key::{cohort_share_key, MeterSeeds};
    use psm_core::linear::mask::{mask_sum, SlotRun};
    use psm_core::linear::release::{cohort_hash, contribution, output_hash, Release};
    use psm_core::linear::Channel;
    use psm_core::lwe::words_to_le_bytes;
    use psm_core::threshold::FloodKey;
    use psm_proto::v1::{
        AggregateProgram, Cohort, ComputationKind, ReleaseOutput, TariffBand, TimeRange,
    };

    const START: i64 = 20_000 * 86_400;

    fn names() -> Vec<String> {
        (1..=3).map(|i| format!("keyshare-{i}")).collect()
    }

    /// An hourly aggregate release over two hours for `meters`, both outputs on cohort 0.
    fn aggregate(meters: &[&str]) -> LinearRelease {
        LinearRelease {
            kind: ComputationKind::Aggregate as i32,
            epoch: 1,
            channel: Channel::Import.to_proto() as i32,
            program: AggregateProgram {
                granularity_seconds: 3600,
            }
            .encode_to_vec(),
            range: Some(TimeRange {
                start_unix: START,
                end_unix: START + 7200,
            }),
            cohorts: vec![Cohort {
                meter_ids: meters.iter().map(|m| m.to_string()).collect(),
            }],
            outputs: (0..2)
                .map(|index| ReleaseOutput { index, cohort: 0 })
                .collect(),
            reissue_reason: String::new(),
        }
    }

    /// What an honest party answers: for each share it holds, d_U per output.
    fn answer(
        scheme: Scheme,
        party: usize,
        release: &Release,
        seeds: &[MeterSeeds],
    ) -> ReleaseResponse {
        let flood = FloodKey([party as u8 + 1; 32]);
        let shares = scheme
            .held_by(party)
            .into_iter()
            .map(|u| {
                let mut words = Vec::new();
                for (index, c) in &release.outputs {
                    let runs = release.spec.output_runs(*index);
                    let members: Vec<_> = seeds.iter().map(|s| &s.seeds[u]).collect();
                    let key = cohort_share_key(&members, release.spec.channel);
                    let hash =
                        output_hash(&release.spec, &cohort_hash(&release.cohorts[*c]), &runs);
                    words.push(contribution(
                        &mask_sum(release.spec.epoch, &runs),
                        &key.0,
                        &flood,
                        u,
                        &hash,
                    ));
                }
                SharePartials {
                    share_index: u as u32,
                    partials: words_to_le_bytes(&words),
                }
            })
            .collect();
        ReleaseResponse {
            party: format!("keyshare-{}", party + 1),
            party_index: party as u32 + 1,
            shares,
            audit_seq: 1,
            headend_encrypted: Vec::new(),
        }
    }

    #[test]
    fn released_contributions_combine_to_the_clear_sums() {
        let scheme = Scheme::new(3, 2).unwrap();
        let meters = ["a", "b", "c"];
        let seeds: Vec<MeterSeeds> = meters
            .iter()
            .map(|_| MeterSeeds::generate(scheme, 1))
            .collect();
        // Quarter-hourly readings over the two hours; bucket sums of the bodies.
        let masks = IntervalMasks::new(1, (START / 300) as u64, 3, 8);
        let values: Vec<Vec<i64>> = (0..3)
            .map(|m| (0..8).map(|i| 100 * m + i).collect())
            .collect();
        let mut sums = [0u128; 2];
        for (s, v) in seeds.iter().zip(&values) {
            let bodies = masks.encrypt(&s.key(Channel::Import), 0, v).unwrap();
            for (i, b) in bodies.iter().enumerate() {
                sums[i / 4] = sums[i / 4].wrapping_add(*b);
            }
        }
        let want: Vec<i128> = (0..2)
            .map(|b| {
                values
                    .iter()
                    .map(|v| v[b * 4..b * 4 + 4].iter().sum::<i64>() as i128)
                    .sum()
            })
            .collect();
        let proto = aggregate(&meters);
        let release = release_from_proto(&proto).unwrap();
        let answers: Vec<(String, ReleaseResponse)> = (0..3)
            .map(|p| {
                let mut r = answer(scheme, p, &release, &seeds);
                if p == 1 {
                    r.headend_encrypted = vec!["b".into()];
                }
                (format!("keyshare-{}", p + 1), r)
            })
            .collect();
        let out = combine_release(
            scheme,
            &names(),
            &release.cohorts,
            &sums,
            &answers,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(out.values, want);
        assert_eq!(out.headend_encrypted, vec!["b".to_string()]);
        assert!(out.report.faults.is_empty(), "{:?}", out.report.faults);

        // Any two parties suffice; a malformed third is named and not used.
        let mut bad = answers.clone();
        bad[2].1.party_index = 1;
        let out =
            combine_release(scheme, &names(), &release.cohorts, &sums, &bad, Vec::new()).unwrap();
        assert_eq!(out.values, want);
        assert_eq!(out.report.used, ["keyshare-1", "keyshare-2"]);
        assert_eq!(out.report.faults[0].party, "keyshare-3");

        // Malformed answers: a share sent twice, one the party does not hold, a short one,
        // a head-end list naming a non-member.
        let mut twice = answers[0].clone();
        twice.1.shares.push(twice.1.shares[0].clone());
        let mut foreign = answers[0].clone();
        foreign.1.shares[0].share_index = 0; // party 0 does not hold share 0 (U = {0})
        let mut short = answers[0].clone();
        short.1.shares[0].partials.truncate(16);
        let mut stranger = answers[0].clone();
        stranger.1.headend_encrypted = vec!["zz".into()];
        for (what, a) in [
            ("twice", twice),
            ("foreign", foreign),
            ("short", short),
            ("stranger", stranger),
        ] {
            let r = combine_release(
                scheme,
                &names(),
                &release.cohorts,
                &sums,
                &[a, answers[1].clone()],
                Vec::new(),
            );
            assert!(
                matches!(r, Err(DecryptError::Combine(ThresholdError::NoQuorum(_)))),
                "{what}: {r:?}"
            );
        }

        // In 2-of-3 each share has two holders: when their contributions disagree, nobody can
        // tell which one lied, and nothing is decrypted.
        let mut liar = answers.clone();
        let w = u128::from_le_bytes(liar[0].1.shares[0].partials[..16].try_into().unwrap());
        liar[0].1.shares[0].partials[..16].copy_from_slice(&w.wrapping_add(1 << 100).to_le_bytes());
        let r = combine_release(scheme, &names(), &release.cohorts, &sums, &liar, Vec::new());
        assert!(
            matches!(
                r,
                Err(DecryptError::Combine(ThresholdError::Undecidable(_)))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn bill_runs_match_the_keyshares_derivation() {
        let band = |name: &str, s: u32, e: u32| TariffBand {
            name: name.into(),
            weekday_mask: 0x7F,
            start_hour: s,
            end_hour: e,
            import_price_milli: 1,
            export_price_milli: 1,
            month_mask: 0,
        };
        let tariff = psm_proto::v1::Tariff {
            name: "t".into(),
            time_zone: "Europe/London".into(),
            bands: vec![
                band("night", 0, 7),
                band("day", 7, 23),
                band("late", 23, 24),
            ],
            currency: "GBP".into(),
            ..Default::default()
        };
        let mut proto = aggregate(&["a"]);
        proto.kind = ComputationKind::Bill as i32;
        proto.program = tariff.encode_to_vec();
        // Three days across the spring change, from 00:15 UTC.
        let start = 1_774_656_000 + 900; // 2026-03-28T00:15Z
        proto.range = Some(TimeRange {
            start_unix: start,
            end_unix: start + 3 * 86_400,
        });
        proto.outputs = vec![
            ReleaseOutput {
                index: 0,
                cohort: 0,
            },
            ReleaseOutput {
                index: 2,
                cohort: 0,
            },
        ];
        let spec = release_from_proto(&proto).unwrap().spec;
        let runs = spec.runs_of(&[0, 1, 2]);
        for (i, r) in runs.iter().enumerate() {
            assert_eq!(*r, spec.output_runs(i), "band {i}");
        }
        assert!(runs.iter().all(|r| !r.is_empty()));
    }

    #[test]
    fn refusals_map_to_statuses() {
        let e = release_from_proto(&LinearRelease::default()).unwrap_err();
        assert_eq!(
            tonic::Status::from(DecryptError::from(e)).code(),
            tonic::Code::InvalidArgument
        );
        let nb = check_noise(
            Scheme::new(3, 2).unwrap(),
            1,
            &[SlotRun {
                start: 0,
                end: 1,
                weight: psm_core::linear::MAX_WEIGHT + 1,
            }],
        )
        .unwrap_err();
        let s = tonic::Status::from(DecryptError::from(nb));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("noise-bound: "), "{}", s.message());
        assert_eq!(
            tonic::Status::from(DecryptError::TooLarge("x".into())).code(),
            tonic::Code::ResourceExhausted
        );
    }
}
