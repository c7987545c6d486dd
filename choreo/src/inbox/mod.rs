//! The inbox: a JetStream key-value bucket per service that records which
//! events each handler has handled, so a redelivered or re-published event is
//! acknowledged and skipped instead of handled again.
//!
//! Bucket `choreo_inbox_<service>`, key `<handler>.<event id>`. A key holds
//! one of two values:
//!
//! - `done <unix ms>`: the **record**, written only after the handler
//!   returned `Ok` and every event it emitted was acknowledged by JetStream,
//!   and before the handled event is acked. A delivery that finds it is acked
//!   and skipped.
//! - `run <instance> <unix ms> <stream sequence>`: a **claim**, written by
//!   the handler's watchdog once the handler has run for a second (or a third
//!   of its `ack_wait`, if less) and refreshed with each in-progress ack.
//!   While it is fresh, another delivery of the same event waits for the
//!   outcome instead of running the handler a second time. No clock judges
//!   it (see `decide`): a redelivery of the message it names takes it over,
//!   and any other waiter takes it over once it has not moved for one
//!   `ack_wait`. The time is for people reading the bucket.
//!
//! When eight or more pulled events wait at once, the keys of the whole
//! batch are read with one batched direct get (`multi_last`), so under load
//! the common path costs one write per event: the record. Fewer events read
//! their own keys, each in its own task. A failed handler's claim is
//! deleted, so its retry runs at once. If the inbox cannot be read or
//! written, the event is not acked and comes back: never handled without
//! being looked up, never acked without a record.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::nats::{Cause, Source, recent_permission_error, source};
mod batch;
mod record;

use batch::Answers;
pub(crate) use batch::READ_BATCH;
use record::record_of;
pub(crate) use record::{Record, Sighting, State, Verdict, Watch, claim_lease, decide};

pub(crate) use crate::topology::inbox_bucket as bucket;

/// How long records are kept by default: 7 days, far more than the streams'
/// 2-minute duplicate window, so a re-published event is still recognised.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) use crate::topology::inbox_key as key;

/// The inbox could not be read or written.
///
/// `{:?}` prints the message; `{:#?}` the fields.
#[derive(Clone, thiserror::Error)]
#[error("inbox {bucket}: {what}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct InboxError {
    bucket: String,
    what: String,
    #[source]
    source: Option<Source>,
    kind: InboxErrorKind,
}

/// What kind of [`InboxError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InboxErrorKind {
    /// The cluster could not serve the bucket (peers offline, no quorum).
    ClusterUnavailable,
    /// No answer in time.
    TimedOut,
    /// The server refused for permissions.
    PermissionDenied,
    /// Anything else.
    Other,
}

impl InboxError {
    fn new(
        client: &async_nats::Client,
        bucket: &str,
        what: impl Into<String>,
        e: Option<Source>,
    ) -> Self {
        let cause = e.as_deref().map_or(Cause::Other, |e| Cause::of(e));
        let kind = if recent_permission_error(client).is_some() {
            InboxErrorKind::PermissionDenied
        } else if cause.cluster_unavailable() {
            InboxErrorKind::ClusterUnavailable
        } else if cause == Cause::TimedOut {
            InboxErrorKind::TimedOut
        } else {
            InboxErrorKind::Other
        };
        Self {
            bucket: bucket.to_owned(),
            what: what.into(),
            source: e,
            kind,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> InboxErrorKind {
        self.kind
    }

    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            InboxErrorKind::ClusterUnavailable | InboxErrorKind::TimedOut
        )
    }
}

crate::debug_as_display!(InboxError);

#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    kv: kv::Store,
    client: async_nats::Client,
    answers: Arc<Answers>,
    bucket: String,
    /// `<API prefix>.DIRECT.GET.KV_<bucket>`.
    direct_get: String,
    /// `$KV.<bucket>.`
    key_prefix: String,
    /// Whether the bucket answers direct gets, which batched reads use (a
    /// bucket made by hand or by an old client may not).
    direct: bool,
    /// After a batched read fails (a permission that allows reading one key
    /// but not a batch, a leader election), batched reads pause until this
    /// unix time in ms, and events read their own keys meanwhile.
    batches_paused_until: Arc<AtomicU64>,
    /// Unix ms of the first failed look-up since the last one that
    /// worked (0: none failed).
    trouble_since: Arc<AtomicU64>,
    instance: u64,
    metrics: crate::observe::InboxMetrics,
    /// A fault hook: how long each claim write waits first.
    claim_delay: Option<Duration>,
}

pub(crate) use crate::event::now_ms;

