//! [`PostgresServer`]: a real Postgres for one test, started the way
//! [`NatsServer`](crate::NatsServer) starts nats-server: a fresh cluster
//! directory in a temp dir, a free loopback port, stopped on drop. As root
//! (CI, containers) the server runs as the unprivileged `postgres` user,
//! since `initdb` refuses root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::TestkitError;

/// The environment variable that names the directory holding Postgres's
/// `initdb`, `postgres` and `psql`.
pub const POSTGRES_BIN_DIR: &str = "POSTGRES_BIN_DIR";

/// The user a root process runs Postgres as.
const UNPRIVILEGED: &str = "postgres";

/// The role tests connect as (a superuser, no password, loopback only).
/// Not `choreo`: a role of that name has the `choreo` schema first on its
/// default search path (`"$user", public`), and its unqualified tables
/// would be made there.
pub const POSTGRES_USER: &str = "postgres";

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the directory with Postgres's binaries: `$POSTGRES_BIN_DIR`, then
/// `pg_config --bindir`, then Debian's `/usr/lib/postgresql/<newest>/bin`,
/// then the directory of `initdb` on `PATH`.
///
/// # Errors
/// [`TestkitError::PostgresNotFound`], which says how to get one.
pub fn find_postgres() -> Result<PathBuf, TestkitError> {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os(POSTGRES_BIN_DIR) {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(TestkitError::PostgresNotFound {
                looked: format!(
                    "{POSTGRES_BIN_DIR}={} (it lacks initdb, postgres or psql)",
                    dir.display()
                ),
            })
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if complete(&dir) {
            return Ok(dir);
        }
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| complete(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if complete(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(TestkitError::PostgresNotFound {
        looked: format!(
            "${POSTGRES_BIN_DIR} (unset), pg_config, /usr/lib/postgresql/*/bin and PATH"
        ),
    })
}

/// Whether this process runs as root (Postgres will not).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A real Postgres server on a free loopback port, its cluster in a temp
/// dir, fsync off: a committed transaction survives the server's process
/// being killed (its WAL is written at commit), not a power cut. It is
/// stopped, and the dir removed, on drop; when the test is panicking the
/// dir is kept and its path printed, so the server's log can be read.
///
/// ```no_run
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// let pg = choreo_testkit::PostgresServer::start().await?;
/// let url = pg.url(); // postgres://postgres@127.0.0.1:<port>/postgres
/// pg.psql("CREATE TABLE t (id int)")?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    port: u16,
    /// The postmaster's pid while it runs.
    pid: Option<u32>,
    as_user: Option<&'static str>,
}

impl PostgresServer {
    /// Creates a cluster and starts the server, waiting until it accepts
    /// connections.
    ///
    /// # Errors
    /// No binaries, a cluster that cannot be made, or a server that does not
    /// start (with its log).
    pub async fn start() -> Result<Self, TestkitError> {
        let bin = find_postgres()?;
        let dir = tempfile::Builder::new()
            .prefix("choreo-pg-")
            .tempdir()
            .map_err(|e| io("create a temp dir", e))?;
        let as_user = is_root().then_some(UNPRIVILEGED);
        let mut server = Self {
            bin,
            dir: Some(dir),
            port: 0,
            pid: None,
            as_user,
        };
        if let Some(user) = as_user {
            // The cluster and the socket live in the temp dir, which the
            // unprivileged user must own.
            server.run_checked(
                Command::new("chown").arg("-R").arg(user).arg(server.dir()),
                "give the temp dir to the postgres user",
            )?;
        }
        let data = server.dir().join("data");
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            POSTGRES_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        server.run_checked(&mut initdb, "create the cluster (initdb)")?;
        server.spawn().await?;
        Ok(server)
    }

    /// A command for binary `name`, run as the unprivileged user when this
    /// process is root.
    fn command(&self, name: &str) -> Command {
        let bin = self.bin.join(name);
        match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }

    fn run_checked(&self, command: &mut Command, what: &str) -> Result<(), TestkitError> {
        let out = command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io(what, e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(TestkitError::PostgresFailed {
            why: format!(
                "could not {what}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
            log_tail: self.log_tail(20),
        })
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let data = self.dir().join("data");
        let pid_file = data.join("postmaster.pid");
        let stale = read_pid_file(&pid_file).map(|(pid, _)| pid);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let port = if self.port == 0 {
                free_port()?
            } else {
                self.port
            };
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir().join("postgres.log"))
                .map_err(|e| io("open the server log", e))?;
            let mut postgres = self.command("postgres");
            postgres
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(self.dir())
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            let mut child = postgres
                .spawn()
                .map_err(|e| io(&format!("start {}", self.bin.join("postgres").display()), e))?;
            // The postmaster writes its pid and, once it accepts
            // connections, "ready" into postmaster.pid. One killed before
            // left its own file behind: wait for this one's.
            loop {
                if let Some((pid, ready)) = read_pid_file(&pid_file)
                    && Some(pid) != stale
                {
                    self.pid = Some(pid);
                    if ready {
                        self.port = port;
                        // `runuser` waits for the postmaster; it is reaped
                        // when the postmaster stops.
                        std::thread::spawn(move || child.wait());
                        return Ok(());
                    }
                }
                if let Ok(Some(_)) = child.try_wait() {
                    self.pid = None;
                    let log = self.log_tail(5);
                    // Another process took the port between our probe and
                    // the server's bind: try another.
                    if self.port == 0 && log.contains("could not bind") && Instant::now() < deadline
                    {
                        break;
                    }
                    return Err(self.failed("the server exited during startup"));
                }
                if Instant::now() > deadline {
                    let err = self.failed("not ready within 30 s");
                    self.signal("-KILL", Duration::ZERO);
                    let _ = child.kill();
                    return Err(err);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn failed(&self, why: &str) -> TestkitError {
        TestkitError::PostgresFailed {
            why: why.to_owned(),
            log_tail: self.log_tail(20),
        }
    }

    /// The connection URL, `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `database` on this server.
    pub fn url_of(&self, database: &str) -> String {
        format!(
            "postgres://{POSTGRES_USER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir (cluster, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or_else(|| Path::new("."), |d| d.path())
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir().join("postgres.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `sql` with `psql` (stop on the first error) and returns what it
    /// printed, unaligned and without headers: one row per line, columns
    /// separated by `|`.
    ///
    /// # Errors
    /// `psql` failed; the error carries its message.
    pub fn psql(&self, sql: &str) -> Result<String, TestkitError> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io("run psql", e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(TestkitError::PostgresFailed {
                why: format!("psql: {}", String::from_utf8_lossy(&out.stderr).trim()),
                log_tail: String::new(),
            })
        }
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Kills the server with SIGKILL (a crash; the next start recovers).
    pub fn kill(&mut self) {
        self.signal("-KILL", Duration::ZERO);
    }

    /// Stops the server (fast shutdown: sessions are closed, open
    /// transactions roll back) and waits for it to exit.
    pub fn stop(&mut self) {
        self.signal("-INT", Duration::from_secs(10));
    }

    /// Starts the server again on the same port with the same cluster,
    /// after [`kill`](Self::kill) or [`stop`](Self::stop).
    ///
    /// # Errors
    /// As for [`start`](Self::start).
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn().await
    }

    fn signal(&mut self, signal: &str, grace: Duration) {
        // The pid learnt at start, else the one in the cluster's pid file
        // (a start that failed half-way).
        let data = self.dir().join("data");
        let ours = |pid: &u32| {
            // Alive, and a postmaster of this cluster (not a process that
            // took a dead one's pid).
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*data.to_string_lossy()))
        };
        let from_file = read_pid_file(&data.join("postmaster.pid"))
            .map(|(pid, _)| pid)
            .filter(ours);
        let Some(pid) = self.pid.take().or(from_file) else {
            return;
        };
        let _ = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + grace;
        let alive = || Path::new(&format!("/proc/{pid}")).exists();
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            while alive() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "postgres server dir kept for inspection: {}",
                dir.keep().display()
            );
        }
    }
}

/// The postmaster's pid from its pid file, and whether it says "ready"
/// (accepting connections).
fn read_pid_file(path: &Path) -> Option<(u32, bool)> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines.first()?.trim().parse().ok()?;
    Some((pid, lines.get(7).is_some_and(|s| s.trim() == "ready")))
}

/// A port nobody listens on now.
fn free_port() -> Result<u16, TestkitError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| io("find a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| io("find a free port", e))
}

fn io(what: &str, source: std::io::Error) -> TestkitError {
    TestkitError::Io {
        what: what.to_owned(),
        source,
    }
}
