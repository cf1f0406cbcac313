//! Harness for end-to-end tests: a throwaway dev PKI, service processes started from the real
//! binaries in `target/release`, and mTLS clients. Every process is killed when its handle drops.

pub mod keys;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use psm_net::pki::{DevPki, Validity};
use psm_net::tls::TlsPaths;
use psm_net::Role;
use tonic::transport::Channel;

/// Path of a workspace binary next to the running test executable (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --release --workspace`, which builds every binary",
        path.display()
    );
    path
}

/// Runs the `psm` command line with `args` (off the async runtime's worker) and returns what it
/// wrote and how it exited.
pub fn psm_output<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(bin("psm"));
    cmd.args(args);
    let mut run = move || cmd.output().expect("psm runs");
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(run),
        Err(_) => run(),
    }
}

/// `psm audit SUB` against keyshare-1 on 127.0.0.1:`port` with the test PKI in `pki`.
pub fn audit_args(sub: &str, port: u16, pki: &Path) -> Vec<std::ffi::OsString> {
    let endpoint = format!("https://127.0.0.1:{port}");
    [
        "audit",
        sub,
        "--server-name",
        "keyshare-1",
        "--endpoint",
        &endpoint,
        "--pki",
    ]
    .iter()
    .map(Into::into)
    .chain([pki.as_os_str().to_owned()])
    .collect()
}

