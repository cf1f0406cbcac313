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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A dev PKI in a temporary directory.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        psm_net::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = DevPki::init(dir.path(), trust_domain, false).expect("dev PKI");
        TestPki { dir, pki }
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
        }
    }

    /// An mTLS channel to a service on 127.0.0.1.
    pub fn channel(&self, port: u16, server_name: &str, role: Role, name: &str) -> Channel {
        psm_net::client::channel(
            &format!("https://127.0.0.1:{port}"),
            server_name,
            &self.tls(role, name),
            &psm_net::client::ClientOptions {
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(60),
            },
        )
        .expect("channel")
    }
}

/// A running service process; killed on drop.
pub struct Proc {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `binary` as `role`/`name` on a free port with the PKI's certificate, plus `extra`
    /// flags, and waits until it reports SERVING for `grpc_service`.
    pub async fn start(
        pki: &TestPki,
        binary: &str,
        role: Role,
        name: &str,
        grpc_service: &str,
        extra: &[&str],
    ) -> Proc {
        let port = free_port();
        let tls = pki.tls(role, name);
        let log = pki.dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
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
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn service");
        let proc = Proc {
            name: name.to_owned(),
            port,
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