impl Inbox {
    /// Opens the service's bucket, creating it if missing.
    pub(crate) async fn open(
        js: &jetstream::Context,
        api_prefix: &str,
        service: &str,
        retention: Duration,
        replicas: usize,
    ) -> Result<Self, InboxError> {
        let bucket = bucket(service);
        let client = js.client();
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                let created = js
                    .create_key_value(kv::Config {
                        bucket: bucket.clone(),
                        description: format!(
                            "choreo inbox of service {service}: events each handler has handled"
                        ),
                        history: 1,
                        max_age: retention,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(kv) => kv,
                    // Another instance may have created it in between.
                    Err(e) => js.get_key_value(&bucket).await.map_err(|_| {
                        InboxError::new(
                            &client,
                            &bucket,
                            "cannot create the bucket",
                            Some(source(e)),
                        )
                    })?,
                }
            }
        };
        let instance = uuid::Uuid::now_v7().as_u64_pair().1.max(1);
        let direct = kv.status().await.is_ok_and(|s| s.info.config.allow_direct);
        let answers = Answers::start(&client).await.map_err(|e| {
            InboxError::new(
                &client,
                &bucket,
                "cannot subscribe for answers",
                Some(source(e)),
            )
        })?;
        Ok(Self {
            kv,
            client,
            answers,
            direct_get: format!("{api_prefix}.DIRECT.GET.KV_{bucket}"),
            key_prefix: format!("$KV.{bucket}."),
            direct,
            batches_paused_until: Arc::new(AtomicU64::new(0)),
            trouble_since: Arc::new(AtomicU64::new(0)),
            claim_delay: None,
            metrics: crate::observe::InboxMetrics::new(service),
            bucket,
            instance,
        })
    }

    fn claim_value(&self, stream_seq: u64) -> Bytes {
        Bytes::from(format!(
            "run {:016x} {} {stream_seq}",
            self.instance,
            now_ms()
        ))
    }

    /// Makes every claim write wait `delay` first (a fault hook).
    pub(crate) fn delay_claims(&mut self, delay: Duration) {
        self.claim_delay = Some(delay);
    }

    async fn claim_delay(&self) {
        if let Some(d) = self.claim_delay {
            tokio::time::sleep(d).await;
        }
    }

    /// This instance's id, as its claims carry it.
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    /// An error of this bucket: `what` failed, because of `e`.
    fn fail(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> InboxError {
        InboxError::new(&self.client, &self.bucket, what, Some(source(e)))
    }

    /// An error of this bucket that choreo itself detected.
    fn err(&self, what: impl Into<String>) -> InboxError {
        InboxError::new(&self.client, &self.bucket, what, None)
    }

    /// The bucket's name.
    pub(crate) fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Notes whether a look-up worked, for [`Self::troubled_for`].
    pub(crate) fn note_look_up(&self, worked: bool) {
        if worked {
            if self.trouble_since.load(Ordering::Relaxed) != 0 {
                self.trouble_since.store(0, Ordering::Relaxed);
            }
        } else {
            let _ = self.trouble_since.compare_exchange(
                0,
                now_ms().max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// How long look-ups have failed without one working in between.
    pub(crate) fn troubled_for(&self) -> Option<Duration> {
        match self.trouble_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// Whether [`Self::read_many`] should be used: the bucket answers direct
    /// gets, and no batched read failed within the last minute.
    pub(crate) fn reads_in_batches(&self) -> bool {
        self.direct && now_ms() >= self.batches_paused_until.load(Ordering::Relaxed)
    }

    /// Reads one key.
    pub(crate) async fn read(&self, key: &str) -> Result<Option<Record>, InboxError> {
        self.metrics.key_reads.increment(1);
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| self.fail("cannot read", e))?;
        Ok(entry.as_ref().map(record_of))
    }

    /// Claims `key` (at `revision`, 0 if absent) for this instance, or
    /// refreshes the claim it holds at `revision`; returns the claim's new
    /// revision.
    pub(crate) async fn claim(
        &self,
        key: &str,
        revision: u64,
        stream_seq: u64,
    ) -> Result<u64, InboxError> {
        self.claim_delay().await;
        self.metrics.claims.increment(1);
        self.write_at(key, self.claim_value(stream_seq), revision)
            .await
            .map_err(|(_, e)| e)
    }

    /// Writes `value` over `key` if the key is still at `revision` (0:
    /// absent); returns the new revision. The error says whether the key
    /// had moved on.
    async fn write_at(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, (bool, InboxError)> {
        if revision == 0 {
            self.kv.create(key, value).await.map_err(|e| {
                let moved = e.kind() == kv::CreateErrorKind::AlreadyExists;
                (moved, self.fail("cannot write", e))
            })
        } else {
            self.kv.update(key, value, revision).await.map_err(|e| {
                let moved = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                (moved, self.fail("cannot write", e))
            })
        }
    }

    /// Records the event as handled. `revision` is the key's revision as
    /// this instance last knew it (0: absent). If the key moved on meanwhile
    /// (a claim written or taken over), the record is written over it: the
    /// handling is complete either way.
    pub(crate) async fn done(&self, key: &str, revision: u64) -> Result<(), InboxError> {
        let value = Bytes::from(format!("done {}", now_ms()));
        self.metrics.records.increment(1);
        let mut revision = revision;
        for _ in 0..3 {
            match self.write_at(key, value.clone(), revision).await {
                Ok(_) => return Ok(()),
                Err((false, e)) => return Err(e),
                Err((true, _)) => match self.read(key).await? {
                    Some(Record {
                        state: State::Done, ..
                    }) => {
                        tracing::info!(
                            key,
                            "another delivery recorded this event while the handler ran"
                        );
                        return Ok(());
                    }
                    Some(r) => revision = r.revision,
                    None => revision = 0,
                },
            }
        }
        Err(self.err("the key kept changing while the record was written"))
    }

    /// Gives a claim up after a failure, so the retry can run at once.
    pub(crate) async fn release(&self, key: &str, revision: u64) {
        if let Err(e) = self.kv.delete_expect_revision(key, Some(revision)).await {
            tracing::debug!(key, error = %e, "could not release the inbox claim; it will expire");
        }
    }
}
