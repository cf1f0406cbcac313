//! The other keyshares that hold the same shares as this one (co-holders), reached directly over
//! mutual TLS (DESIGN.md, "Co-holder confirmation"). The utility relays everything between
//! compute and the keyshares, so it could show one holder of a share one release and the other
//! holder another; co-holders therefore confirm enrollments and releases with each other.
//!
//! When a co-holder is unreachable a keyshare may answer alone, but it appends the release to a
//! hash-chained log kept for that co-holder ([`Peers::append_record`]); the co-holder imports
//! the log into its own ledger before it answers for a shared share again.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
    ReleaseRecordPage,
};
use serde::Deserialize;
use tonic::transport::Channel;

/// Release records sent per GetReleaseRecords page.
pub const RECORDS_PER_PAGE: usize = 100;
/// Bytes of records per page (at least one record is always sent; a release is at most a few
/// tens of MB).
pub const PAGE_BYTES: usize = 16 << 20;
/// Pages one import fetches before it stops for this time (the rest follows on the next pass,
/// and until then the shares held with that co-holder are withheld).
pub const PAGES_PER_IMPORT: usize = 20;
/// Largest message between keyshares (a release of 100,000 members is ~2 MB).
const MAX_PEER_MESSAGE: usize = 64 << 20;

/// What a release record holds.
pub type RecordBody = release_record::Release;

/// One co-holder in `[keyshare.peers]`: where it is, and its anchor public key as its regulator
/// published it (the pin: a certificate from the utility's CA is not enough to answer for it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub url: String,
    /// The co-holder's `anchor.pub`.
    pub anchor: PathBuf,
}

/// Why a co-holder gave no usable answer.
#[derive(Debug, Clone)]
pub enum PeerError {
    /// It could not be reached at all: its port accepts no connection (the request cannot have
    /// been judged there).
    Unreachable(String),
    /// It was reachable but did not answer, answered late, or answered without its anchor's
    /// signature: counted as a refusal.
    Failed(String),
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Unreachable(m) | PeerError::Failed(m) => f.write_str(m),
        }
    }
}

