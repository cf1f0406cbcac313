//! A real PostgreSQL server for tests, without Docker: the Debian `postgresql` package's
//! binaries run a fresh cluster in a temporary directory on a free 127.0.0.1 port, with trust
//! authentication for the local test user, and stop it when dropped. Each test gets its own
//! server, so tests never see each other's rows.
//!
//! The binaries are found under `PSM_PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`,
//! else `PATH`. When running as root (CI containers), the server runs as the `postgres` user,
//! because PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running throwaway server; stopped (immediately) and deleted on drop.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    run_as: Option<&'static str>,
}

fn bindir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("PSM_PG_BINDIR") {
        return Ok(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let on_path = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    on_path.ok_or_else(|| {
        "no PostgreSQL server binaries found (install the Debian package `postgresql`, or set PSM_PG_BINDIR to the directory holding initdb and pg_ctl)".to_string()
    })
}

fn is_root() -> bool {
    // `id -u` rather than a libc dependency for one call.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl TestPostgres {
    /// Creates and starts a cluster; its superuser is `psm` with no password, and it has an
    /// empty database `psm`.
    pub fn start() -> Result<TestPostgres, String> {
        let bindir = bindir()?;
        let dir = tempfile::Builder::new()
            .prefix("psm-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            run(Command::new("chown").arg("-R").arg(user).arg(dir.path()))?;
        }
        let mut pg = TestPostgres {
            dir,
            bindir,
            port: 0,
            run_as,
        };
        let data = pg.data();
        pg.run_pg(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "psm".as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-instructions".as_ref(),
            ],
        )?;
        // A port picked now may be taken before the server binds it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200",
                pg.port,
                pg.dir.path().display()
            );
            let log = pg.dir.path().join("server.log");
            match pg.run_pg(
                "pg_ctl",
                &[
                    "start".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    opts.as_ref(),
                ],
            ) {
                Ok(()) => {
                    pg.run_pg(
                        "createdb",
                        &[
                            "-h".as_ref(),
                            "127.0.0.1".as_ref(),
                            "-p".as_ref(),
                            pg.port.to_string().as_ref(),
                            "-U".as_ref(),
                            "psm".as_ref(),
                            "psm".as_ref(),
                        ],
                    )?;
                    return Ok(pg);
                }
                Err(e) => {
                    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
                    last = format!("{e}\n{server_log}");
                }
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` (`psm` exists; see [`TestPostgres::create_database`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://psm@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates another empty database (one per service, as in production).
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        self.client("createdb", &[name])?;
        Ok(self.url(name))
    }

    /// Runs a client program of the server's version (`pg_dump`, `pg_restore`, `psql`, …)
    /// against this server with `args`, returning its standard output.
    pub fn client(&self, program: &str, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new(self.bindir.join(program))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "psm"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }

    fn run_pg(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let bin = self.bindir.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd)
    }

    /// Directory of the cluster (for tests that look at the server's log).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run_pg(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_server_starts_takes_queries_and_stops() {
        let pg = super::TestPostgres::start().unwrap();
        let out = pg
            .client("psql", &["-d", "psm", "-Atc", "SELECT 40 + 2"])
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), "42");
        let url = pg.create_database("other").unwrap();
        assert!(url.ends_with("/other"));
        let port = pg.port();
        drop(pg);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
