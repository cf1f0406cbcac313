//! Service configuration: a TOML file, overridden by environment variables, overridden by flags.
//!
//! Every service shares the `[server]`, `[tls]` and `[log]` sections and the flags of
//! [`ServerArgs`]; a service adds one section of its own named after it (`[keyshare]`, ...).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::telemetry::LogFormat;
use crate::tls::TlsPaths;
use crate::NetError;

/// Default cap on a request message: big enough for a day of a large cohort's ciphertexts or a
/// squashed result batch; keys travel as streams of chunks instead.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Default cap on a response message.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// `[server]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<SocketAddr>,
    pub health_listen: Option<SocketAddr>,
    pub trust_domain: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub max_request_bytes: Option<usize>,
    pub shutdown_grace_secs: Option<u64>,
}

/// `[tls]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Certificate revocation list (PEM or DER) signed by the CA; re-read when it changes.
    pub crl: Option<PathBuf>,
}

/// `[log]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<LogFormat>,
}

/// The sections every service file has, plus the service's own section `S`.
#[derive(Debug, Default)]
pub struct ConfigFile<S> {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub log: LogSection,
    pub service: S,
}

fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    name: &str,
    path: &Path,
) -> Result<T, NetError> {
    match table.remove(name) {
        None => Ok(T::default()),
        Some(v) => v
            .try_into()
            .map_err(|e| NetError::Config(format!("{}: [{name}]: {e}", path.display()))),
    }
}

/// Reads a service config file whose own section is `[service_section]`. Unknown sections or
/// keys are errors, so a typo does not silently fall back to a default.
pub fn load_file<S: DeserializeOwned + Default>(
    path: Option<&Path>,
    service_section: &str,
) -> Result<ConfigFile<S>, NetError> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| NetError::read(path, e))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| NetError::Config(format!("{}: {e}", path.display())))?;
    let file = ConfigFile {
        server: section(&mut table, "server", path)?,
        tls: section(&mut table, "tls", path)?,
        log: section(&mut table, "log", path)?,
        service: section(&mut table, service_section, path)?,
    };
    if let Some(key) = table.keys().next() {
        return Err(NetError::Config(format!(
            "{}: unknown section or key {key:?}; expected [server], [tls], [log] or [{service_section}]",
            path.display()
        )));
    }
    Ok(file)
}

/// Flags (and environment variables) every service accepts. Each overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// TOML configuration file with [server], [tls], [log] and a section for this service.
    /// Flags and PSM_* environment variables override its values.
    #[arg(long, env = "PSM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for the mutual-TLS gRPC API, e.g. 127.0.0.1:7443.
    #[arg(long, env = "PSM_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Optional plaintext address serving only grpc.health.v1.Health, for Kubernetes probes
    /// (kubelet cannot present a client certificate).
    #[arg(long, env = "PSM_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// SPIFFE trust domain accepted from callers (the <trust-domain> in spiffe://<td>/<role>/<name>).
    #[arg(long, env = "PSM_TRUST_DOMAIN", value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// This service's certificate (PEM).
    #[arg(long, env = "PSM_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This service's private key (PEM).
    #[arg(long, env = "PSM_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that client and peer certificates must chain to.
    #[arg(long, env = "PSM_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Certificate revocation list (PEM or DER) signed by that CA: revoked client and server
    /// certificates are refused; the file is re-read when it changes.
    #[arg(long, env = "PSM_TLS_CRL", value_name = "FILE")]
    pub tls_crl: Option<PathBuf>,
    /// Directory for this service's durable state.
    #[arg(long, env = "PSM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Largest accepted request message in bytes (default 64 MiB); larger ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "PSM_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Seconds to let in-flight calls finish after SIGTERM/SIGINT (default 10).
    #[arg(long, env = "PSM_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Log format: text or json. Verbosity comes from RUST_LOG (default "info").
    #[arg(long, env = "PSM_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Resolved settings of a server, after file, environment and flags.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub trust_domain: String,
    pub tls: TlsPaths,
    pub data_dir: PathBuf,
    pub max_request_bytes: usize,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
}