/// The co-holders, their clients and anchors, whether each has been reached since start, and the
/// release records kept for them.
pub struct Peers {
    me: usize,
    names: Vec<String>,
    /// Per party (None for this keyshare and parties that share nothing with it).
    channels: Vec<Option<Channel>>,
    /// (host, port) per party, probed when a call fails.
    addrs: Vec<Option<(String, u16)>>,
    anchors: Vec<Option<[u8; 32]>>,
    timeout: Duration,
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
    import_locks: Vec<tokio::sync::Mutex<()>>,
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

/// A release's identity between co-holders: BLAKE3 of it as a record with only `release` set.
pub fn release_hash(body: &RecordBody) -> [u8; 32] {
    *blake3::hash(
        &ReleaseRecord {
            release: Some(body.clone()),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .as_bytes()
}

/// What a release confirmation's signature covers besides names and nonce.
pub fn release_answer_hash(r: &ConfirmReleaseResponse, release: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[u8::from(r.admitted)]);
    for s in [&r.rule, &r.reason] {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    h.update(&r.records_for_you.to_le_bytes());
    h.update(release);
    *h.finalize().as_bytes()
}

/// What an enrollment confirmation's signature covers besides names and nonce.
pub fn enrollments_answer_hash(c: &[EnrollmentConfirmation]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for x in c {
        let b = x.encode_to_vec();
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(&b);
    }
    *h.finalize().as_bytes()
}

/// What a record page's signature covers besides names and nonce.
pub fn page_hash(from: u64, page: &ReleaseRecordPage) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&from.to_le_bytes());
    h.update(&page.last_seq.to_le_bytes());
    for r in &page.records {
        h.update(&(r.record_hash.len() as u64).to_le_bytes());
        h.update(&r.record_hash);
    }
    *h.finalize().as_bytes()
}

/// 32 fresh random bytes.
pub fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn record_key(peer: usize, seq: u64) -> Vec<u8> {
    let mut k = vec![peer as u8];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Peers {
    /// Clients for every co-holder: `config` maps each co-holder's party name to its URL and
    /// anchor file; the server must present that party's keyshare certificate, and its answers
    /// must be signed by that anchor.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: &sled::Db,
        scheme: Scheme,
        me: usize,
        names: Vec<String>,
        config: &BTreeMap<String, PeerConfig>,
        tls: &TlsPaths,
        timeout: Duration,
        answer_alone: bool,
    ) -> Result<Self, String> {
        for n in config.keys() {
            if !names.contains(n) || *n == names[me] {
                return Err(format!(
                    "[keyshare.peers] names {n:?}, which is not another party of this deployment ({})",
                    names.join(", ")
                ));
            }
        }
        let mut channels = vec![None; names.len()];
        let mut addrs = vec![None; names.len()];
        let mut anchors = vec![None; names.len()];
        for p in coholders_of(scheme, me) {
            let name = &names[p];
            let c = config.get(name).ok_or_else(|| {
                format!("[keyshare.peers] has no entry for co-holder {name}: keyshares that hold the same shares confirm enrollments and releases with each other directly (url and anchor)")
            })?;
            let anchor = psm_core::signing::AnchorFile::read(&c.anchor)
                .and_then(|f| {
                    if f.party == *name {
                        f.key()
                    } else {
                        Err(psm_core::signing::SigningError::Key(format!(
                            "{} is the anchor of {}, not of {name}",
                            c.anchor.display(),
                            f.party
                        )))
                    }
                })
                .map_err(|e| format!("co-holder {name}: {e}"))?;
            let ch = psm_net::client::channel(
                &c.url,
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
            addrs[p] = Some(host_port(&c.url).map_err(|e| format!("co-holder {name}: {e}"))?);
            anchors[p] = Some(anchor);
        }
        Ok(Peers {
            me,
            contact: Mutex::new(vec![false; names.len()]),
            import_locks: (0..names.len())
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            names,
            channels,
            addrs,
            anchors,
            timeout,
            answer_alone,
            records: db
                .open_tree("peer_release_records")
                .map_err(|e| e.to_string())?,
            imports: db
                .open_tree("peer_release_imports")
                .map_err(|e| e.to_string())?,
            append_lock: tokio::sync::Mutex::new(()),
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

    /// The import lock of co-holder `p`.
    pub fn import_lock(&self, p: usize) -> &tokio::sync::Mutex<()> {
        &self.import_locks[p]
    }

    /// The co-holder a caller is, or `None` when it is not another party's keyshare.
    pub fn party_of(&self, caller: &SpiffeId) -> Option<usize> {
        if caller.role != Role::Keyshare {
            return None;
        }
        let p = self.names.iter().position(|n| *n == caller.name)?;
        (p != self.me && self.channels[p].is_some()).then_some(p)
    }

    fn client(&self, p: usize) -> Result<KeyshareClient<Channel>, PeerError> {
        let ch = self
            .channels
            .get(p)
            .and_then(Option::clone)
            .ok_or_else(|| {
                PeerError::Failed(format!("party {p} is not a co-holder of this keyshare"))
            })?;
        Ok(KeyshareClient::new(ch)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }

    /// Whether co-holder `p`'s port accepts a TCP connection within the timeout. A failed call
    /// counts as "unreachable" only when this fails too: a co-holder that is up but slow, or that
    /// failed after the request reached it, is a refusal, never a reason to answer alone.
    /// Only a refused connection, a connect timeout or an unreachable host or network count as
    /// absent; any other error (a local one, such as running out of file descriptors) counts as
    /// reachable, so it is a refusal.
    async fn reachable(&self, p: usize) -> bool {
        let Some((host, port)) = self.addrs.get(p).and_then(Option::as_ref) else {
            return true;
        };
        match tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((host.as_str(), *port)),
        )
        .await
        {
            Err(_) => false,
            Ok(Ok(_)) => true,
            Ok(Err(e)) => !matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::TimedOut
            ),
        }
    }

    async fn classify(&self, p: usize, s: tonic::Status) -> PeerError {
        let what = format!("{:?}: {}", s.code(), s.message());
        if self.reachable(p).await {
            PeerError::Failed(what)
        } else {
            PeerError::Unreachable(what)
        }
    }

    fn verify(
        &self,
        p: usize,
        kind: &str,
        nonce: &[u8],
        body: &[u8; 32],
        sig: &[u8],
    ) -> Result<(), PeerError> {
        let msg = psm_core::signing::peer_message(
            kind,
            &self.names[p],
            &self.names[self.me],
            nonce,
            body,
        );
        if self.anchors[p].is_some_and(|a| psm_core::signing::verify(&a, &msg, sig)) {
            Ok(())
        } else {
            Err(PeerError::Failed(format!(
                "the answer of {} is not signed by its anchor (an impostor with a certificate of the service CA?)",
                self.names[p]
            )))
        }
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

    /// Asks co-holder `p` for its (anchor-signed) decisions on enrollments.
    pub async fn confirm_enrollments(
        &self,
        p: usize,
        refs: Vec<EnrollmentRef>,
    ) -> Result<Vec<EnrollmentConfirmation>, PeerError> {
        let n = refs.len();
        let nonce = nonce();
        let r = match self
            .client(p)?
            .confirm_enrollments(ConfirmEnrollmentsRequest {
                enrollments: refs,
                nonce: nonce.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.classify(p, s).await),
        };
        self.verify(
            p,
            "enrollments",
            &nonce,
            &enrollments_answer_hash(&r.confirmations),
            &r.signature,
        )?;
        if r.confirmations.len() != n {
            return Err(PeerError::Failed(format!(
                "co-holder {} answered {} confirmations for {n} enrollments",
                self.names[p],
                r.confirmations.len()
            )));
        }
        Ok(r.confirmations)
    }

    /// Asks co-holder `p` to judge a release; its answer must be signed by its anchor.
    pub async fn confirm_release(
        &self,
        p: usize,
        body: RecordBody,
    ) -> Result<ConfirmReleaseResponse, PeerError> {
        let hash = release_hash(&body);
        let release = Some(match body {
            RecordBody::Linear(l) => psm_proto::v1::confirm_release_request::Release::Linear(l),
            RecordBody::Tfhe(t) => psm_proto::v1::confirm_release_request::Release::Tfhe(t),
        });
        let records_for_you = self
            .records_for(p)
            .map_err(|e| PeerError::Failed(format!("release records: {e}")))?;
        let nonce = nonce();
        let r = match self
            .client(p)?
            .confirm_release(ConfirmReleaseRequest {
                release,
                records_for_you,
                nonce: nonce.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.classify(p, s).await),
        };
        self.verify(
            p,
            "release",
            &nonce,
            &release_answer_hash(&r, &hash),
            &r.signature,
        )?;
        Ok(r)
    }

    /// Fetches one page of co-holder `p`'s records for this keyshare from `from` on, checked
    /// against its anchor.
    pub async fn fetch_records(&self, p: usize, from: u64) -> Result<ReleaseRecordPage, PeerError> {
        let nonce = nonce();
        let page = match self
            .client(p)?
            .get_release_records(GetReleaseRecordsRequest {
                from_seq: from,
                nonce: nonce.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.classify(p, s).await),
        };
        self.verify(
            p,
            "records",
            &nonce,
            &page_hash(from, &page),
            &page.signature,
        )?;
        if page.records.len() > RECORDS_PER_PAGE {
            return Err(PeerError::Failed(format!(
                "{} sent {} records in one page",
                self.names[p],
                page.records.len()
            )));
        }
        Ok(page)
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

    /// Records kept for co-holder `p` from `from` on: at most `limit`, and no more than
    /// [`PAGE_BYTES`] after the first.
    pub fn records_from(
        &self,
        p: usize,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ReleaseRecord>, String> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for kv in self
            .records
            .range(record_key(p, from.max(1))..record_key(p, u64::MAX))
        {
            let (_, v) = kv.map_err(|e| e.to_string())?;
            if !out.is_empty() && bytes + v.len() > PAGE_BYTES {
                break;
            }
            bytes += v.len();
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

/// (host, port) of an `https://` URL, port 443 when none is given — as the client connects.
pub fn host_port(url: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("URL {url:?} does not parse: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("URL {url:?} must start with https://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("URL {url:?} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
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
    fn probe_addresses_are_the_client_s() {
        assert_eq!(
            host_port("https://keyshare-2").unwrap(),
            ("keyshare-2".into(), 443)
        );
        assert_eq!(host_port("https://h:1/x").unwrap(), ("h".into(), 1));
        assert_eq!(
            host_port("https://127.0.0.1:7411").unwrap(),
            ("127.0.0.1".into(), 7411)
        );
        assert!(host_port("http://h:1").is_err());
        assert!(host_port("not a url").is_err());
    }

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
