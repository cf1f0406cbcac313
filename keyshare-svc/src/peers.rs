//! The other keyshares that hold the same shares as this one (co-holders), reached directly over
//! mutual TLS (DESIGN.md, "Co-holder confirmation"). The utility relays everything between
//! compute and the keyshares, so it could show one holder of a share one release and the other
//! holder another; co-holders therefore confirm enrollments and releases with each other.
//!
//! When a co-holder is unreachable a keyshare may answer alone, but it appends the release to a
//! hash-chained log kept for that co-holder ([`Peers::append_record`]); the co-holder imports
//! the log into its own ledger before it answers for a shared share again.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use psm_core::threshold::Scheme;
use psm_net::tls::TlsPaths;
use psm_net::{Role, SpiffeId};
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{
    release_record, ConfirmEnrollmentsRequest, ConfirmReleaseRequest, ConfirmReleaseResponse,
    EnrollmentConfirmation, EnrollmentRef, GetReleaseRecordsRequest, ReleaseRecord,
};
use tonic::transport::Channel;
use tonic::Status;

/// Release records sent per GetReleaseRecords page.
pub const RECORDS_PER_PAGE: usize = 1_000;
/// Largest message between keyshares (a release of 100,000 members is ~2 MB).
const MAX_PEER_MESSAGE: usize = 64 << 20;

/// What a release record holds.
pub type RecordBody = release_record::Release;

/// The co-holders, their clients, whether each has been reached since start, and the release
/// records kept for them.
pub struct Peers {
    me: usize,
    names: Vec<String>,
    /// Per party (None for this keyshare and parties that share nothing with it).
    channels: Vec<Option<Channel>>,
    /// Answer alone (recording the release) when a co-holder that was reached since start is
    /// unreachable now.
    pub answer_alone: bool,
    contact: Mutex<Vec<bool>>,
    /// peer ‖ seq (big-endian) → ReleaseRecord.
    records: sled::Tree,
    /// peer → last imported seq ‖ its record hash.
    imports: sled::Tree,
    append_lock: tokio::sync::Mutex<()>,
    /// One import per co-holder at a time.
    pub import_lock: tokio::sync::Mutex<()>,
    db: sled::Db,
}

/// The record hash: BLAKE3 over a domain and the record encoded with `record_hash` empty.
pub fn record_hash(r: &ReleaseRecord) -> [u8; 32] {
    let mut c = r.clone();
    c.record_hash.clear();
    let mut h = blake3::Hasher::new();
    h.update(b"psm/v2/release-record");
    h.update(&c.encode_to_vec());
    *h.finalize().as_bytes()
}

fn record_key(peer: usize, seq: u64) -> Vec<u8> {
    let mut k = vec![peer as u8];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Whether a failed call means the co-holder could not be reached (rather than that it answered).
pub fn unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) || (s.code() == tonic::Code::Unknown && s.message().contains("transport"))
}

