//! The inbox: a JetStream key-value bucket per service that records which
//! events each handler has handled, so a redelivered or re-published event is
//! acknowledged and skipped instead of handled again.
//!
//! Bucket `choreo_inbox_<service>`. Three kinds of key:
//!
//! - `<handler>.g.<n>`: a **group** of records (see
//!   [`crate::topology::inbox_group_key`]): the ids of the events the
//!   handler has handled whose id hashes to group `n`, each with the time it
//!   was recorded. A record is added — with a compare-and-set on the group's
//!   revision, retried on a conflict — only after the handler returned `Ok`
//!   and every event it emitted was acknowledged by JetStream, and before the
//!   handled event is acked. A delivery whose id is in its group is acked and
//!   skipped. Records older than the horizon are dropped at each write, and a
//!   group left unwritten for a horizon expires, so the server holds at most
//!   the group count of keys per handler, however many events it handled.
//! - `<handler>.<event id>`: a **claim**, `run <instance> <unix ms> <stream
//!   sequence> <attempt>/<max_deliver>`, written by the handler's watchdog
//!   once the handler has run for a second (or a third of its `ack_wait`, if less) and refreshed with
//!   each in-progress ack. While it is fresh, another delivery of the same
//!   event waits for the outcome instead of running the handler a second
//!   time. No clock judges it (see `decide`): a redelivery of the message it
//!   names takes it over, and any other waiter takes it over once it has not
//!   moved for one `ack_wait`. Claims carry a per-message TTL (nats-server
//!   2.11+), so they leave the server on their own. After a failed attempt
//!   that will be retried, a **retry note** takes the claim's place: `retry
//!   <instance> <unix ms> <stream sequence> <attempt>/<max_deliver> <retry
//!   at ms> <error>`, so `choreo trace` can say which attempt failed and
//!   when the next is due. It frees the key as a released claim does, and
//!   expires a claim's TTL after the retry is due (where the bucket keeps no
//!   TTLs, no note is written). Buckets written by
//!   choreo before records were grouped hold `done <unix ms>` records under
//!   these keys; they are still read as records.
//!
//! The group count is kept in the bucket stream's metadata
//! (`choreo_inbox_groups`), and a service configured with another count
//! refuses to start (see `layout`).
//!
//! When eight or more pulled events wait at once, the claim and group keys
//! of the whole batch are read with one batched direct get (`multi_last`),
//! so under load the common path costs one write per event: the group's.
//! Fewer events read their own two keys, each in its own task. A failed
//! handler's claim is deleted, so its retry runs at once. If the inbox
//! cannot be read or written, the event is not acked and comes back: never
//! handled without being looked up, never acked without a record.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::nats::{Answers, moved_on, source};
mod batch;
mod error;
mod groups;
mod layout;
mod record;
mod view;

pub use error::{InboxError, InboxErrorKind};
pub(crate) use view::View;

pub(crate) use batch::READ_BATCH;
use record::record_of;
pub(crate) use record::{
    Delivered, Note, Record, Sighting, State, Verdict, Watch, claim_lease, claim_ttl, decide, note,
};

use crate::event::id::EventId;
use crate::topology::inbox_group::{Group, inbox_group_key};

pub(crate) use crate::topology::inbox_bucket as bucket;

/// How long records are kept by default: 7 days, far more than the streams'
/// 2-minute duplicate window, so a re-published event is still recognised.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) use crate::topology::inbox_key as key;

/// How much of a failed attempt's error its retry note keeps.
const NOTE_ERROR_CHARS: usize = 300;

#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    kv: kv::Store,
    js: jetstream::Context,
    client: async_nats::Client,
    answers: Arc<Answers>,
    bucket: String,
    /// `<API prefix>.DIRECT.GET.KV_<bucket>`.
    direct_get: String,
    /// `$KV.<bucket>.`
    key_prefix: String,
    /// Where keys are written: `key_prefix`, behind the API prefix for a
    /// JetStream domain (as async-nats writes them).
    put_prefix: String,
    /// Whether the bucket answers direct gets, which batched reads use (a
    /// bucket made by hand or by an old client may not).
    direct: bool,
    /// How many groups each handler's records are spread over.
    groups: u32,
    /// How long records are kept, in ms.
    horizon_ms: u64,
    /// Whether the bucket allows per-message TTLs, so claims can expire
    /// (cleared if a write with one is refused: a bucket made again by hand).
    claims_expire: Arc<AtomicBool>,
    /// The newest value and revision this instance saw of groups it read or
    /// wrote lately, so adding a record rarely needs a read of its own (a
    /// stale one only costs a conflict and a read).
    known: Arc<Mutex<HashMap<String, (u64, Bytes)>>>,
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

