//! What services with an outbox in their own database (`choreo-postgres`)
//! report about it in the registry bucket, so that `choreo status` and
//! `choreo lint` can see it from NATS alone: one record per service,
//! `outboxes.<service>`, refreshed by its relays.

use async_nats::jetstream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::live::{BUCKET, RegistryError, open};

/// One service's outbox, as its relay last saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OutboxReport {
    /// The service.
    pub service: String,
    /// The instance whose relay wrote the report.
    pub instance: String,
    /// Rows committed and not yet published (capped at 100,000).
    pub pending: u64,
    /// How long the oldest of them has waited, milliseconds; 0 when none.
    pub oldest_age_ms: u64,
    /// Rows whose publish failed and that wait for a retry (a stream that
    /// is gone, a payload over the server's limit): kept, not dropped.
    pub failing: u64,
    /// The newest failure's reason, naming its event.
    pub last_error: Option<String>,
    /// How old a row must be before the relay publishes it, milliseconds.
    pub relay_delay_ms: u64,
    /// How often the relay looks, milliseconds.
    pub relay_every_ms: u64,
    /// When the report was written, Unix milliseconds.
    pub reported_at_ms: u64,
}

impl OutboxReport {
    /// A report of `service`'s outbox by `instance`'s relay, written now.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: &str,
        instance: &str,
        pending: u64,
        oldest_age_ms: u64,
        failing: u64,
        last_error: Option<String>,
        relay_delay_ms: u64,
        relay_every_ms: u64,
    ) -> Self {
        Self {
            service: service.to_owned(),
            instance: instance.to_owned(),
            pending,
            oldest_age_ms,
            failing,
            last_error,
            relay_delay_ms,
            relay_every_ms,
            reported_at_ms: crate::event::now_ms(),
        }
    }

    /// The latest the relay publishes a committed row after its commit,
    /// milliseconds: its delay and two of its periods.
    pub fn relay_latest_ms(&self) -> u64 {
        self.relay_delay_ms + 2 * self.relay_every_ms
    }
}

fn key(service: &str) -> String {
    format!("outboxes.{service}")
}

/// Writes `report` (creating the bucket if missing, with `replicas`).
///
/// # Errors
/// The bucket cannot be written.
pub async fn report_outbox(
    js: &jetstream::Context,
    report: &OutboxReport,
    replicas: usize,
) -> Result<(), String> {
    let store = open(js, replicas).await?;
    let value = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    store
        .put(key(&report.service), value.into())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Every service's outbox report, sorted by service. Reports expire with
/// the bucket's records ([`MAX_AGE`](super::MAX_AGE) after the last).
///
/// # Errors
/// The bucket cannot be read.
pub async fn outboxes(js: &jetstream::Context) -> Result<Vec<OutboxReport>, RegistryError> {
    let of = |e| RegistryError::of(BUCKET)(crate::nats::source(e));
    let store = js.get_key_value(BUCKET).await.map_err(of)?;
    let mut keys = store
        .keys()
        .await
        .map_err(|e| RegistryError::of(BUCKET)(crate::nats::source(e)))?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        if !k.starts_with("outboxes.") {
            continue;
        }
        if let Ok(Some(v)) = store.get(&k).await
            && let Ok(r) = serde_json::from_slice::<OutboxReport>(&v)
        {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.service.cmp(&b.service));
    Ok(out)
}