impl Peers {
    /// Clients for every co-holder: `urls` maps each co-holder's party name to its URL; the
    /// server must present that party's keyshare certificate.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: &sled::Db,
        scheme: Scheme,
        me: usize,
        names: Vec<String>,
        urls: &BTreeMap<String, String>,
        tls: &TlsPaths,
        timeout: Duration,
        answer_alone: bool,
    ) -> Result<Self, String> {
        for n in urls.keys() {
            if !names.contains(n) || *n == names[me] {
                return Err(format!(
                    "[keyshare.peers] names {n:?}, which is not another party of this deployment ({})",
                    names.join(", ")
                ));
            }
        }
        let mut channels = vec![None; names.len()];
        for p in coholders_of(scheme, me) {
            let name = &names[p];
            let url = urls.get(name).ok_or_else(|| {
                format!("[keyshare.peers] has no URL for co-holder {name}: keyshares that hold the same shares confirm enrollments and releases with each other directly")
            })?;
            let ch = psm_net::client::channel(
                url,
                name,
                Some(Role::Keyshare),
                tls,
                &psm_net::client::ClientOptions {
                    connect_timeout: timeout,
                    request_timeout: timeout,
                },
            )
            .map_err(|e| format!("co-holder {name}: {e}"))?;
            channels[p] = Some(ch);
        }
        Ok(Peers {
            me,
            contact: Mutex::new(vec![false; names.len()]),
            names,
            channels,
            answer_alone,
            records: db
                .open_tree("peer_release_records")
                .map_err(|e| e.to_string())?,
            imports: db
                .open_tree("peer_release_imports")
                .map_err(|e| e.to_string())?,
            append_lock: tokio::sync::Mutex::new(()),
            import_lock: tokio::sync::Mutex::new(()),
            db: db.clone(),
        })
    }

    /// The co-holders' party indices.
    pub fn coholders(&self) -> Vec<usize> {
        (0..self.channels.len())
            .filter(|p| self.channels[*p].is_some())
            .collect()
    }

    pub fn name(&self, p: usize) -> &str {
        &self.names[p]
    }

    /// The co-holder a caller is, or `None` when it is not another party's keyshare.
    pub fn party_of(&self, caller: &SpiffeId) -> Option<usize> {
        if caller.role != Role::Keyshare {
            return None;
        }
        let p = self.names.iter().position(|n| *n == caller.name)?;
        (p != self.me && self.channels[p].is_some()).then_some(p)
    }

    fn client(&self, p: usize) -> Result<KeyshareClient<Channel>, Status> {
        let ch = self
            .channels
            .get(p)
            .and_then(Option::clone)
            .ok_or_else(|| {
                Status::internal(format!("party {p} is not a co-holder of this keyshare"))
            })?;
        Ok(KeyshareClient::new(ch)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }

    /// Whether co-holder `p` has been reached (and its records imported) since this start.
    pub fn in_contact(&self, p: usize) -> bool {
        self.contact
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(p)
            .copied()
            .unwrap_or(false)
    }

    pub fn set_contact(&self, p: usize) {
        if let Some(c) = self
            .contact
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(p)
        {
            *c = true;
        }
    }

    /// Asks co-holder `p` for its decisions on enrollments.
    pub async fn confirm_enrollments(
        &self,
        p: usize,
        refs: Vec<EnrollmentRef>,
    ) -> Result<Vec<EnrollmentConfirmation>, Status> {
        let n = refs.len();
        let r = self
            .client(p)?
            .confirm_enrollments(ConfirmEnrollmentsRequest { enrollments: refs })
            .await?
            .into_inner();
        if r.confirmations.len() != n {
            return Err(Status::internal(format!(
                "co-holder {} answered {} confirmations for {n} enrollments",
                self.names[p],
                r.confirmations.len()
            )));
        }
        Ok(r.confirmations)
    }

    /// Asks co-holder `p` to judge a release.
    pub async fn confirm_release(
        &self,
        p: usize,
        body: RecordBody,
    ) -> Result<ConfirmReleaseResponse, Status> {
        let release = Some(match body {
            RecordBody::Linear(l) => psm_proto::v1::confirm_release_request::Release::Linear(l),
            RecordBody::Tfhe(t) => psm_proto::v1::confirm_release_request::Release::Tfhe(t),
        });
        let records_for_you = self
            .records_for(p)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(self
            .client(p)?
            .confirm_release(ConfirmReleaseRequest {
                release,
                records_for_you,
            })
            .await?
            .into_inner())
    }

    /// Fetches co-holder `p`'s records for this keyshare from `from` on (one page at most).
    pub async fn fetch_records(&self, p: usize, from: u64) -> Result<Vec<ReleaseRecord>, Status> {
        let mut s = self
            .client(p)?
            .get_release_records(GetReleaseRecordsRequest { from_seq: from })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await? {
            out.push(r);
            if out.len() >= RECORDS_PER_PAGE {
                break;
            }
        }
        Ok(out)
    }

    /// Records kept for co-holder `p` (the last sequence number; they start at 1).
    pub fn records_for(&self, p: usize) -> Result<u64, sled::Error> {
        Ok(self
            .records
            .scan_prefix([p as u8])
            .next_back()
            .transpose()?
            .map_or(0, |(k, _)| u64_at(&k, 1)))
    }

    /// Appends a release answered without co-holder `p`'s confirmation, durably; returns its
    /// sequence number.
    pub async fn append_record(&self, p: usize, body: RecordBody) -> Result<u64, sled::Error> {
        let _g = self.append_lock.lock().await;
        let last = self
            .records
            .scan_prefix([p as u8])
            .next_back()
            .transpose()?;
        let (seq, prev) = match last {
            Some((k, v)) => {
                let prev = ReleaseRecord::decode(v.as_ref())
                    .map(|r| r.record_hash)
                    .unwrap_or_default();
                (u64_at(&k, 1) + 1, prev)
            }
            None => (1, vec![0u8; 32]),
        };
        let mut r = ReleaseRecord {
            seq,
            unix_time: unix_now(),
            release: Some(match body {
                RecordBody::Linear(l) => release_record::Release::Linear(l),
                RecordBody::Tfhe(t) => release_record::Release::Tfhe(t),
            }),
            prev_hash: prev,
            record_hash: Vec::new(),
        };
        r.record_hash = record_hash(&r).to_vec();
        self.records.insert(record_key(p, seq), r.encode_to_vec())?;
        self.db.flush_async().await?;
        Ok(seq)
    }

    /// Records kept for co-holder `p` from `from` on, at most `limit`.
    pub fn records_from(
        &self,
        p: usize,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ReleaseRecord>, String> {
        let mut out = Vec::new();
        for kv in self
            .records
            .range(record_key(p, from.max(1))..record_key(p, u64::MAX))
        {
            let (_, v) = kv.map_err(|e| e.to_string())?;
            out.push(ReleaseRecord::decode(v.as_ref()).map_err(|e| e.to_string())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The last record imported from co-holder `p`: (seq, record hash).
    pub fn imported(&self, p: usize) -> Result<(u64, [u8; 32]), sled::Error> {
        Ok(match self.imports.get([p as u8])? {
            Some(v) if v.len() == 40 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&v[8..]);
                (u64_at(&v, 0), h)
            }
            _ => (0, [0u8; 32]),
        })
    }

    /// Notes that record `seq` (hash `hash`) of co-holder `p` was imported, durably.
    pub async fn set_imported(
        &self,
        p: usize,
        seq: u64,
        hash: &[u8; 32],
    ) -> Result<(), sled::Error> {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(hash);
        self.imports.insert([p as u8], v)?;
        self.db.flush_async().await?;
        Ok(())
    }
}

/// Parties other than `me` that hold at least one share `me` holds.
pub fn coholders_of(scheme: Scheme, me: usize) -> Vec<usize> {
    let mine = scheme.held_by(me);
    (0..scheme.parties())
        .filter(|p| *p != me && mine.iter().any(|u| scheme.holds(*p, *u)))
        .collect()
}

/// The co-holders of share `u` other than `me`.
pub fn holders_of(scheme: Scheme, u: usize, me: usize) -> Vec<usize> {
    (0..scheme.parties())
        .filter(|p| *p != me && scheme.holds(*p, u))
        .collect()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_other_party_co_holds_in_two_of_three_and_records_chain() {
        let s = Scheme::new(3, 2).unwrap();
        assert_eq!(coholders_of(s, 0), vec![1, 2]);
        let s5 = Scheme::new(5, 3).unwrap();
        assert_eq!(coholders_of(s5, 0), vec![1, 2, 3, 4]);
        for u in s.held_by(0) {
            assert_eq!(holders_of(s, u, 0).len(), 1);
        }
        let mut r = ReleaseRecord {
            seq: 1,
            prev_hash: vec![0; 32],
            ..Default::default()
        };
        r.record_hash = record_hash(&r).to_vec();
        let h = record_hash(&r);
        assert_eq!(r.record_hash, h);
        r.seq = 2;
        assert_ne!(record_hash(&r), h);
    }
}