/// A key's newest message, as read: its revision, whether it is a delete
/// or purge marker, and its value.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub(crate) revision: u64,
    pub(crate) deleted: bool,
    pub(crate) value: Bytes,
}

impl Inbox {
    /// Opens the service's bucket, creating it if missing, and checks (or
    /// records) its group count.
    pub(crate) async fn open(
        js: &jetstream::Context,
        api_prefix: &str,
        service: &str,
        retention: Duration,
        replicas: usize,
        groups: u32,
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
        let layout = layout::settle(js, &client, &bucket, groups).await?;
        let instance = uuid::Uuid::now_v7().as_u64_pair().1.max(1);
        let answers = Answers::start(&client).await.map_err(|e| {
            InboxError::new(
                &client,
                &bucket,
                "cannot subscribe for answers",
                Some(source(e)),
            )
        })?;
        let key_prefix = format!("$KV.{bucket}.");
        let put_prefix = match (&kv.put_prefix, kv.use_jetstream_prefix) {
            (Some(p), true) => format!("{api_prefix}.{p}"),
            (Some(p), false) => p.clone(),
            (None, true) => format!("{api_prefix}.{key_prefix}"),
            (None, false) => key_prefix.clone(),
        };
        Ok(Self {
            kv,
            js: js.clone(),
            client,
            answers,
            direct_get: format!("{api_prefix}.DIRECT.GET.KV_{bucket}"),
            key_prefix,
            put_prefix,
            direct: layout.direct,
            groups,
            horizon_ms: match layout.max_age {
                Duration::ZERO => u64::MAX,
                age => u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            },
            claims_expire: Arc::new(AtomicBool::new(layout.ttl)),
            known: Arc::new(Mutex::new(HashMap::new())),
            batches_paused_until: Arc::new(AtomicU64::new(0)),
            trouble_since: Arc::new(AtomicU64::new(0)),
            claim_delay: None,
            metrics: crate::observe::InboxMetrics::new(service),
            bucket,
            instance,
        })
    }

    /// What a claim key holds: `<kind> <instance> <unix ms> <stream seq>
    /// <attempt>/<max>`, then `tail` (see the module's docs).
    fn claim_key_value(&self, kind: &str, now: u64, d: Delivered, tail: &str) -> Bytes {
        Bytes::from(format!(
            "{kind} {:016x} {now} {} {}/{}{tail}",
            self.instance, d.stream_seq, d.attempt, d.of
        ))
    }