/// [`psm_output`] for a command that must succeed: its standard output (the failure shows both
/// streams).
pub fn psm<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = psm_output(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psm {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// Taken below the kernel's ephemeral range where there is room: a port the kernel hands out
/// (`bind(0)`) can be given to some client's outgoing connection before the service binds it
/// ("Address already in use"), a port below the range cannot. Each process walks its own
/// sequence, so parallel tests in one binary never pick the same port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 1_000 {
        let span = ephemeral_low - LOW;
        let base = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span.min(5_000) {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (LOW + (base + k) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A dev PKI in a temporary directory, and the ports its keyshares listen on (fixed per name,
/// so keyshares can name each other as co-holders, and a restarted keyshare keeps its address).
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    keyshare_ports: std::sync::Mutex<std::collections::BTreeMap<String, u16>>,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        psm_net::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = DevPki::init(dir.path(), trust_domain, false).expect("dev PKI");
        TestPki {
            dir,
            pki,
            keyshare_ports: Default::default(),
        }
    }

    /// Keyshare `name`'s anchor public key file (`anchor.pub` in its data directory), made
    /// before the keyshare first starts, as a regulator would hand it to the other keyshares.
    pub fn anchor(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("{name}-data"));
        let public = dir.join("anchor.pub");
        if !public.exists() {
            psm_core::signing::AnchorFile::init(name, &dir.join("anchor.key"), &public)
                .expect("anchor key");
        }
        public
    }

    /// The port keyshare `name` listens on in this test.
    pub fn keyshare_port(&self, name: &str) -> u16 {
        *self
            .keyshare_ports
            .lock()
            .expect("port map")
            .entry(name.to_owned())
            .or_insert_with(free_port)
    }

    /// TLS material of an identity (issuing it if `init` did not).
    pub fn tls(&self, role: Role, name: &str) -> TlsPaths {
        let (cert, key) = self.pki.paths(role, name);
        if !cert.exists() {
            self.pki
                .issue(role, name, Validity::days(30))
                .expect("issue certificate");
        }
        TlsPaths {
            cert,
            key,
            ca: self.pki.ca_cert_path(),
            crl: self.pki.crl_if_any(),
        }
    }

    /// An mTLS channel to a service on 127.0.0.1 (requests time out after 60 s).
    pub fn channel(&self, port: u16, server_name: &str, role: Role, name: &str) -> Channel {
        self.channel_with_timeout(port, server_name, role, name, Duration::from_secs(60))
    }

    /// As [`TestPki::channel`], for requests that may run long (tfhe evaluations on a loaded
    /// machine).
    pub fn channel_with_timeout(
        &self,
        port: u16,
        server_name: &str,
        role: Role,
        name: &str,
        timeout: Duration,
    ) -> Channel {
        psm_net::client::channel(
            &format!("https://127.0.0.1:{port}"),
            server_name,
            None,
            &self.tls(role, name),
            &psm_net::client::ClientOptions {
                connect_timeout: Duration::from_secs(5),
                request_timeout: timeout,
            },
        )
        .expect("channel")
    }
}

/// A running service process; killed on drop.
pub struct Proc {
    pub name: String,
    pub port: u16,
    /// The plaintext health and `/metrics` port ([`scrape`] it).
    pub health_port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `binary` as `role`/`name` on a free port with the PKI's certificate, plus `extra`
    /// flags, and waits until it reports SERVING for `grpc_service`. Its plaintext health port
    /// is `--health-listen` from `extra`, else a free one.
    pub async fn start(
        pki: &TestPki,
        binary: &str,
        role: Role,
        name: &str,
        grpc_service: &str,
        extra: &[&str],
    ) -> Proc {
        let port = if role == Role::Keyshare {
            pki.keyshare_port(name)
        } else {
            free_port()
        };
        let tls = pki.tls(role, name);
        let log = pki.dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
        let given = extra
            .iter()
            .position(|a| *a == "--health-listen")
            .and_then(|i| extra.get(i + 1))
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok());
        let health_port = given.unwrap_or_else(free_port);
        let mut health = Vec::new();
        if given.is_none() {
            health = vec![
                "--health-listen".to_owned(),
                format!("127.0.0.1:{health_port}"),
            ];
        }
        let child = Command::new(bin(binary))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--trust-domain")
            .arg(pki.pki.trust_domain())
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--data-dir")
            .arg(pki.dir.path().join(format!("{name}-data")))
            .args(extra)
            .args(&health)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn service");
        let proc = Proc {
            name: name.to_owned(),
            port,
            health_port,
            log,
            child: Some(child),
        };
        let ch = pki.channel(port, name, Role::Operator, "billing");
        if let Err(e) =
            psm_net::client::wait_serving(ch, grpc_service, Duration::from_secs(30)).await
        {
            panic!("{name} did not start: {e}\n{}", proc.log_text());
        }
        proc
    }

    /// Starts keyshare-svc `name` (keyshare-1, ...) with its share file from `keys`.
    pub async fn start_keyshare(
        pki: &TestPki,
        name: &str,
        keys: &psm_core::ceremony::CeremonyOutput,
        extra: &[&str],
    ) -> Proc {
        let share = keys
            .share_files
            .iter()
            .find(|p| p.file_stem().is_some_and(|s| s == name))
            .unwrap_or_else(|| panic!("no share file for {name}"))
            .to_str()
            .expect("utf-8 path")
            .to_owned();
        let mut args = vec!["--share-file", share.as_str()];
        args.extend_from_slice(extra);
        Proc::start(
            pki,
            "keyshare-svc",
            Role::Keyshare,
            name,
            psm_proto::service_names::KEYSHARE,
            &args,
        )
        .await
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits up to `within` for the process to exit.
    /// Sends `signal` to the process (SIGSTOP / SIGCONT to make it hang and resume).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            // SAFETY: kill(2) on a child we spawned.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = i32::try_from(child.id()).ok()?;
        // SAFETY: kill(2) on a child we spawned.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The policy the test system's keyshares run with unless a test says otherwise: the default
/// cohort minimum, any tariff allowed, bills of a day or more (tests bill short periods; the
/// default minimum is 28 days), tfhe-track requests not re-executed (each keyshare would load
/// the server key and repeat every tfhe evaluation: tests that want it say so).
pub const TEST_POLICY: &str =
    "allow_any_program = true\nmin_bill_days = 1\nmin_band_days = 1\nbilling_cycle = \"any\"\n";

/// The registry the test keyshares use unless a test says otherwise: any meter id counts as
/// registered and meter-encrypted (development mode; tests of the registry pass their own).
pub const DEV_REGISTRY: &str = "development_allow_all = true\n";

/// Writes keyshare `name`'s config file: enrollments and re-execution against `ingest` (if any)
/// with the public bundle in `public_dir`, the [`DEV_REGISTRY`], and the `[keyshare.policy]`
/// lines `policy`. Returns the `--config` flag and its value.
pub fn keyshare_config(
    pki: &TestPki,
    name: &str,
    ingest: Option<&Proc>,
    public_dir: Option<&Path>,
    policy: &str,
) -> [String; 2] {
    keyshare_config_with_registry(pki, name, ingest, public_dir, policy, DEV_REGISTRY)
}

/// As [`keyshare_config`] with the registry file contents `registry` (TOML).
pub fn keyshare_config_with_registry(
    pki: &TestPki,
    name: &str,
    ingest: Option<&Proc>,
    public_dir: Option<&Path>,
    policy: &str,
    registry: &str,
) -> [String; 2] {
    let reg = pki.dir.path().join(format!("{name}-registry.toml"));
    fs::write(&reg, registry).expect("registry file");
    let mut cfg = String::from("[keyshare]\n");
    cfg.push_str(&format!(
        "registry = {:?}\nenrollment_sync_secs = 2\npeer_timeout_ms = 1500\n",
        reg.to_str().expect("utf-8 path")
    ));
    let mut peers = String::from("\n[keyshare.peers]\n");
    if let Some(d) = public_dir {
        cfg.push_str(&format!(
            "public_dir = {:?}\n",
            d.to_str().expect("utf-8 path")
        ));
        // Every other party is a co-holder, at its fixed test port.
        let parties = psm_core::ceremony::PublicBundle::open(d)
            .expect("public bundle")
            .manifest
            .party_names;
        for p in parties.iter().filter(|p| *p != name) {
            peers.push_str(&format!(
                "{p:?} = {{ url = \"https://127.0.0.1:{}\", anchor = {:?} }}\n",
                pki.keyshare_port(p),
                pki.anchor(p).to_str().expect("utf-8 path")
            ));
        }
    }
    if let Some(i) = ingest {
        cfg.push_str(&format!("ingest_url = \"https://127.0.0.1:{}\"\n", i.port));
    }
    cfg.push_str("[keyshare.policy]\n");
    cfg.push_str(policy);
    cfg.push_str(&peers);
    let path = pki.dir.path().join(format!("{name}.toml"));
    fs::write(&path, cfg).expect("keyshare config");
    ["--config".into(), path.to_str().expect("utf-8 path").into()]
}

/// Starts keyshare-svc for every party of `keys`, re-executing against `ingest`, with `policy`.
pub async fn start_keyshares(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    ingest: Option<&Proc>,
    policy: &str,
) -> Vec<Proc> {
    start_keyshares_with_registry(pki, keys, ingest, policy, DEV_REGISTRY).await
}

/// As [`start_keyshares`], every keyshare with the registry file contents `registry`.
pub async fn start_keyshares_with_registry(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    ingest: Option<&Proc>,
    policy: &str,
    registry: &str,
) -> Vec<Proc> {
    let mut procs = Vec::new();
    for name in &keys.manifest.party_names {
        let cfg = keyshare_config_with_registry(
            pki,
            name,
            ingest,
            Some(&keys.public_dir),
            policy,
            registry,
        );
        let args: Vec<&str> = cfg.iter().map(String::as_str).collect();
        procs.push(Proc::start_keyshare(pki, name, keys, &args).await);
    }
    // Every keyshare reaches its co-holders before the test goes on (a test that stops one
    // must not depend on how far the others got).
    wait_in_contact(pki, &procs).await;
    procs
}

/// Starts ingest-svc as `ingest`; head-end `headend-1` may submit for any meter. It checks
/// device signatures against the [`DEV_REGISTRY`] (none for unlisted meters).
pub async fn start_ingest(pki: &TestPki, keys: &psm_core::ceremony::CeremonyOutput) -> Proc {
    start_ingest_named(pki, keys, "ingest", DEV_REGISTRY).await
}

/// Starts ingest-svc with certificate name `name`, checking device signatures against the
/// registry file contents `registry`.
pub async fn start_ingest_named(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    name: &str,
    registry: &str,
) -> Proc {
    start_ingest_with(pki, keys, name, registry, "", &[]).await
}

/// As [`start_ingest_named`], with `store` appended to the config file (an `[ingest.store]`
/// section) and `extra` flags.
pub async fn start_ingest_with(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    name: &str,
    registry: &str,
    store: &str,
    extra: &[&str],
) -> Proc {
    let public = keys.public_dir.to_str().expect("utf-8 path").to_owned();
    let reg = pki.dir.path().join(format!("{name}-registry.toml"));
    fs::write(&reg, registry).expect("registry file");
    let icfg = pki.dir.path().join(format!("{name}.toml"));
    fs::write(
        &icfg,
        format!(
            "[ingest]\nregistry = {:?}\n[ingest.headends]\n\"headend-1\" = [\"*\"]\n{store}\n",
            reg.to_str().expect("utf-8 path")
        ),
    )
    .expect("ingest config");
    let icfg = icfg.to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["--public-dir", &public, "--config", &icfg];
    args.extend_from_slice(extra);
    Proc::start(
        pki,
        "ingest-svc",
        Role::Ingest,
        name,
        psm_proto::service_names::INGEST,
        &args,
    )
    .await
}

/// The whole audit log of keyshare `k`, read as the auditor.
pub async fn audit_log(pki: &TestPki, k: &Proc) -> Vec<psm_proto::v1::AuditRecord> {
    let mut s = psm_proto::v1::keyshare_client::KeyshareClient::new(pki.channel(
        k.port,
        &k.name,
        Role::Auditor,
        "regulator",
    ))
    .get_audit_log(psm_proto::v1::GetAuditLogRequest {
        from_seq: 0,
        limit: 0,
    })
    .await
    .expect("audit log")
    .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.expect("audit record") {
        out.push(r);
    }
    out
}

/// Waits until every keyshare has activated the epoch-`epoch` enrollments of `meters` (its
/// receipts, asked as headend-1; the first ask makes it fetch and confirm them), at most
/// `timeout`; panics naming what is still pending or refused.
pub async fn wait_active(
    pki: &TestPki,
    keyshares: &[Proc],
    meters: &[String],
    epoch: u32,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    for k in keyshares {
        let mut client = psm_proto::v1::keyshare_client::KeyshareClient::new(pki.channel(
            k.port,
            &k.name,
            Role::Headend,
            "headend-1",
        ));
        let mut waiting: Vec<String> = meters.to_vec();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for chunk in waiting.chunks(10_000) {
                let answers = client
                    .get_receipts(psm_proto::v1::GetReceiptsRequest {
                        meter_ids: chunk.to_vec(),
                        epoch,
                    })
                    .await
                    .expect("receipts")
                    .into_inner()
                    .answers;
                for a in answers {
                    let state = psm_proto::v1::EnrollmentState::try_from(a.state)
                        .unwrap_or(psm_proto::v1::EnrollmentState::Unspecified);
                    assert_ne!(
                        state,
                        psm_proto::v1::EnrollmentState::Refused,
                        "{} refused {}: {}",
                        k.name,
                        a.meter_id,
                        a.reason
                    );
                    if state != psm_proto::v1::EnrollmentState::Active {
                        still.push(a.meter_id);
                    }
                }
            }
            assert!(
                still.is_empty() || Instant::now() < deadline,
                "{}: {} enrollment(s) not active (first: {})",
                k.name,
                still.len(),
                still[0]
            );
            if !still.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            waiting = still;
        }
    }
}

/// Waits (at most 20 s) until every keyshare has reached every co-holder since it started.
pub async fn wait_in_contact(pki: &TestPki, keyshares: &[Proc]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in keyshares {
        loop {
            let st = psm_proto::v1::keyshare_client::KeyshareClient::new(pki.channel(
                k.port,
                &k.name,
                Role::Operator,
                "billing",
            ))
            .status(psm_proto::v1::StatusRequest {})
            .await
            .expect("keyshare status")
            .into_inner();
            if st.coholders_reached.len() + 1 == st.parties as usize {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} reached only {:?}",
                k.name,
                st.coholders_reached
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What compute-svc uses to decrypt, aimed at `keyshares` with the compute certificate.
pub fn decryptor(
    pki: &TestPki,
    keys: &psm_core::ceremony::CeremonyOutput,
    keyshares: &[Proc],
    grace: Duration,
) -> compute_svc::decrypt::ThresholdDecryptor {
    let endpoints: Vec<compute_svc::decrypt::KeyshareEndpoint> = keyshares
        .iter()
        .map(|p| compute_svc::decrypt::KeyshareEndpoint {
            name: p.name.clone(),
            url: format!("https://127.0.0.1:{}", p.port),
        })
        .collect();
    compute_svc::decrypt::ThresholdDecryptor::new(
        keys.manifest.clone(),
        &endpoints,
        &pki.tls(Role::Compute, "compute"),
        grace,
        Duration::from_secs(30),
    )
    .expect("decryptor")
}

/// The whole system as separate processes: three keyshares, ingest (head-end `headend-1` may
/// submit for any meter) and compute wired to both.
pub struct System {
    pub keyshares: Vec<Proc>,
    pub ingest: Proc,
    pub compute: Proc,
}

impl System {
    /// Starts everything with the cached 2-of-3 key set and [`TEST_POLICY`]; `compute_extra` is
    /// appended to the `[compute]` section.
    pub async fn start(
        pki: &TestPki,
        keys: &psm_core::ceremony::CeremonyOutput,
        compute_extra: &str,
    ) -> System {
        Self::start_with_policy(pki, keys, compute_extra, TEST_POLICY).await
    }

    /// As [`System::start`], the keyshares with the `[keyshare.policy]` lines `policy`.
    pub async fn start_with_policy(
        pki: &TestPki,
        keys: &psm_core::ceremony::CeremonyOutput,
        compute_extra: &str,
        policy: &str,
    ) -> System {
        Self::start_with_registry(pki, keys, compute_extra, policy, DEV_REGISTRY).await
    }

    /// As [`System::start_with_policy`], the keyshares with the registry file `registry`.
    pub async fn start_with_registry(
        pki: &TestPki,
        keys: &psm_core::ceremony::CeremonyOutput,
        compute_extra: &str,
        policy: &str,
        registry: &str,
    ) -> System {
        let ingest = start_ingest_named(pki, keys, "ingest", registry).await;
        Self::start_over(pki, keys, compute_extra, policy, registry, ingest).await
    }

    /// Starts the keyshares and compute over an ingest already running.
    pub async fn start_over(
        pki: &TestPki,
        keys: &psm_core::ceremony::CeremonyOutput,
        compute_extra: &str,
        policy: &str,
        registry: &str,
        ingest: Proc,
    ) -> System {
        let public = keys.public_dir.to_str().expect("utf-8 path").to_owned();
        let keyshares =
            start_keyshares_with_registry(pki, keys, Some(&ingest), policy, registry).await;
        let mut ccfg = format!(
            "[compute]\npublic_dir = {public:?}\ningest_url = \"https://127.0.0.1:{}\"\n{compute_extra}\n",
            ingest.port
        );
        for k in &keyshares {
            ccfg.push_str(&format!(
                "[[compute.keyshares]]\nname = {:?}\nurl = \"https://127.0.0.1:{}\"\n",
                k.name, k.port
            ));
        }
        let cpath = pki.dir.path().join("compute.toml");
        fs::write(&cpath, ccfg).expect("compute config");
        let compute = Proc::start(
            pki,
            "compute-svc",
            Role::Compute,
            "compute",
            psm_proto::service_names::COMPUTE,
            &["--config", cpath.to_str().expect("utf-8 path")],
        )
        .await;
        System {
            keyshares,
            ingest,
            compute,
        }
    }
}

/// A test meter's device signing key: derived from its id, so a test can register a meter
/// (`registry_entry`) before the meter exists. Tests only.
pub fn device_key(meter: &str) -> psm_core::signing::SecretKey {
    let mut h = blake3::Hasher::new();
    h.update(b"psm-e2e/device-key");
    h.update(meter.as_bytes());
    psm_core::signing::SecretKey::from_bytes(*h.finalize().as_bytes())
}

/// A registry entry (TOML) for test meter `id` with its device key; `encryption` is "meter" or
/// "headend".
pub fn registry_entry(id: &str, encryption: &str) -> String {
    format!(
        "[[meters]]\nid = {id:?}\nencryption = {encryption:?}\ndevice_key = \"{}\"\n",
        hex::encode(device_key(id).public())
    )
}

/// A meter of the tests: its id, device key and its own seeds for one epoch (2-of-3, the cached
/// key set's scheme), signing and encrypting exactly as a real meter does.
pub struct TestMeter {
    pub id: String,
    pub seeds: psm_core::linear::key::MeterSeeds,
    pub scheme: psm_core::threshold::Scheme,
    pub device: psm_core::signing::SecretKey,
}

impl TestMeter {
    /// Fresh seeds for `epoch` of a 2-of-3 scheme.
    pub fn new(id: &str, epoch: u32) -> Self {
        Self::with_scheme(
            id,
            epoch,
            psm_core::threshold::Scheme::new(3, 2).expect("2-of-3"),
        )
    }

    pub fn with_scheme(id: &str, epoch: u32, scheme: psm_core::threshold::Scheme) -> Self {
        TestMeter {
            id: id.to_owned(),
            seeds: psm_core::linear::key::MeterSeeds::generate(scheme, epoch),
            scheme,
            device: device_key(id),
        }
    }

    /// The meter's enrollment, sealed to `keys` ((party name, public key) in party order) and
    /// signed with its device key.
    pub fn enrollment(&self, keys: &[(String, Vec<u8>)]) -> psm_proto::v1::Enrollment {
        psm_core::linear::envelope::enroll(&self.id, &self.seeds, self.scheme, keys, &self.device)
            .expect("enrollment")
    }

    /// A linear batch of `values` (Wh, one per interval) on `channel`, for intervals
    /// `first_interval..` of day number `day`.
    pub fn batch(
        &self,
        day: i64,
        channel: psm_core::linear::Channel,
        interval_seconds: u32,
        first_interval: u32,
        values: &[i64],
    ) -> psm_proto::v1::ReadingBatch {
        use psm_core::linear::{SLOTS_PER_DAY, SLOT_SECONDS};
        let spi = u64::from(interval_seconds) / SLOT_SECONDS as u64;
        let first_slot = day as u64 * SLOTS_PER_DAY as u64 + u64::from(first_interval) * spi;
        let masks = psm_core::linear::encrypt::IntervalMasks::new(
            self.seeds.epoch,
            first_slot,
            spi,
            values.len(),
        );
        let bodies = masks
            .encrypt(&self.seeds.key(channel), 0, values)
            .expect("readings in range");
        let mut b = psm_core::wire::linear_batch_to_proto(
            &self.id,
            day,
            self.seeds.epoch,
            channel,
            interval_seconds,
            first_interval,
            &bodies,
        );
        psm_core::signing::sign_batch(&mut b, &self.device);
        b
    }
}

/// The keyshares' enrollment keys in party order, read over their Status RPC with the operator
/// certificate.
pub async fn enrollment_keys(pki: &TestPki, keyshares: &[Proc]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(u32, String, Vec<u8>)> = Vec::new();
    for k in keyshares {
        let st = psm_proto::v1::keyshare_client::KeyshareClient::new(pki.channel(
            k.port,
            &k.name,
            Role::Operator,
            "billing",
        ))
        .status(psm_proto::v1::StatusRequest {})
        .await
        .expect("keyshare status")
        .into_inner();
        out.push((st.party_index, st.party, st.enrollment_public_key));
    }
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, n, k)| (n, k)).collect()
}

/// Enrolls `meters` through ingest as head-end `headend-1`.
pub async fn enroll(
    pki: &TestPki,
    ingest: &Proc,
    meters: &[&TestMeter],
    keys: &[(String, Vec<u8>)],
) -> Result<psm_proto::v1::EnrollResponse, tonic::Status> {
    let mut client = psm_proto::v1::ingest_client::IngestClient::new(pki.channel(
        ingest.port,
        &ingest.name,
        Role::Headend,
        "headend-1",
    ));
    let mut total = psm_proto::v1::EnrollResponse::default();
    for (i, chunk) in meters.chunks(500).enumerate() {
        let r = client
            .enroll(psm_proto::v1::EnrollRequest {
                idempotency_key: format!("enroll-{}-{i}", chunk[0].id),
                enrollments: chunk.iter().map(|m| m.enrollment(keys)).collect(),
            })
            .await?
            .into_inner();
        total.stored += r.stored;
        total.duplicates += r.duplicates;
    }
    Ok(total)
}

/// Submits `batches` through ingest as head-end `headend-1`, in requests of at most 1,000.
pub async fn submit(
    pki: &TestPki,
    ingest: &Proc,
    batches: Vec<psm_proto::v1::ReadingBatch>,
) -> Result<psm_proto::v1::SubmitReadingsResponse, tonic::Status> {
    let mut client = psm_proto::v1::ingest_client::IngestClient::new(pki.channel(
        ingest.port,
        &ingest.name,
        Role::Headend,
        "headend-1",
    ));
    let mut total = psm_proto::v1::SubmitReadingsResponse::default();
    for chunk in batches.chunks(1000) {
        let key = format!(
            "submit-{}",
            hex::encode(&blake3::hash(&chunk[0].ciphertext).as_bytes()[..8])
        );
        let r = client
            .submit_readings(psm_proto::v1::SubmitReadingsRequest {
                idempotency_key: key,
                batches: chunk.to_vec(),
            })
            .await?
            .into_inner();
        total.stored += r.stored;
        total.duplicates += r.duplicates;
    }
    Ok(total)
}

/// The Prometheus text a service serves on its plaintext health port (`GET /metrics`, plain
/// HTTP/1.1, as a scraper sends it).
pub async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("send scrape");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read scrape");
    let text = String::from_utf8(out).expect("utf-8 metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The sum of every series of `name` whose labels include all of `labels`, in scraped `text`
/// (0 when there is none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A benchmark's size from environment variable `name` (underscores allowed: `100_000`), or
/// `default`. A value that is not a number stops the benchmark with a message.
pub fn bench_size(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The band of `unix` in a bill from `period_start` under a tariff, from its wire form alone,
/// for plaintext references: the season of the period's first local month, the local date (a
/// holiday?) or weekday, and the local hour; exactly one band.
pub fn band_of(t: &psm_proto::v1::Tariff, period_start: i64, unix: i64) -> usize {
    use chrono::{Datelike, TimeZone, Timelike};
    let tz: chrono_tz::Tz = t.time_zone.parse().unwrap();
    let local = tz.timestamp_opt(unix, 0).unwrap();
    let first = tz.timestamp_opt(period_start, 0).unwrap();
    let date = local.format("%Y-%m-%d").to_string();
    let day_bit = if t.holidays.contains(&date) {
        1 << 7
    } else {
        1 << local.weekday().num_days_from_monday()
    };
    let month_bit = 1 << first.month0();
    let hits: Vec<usize> = (0..t.bands.len())
        .filter(|i| {
            let b = &t.bands[*i];
            (b.month_mask == 0 || b.month_mask & month_bit != 0)
                && b.weekday_mask & day_bit != 0
                && (b.start_hour..b.end_hour).contains(&local.hour())
        })
        .collect();
    assert_eq!(hits.len(), 1, "{date} {}: one band", local.hour());
    hits[0]
}
