//! Publishing events: [`Publisher`], stream provisioning and [`Receipt`]s.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

pub(crate) mod batch;
mod error;
mod outgoing;
mod record;
mod send;

pub use batch::BatchOutcome;
pub use error::{PublishError, PublishErrorKind};
pub use outgoing::Emission;
pub(crate) use outgoing::Outgoing;
pub use record::{PUBLISHERS_BUCKET, PublishedEvent};
pub use send::PUBLISH_ALL_IN_FLIGHT;

use crate::event::Event;
use crate::event::EventId;
use crate::nats::JetStreamApi;
use crate::topology::StreamSettings;
use crate::topology::stream::ensure_stream;
use crate::wire::envelope::Envelope;
use crate::wire::headers::{self, Metadata};

/// What JetStream said about one published event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The event's id.
    pub event_id: EventId,
    /// The flow's id.
    pub correlation_id: EventId,
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream (the original's, for a duplicate).
    pub sequence: u64,
    /// JetStream already had this id inside its duplicate window and did not
    /// store it again. That is success: the event is in the stream once.
    pub duplicate: bool,
}

/// A receipt at once, or after a duplicate's check.
type Checked<'a> = futures::future::Either<
    futures::future::Ready<Result<Receipt, PublishError>>,
    std::pin::Pin<Box<dyn Future<Output = Result<Receipt, PublishError>> + Send + 'a>>,
>;

/// What a duplicate's check compares: kept from the encoded event.
#[derive(Debug)]
struct Sent {
    event: &'static str,
    payload: Bytes,
    version: u32,
    key: Option<crate::EventKey>,
}

/// Publishes events to JetStream: creates missing streams, sets every header
/// of the wire format, awaits each PubAck, and retries transient failures
/// (no stream leader during a failover, a timeout) with the same event id,
/// which JetStream's deduplication makes safe.
///
/// ```no_run
/// # use choreo::{event, Publisher};
/// # #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// # pub struct OrderPlaced { pub order_id: String }
/// # async fn t(client: choreo::async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let publisher = Publisher::new(client, "checkout")?;
/// let receipt = publisher.publish(&OrderPlaced { order_id: "o-1".into() }).await?;
/// println!("stored as {} #{}", receipt.stream, receipt.sequence);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    source: String,
    settings: StreamSettings,
    retry_for: Duration,
    ensured: Mutex<HashSet<&'static str>>,
    /// The JetStream API prefix requests go to (`$JS.API` unless
    /// [`Publisher::jetstream`] named another).
    api_prefix: String,
    /// The root event types (name, version) recorded in the registry so far.
    recorded: Mutex<HashSet<(&'static str, u32)>>,
    /// The registry writes still running in the background.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Held while a stream is being looked up or created, so that many
    /// concurrent first publishes make one request, not hundreds.
    ensuring: tokio::sync::Mutex<()>,
    /// The server's `max_payload`, read at construction (`server_info()`
    /// clones the whole INFO block, too costly per event) and refreshed when
    /// the client reports the limit exceeded.
    max_payload: AtomicUsize,
    /// Metric handles per stream, taken on its first publish.
    metrics: Mutex<std::collections::HashMap<&'static str, crate::observe::PublishMetrics>>,
}

