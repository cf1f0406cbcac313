//! `psm demo`: runs the whole system locally as separate processes over mutual TLS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use prost::Message;
use psm_net::client::{channel, wait_serving, ClientOptions};
use psm_net::pki::DevPki;
use psm_net::tls::TlsPaths;
use psm_net::Role;

/// The simulated town's random seed and first day (a Monday), and the meters' key epoch.
const SIM_SEED: u64 = 1;
const SIM_START: &str = "2026-01-05";
const EPOCH: u32 = 1;

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
    /// Start everything, run the demo once, then stop (no waiting for Ctrl-C).
    #[arg(long)]
    check: bool,
    /// Simulated households on the feeder.
    #[arg(long, default_value_t = 50)]
    households: usize,
    /// Simulated small businesses on the feeder.
    #[arg(long, default_value_t = 2)]
    businesses: usize,
    /// Days of readings to simulate (from 2026-01-05, a Monday).
    #[arg(long, default_value_t = 7)]
    days: u32,
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

/// A path as a TOML string.
fn toml_path(path: &Path) -> anyhow::Result<String> {
    let p = path
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
    Ok(toml::Value::String(p.to_owned()).to_string())
}

/// The regulators' meter registry: every simulated meter, encrypting its own readings, with the
/// device key `psm meter` keeps for it in `meter_keys` (made here first: provisioning).
fn registry_toml(
    meters: &[psm_meterdata::simulate::SimMeter],
    meter_keys: &Path,
) -> anyhow::Result<String> {
    crate::meter::create_key_dir(meter_keys)?;
    let mut r = psm_core::registry::Registry::default();
    for m in meters {
        let device = crate::meter::load_or_create_device(meter_keys, &m.id)?;
        r.upsert(psm_core::registry::Entry {
            id: m.id.clone(),
            encryption: psm_core::registry::Encryption::Meter,
            device_key: hex::encode(device.public()),
            billing_day: 1,
            time_zone: None,
        })?;
    }
    Ok(format!(
        "# The meters this keyshare serves (written by psm demo): all encrypt their own readings.\n{}",
        r.to_toml()?
    ))
}