fn required<T>(v: Option<T>, flag: &str, key: &str) -> Result<T, NetError> {
    v.ok_or_else(|| {
        NetError::Config(format!(
            "missing {flag} (or {key} in the config file, or the matching PSM_* variable)"
        ))
    })
}

impl ServerArgs {
    /// Merges flags over the file; `default_listen` applies when neither sets an address.
    pub fn resolve<S>(
        &self,
        file: &ConfigFile<S>,
        default_listen: SocketAddr,
        default_data_dir: &str,
    ) -> Result<ServerSettings, NetError> {
        let s = &file.server;
        let t = &file.tls;
        let tls = TlsPaths {
            cert: required(
                self.tls_cert.clone().or(t.cert.clone()),
                "--tls-cert",
                "[tls] cert",
            )?,
            key: required(
                self.tls_key.clone().or(t.key.clone()),
                "--tls-key",
                "[tls] key",
            )?,
            ca: required(self.tls_ca.clone().or(t.ca.clone()), "--tls-ca", "[tls] ca")?,
            crl: self.tls_crl.clone().or(t.crl.clone()),
        };
        let trust_domain = required(
            self.trust_domain.clone().or(s.trust_domain.clone()),
            "--trust-domain",
            "[server] trust_domain",
        )?;
        crate::identity::validate_label("trust domain", &trust_domain).map_err(NetError::Config)?;
        let max_request_bytes = self
            .max_request_bytes
            .or(s.max_request_bytes)
            .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if max_request_bytes < 1024 {
            return Err(NetError::Config(format!(
                "max_request_bytes {max_request_bytes} is below the 1 KiB minimum"
            )));
        }
        Ok(ServerSettings {
            listen: self.listen.or(s.listen).unwrap_or(default_listen),
            health_listen: self.health_listen.or(s.health_listen),
            trust_domain,
            tls,
            data_dir: self
                .data_dir
                .clone()
                .or(s.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from(default_data_dir)),
            max_request_bytes,
            shutdown_grace: Duration::from_secs(
                self.shutdown_grace_secs
                    .or(s.shutdown_grace_secs)
                    .unwrap_or(10),
            ),
            log_format: self.log_format.or(file.log.format).unwrap_or_default(),
        })
    }
}

/// What every service `main` does first: read the file named by `--config`, resolve flags over
/// it, and install logging in the configured format.
pub fn load_service<S: DeserializeOwned + Default>(
    args: &ServerArgs,
    service_section: &str,
    default_listen: SocketAddr,
    default_data_dir: &str,
) -> Result<(ConfigFile<S>, ServerSettings), NetError> {
    let file = load_file::<S>(args.config.as_deref(), service_section)?;
    let settings = args.resolve(&file, default_listen, default_data_dir)?;
    crate::telemetry::init(settings.log_format);
    // Before anything is counted (a keyshare audits its registry before it serves).
    crate::metrics::handle();
    Ok((file, settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Own {
        threshold: Option<u32>,
    }

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[server]\nlisten = \"127.0.0.1:1000\"\ntrust_domain = \"a.b\"\n[tls]\ncert=\"c\"\nkey=\"k\"\nca=\"ca\"\n[own]\nthreshold = 2\n",
        )
        .unwrap();
        let file: ConfigFile<Own> = load_file(Some(&p), "own").unwrap();
        assert_eq!(file.service.threshold, Some(2));
        let args = ServerArgs {
            listen: Some("127.0.0.1:2000".parse().unwrap()),
            ..Default::default()
        };
        let s = args
            .resolve(&file, "127.0.0.1:3000".parse().unwrap(), "d")
            .unwrap();
        assert_eq!(s.listen.port(), 2000);
        assert_eq!(s.trust_domain, "a.b");
        assert_eq!(s.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);

        std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:1000\"\nlisen = 3\n").unwrap();
        assert!(load_file::<Own>(Some(&p), "own").is_err());
        std::fs::write(&p, "[sever]\n").unwrap();
        let err = load_file::<Own>(Some(&p), "own").unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");
    }

    #[test]
    fn missing_tls_is_named() {
        let file: ConfigFile<Own> = ConfigFile::default();
        let err = ServerArgs::default()
            .resolve(&file, "127.0.0.1:1".parse().unwrap(), "d")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert"), "{err}");
    }
}