impl Publisher {
    /// A publisher that writes `source` into `ce-source`.
    ///
    /// # Errors
    /// `source` is not a legal service name (1–256 characters, no whitespace
    /// or control characters).
    pub fn new(client: async_nats::Client, source: &str) -> Result<Self, PublishError> {
        headers::check_source(source)?;
        let js = jetstream::new(client.clone());
        let max_payload = AtomicUsize::new(client.server_info().max_payload);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                source: source.to_owned(),
                settings: StreamSettings::default(),
                retry_for: Duration::from_secs(30),
                ensured: Mutex::new(HashSet::new()),
                api_prefix: JetStreamApi::default().prefix(),
                ensuring: tokio::sync::Mutex::new(()),
                max_payload,
                metrics: Mutex::new(std::collections::HashMap::new()),
                recorded: Mutex::new(HashSet::new()),
                background: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Publishes through `api`: a JetStream domain or an API prefix
    /// instead of the account's own JetStream.
    pub fn jetstream(self, api: &JetStreamApi) -> Self {
        let js = api.context(self.inner.client.clone());
        let prefix = api.prefix();
        self.rebuild(|i| {
            i.js = js;
            i.api_prefix = prefix;
        })
    }

    /// Uses `settings` for streams this publisher creates.
    pub fn stream_settings(self, settings: StreamSettings) -> Self {
        self.rebuild(|i| i.settings = settings)
    }

    /// How long transient failures are retried before a publish fails
    /// (default 30 s, enough for a cluster to elect a new stream leader).
    pub fn retry_for(self, retry_for: Duration) -> Self {
        self.rebuild(|i| i.retry_for = retry_for)
    }

    fn rebuild(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            client: self.inner.client.clone(),
            js: self.inner.js.clone(),
            source: self.inner.source.clone(),
            settings: self.inner.settings.clone(),
            retry_for: self.inner.retry_for,
            ensured: Mutex::new(HashSet::new()),
            api_prefix: self.inner.api_prefix.clone(),
            ensuring: tokio::sync::Mutex::new(()),
            max_payload: AtomicUsize::new(self.inner.max_payload.load(Ordering::Relaxed)),
            metrics: Mutex::new(std::collections::HashMap::new()),
            recorded: Mutex::new(HashSet::new()),
            background: Mutex::new(Vec::new()),
        };
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The service name written in `ce-source`.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context it publishes through (its API prefix or
    /// domain): for what publishes encoded events choreo made, such as an
    /// outbox's relay.
    pub fn js(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The settings of the streams it creates.
    pub fn settings(&self) -> &StreamSettings {
        &self.inner.settings
    }

    /// The JetStream API prefix of [`js`](Self::js).
    pub(crate) fn api_prefix(&self) -> &str {
        &self.inner.api_prefix
    }

    /// Publishes `event` as the root of a new flow.
    ///
    /// # Errors
    /// See [`PublishError`]; nothing was stored unless the error says so.
    ///
    /// The event is encoded when this is called; the returned future sends
    /// it and waits for JetStream's acknowledgement. (Encoding first keeps the
    /// future small: it is what a caller boxes, spawns or joins.)
    pub fn publish<E: Event>(
        &self,
        event: &E,
    ) -> impl Future<Output = Result<Receipt, PublishError>> + Send + '_ {
        self.record::<E>();
        // One key for the id and for a duplicate's check.
        let key = event.key();
        let out = Metadata::root_with_key::<E>(key.as_ref(), &self.inner.source)
            .map_err(PublishError::from)
            .and_then(|meta| Outgoing::new(event, meta));
        self.send_checked(out, key)
    }

    /// `event` as [`publish`](Self::publish) would send it, without sending
    /// it: its final id (deterministic for a keyed event), subject, headers
    /// (`Nats-Msg-Id` among them) and encoded payload, for a transactional
    /// outbox to store and publish later. Creates `E`'s stream if missing,
    /// so a later publish of the stored event finds it, and records the
    /// publisher as [`publish`](Self::publish) does.
    ///
    /// # Errors
    /// The event cannot be encoded, is over the server's size limit, or its
    /// stream cannot be made.
    pub async fn prepare<E: Event>(&self, event: &E) -> Result<Emission, PublishError> {
        self.record::<E>();
        let key = event.key();
        let meta = Metadata::root_with_key::<E>(key.as_ref(), &self.inner.source)?;
        let out = Outgoing::new(event, meta)?;
        self.check_size(&out)?;
        self.ensure(E::STREAM, E::STREAM_SUBJECTS, E::SUBJECT_FILTER)
            .await?;
        Ok(Emission {
            event_id: out.id,
            event_type: out.event,
            stream: out.stream.name,
            subject: out.subject,
            headers: out.headers,
            payload: out.payload,
        })
    }

    /// Publishes `event` with metadata built by the caller, for example with
    /// [`Metadata::emitted`] to continue a flow.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub fn publish_with<E: Event>(
        &self,
        event: &E,
        meta: &Metadata,
    ) -> impl Future<Output = Result<Receipt, PublishError>> + Send + '_ {
        self.record::<E>();
        self.send_checked(Outgoing::new(event, meta.clone()), event.key())
    }

    /// Publishes an event with metadata built by the caller (for example
    /// with [`Metadata::emitted`], to continue a flow).
    ///
    /// # Errors
    /// See [`PublishError`].
    pub async fn publish_envelope<E: Event>(
        &self,
        env: &Envelope<E>,
    ) -> Result<Receipt, PublishError> {
        self.publish_with(env.event(), env.meta()).await
    }