/// Keyshare `name`'s anchor public key in its data directory, made first when missing (the
/// keyshare reads the same `anchor.key` when it starts).
fn anchor_pub(data: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = data.join(name);
    let public = dir.join("anchor.pub");
    if !public.exists() {
        psm_core::signing::AnchorFile::init(name, &dir.join("anchor.key"), &public)
            .with_context(|| format!("the anchor key of {name}"))?;
    }
    Ok(public)
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

    let meters = psm_meterdata::simulate::town(args.households, args.businesses, SIM_SEED);
    let registry = data.join("registry.toml");
    fs::write(&registry, registry_toml(&meters, &data.join("meter-keys"))?)
        .with_context(|| format!("writing {}", registry.display()))?;
    let mut children = Children(Vec::new());
    for s in &services {
        let bin = sibling_binary(s.binary)?;
        let (cert, key) = pki.paths(s.role, &s.name);
        let log_path = logs.join(format!("{}.log", s.name));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(&bin);
        if s.role == Role::Keyshare {
            // Each regulator's policy: the meters it serves (its registry: the simulated town),
            // enrollments fetched from ingest (the public bundle names the parties they are
            // sealed to), cohorts of at least 5, only the demo tariffs may be billed, bills as
            // short as a day (the demo bills its few simulated days; the default is 28). tfhe-track re-execution is off here: on a small machine three
            // keyshares repeating every demand charge would triple its cost (production keeps
            // the default, "always").
            let cfg = data.join(format!("{}.toml", s.name));
            // The co-holders: where they are and their anchors (made here before any keyshare
            // starts, as each regulator would hand its anchor to the others).
            let mut peers = String::from("[keyshare.peers]\n");
            for i in 1..=3u16 {
                let name = format!("keyshare-{i}");
                if name != s.name {
                    peers.push_str(&format!(
                        "\"{name}\" = {{ url = \"https://127.0.0.1:{}\", anchor = {} }}\n",
                        port(10 + i)?,
                        toml_path(&anchor_pub(data, &name)?)?
                    ));
                }
            }
            let homes = blake3::hash(&demo_tariff().encode_to_vec());
            let shops = blake3::hash(&demo_business_tariff().encode_to_vec());
            fs::write(
                &cfg,
                format!(
                    "[keyshare]\ningest_url = \"https://127.0.0.1:{}\"\npublic_dir = {}\nregistry = {}\n[keyshare.policy]\nmin_cohort = 5\nmin_bill_days = 1\nmin_band_days = 1\nbilling_cycle = \"any\"\nallowed_programs = [\"{}\", \"{}\"]\n{peers}",
                    port(1)?,
                    toml_path(&keys_dir.join("public"))?,
                    toml_path(&registry)?,
                    homes.to_hex(),
                    shops.to_hex()
                ),
            )
            .with_context(|| format!("writing {}", cfg.display()))?;
            cmd.arg("--share-file")
                .arg(keys_dir.join("shares").join(format!("{}.share", s.name)))
                .arg("--config")
                .arg(cfg);
        }
        if s.role == Role::Ingest {
            let cfg = data.join("ingest.toml");
            fs::write(
                &cfg,
                format!(
                    "[ingest]\nregistry = {}\n[ingest.headends]\n\"headend-1\" = [\"meter-*\", \"shop-*\"]\n",
                    toml_path(&registry)?
                ),
            )
            .with_context(|| format!("writing {}", cfg.display()))?;
            cmd.arg("--public-dir")
                .arg(keys_dir.join("public"))
                .arg("--config")
                .arg(cfg);
        }
        if s.role == Role::Compute {
            let cfg = data.join("compute.toml");
            let public = keys_dir.join("public");
            let mut text = format!(
                "[compute]\npublic_dir = {}\ningest_url = \"https://127.0.0.1:{}\"\nmin_cohort = 5\n",
                toml_path(&public)?,
                port(1)?
            );
            for i in 1..=3u16 {
                text.push_str(&format!(
                    "[[compute.keyshares]]\nname = \"keyshare-{i}\"\nurl = \"https://127.0.0.1:{}\"\n",
                    port(10 + i)?
                ));
            }
            fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
            cmd.arg("--config").arg(cfg);
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
        crl: pki.crl_if_any(),
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
            None,
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
    // Each keyshare publishes its enrollment key at start, signed by its anchor; meters seal
    // their seeds to them. (In the field the anchors reach meters from the regulator, not from
    // the utility; here they are read from the keyshares' data directories.)
    let mut enrollment_keys = Vec::new();
    let mut anchors = Vec::new();
    for s in services.iter().filter(|s| s.role == Role::Keyshare) {
        let path = data.join(&s.name).join("enrollment.pub");
        if !path.exists() {
            let tail = log_tail(&logs.join(format!("{}.log", s.name)));
            bail!(
                "{} is serving but has not published {}\n--- last log lines ---\n{tail}",
                s.name,
                path.display()
            );
        }
        enrollment_keys.push(path);
        anchors.push(data.join(&s.name).join("anchor.pub"));
    }
    rt.block_on(town_demo(&args, &pki, b, enrollment_keys, anchors))?;
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

/// Simulates the town, ingests it, and shows the feeder's load and the keyshares' audit logs.
async fn town_demo(
    args: &DemoArgs,
    pki: &DevPki,
    base: u16,
    enrollment_keys: Vec<PathBuf>,
    anchors: Vec<PathBuf>,
) -> anyhow::Result<()> {
    use psm_proto::v1::compute_client::ComputeClient;
    use psm_proto::v1::{AggregateRequest, Channel, TimeRange};

    let tls_of = |role: Role, name: &str| {
        let (cert, key) = pki.paths(role, name);
        TlsPaths {
            cert,
            key,
            ca: pki.ca_cert_path(),
            crl: pki.crl_if_any(),
        }
    };
    let url = |off: u16| format!("https://127.0.0.1:{}", base + off);
    let opts = ClientOptions::default();
    println!(
        "\nSimulating {} households and {} businesses for {} days; each meter enrolls its own keys (epoch {EPOCH}) with the keyshares, then its readings are encrypted and submitted through headend-1:",
        args.households, args.businesses, args.days
    );
    let sim = crate::meter::SimulateArgs {
        meters: args.households,
        businesses: args.businesses,
        days: args.days,
        start: SIM_START.into(),
        seed: SIM_SEED,
        interval: 900,
        keys: crate::meter::MeterKeyArgs {
            epoch: EPOCH,
            enrollment_keys,
            anchors,
            keyshares: (1..=3u16)
                .map(|i| format!("keyshare-{i}={}", url(10 + i)))
                .collect(),
            receipt_wait_secs: 120,
            meter_keys: args.data_dir.join("meter-keys"),
        },
        client: crate::client_args::ClientArgs {
            endpoint: url(1),
            server_name: "ingest".into(),
            pki: args.data_dir.join("pki"),
            identity: Some("headend/headend-1".into()),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_crl: None,
        },
    };
    // Each slot is encrypted once per epoch (a second encryption would be new bytes, kept out
    // as ALREADY_EXISTS): remember what this data directory already holds.
    let marker = args.data_dir.join(format!(
        "simulated-{}-{}-{}-{}.done",
        sim.start, args.days, args.households, args.businesses
    ));
    let meters = psm_meterdata::simulate::town(args.households, args.businesses, sim.seed);
    if marker.exists() {
        println!(
            "  reusing the readings ingested by an earlier run ({})",
            marker.display()
        );
    } else {
        let ingest = channel(
            &url(1),
            "ingest",
            Some(Role::Ingest),
            &tls_of(Role::Headend, "headend-1"),
            &opts,
        )?;
        let sub = crate::meter::simulate_and_submit(ingest, &sim).await?;
        println!("  {}", sub.counts);
        fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    }

    let cohort: Vec<String> = meters.iter().map(|m| m.id.clone()).collect();
    let start = psm_core::readings::parse_day(&sim.start)? * 86_400;
    let mut compute = ComputeClient::new(channel(
        &url(2),
        "compute",
        Some(Role::Compute),
        &tls_of(Role::Operator, "billing"),
        &opts,
    )?);
    let t = std::time::Instant::now();
    let agg = compute
        .aggregate(AggregateRequest {
            idempotency_key: format!("demo-feeder-{}", args.days),
            meter_ids: cohort.clone(),
            range: Some(TimeRange {
                start_unix: start,
                end_unix: start + i64::from(args.days) * 86_400,
            }),
            granularity_seconds: 3600,
            epoch: EPOCH,
            channel: Channel::Import as i32,
        })
        .await;
    let agg = match agg {
        Ok(a) => Some(a.into_inner()),
        // The same data directory, another town: the keyshares refuse to release a feeder that
        // differs from an earlier released one by a few meters.
        Err(e) if e.code() == tonic::Code::FailedPrecondition => {
            let why = keyshare_reason(e.message());
            let hint = if why.starts_with("differencing") {
                "\n  An earlier run in this data directory released the feeder with a different set of meters; a fresh --data-dir starts over."
            } else {
                ""
            };
            println!("\nFeeder load: refused by the keyshares ({why}){hint}");
            None
        }
        Err(e) => return Err(anyhow::anyhow!("feeder aggregate: {}", e.message())),
    };
    if let Some(agg) = agg {
        let used = agg.quorum.map_or_else(String::new, |q| {
            format!(
                "{}{}",
                q.used.join(", "),
                if q.cross_checked {
                    ", cross-checked"
                } else {
                    ", not cross-checked (some share came from one keyshare only)"
                }
            )
        });
        println!(
            "\nFeeder load, {} meters, mean kW imported by hour of day (UTC), released in {:.1} s by {used} (only the sums; no reading was decrypted):",
            agg.cohort_size,
            t.elapsed().as_secs_f64()
        );
        // Average day profile: mean kW per hour of day across the simulated days.
        let mut by_hour = [0i64; 24];
        for (i, wh) in agg.energy_wh.iter().enumerate() {
            by_hour[i % 24] += wh;
        }
        let days = i64::from(args.days.max(1));
        let max = by_hour.iter().map(|v| v / days).max().unwrap_or(1).max(1);
        for (h, total) in by_hour.iter().enumerate() {
            let kw = *total as f64 / days as f64 / 1000.0;
            let len = ((total / days).max(0) * 50 / max) as usize;
            println!("  {h:02}:00 {kw:>8.1} kW {}", "█".repeat(len));
        }
        let day_totals: Vec<String> = agg
            .energy_wh
            .chunks(24)
            .map(|d| format!("{:.0}", d.iter().sum::<i64>() as f64 / 1000.0))
            .collect();
        println!("  daily totals (kWh): {}", day_totals.join(", "));
        println!(
            "  {}",
            cohort_summary(&agg.interval_cohort_size, agg.cohort_size)
        );
        if !agg.headend_encrypted.is_empty() {
            println!(
                "  encrypted by a head-end (plaintext to the utility): {}",
                agg.headend_encrypted.join(", ")
            );
        }

        // An analyst tries to learn one household's load by differencing: the feeder without it.
        if let Some((left_out, rest)) = cohort.split_last() {
            let probe = compute
                .aggregate(AggregateRequest {
                    idempotency_key: "demo-differencing-probe".into(),
                    meter_ids: rest.to_vec(),
                    range: Some(TimeRange {
                        start_unix: start,
                        end_unix: start + 86_400,
                    }),
                    granularity_seconds: 3600,
                    epoch: EPOCH,
                    channel: Channel::Import as i32,
                })
                .await;
            match probe {
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    let why = keyshare_reason(e.message());
                    println!(
                        "\nDifferencing probe — the same feeder without {left_out} on {}: refused by the keyshares\n  ({why})",
                        sim.start
                    );
                }
                Ok(_) => {
                    println!("\nDifferencing probe was released: the keyshares' policy allows it")
                }
                Err(e) => return Err(anyhow::anyhow!("differencing probe: {e}")),
            }
        }
    }
    // Bills: per-band import and export totals summed on ciphertexts, only the totals released.
    let tariff = demo_tariff();
    let band_names: Vec<&str> = tariff.bands.iter().map(|b| b.name.as_str()).collect();
    println!(
        "\nBills, {} days, tariff {:?} (kWh imported per band: {}; kWh exported, credited per band; £ incl. 5% VAT):",
        args.days,
        tariff.name,
        band_names.join("/")
    );
    let t = std::time::Instant::now();
    let households: Vec<_> = meters
        .iter()
        .filter(|m| m.site != psm_meterdata::simulate::Site::Business)
        .collect();
    for m in &households {
        let b = compute
            .bill(psm_proto::v1::BillRequest {
                idempotency_key: format!("demo-bill-{}-{}", m.id, args.days),
                meter_id: m.id.clone(),
                period: Some(TimeRange {
                    start_unix: start,
                    end_unix: start + i64::from(args.days) * 86_400,
                }),
                tariff: Some(tariff.clone()),
                reissue_reason: String::new(),
                epoch: EPOCH,
            })
            .await
            .with_context(|| format!("bill for {}", m.id))?
            .into_inner();
        let bands: Vec<String> = band_names
            .iter()
            .map(|band| format!("{:>6.1}", band_import_wh(&b.lines, band) as f64 / 1000.0))
            .collect();
        println!(
            "  {:<11} {}  export {:>5.1}  standing £{:>5.2}  total £{:>7.2}",
            m.id,
            bands.join(" "),
            export_wh(&b.lines) as f64 / 1000.0,
            b.standing_charge as f64 / 100.0,
            b.total as f64 / 100.0
        );
    }
    println!(
        "  ({} bills in {:.1} s)",
        households.len(),
        t.elapsed().as_secs_f64()
    );

    // Businesses: the same bands plus a demand charge on the month's highest daily peak,
    // computed on their encrypted registers (tfhe track); only the peak is decrypted.
    let business_tariff = demo_business_tariff();
    let businesses: Vec<_> = meters
        .iter()
        .filter(|m| m.site == psm_meterdata::simulate::Site::Business)
        .collect();
    if !businesses.is_empty() {
        println!(
            "\nBusiness bills with a demand charge of £{:.2} per kW of the period's highest daily peak, computed on encrypted registers (the first loads the tfhe server key):",
            business_tariff.demand_rate_per_kw_milli as f64 / 100_000.0
        );
    }
    for m in &businesses {
        let t = std::time::Instant::now();
        let key = format!("demo-bill-{}-{}", m.id, args.days);
        let request = psm_proto::v1::BillRequest {
            idempotency_key: key.clone(),
            meter_id: m.id.clone(),
            period: Some(TimeRange {
                start_unix: start,
                end_unix: start + i64::from(args.days) * 86_400,
            }),
            tariff: Some(business_tariff.clone()),
            reissue_reason: String::new(),
            epoch: EPOCH,
        };
        let mut c = compute.clone();
        let running = tokio::spawn(async move { c.bill(request).await });
        watch_progress(&mut compute, &key).await;
        let b = running
            .await?
            .with_context(|| format!("bill for {}", m.id))?
            .into_inner();
        let demand = b
            .lines
            .iter()
            .find(|l| l.description.starts_with("demand charge"))
            .map(|l| format!("{} £{:.2}", l.description, l.amount as f64 / 100.0))
            .unwrap_or_default();
        let energy: i64 = b
            .lines
            .iter()
            .filter(|l| !is_export(l))
            .map(|l| l.energy_wh)
            .sum();
        println!(
            "  {:<11} {:>7.1} kWh  {demand}  total £{:>8.2}  ({:.0} s)",
            m.id,
            energy as f64 / 1000.0,
            b.total as f64 / 100.0,
            t.elapsed().as_secs_f64()
        );
    }

    println!("\nKeyshare audit logs (each regulator's own record of what it allowed and refused):");
    for i in 1..=3u16 {
        let name = format!("keyshare-{i}");
        let ch = channel(
            &url(10 + i),
            &name,
            Some(Role::Keyshare),
            &tls_of(Role::Auditor, "regulator"),
            &opts,
        )?;
        let records = crate::audit::fetch_from(ch, &url(10 + i)).await?;
        let mut allowed = 0;
        let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
        for r in &records {
            if r.decision == "allow" {
                allowed += 1;
            } else {
                *refused.entry(r.rule.as_str()).or_default() += 1;
            }
        }
        let refused: Vec<String> = refused.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
        let chain = match crate::audit::verify(&records) {
            Ok(head) => format!("chain verified, head {}", hex::encode(&head[..8])),
            Err(e) => format!("CHAIN BROKEN: {e}"),
        };
        println!(
            "  {name}: {} decisions — {allowed} allowed; refused: {}; {chain}",
            records.len(),
            if refused.is_empty() {
                "none".to_string()
            } else {
                refused.join(", ")
            }
        );
    }
    println!(
        "  (full table: psm audit show --endpoint {} --server-name keyshare-1 --pki {})",
        url(11),
        args.data_dir.join("pki").display()
    );
    Ok(())
}

/// The first keyshare's reason in a compute refusal ("differencing: ..."), without the quorum
/// preamble.
fn keyshare_reason(message: &str) -> &str {
    const RULES: [&str; 5] = [
        "differencing:",
        "k-anonymity:",
        "one-bill-per-period:",
        "enrollment:",
        "allowed-program:",
    ];
    let from = RULES
        .iter()
        .filter_map(|r| message.find(r))
        .min()
        .or_else(|| message.find("FailedPrecondition: ").map(|i| i + 20));
    match from {
        Some(i) => message[i..].split(';').next().unwrap_or(message).trim_end(),
        None => message,
    }
}

/// Whether a bill line credits exported energy.
fn is_export(l: &psm_proto::v1::BillLine) -> bool {
    l.energy_wh < 0 || l.description.contains("export")
}

/// Imported Wh of a bill's lines for tariff band `band`.
fn band_import_wh(lines: &[psm_proto::v1::BillLine], band: &str) -> i64 {
    lines
        .iter()
        .filter(|l| !is_export(l))
        .filter(|l| l.description == band || l.description.starts_with(&format!("{band} ")))
        .map(|l| l.energy_wh)
        .sum()
}

/// Exported Wh of a bill (export lines carry negative energy).
fn export_wh(lines: &[psm_proto::v1::BillLine]) -> i64 {
    lines
        .iter()
        .filter(|l| is_export(l))
        .map(|l| l.energy_wh.abs())
        .sum()
}

/// One line on the outputs' effective cohorts: the members whose readings cover each interval.
fn cohort_summary(sizes: &[u32], requested: u32) -> String {
    let withheld = sizes.iter().filter(|s| **s == 0).count();
    let released: Vec<u32> = sizes.iter().copied().filter(|s| *s > 0).collect();
    let (min, max) = (
        released.iter().min().copied().unwrap_or(0),
        released.iter().max().copied().unwrap_or(0),
    );
    let mut line = if released.is_empty() {
        "effective cohort: no hour released".to_string()
    } else if min == max && min == requested {
        format!("effective cohort: all {requested} meters in every hour")
    } else if min == max {
        format!("effective cohort: {min} of {requested} meters in every released hour")
    } else {
        format!("effective cohort: {min} to {max} of {requested} meters per released hour")
    };
    if withheld > 0 {
        line.push_str(&format!(
            "; {withheld} hours withheld (too few meters with readings)"
        ));
    }
    line
}

/// Shows a running job's progress (WatchJob) on one terminal line until it is done.
async fn watch_progress(
    compute: &mut psm_proto::v1::compute_client::ComputeClient<tonic::transport::Channel>,
    key: &str,
) {
    use std::io::Write;
    let req = || psm_proto::v1::WatchJobRequest {
        idempotency_key: key.to_owned(),
    };
    for _ in 0..100 {
        match compute.watch_job(req()).await {
            Ok(s) => {
                let mut s = s.into_inner();
                while let Ok(Some(p)) = s.message().await {
                    let width = 30;
                    let filled = p.percent as usize * width / 100;
                    eprint!(
                        "\r  [{}{}] {:>3}% {:<48}",
                        "#".repeat(filled),
                        ".".repeat(width - filled),
                        p.percent,
                        p.step.chars().take(48).collect::<String>()
                    );
                    let _ = std::io::stderr().flush();
                    if p.done {
                        break;
                    }
                }
                eprint!("\r{:<90}\r", "");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The demo businesses' tariff: the household bands plus a demand charge.
fn demo_business_tariff() -> psm_proto::v1::Tariff {
    psm_proto::v1::Tariff {
        name: "PSM demo business time-of-use with demand charge".into(),
        demand_rate_per_kw_milli: 850_000,
        ..demo_tariff()
    }
}

/// The demo's time-of-use tariff; the keyshares allow it by the hash of this encoding.
fn demo_tariff() -> psm_proto::v1::Tariff {
    let band = |name: &str, mask: u32, s: u32, e: u32, imp: i64| psm_proto::v1::TariffBand {
        name: name.into(),
        weekday_mask: mask,
        start_hour: s,
        end_hour: e,
        import_price_milli: imp,
        export_price_milli: 15_000,
        month_mask: 0,
    };
    psm_proto::v1::Tariff {
        name: "PSM demo time-of-use".into(),
        time_zone: "Europe/London".into(),
        bands: vec![
            band("peak", 0x1F, 16, 19, 42_000),
            band("day", 0x1F, 7, 16, 27_500),
            band("evening", 0x1F, 19, 24, 27_500),
            band("weekend", 0x60, 7, 24, 24_000),
            band("night", 0x7F, 0, 7, 11_000),
        ],
        standing_charge_per_day: 53,
        vat_basis_points: 500,
        currency: "GBP".into(),
        ..Default::default()
    }
}
