//! Test choreo services against real NATS servers.
//!
//! [`NatsServer`] runs a real `nats-server` process for one test: a free
//! loopback port learned from the server's own ports file (no guessing, no
//! races between parallel tests), JetStream on, a temp store, readiness awaited
//! through `/healthz` rather than slept for, and the process killed on drop.
//!
//! The binary comes from `$NATS_SERVER_BIN`, then `PATH`, then the project's
//! local install made by `scripts/test`; when there is none, starting fails
//! with an error that says how to get one.
//!
//! ```no_run
//! use choreo_testkit::NatsServer;
//!
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! let server = NatsServer::start().await?;
//! let client = server.connect().await?;
//! // ... run services against `client`, publish, assert ...
//! # Ok(()) }
//! ```

mod cluster;
mod error;
pub mod flow;
mod server;
mod service;

pub use cluster::NatsCluster;
pub use error::TestkitError;
pub use flow::{Flow, FlowError, Recorded, Recorder, Seen};
pub use service::TestService;
pub use server::{NATS_SERVER_BIN, NatsServer, NatsServerBuilder, find_binary};