    /// Creates `E`'s stream if it is missing, and checks that an existing one
    /// covers `E`'s subjects.
    ///
    /// # Errors
    /// [`PublishError::Stream`].
    pub async fn ensure_stream<E: Event>(&self) -> Result<(), PublishError> {
        self.ensure(E::STREAM, E::STREAM_SUBJECTS, E::SUBJECT_FILTER)
            .await
    }

    pub(crate) async fn ensure(
        &self,
        name: &'static str,
        subjects: &'static str,
        filter: &'static str,
    ) -> Result<(), PublishError> {
        if self.known(name) {
            return Ok(());
        }
        // Boxed: the slow path's JetStream calls would otherwise make every
        // publish future kilobytes larger, and each one is moved and allocated.
        Box::pin(self.ensure_slowly(name, subjects, filter)).await
    }

    async fn ensure_slowly(
        &self,
        name: &'static str,
        subjects: &'static str,
        filter: &'static str,
    ) -> Result<(), PublishError> {
        let _one_at_a_time = self.inner.ensuring.lock().await;
        if self.known(name) {
            return Ok(());
        }
        ensure_stream(
            &self.inner.js,
            &self.inner.settings,
            name,
            vec![subjects.to_owned()],
            filter,
        )
        .await?;
        self.inner
            .ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name);
        Ok(())
    }

    fn known(&self, name: &'static str) -> bool {
        self.inner
            .ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    pub(crate) fn check_size(&self, out: &Outgoing) -> Result<(), PublishError> {
        let max = self.inner.max_payload.load(Ordering::Relaxed);
        let size = out.size();
        if max > 0 && size > max {
            return Err(PublishError::TooLarge {
                event: out.event,
                size,
                max,
            });
        }
        Ok(())
    }

    /// Checks one encoded event's size, makes sure its stream exists,
    /// [`Self::send_one`]s it, and checks a duplicate's content (see
    /// [`Self::check_duplicate`]). Once the stream is known to exist, the
    /// future is [`Self::send_one`]'s and a small continuation.
    fn send_checked(
        &self,
        out: Result<Outgoing, PublishError>,
        key: Option<crate::EventKey>,
    ) -> impl Future<Output = Result<Receipt, PublishError>> + Send + '_ {
        use futures::future::{Either, TryFutureExt, ready};
        let out = match out.and_then(|o| self.check_size(&o).map(|()| o)) {
            Ok(out) => out,
            Err(e) => return Either::Left(ready(Err(e))),
        };
        let sent = Sent {
            event: out.event,
            payload: out.payload.clone(),
            version: out.meta.version(),
            key,
        };
        let check = move |r: Receipt| self.checked(r, sent);
        if self.known(out.stream.name) {
            return Either::Right(Either::Left(self.send_one(out).and_then(check)));
        }
        Either::Right(Either::Right(Box::pin(async move {
            self.ensure(out.stream.name, out.stream.subjects, out.stream.filter)
                .await?;
            check(self.send_one(out).await?).await
        })))
    }

    /// The receipt, unless it is a duplicate whose stored event differs.
    fn checked(&self, r: Receipt, sent: Sent) -> Checked<'_> {
        use futures::future::{Either, ready};
        if !r.duplicate {
            return Either::Left(ready(Ok(r)));
        }
        // Only duplicates pay for the read: one get of the stored message.
        Either::Right(Box::pin(async move {
            self.check_duplicate(&r, &sent).await?;
            Ok(r)
        }))
    }

    /// JetStream dropped the publish as a duplicate: compares the stored
    /// event (read from the stream's leader) with this one. The same
    /// version with another payload is [`PublishError::Conflict`]; another
    /// version of the same fact is not compared. A stored event that cannot
    /// be read is logged and taken as the same.
    async fn check_duplicate(&self, r: &Receipt, sent: &Sent) -> Result<(), PublishError> {
        let stored = match self.inner.js.get_stream_no_info(&r.stream).await {
            Ok(s) => s
                .get_raw_message(r.sequence)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let stored = match stored {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(event = sent.event, event_id = %r.event_id, stream = %r.stream, sequence = r.sequence, error = %e, "a duplicate's stored event could not be read to compare it");
                return Ok(());
            }
        };
        let same_version = stored
            .headers
            .get(crate::wire::headers::CE_EVENTVERSION)
            .is_some_and(|v| v.as_str() == sent.version.to_string());
        if same_version && stored.payload != sent.payload {
            return Err(PublishError::Conflict {
                event: sent.event,
                key: sent
                    .key
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |k| k.parts().join(", ")),
                id: r.event_id,
                stream: r.stream.clone(),
                sequence: r.sequence,
            });
        }
        Ok(())
    }
}
