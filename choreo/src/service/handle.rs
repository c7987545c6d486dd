//! [`ServiceHandle`]: a running service, to wait on or stop.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::RunError;
use crate::runtime::{HandlerStats, Stopped};

/// A running service.
///
/// Dropping the handle stops the service gracefully in the background, as
/// [`shutdown`](Self::shutdown) does without waiting: no new events are
/// pulled, running handlers finish (up to the grace period), publish their
/// emissions and ack — as long as the tokio runtime keeps running. Keep the
/// handle for as long as the service should run; call
/// [`wait`](Self::wait) to learn of a failure it cannot recover from.
#[derive(Debug)]
#[must_use = "dropping a ServiceHandle stops the service: keep it, or call .wait() or .shutdown()"]
pub struct ServiceHandle {
    pub(super) name: Arc<str>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) tasks: JoinSet<Result<(), Stopped>>,
    pub(super) stats: Vec<(&'static str, Arc<HandlerStats>)>,
    pub(super) client: async_nats::Client,
}

impl ServiceHandle {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The counters of handler `name`.
    pub fn stats(&self, handler: &str) -> Option<&HandlerStats> {
        self.stats
            .iter()
            .find(|(n, _)| *n == handler)
            .map(|(_, s)| &**s)
    }

    /// Waits until the service stops on its own: `Err` when a handler met
    /// a failure it could not recover from within the recovery timeout (the
    /// rest of the service is then shut down gracefully before this
    /// returns); `Ok` only after [`shutdown`](Self::shutdown)-like stops.
    /// Cancel-safe: a `select!` may drop it and call `shutdown` after.
    ///
    /// # Errors
    /// The first [`RunError`] a handler stopped with.
    pub async fn wait(&mut self) -> Result<(), RunError> {
        while let Some(done) = self.tasks.join_next().await {
            let failed = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => RunError::stopped(&self.name, e),
                Err(e) if e.is_panic() => RunError::Panicked {
                    service: self.name.to_string(),
                    panic: crate::runtime::panic_message(&*e.into_panic()),
                },
                Err(_) => continue,
            };
            let _ = self.stop.send(true);
            while self.tasks.join_next().await.is_some() {}
            let _ = self.client.flush().await;
            tracing::error!(service = %self.name, error = %failed, "service stopped on a failure");
            return Err(failed);
        }
        Ok(())
    }

    /// Stops pulling, lets running handlers finish (up to the grace period),
    /// publishes their emissions and acks, flushes the connection, returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Err(e)) = done {
                let e = RunError::stopped(&self.name, e);
                tracing::error!(service = %self.name, error = %e, "a handler had failed before shutdown");
            }
        }
        let _ = self.client.flush().await;
        tracing::info!(service = %self.name, "service stopped");
    }

    /// Stops at once, as a crash would: running handlers are dropped without
    /// a verdict, nothing is acked or flushed. JetStream redelivers their
    /// events after `ack_wait`. For fault tests.
    pub fn abort(mut self) {
        self.tasks.abort_all();
        self.tasks.detach_all();
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        // Stop gracefully in the background: the tasks see the signal,
        // finish what runs, and end on their own.
        let _ = self.stop.send(true);
        self.tasks.detach_all();
        tracing::info!(service = %self.name, "service handle dropped; stopping gracefully in the background");
    }
}
