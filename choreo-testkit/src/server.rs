//! [`NatsServer`]: a real `nats-server` process for one test.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::TestkitError;

/// The environment variable that names the `nats-server` binary to use.
pub const NATS_SERVER_BIN: &str = "NATS_SERVER_BIN";
/// Set by the workspace's `.cargo/config.toml`: the project-local install
/// that `scripts/test` creates.
const LOCAL_INSTALL: &str = "CHOREO_LOCAL_NATS_SERVER";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds the `nats-server` binary: `$NATS_SERVER_BIN`, then `PATH`, then the
/// project-local install (`.tools/nats-server/bin/nats-server`, made by
/// `scripts/test`; found through cargo's environment, or above the current
/// directory).
///
/// # Errors
/// [`TestkitError::BinaryNotFound`], which says how to get one.
pub fn find_binary() -> Result<PathBuf, TestkitError> {
    if let Some(bin) = std::env::var_os(NATS_SERVER_BIN) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(TestkitError::BinaryNotFound {
                looked: format!("{NATS_SERVER_BIN}={} (no such file)", bin.display()),
            })
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(local) = std::env::var_os(LOCAL_INSTALL) {
        let local = PathBuf::from(local);
        if local.is_file() {
            return Ok(local);
        }
    }
    // Run outside cargo (a built example, say): look for the project-local
    // install above the current directory.
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join(".tools/nats-server/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(TestkitError::BinaryNotFound {
        looked: format!(
            "${NATS_SERVER_BIN} (unset), PATH, and the project-local .tools/nats-server"
        ),
    })
}

/// Options for [`NatsServer::builder`].
#[derive(Clone, Debug, Default)]
pub struct NatsServerBuilder {
    extra_config: String,
    jetstream: Option<bool>,
    domain: Option<String>,
    cluster: Option<ClusterSpec>,
}

/// A node's place in a cluster (set by [`NatsCluster`](crate::NatsCluster)).
#[derive(Clone, Debug)]
pub(crate) struct ClusterSpec {
    pub(crate) cluster_name: String,
    pub(crate) server_name: String,
    pub(crate) cluster_port: u16,
    pub(crate) routes: Vec<u16>,
}

impl NatsServerBuilder {
    /// Appends `config` (nats-server configuration syntax) to the generated
    /// configuration, e.g. `authorization { ... }` or `max_payload: 4096`.
    pub fn config(mut self, config: &str) -> Self {
        self.extra_config.push_str(config);
        self.extra_config.push('\n');
        self
    }

    /// Turns JetStream off (it is on by default), to test how services
    /// react to a server without it.
    pub fn without_jetstream(mut self) -> Self {
        self.jetstream = Some(false);
        self
    }

    /// Gives the server's JetStream the domain `domain`: clients then reach
    /// it at `$JS.<domain>.API` too ([`choreo::JetStreamApi::domain`]).
    pub fn jetstream_domain(mut self, domain: &str) -> Self {
        self.domain = Some(domain.to_owned());
        self
    }

    pub(crate) fn cluster(mut self, spec: ClusterSpec) -> Self {
        self.cluster = Some(spec);
        self
    }

    /// Starts the server and waits until it is ready.
    ///
    /// # Errors
    /// No binary, a server that exits or is not ready in time (with its log).
    pub async fn start(self) -> Result<NatsServer, TestkitError> {
        let mut server = self.prepare()?;
        server.spawn().await?;
        Ok(server)
    }

    /// A server whose process is not started yet.
    pub(crate) fn prepare(self) -> Result<NatsServer, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("choreo-nats-")
            .tempdir()
            .map_err(|e| TestkitError::Io {
                what: "create a temp dir".into(),
                source: e,
            })?;
        Ok(NatsServer {
            bin: find_binary()?,
            dir: Some(dir),
            child: None,
            port: 0,
            monitor_port: 0,
            builder: self,
        })
    }
}

/// A real `nats-server` process on a free loopback port, with JetStream on and
/// its own store in a temp dir. It is killed, and the dir removed, on drop;
/// when the test is panicking the dir is kept and its path printed, so the
/// server's log can be read.
///
/// ```no_run
/// # async fn t() -> Result<(), Box<dyn std::error::Error>> {
/// let server = choreo_testkit::NatsServer::start().await?;
/// let client = server.connect().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    builder: NatsServerBuilder,
}

impl NatsServer {
    /// Starts a server with the default configuration.
    ///
    /// # Errors
    /// See [`NatsServerBuilder::start`].
    pub async fn start() -> Result<Self, TestkitError> {
        Self::builder().start().await
    }

    /// The same server, to listen for clients on `port` and for monitoring
    /// on `monitor_port` (a cluster node's ports are fixed before it
    /// starts, so a restart finds them again).
    pub(crate) fn on_ports(mut self, port: u16, monitor_port: u16) -> Self {
        self.port = port;
        self.monitor_port = monitor_port;
        self
    }

