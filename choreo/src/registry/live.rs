//! The registry: each running instance describes itself in the KV bucket
//! [`BUCKET`], key `services.<service>.<instance>`, and refreshes its record
//! every heartbeat (10 s by default). The bucket keeps a key for
//! [`MAX_AGE`] after its last write, so a crashed instance shows as stale
//! once two heartbeats are missed ([`Instance::stale`]) and is gone a minute
//! later. A graceful stop deletes the record at once. This uses only the
//! bucket's `max_age`, which every nats-server with JetStream has (no
//! per-message TTL needed).
//!
//! Writing the registry never stops a service: a failed write is logged at
//! `warn` and tried again at the next heartbeat.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::Manifest;

/// The registry's bucket.
pub const BUCKET: &str = crate::topology::REGISTRY_BUCKET;

/// How long the bucket keeps a record after its last write.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// How often an instance refreshes its record by default.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// One running (or recently crashed) instance, as the registry shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Instance {
    /// The instance id (16 hex digits), also in its inbox claims.
    pub instance: String,
    /// The host it runs on: the system's host name (`unknown` if it has
    /// none that is text).
    pub host: String,
    /// When it started, Unix milliseconds.
    pub started_at_ms: u64,
    /// When it last refreshed this record, Unix milliseconds.
    pub heartbeat_at_ms: u64,
    /// How often it refreshes, milliseconds.
    pub heartbeat_ms: u64,
    /// What it runs.
    pub manifest: Manifest,
}

impl Instance {
    /// Whether it missed two heartbeats as of `now_ms` (crashed, or cut off).
    pub fn stale(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.heartbeat_at_ms) > self.heartbeat_ms.saturating_mul(2)
    }
}

pub(crate) use crate::event::now_ms;

/// The system's host name, as `hostname` prints it (not `$HOSTNAME`,
/// which shells set but rarely export); `unknown` if it is not text.
pub fn host_name() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The registry bucket, created if missing.
pub(crate) async fn open(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    match js
        .create_key_value(kv::Config {
            bucket: BUCKET.to_owned(),
            description: "choreo: the running service instances".to_owned(),
            history: 1,
            max_age: MAX_AGE,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
    {
        Ok(store) => Ok(store),
        // Another instance may have created it in between.
        Err(e) => js.get_key_value(BUCKET).await.map_err(|_| e.to_string()),
    }
}

/// The key of one instance's record.
fn key(service: &str, instance: &str) -> String {
    format!("services.{service}.{instance}")
}

/// A registry bucket could not be read. An error of its own (so `?` takes
/// it into `Box<dyn Error>` or `anyhow::Error`); its `source()` is the
/// client's error.
#[derive(Clone, Debug, thiserror::Error)]
#[error("cannot read the registry bucket {bucket}: {source}")]
#[non_exhaustive]
pub struct RegistryError {
    /// The bucket.
    pub bucket: &'static str,
    #[source]
    source: crate::nats::Source,
}

impl RegistryError {
    pub(super) fn of(bucket: &'static str) -> impl FnOnce(crate::nats::Source) -> Self {
        move |source| Self { bucket, source }
    }

    /// The client's error, for choreo's own errors to carry.
    pub(crate) fn into_source(self) -> crate::nats::Source {
        self.source
    }
}

/// Every instance the registry shows, live and stale, sorted by service.
///
/// # Errors
/// The bucket cannot be read (none exists when no service ever started).
pub async fn instances(js: &jetstream::Context) -> Result<Vec<Instance>, RegistryError> {
    let mut out: Vec<Instance> = read_all(js, BUCKET)
        .await
        .map_err(RegistryError::of(BUCKET))?;
    out.sort_by(|a, b| (&a.manifest.service, &a.instance).cmp(&(&b.manifest.service, &b.instance)));
    Ok(out)
}

/// Every value of `bucket` that reads as a `T` (others are skipped).
async fn read_all<T: serde::de::DeserializeOwned>(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<Vec<T>, crate::nats::Source> {
    let store = js
        .get_key_value(bucket)
        .await
        .map_err(crate::nats::source)?;
    let mut keys = store.keys().await.map_err(crate::nats::source)?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        if let Ok(Some(v)) = store.get(&k).await
            && let Ok(t) = serde_json::from_slice::<T>(&v)
        {
            out.push(t);
        }
    }
    Ok(out)
}

/// What one instance writes about itself.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) instance: Instance,
    pub(crate) replicas: usize,
}

/// Writes the instance's record, refreshes it every heartbeat, and deletes
/// it when the service stops. Never fails the service.
pub(crate) async fn heartbeat(
    js: jetstream::Context,
    record: Record,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Record {
        mut instance,
        replicas,
    } = record;
    let key = key(&instance.manifest.service, &instance.instance);
    let every = Duration::from_millis(instance.heartbeat_ms.max(100));
    let mut store = None;
    loop {
        if store.is_none() {
            match open(&js, replicas).await {
                Ok(s) => store = Some(s),
                Err(e) => {
                    tracing::warn!(service = %instance.manifest.service, bucket = BUCKET, error = %e, "cannot open the registry; trying again at the next heartbeat");
                }
            }
        }
        if let Some(s) = &store {
            instance.heartbeat_at_ms = now_ms();
            let value = serde_json::to_vec(&instance).unwrap_or_default();
            if let Err(e) = s.put(&key, value.into()).await {
                tracing::warn!(service = %instance.manifest.service, key = %key, error = %e, "cannot write the registry record; trying again at the next heartbeat");
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Some(s) = &store
        && let Err(e) = s.delete(&key).await
    {
        tracing::debug!(key = %key, error = %e, "could not delete the registry record; it expires on its own");
    }
}

pub use crate::publish::{PUBLISHERS_BUCKET, PublishedEvent};

/// Every root event type publishers have recorded, sorted by source.
///
/// # Errors
/// The bucket cannot be read (none exists before the first publish).
pub async fn publishers(js: &jetstream::Context) -> Result<Vec<PublishedEvent>, RegistryError> {
    let mut out: Vec<PublishedEvent> = read_all(js, PUBLISHERS_BUCKET)
        .await
        .map_err(RegistryError::of(PUBLISHERS_BUCKET))?;
    out.sort_by(|a, b| {
        let key = |p: &PublishedEvent| (p.source.clone(), p.event.event.clone(), p.event.version);
        key(a).cmp(&key(b))
    });
    Ok(out)
}
