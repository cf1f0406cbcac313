//! PostgreSQL connections for the services that keep state in it (ingest's reading store,
//! compute's shared jobs): one settings section, one pool per process, and the service's schema
//! migrated at start-up under sqlx's migration lock, so replicas starting together migrate once.
//! Each service keeps its own migration table, so several may share one database.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::SqlSafeStr;

/// `[<service>.store]`-style settings: where the database is and how many connections to keep.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// `postgres://user:password@host:5432/db?sslmode=verify-full&sslrootcert=ca.pem`: TLS to
    /// the database is chosen by `sslmode` (disable, prefer, require, verify-ca, verify-full).
    /// An environment variable named by the service overrides it, so a password need not be
    /// in the file.
    pub url: Option<String>,
    /// Connections this replica keeps open (default 16).
    pub max_connections: Option<u32>,
    /// Seconds a request waits for a free connection before it fails (default 10).
    pub acquire_timeout_secs: Option<u64>,
    /// Longest statement, seconds (default 60), and longest wait for a lock (default 10): a
    /// stuck database or a held lock becomes an error the caller sees, not a hung thread.
    pub statement_timeout_secs: Option<u64>,
    pub lock_timeout_secs: Option<u64>,
}

/// Connection failures, with messages that name the server but never the password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Connect(String),
    #[error("migrating the PostgreSQL schema: {0}")]
    Migrate(String),
}

/// One schema version: its number, a description, and its SQL.
pub struct Version {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

impl PgConfig {
    /// The URL: `env` if set, else `url`.
    pub fn resolved_url(&self, env: &str) -> Result<String, PgError> {
        std::env::var(env)
            .ok()
            .or_else(|| self.url.clone())
            .ok_or_else(|| PgError::Config(format!("PostgreSQL needs url (or {env})")))
    }

    /// Connects to `url` and migrates the schema of `service` (its own migration table,
    /// `_psm_<service>_migrations`) to `versions`.
    pub async fn connect(
        &self,
        url: &str,
        service: &str,
        versions: &[Version],
    ) -> Result<PgPool, PgError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(PgError::Config(
                "the PostgreSQL URL must start with postgres:// (postgres://user:password@host:port/database)".into(),
            ));
        }
        let opts = PgConnectOptions::from_str(url).map_err(|e| {
            PgError::Config(format!(
                "the PostgreSQL URL is not usable: {e} (expected postgres://user:password@host:port/database)"
            ))
        })?;
        let opts = opts.options([
            (
                "statement_timeout",
                format!("{}s", self.statement_timeout_secs.unwrap_or(60).max(1)),
            ),
            (
                "lock_timeout",
                format!("{}s", self.lock_timeout_secs.unwrap_or(10).max(1)),
            ),
            ("idle_in_transaction_session_timeout", "60s".to_string()),
        ]);
        let where_ = format!(
            "{}:{} (database {:?})",
            opts.get_host(),
            opts.get_port(),
            opts.get_database().unwrap_or("(default)")
        );
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections.unwrap_or(16).max(1))
            .acquire_timeout(Duration::from_secs(
                self.acquire_timeout_secs.unwrap_or(10).max(1),
            ))
            .connect_with(opts)
            .await
            .map_err(|e| {
                PgError::Connect(format!("cannot connect to PostgreSQL at {where_}: {e}"))
            })?;
        let mut migrator = Migrator::with_migrations(
            versions
                .iter()
                .map(|v| {
                    Migration::new(
                        v.version,
                        v.description.into(),
                        MigrationType::Simple,
                        v.sql.into_sql_str(),
                        false,
                    )
                })
                .collect(),
        );
        migrator.dangerous_set_table_name(format!("_psm_{service}_migrations"));
        migrator
            .run(&pool)
            .await
            .map_err(|e| PgError::Migrate(e.to_string()))?;
        tracing::info!(server = %where_, service, "connected to PostgreSQL; schema up to date");
        Ok(pool)
    }
}

/// Whether PostgreSQL aborted a transaction for a deadlock or a serialization failure, which
/// the caller should retry.
pub fn retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_and_absent_servers_get_errors_that_say_where_but_not_the_password() {
        let cfg = PgConfig {
            acquire_timeout_secs: Some(1),
            ..Default::default()
        };
        let err = cfg
            .connect("mysql://nobody@127.0.0.1/x", "test", &[])
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("must start with postgres://"),
            "{err}"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://psm:secret@127.0.0.1:{port}/readings");
        let m = cfg
            .connect(&url, "test", &[])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            m.contains(&format!("127.0.0.1:{port}")) && m.contains("readings"),
            "{m}"
        );
        assert!(!m.contains("secret"), "{m}");
        assert!(PgConfig::default()
            .resolved_url("PSM_TEST_UNSET_URL_VARIABLE")
            .is_err());
    }
}