    /// A builder for a server with extra configuration.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temp dir (store, config, log).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or_else(|| Path::new("."), |d| d.path())
    }

    /// Connects a plain client (no credentials).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn connect(&self) -> Result<async_nats::Client, TestkitError> {
        async_nats::connect(self.url())
            .await
            .map_err(|e| TestkitError::Connect {
                url: self.url(),
                source: Box::new(e),
            })
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut log = std::fs::read_to_string(self.dir().join("stderr.log")).unwrap_or_default();
        log.push_str(&std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default());
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the process with SIGKILL (no shutdown, as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The server's name (`server_name` in its configuration).
    pub fn name(&self) -> String {
        match &self.builder.cluster {
            Some(spec) => spec.server_name.clone(),
            None => format!("choreo_test_{}", std::process::id()),
        }
    }

    /// Stops the process with SIGTERM and waits for it to exit (JetStream
    /// shuts down cleanly, as in a rolling restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server process's id while it runs (to read its memory or CPU
    /// from `/proc` in a benchmark).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// The monitoring port (`/healthz`, `/jsz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Starts the server again on the same port with the same store, after
    /// [`kill`](Self::kill); kills it first if it still runs. A port that
    /// another process holds meanwhile is waited for, up to 10 s.
    ///
    /// # Errors
    /// As for [`NatsServerBuilder::start`].
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.start_again(START_TIMEOUT).await
    }

    /// Kills the process if it runs and starts it again on its ports with
    /// its store, healthy within `timeout`. A port another process holds
    /// meanwhile (its client and monitoring ports may come from the
    /// kernel's ephemeral range) is waited for, up to 10 s.
    pub(crate) async fn start_again(&mut self, timeout: Duration) -> Result<(), TestkitError> {
        let mut tries = 0;
        loop {
            self.kill();
            let started = match self.launch().await {
                Ok(()) => self.wait_healthy(timeout).await,
                Err(e) => Err(e),
            };
            match started {
                Err(e) if e.log_says("address already in use") && tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                started => return started,
            }
        }
    }

    fn config_text(&self) -> String {
        let dir = self.dir();
        let mut c = String::new();
        match &self.builder.cluster {
            Some(spec) => {
                let _ = writeln!(c, "server_name: {}", spec.server_name);
                let routes: Vec<String> = spec
                    .routes
                    .iter()
                    .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect();
                let _ = writeln!(
                    c,
                    "cluster {{ name: {}, listen: \"127.0.0.1:{}\", routes: [{}] }}",
                    spec.cluster_name,
                    spec.cluster_port,
                    routes.join(", ")
                );
            }
            None => {
                let _ = writeln!(c, "server_name: choreo_test_{}", std::process::id());
            }
        }
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let _ = writeln!(c, "listen: \"127.0.0.1:{port}\"");
        let mport = if self.monitor_port == 0 {
            "-1".to_owned()
        } else {
            self.monitor_port.to_string()
        };
        let _ = writeln!(c, "http: \"127.0.0.1:{mport}\"");
        if self.builder.jetstream != Some(false) {
            let domain = self
                .builder
                .domain
                .as_ref()
                .map(|d| format!(", domain: {d:?}"))
                .unwrap_or_default();
            let _ = writeln!(
                c,
                "jetstream {{ store_dir: {:?}{domain} }}",
                dir.join("js").display().to_string()
            );
        }
        c.push_str(&self.builder.extra_config);
        c
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        self.launch().await?;
        self.wait_healthy(START_TIMEOUT).await
    }

    /// Starts the process and learns its ports, without waiting for health.
    pub(crate) async fn launch(&mut self) -> Result<(), TestkitError> {
        let dir = self.dir().to_path_buf();
        let conf = dir.join("server.conf");
        std::fs::write(&conf, self.config_text()).map_err(|e| TestkitError::Io {
            what: format!("write {}", conf.display()),
            source: e,
        })?;
        // A fresh ports file for this process.
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Errors before the log file is open (bad config, port in use) go
        // to stderr: keep them next to the log.
        let stderr = std::fs::File::create(dir.join("stderr.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&dir)
            .arg("-l")
            .arg(dir.join("server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| TestkitError::Io {
                what: format!("start {}", self.bin.display()),
                source: e,
            })?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let ports_file = dir.join(format!("nats-server_{pid}.ports"));
        // The server writes its ports file once its listeners are up: no
        // port is guessed, so tests never race for one.
        let ports = loop {
            if !self.is_running() {
                return Err(self.start_failed("the process exited during startup"));
            }
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(p) = serde_json::from_str::<Ports>(&text)
            {
                break p;
            }
            if Instant::now() > deadline {
                return Err(self.start_failed("no ports file within 20 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.port =
            port_of(ports.nats.first()).ok_or_else(|| self.start_failed("no client port"))?;
        self.monitor_port = port_of(ports.monitoring.first())
            .ok_or_else(|| self.start_failed("no monitoring port"))?;
        Ok(())
    }

    /// Waits until `/healthz` says ok: listening, and with JetStream on, its
    /// store is ready and (in a cluster) it has a current meta leader.
    pub(crate) async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if http_get_ok(self.monitor_port, "/healthz").await {
                return Ok(());
            }
            if !self.is_running() {
                return Err(self.start_failed("the process exited during startup"));
            }
            if Instant::now() > deadline {
                return Err(self.start_failed(&format!("/healthz not ok within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn start_failed(&self, why: &str) -> TestkitError {
        TestkitError::StartFailed {
            why: why.to_owned(),
            binary: self.bin.display().to_string(),
            log_tail: self.log_tail(20),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "choreo-testkit: kept the nats-server dir for inspection: {}",
                kept.display()
            );
        }
    }
}

#[derive(serde::Deserialize)]
struct Ports {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    monitoring: Vec<String>,
}

fn port_of(url: Option<&String>) -> Option<u16> {
    url?.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// A minimal HTTP/1.0 GET on loopback; true on status 200.
pub(crate) async fn http_get_ok(port: u16, path: &str) -> bool {
    http_get(port, path)
        .await
        .is_some_and(|(status, _)| status == 200)
}

pub(crate) async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}