    fn claim_value(&self, d: Delivered) -> Bytes {
        self.claim_key_value("run", now_ms(), d, "")
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

    /// The group key that holds the record of the event whose claim key is
    /// `key` (`<handler>.<event id>`), and the event's id.
    pub(crate) fn group_of(&self, key: &str) -> Option<(String, EventId)> {
        let (handler, id) = key.rsplit_once('.')?;
        let id: EventId = id.parse().ok()?;
        Some((inbox_group_key(handler, id, self.groups), id))
    }

    /// What the inbox says of one event, from its claim key's newest message
    /// (`claim`) and its group's (`group`: the event's id, its group's key,
    /// and that key's newest message if it has one): handled if its group
    /// records it (or, in a bucket from before groups, its claim key holds
    /// `done`), else what its claim key says.
    pub(crate) fn judge(
        &self,
        claim: Option<&Raw>,
        group: Option<(EventId, &str, Option<&Raw>)>,
    ) -> Option<Record> {
        let claim = claim.map(|r| Record {
            revision: r.revision,
            state: record::parse(&r.value, r.deleted),
        });
        if let Some((id, group_key, raw)) = group {
            // A group read and found empty is remembered too: the record's
            // write then creates it without reading it again.
            let empty = Raw {
                revision: 0,
                deleted: true,
                value: Bytes::new(),
            };
            let raw = raw.unwrap_or(&empty);
            self.remember(group_key, raw);
            if !raw.deleted && Group::recorded_in(&raw.value, id).is_some() {
                return Some(Record {
                    revision: claim.map_or(0, |c| c.revision),
                    state: State::Done,
                });
            }
        }
        claim
    }

    async fn entry(&self, key: &str) -> Result<Option<Raw>, InboxError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| self.fail("cannot read", e))?;
        Ok(entry.map(|e| Raw {
            revision: e.revision,
            deleted: !matches!(e.operation, kv::Operation::Put),
            value: e.value,
        }))
    }

    /// Reads one event's claim key and its group.
    pub(crate) async fn read(&self, key: &str) -> Result<Option<Record>, InboxError> {
        self.metrics.key_reads.increment(1);
        let Some((group, id)) = self.group_of(key) else {
            return Ok(self.entry(key).await?.map(|r| record_of(&r)));
        };
        let (claim, grouped) = tokio::try_join!(self.entry(key), self.entry(&group))?;
        Ok(self.judge(claim.as_ref(), Some((id, group.as_str(), grouped.as_ref()))))
    }

    /// Claims `key` (at `revision`, 0 if absent) for this instance, or
    /// refreshes the claim it holds at `revision`; returns the claim's new
    /// revision. Where the bucket allows it, the claim expires `ttl` after
    /// its last refresh.
    pub(crate) async fn claim(
        &self,
        key: &str,
        revision: u64,
        delivered: Delivered,
        ttl: Duration,
    ) -> Result<u64, InboxError> {
        self.claim_delay().await;
        self.metrics.claims.increment(1);
        if self.claims_expire.load(Ordering::Relaxed) {
            match self
                .write_at(key, self.claim_value(delivered), revision, Some(ttl))
                .await
            {
                Err((false, e)) if e.to_string().contains("TTL") => {
                    tracing::warn!(bucket = %self.bucket, error = %e, "the inbox bucket refuses per-message TTLs; claims now last until the horizon");
                    self.claims_expire.store(false, Ordering::Relaxed);
                }
                written => return written.map_err(|(_, e)| e),
            }
        }
        self.write_at(key, self.claim_value(delivered), revision, None)
            .await
            .map_err(|(_, e)| e)
    }

    /// Writes `value` over `key` if the key is still at `revision` (0:
    /// never written), with a TTL if given; returns the new revision. The
    /// error says whether the key had moved on.
    async fn write_at(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
        ttl: Option<Duration>,
    ) -> Result<u64, (bool, InboxError)> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        if let Some(ttl) = ttl {
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                format!("{}s", ttl.as_secs().max(1)).as_str(),
            );
        }
        let subject = format!("{}{key}", self.put_prefix);
        let moved = |e: &jetstream::context::PublishError| moved_on(e);
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(|e| (moved(&e), self.fail("cannot write", e)))?;
        ack.await
            .map(|a| a.sequence)
            .map_err(|e| (moved(&e), self.fail("cannot write", e)))
    }

    /// Notes on `key` (at `revision`, 0 if absent) that `delivered` failed
    /// with `error` and is retried after `retry_in`, so `choreo trace` can
    /// say "retrying (attempt n of m)". The note frees the key as a
    /// released claim does, and expires `ttl` after the retry is due.
    /// Returns whether it was written: never where the bucket keeps no
    /// per-message TTLs (the note would stay for the horizon), nor when the
    /// key moved on.
    pub(crate) async fn note_retry(
        &self,
        key: &str,
        revision: u64,
        delivered: Delivered,
        retry_in: Duration,
        error: &str,
        ttl: Duration,
    ) -> bool {
        if !self.claims_expire.load(Ordering::Relaxed) {
            return false;
        }
        let now = now_ms();
        let retry_at = now.saturating_add(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
        let mut error: String = error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if let Some((cut, _)) = error.char_indices().nth(NOTE_ERROR_CHARS) {
            error.truncate(cut);
        }
        let value = self.claim_key_value("retry", now, delivered, &format!(" {retry_at} {error}"));
        match self
            .write_at(key, value, revision, Some(retry_in + ttl))
            .await
        {
            Ok(_) => true,
            Err((_, e)) => {
                tracing::debug!(key, error = %e, "the retry note was not written; releasing the claim");
                false
            }
        }
    }

    /// Gives a claim up after a failure, so the retry can run at once.
    pub(crate) async fn release(&self, key: &str, revision: u64) {
        let released = if self.claims_expire.load(Ordering::Relaxed) {
            self.kv
                .purge_expect_revision_with_ttl(key, revision, claim_ttl(Duration::ZERO))
                .await
        } else {
            self.kv.delete_expect_revision(key, Some(revision)).await
        };
        if let Err(e) = released {
            tracing::debug!(key, error = %e, "could not release the inbox claim; it will expire");
        }
    }
}
