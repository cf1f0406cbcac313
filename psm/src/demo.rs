//! `psm demo`: runs the whole system locally as separate processes over mutual TLS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use psm_net::client::{channel, wait_serving, ClientOptions};
use psm_net::pki::DevPki;
use psm_net::tls::TlsPaths;
use psm_net::Role;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Directory for the dev PKI, service state and logs; reused by the next run.
    #[arg(long, default_value = "psm-data")]
    data_dir: PathBuf,
    /// SPIFFE trust domain for a new dev PKI.
    #[arg(long, default_value = "psm.local")]
    trust_domain: String,
    /// Ports: ingest = base+1, compute = base+2, keyshares = base+11..=base+13.
    #[arg(long, default_value_t = 7400)]
    base_port: u16,
    /// Start everything, check it is healthy, then stop (no waiting for Ctrl-C).
    #[arg(long)]
    check: bool,
}

/// One service process of the demo.
struct Svc {
    binary: &'static str,
    role: Role,
    name: String,
    grpc_service: &'static str,
    port: u16,
}

/// Kills every started child on drop, so an error path never leaves processes behind.
struct Children(Vec<(String, Child)>);

impl Children {
    fn terminate(&mut self) {
        for (_, child) in &self.0 {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) with a pid we spawned and a valid signal number.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        for (name, child) in &mut self.0 {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        println!("  {name} stopped ({status})");
                        break;
                    }
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        println!("  {name} killed after the grace period");
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the psm executable")?;
    let dir = exe.parent().context("psm executable has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found next to psm; build every binary first: cargo build --release --bins",
            path.display()
        );
    }
    Ok(path)
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data = &args.data_dir;
    let pki_dir = data.join("pki");
    let pki = if pki_dir.join("ca.crt").exists() {
        println!("Reusing the dev PKI in {}", pki_dir.display());
        DevPki::open(&pki_dir)?
    } else {
        println!("Creating a dev PKI in {}", pki_dir.display());
        DevPki::init(&pki_dir, &args.trust_domain, false)?.0
    };
    let keys_dir = data.join("keys");
    if keys_dir.join("public/manifest.toml").exists() {
        println!("Reusing the key set in {}", keys_dir.display());
    } else {
        println!(
            "Running the key ceremony (2-of-3) into {} — once, about a minute:",
            keys_dir.display()
        );
        let start = std::time::Instant::now();
        let mut progress =
            |step: &str| println!("  [{:>5.1}s] {step}", start.elapsed().as_secs_f64());
        let material = psm_core::ceremony::generate(&mut progress)?;
        let scheme = psm_core::threshold::Scheme::new(3, 2)?;
        let out = psm_core::ceremony::write_bundle(
            &material,
            scheme,
            &psm_core::ceremony::default_party_names(3),
            &keys_dir,
        )?;
        drop(material);
        psm_core::ceremony::self_check(&out, &mut progress)?;
    }
    let logs = data.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let b = args.base_port;
    let port = |off: u16| {
        b.checked_add(off)
            .with_context(|| format!("--base-port {b} is too high"))
    };
    let mut services = Vec::new();
    for i in 1..=3u16 {
        services.push(Svc {
            binary: "keyshare-svc",
            role: Role::Keyshare,
            name: format!("keyshare-{i}"),
            grpc_service: psm_proto::service_names::KEYSHARE,
            port: port(10 + i)?,
        });
    }
    services.push(Svc {
        binary: "ingest-svc",
        role: Role::Ingest,
        name: "ingest".into(),
        grpc_service: psm_proto::service_names::INGEST,
        port: port(1)?,
    });
    services.push(Svc {
        binary: "compute-svc",
        role: Role::Compute,
        name: "compute".into(),
        grpc_service: psm_proto::service_names::COMPUTE,
        port: port(2)?,
    });

    let mut children = Children(Vec::new());
    for s in &services {
        let bin = sibling_binary(s.binary)?;
        let (cert, key) = pki.paths(s.role, &s.name);
        let log_path = logs.join(format!("{}.log", s.name));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(&bin);
        if s.role == Role::Keyshare {
            cmd.arg("--share-file")
                .arg(keys_dir.join("shares").join(format!("{}.share", s.name)));
        }
        if s.role == Role::Ingest {
            cmd.arg("--public-dir").arg(keys_dir.join("public"));
        }
        let child = cmd
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", s.port))
            .arg("--trust-domain")
            .arg(pki.trust_domain())
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-ca")
            .arg(pki.ca_cert_path())
            .arg("--data-dir")
            .arg(data.join(&s.name))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        children.0.push((s.name.clone(), child));
    }

    let (op_cert, op_key) = pki.paths(Role::Operator, "billing");
    let tls = TlsPaths {
        cert: op_cert,
        key: op_key,
        ca: pki.ca_cert_path(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let _rt_guard = rt.enter();
    println!(
        "Starting 5 services over mutual TLS (logs in {}):",
        logs.display()
    );
    for s in &services {
        let ch = channel(
            &format!("https://127.0.0.1:{}", s.port),
            &s.name,
            &tls,
            &ClientOptions::default(),
        )?;
        if let Err(e) = rt.block_on(wait_serving(ch, s.grpc_service, Duration::from_secs(20))) {
            let tail = log_tail(&logs.join(format!("{}.log", s.name)));
            bail!(
                "{} did not become healthy: {e}\n--- last log lines ---\n{tail}",
                s.name
            );
        }
        println!(
            "  {:<11} https://127.0.0.1:{}  spiffe://{}/{}/{}  SERVING",
            s.name,
            s.port,
            pki.trust_domain(),
            s.role,
            s.name
        );
    }
    println!("All 5 services are up and healthy.");
    if args.check {
        println!("Stopping (--check).");
        children.terminate();
        return Ok(());
    }
    println!("Press Ctrl-C to stop them.");
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break Ok(()),
                _ = tick.tick() => {
                    let exited = children.0.iter_mut().find_map(|(name, child)| {
                        child.try_wait().ok().flatten().map(|status| (name.clone(), status))
                    });
                    if let Some((name, status)) = exited {
                        let tail = log_tail(&logs.join(format!("{name}.log")));
                        break Err(anyhow::anyhow!("{name} exited unexpectedly ({status})\n{tail}"));
                    }
                }
            }
        }
    })?;
    println!("\nStopping every service:");
    children.terminate();
    Ok(())
}
