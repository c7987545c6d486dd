//! Recording, once per publisher and event type, which root events a
//! publisher publishes (read back by `choreo::registry::publishers`).

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use crate::event::now_ms;

/// The bucket where publishers record the root events they publish.
pub const PUBLISHERS_BUCKET: &str = crate::topology::PUBLISHERS_BUCKET;

/// A root event type a publisher has published, as the registry keeps it
/// (key `<source>.<event name>.v<version>`, one per version, kept until
/// deleted by hand; 0.1.0 wrote `<source>.<event name>`, one for all
/// versions, which is still read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PublishedEvent {
    /// The publisher's `ce-source`.
    pub source: String,
    /// The event type.
    pub event: crate::event::EventManifest,
    /// When this publisher (instance) first published it, Unix milliseconds.
    pub first_published_at_ms: u64,
}

/// Records that `source` publishes `event`, once per publisher, type and
/// version, in the background; a failure is logged and never fails a
/// publish. Returns the background task.
pub(crate) fn record_publisher(
    js: &jetstream::Context,
    source: &str,
    event: &crate::event::EventType,
    replicas: usize,
) -> Option<tokio::task::JoinHandle<()>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return None;
    };
    let js = js.clone();
    let record = PublishedEvent {
        source: source.to_owned(),
        event: crate::event::EventManifest::from(event),
        first_published_at_ms: now_ms(),
    };
    Some(runtime.spawn(async move {
        let store = match js.get_key_value(PUBLISHERS_BUCKET).await {
            Ok(s) => Ok(s),
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: PUBLISHERS_BUCKET.to_owned(),
                    description: "choreo: which publisher publishes which root events".to_owned(),
                    history: 1,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
        };
        let key = format!(
            "{}.{}.v{}",
            record.source, record.event.event, record.event.version
        );
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let put = match store {
            Ok(s) => s.put(&key, value.into()).await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = put {
            tracing::warn!(source = %record.source, event = %record.event.event, error = %e, "cannot record the publisher in the registry");
        }
    }))
}

impl super::Publisher {
    /// Waits for this publisher's background work to finish: the registry
    /// records of which root events it publishes (written once per event
    /// type and version, after its first publish, so that `choreo graph`
    /// and `lint` see it). Publishes themselves are complete when
    /// [`publish`](Self::publish) returns; this is for a program that
    /// publishes and exits at once, whose runtime would otherwise cancel
    /// that work (it then logs `cannot record the publisher in the
    /// registry`). Clones share the work: flushing one flushes all.
    ///
    /// ```no_run
    /// # use choreo::{event, Publisher};
    /// # #[event(subject = "orders.{order_id}.placed", key = order_id)]
    /// # pub struct OrderPlaced { pub order_id: String }
    /// # async fn t(client: choreo::async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let publisher = Publisher::new(client, "import-job")?;
    /// publisher.publish(&OrderPlaced { order_id: "o-1".into() }).await?;
    /// publisher.flush().await;
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) {
        loop {
            let pending = std::mem::take(
                &mut *self
                    .inner
                    .background
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if pending.is_empty() {
                return;
            }
            for task in pending {
                let _ = task.await;
            }
        }
    }

    /// Records, the first time this publisher publishes an `E`, that it
    /// publishes `E` (bucket `choreo_publishers`, in the background).
    pub(crate) fn record<E: crate::event::Event>(&self) {
        let first = self
            .inner
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((E::NAME, E::VERSION));
        if first
            && let Some(task) = record_publisher(
                &self.inner.js,
                &self.inner.source,
                &crate::event::EventType::of::<E>(),
                self.inner.settings.replicas,
            )
        {
            let mut tasks = self
                .inner
                .background
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// Runs `f` on the metric handles of `stream` (taken on its first
    /// publish), under one lock and with no handle cloned.
    pub(super) fn with_metrics(
        &self,
        stream: &'static str,
        f: impl FnOnce(&crate::observe::PublishMetrics),
    ) {
        let mut map = self.inner.metrics.lock().unwrap_or_else(|p| p.into_inner());
        f(map
            .entry(stream)
            .or_insert_with(|| crate::observe::PublishMetrics::new(&self.inner.source, stream)));
    }
}
