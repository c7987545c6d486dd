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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::nats::{Cause, Source, recent_permission_error, source};
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

/// What the inbox says about one key, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    /// The key's revision (its sequence in the bucket's stream).
    pub(crate) revision: u64,
    pub(crate) state: State,
}

/// The value of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Handled.
    Done,
    /// Claimed by a running handler: the instance that wrote the claim (0
    /// if unreadable) and the stream sequence of the delivery it runs (0 if
    /// not given, as claims of older versions).
    Running { instance: u64, stream_seq: u64 },
    /// Deleted, purged, or not a value choreo writes.
    Gone,
}

/// What to do with a delivery, given what the inbox says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run the handler; the key is at this revision (0: absent).
    Run(u64),
    /// The handler already handled the event: ack and skip.
    Done,
    /// Another invocation may be running it: watch its claim (see
    /// [`Watch`]).
    Busy,
}

/// The delivery a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sighting {
    /// Its delivery attempt (1 for the first).
    pub(crate) attempt: u32,
    /// Its stream sequence.
    pub(crate) stream_seq: u64,
    /// This instance's id, as its claims carry it.
    pub(crate) me: u64,
}

/// Decides from a read record, judging claims without any clock:
///
/// - a claim this very instance wrote does not block it (an invocation of
///   the same key still running here is waited for by the watchdog's
///   registry, not through the inbox);
/// - a claim on the very message being redelivered is stale: JetStream
///   redelivers only after the claim's holder sent no in-progress ack for
///   `ack_wait`, and the holder refreshes its claim with each of those, so
///   the server's own timer has judged it;
/// - any other claim is [`Verdict::Busy`]: the waiter watches it, and takes
///   it over once its revision has not moved for a lease (the holder
///   refreshes it every third of `ack_wait`), measured on the waiter's
///   monotonic clock. Neither clock skew between instances nor a jump of a
///   wall clock can make a live claim look stale.
pub(crate) fn decide(record: Option<Record>, at: Sighting) -> Verdict {
    let Some(record) = record else {
        return Verdict::Run(0);
    };
    match record.state {
        State::Done => Verdict::Done,
        State::Running {
            instance,
            stream_seq,
        } => {
            let own = instance != 0 && instance == at.me;
            let redelivered = at.attempt > 1 && stream_seq != 0 && stream_seq == at.stream_seq;
            if own || redelivered {
                Verdict::Run(record.revision)
            } else {
                Verdict::Busy
            }
        }
        State::Gone => Verdict::Run(record.revision),
    }
}

/// How long a claim may keep one revision before a waiter takes it over:
/// `ack_wait`, three refresh periods.
pub(crate) fn claim_lease(ack_wait: Duration) -> Duration {
    ack_wait
}

/// A waiter's view of one claim: stale once its revision has not changed
/// for the lease, on the waiter's monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    seen: Option<(u64, tokio::time::Instant)>,
}

impl Watch {
    /// Notes the claim's revision as read now; whether it has been at that
    /// revision for at least `lease`.
    pub(crate) fn stale(&mut self, revision: u64, lease: Duration) -> bool {
        let now = tokio::time::Instant::now();
        match self.seen {
            Some((r, since)) if r == revision => now.duration_since(since) >= lease,
            _ => {
                self.seen = Some((revision, now));
                false
            }
        }
    }
}

/// Answers to batched reads arrive on one long-lived subscription
/// (`<inbox prefix>.*`) and are routed by their last token, so a read costs
/// one request and no subscription of its own.
#[derive(Debug)]
struct Answers {
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>,
    router: tokio::task::AbortHandle,
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl Answers {
    async fn start(client: &async_nats::Client) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let prefix = client.new_inbox();
        let mut sub = client.subscribe(format!("{prefix}.*")).await?;
        Ok(Arc::new_cyclic(|me: &std::sync::Weak<Self>| {
            let me = me.clone();
            let router = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let Some(answers) = me.upgrade() else { break };
                    let token = msg
                        .subject
                        .rsplit_once('.')
                        .and_then(|(_, t)| t.parse::<u64>().ok());
                    if let Some(token) = token
                        && let Some(tx) = answers.lock().get(&token)
                    {
                        let _ = tx.send(msg);
                    }
                }
            })
            .abort_handle();
            Self {
                prefix,
                next: AtomicU64::new(0),
                waiting: Mutex::new(HashMap::new()),
                router,
            }
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Unregisters a read's answers when the read ends, however it ends.
struct Waiting<'a> {
    answers: &'a Answers,
    token: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.answers.lock().remove(&self.token);
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    kv: kv::Store,
    client: async_nats::Client,
    answers: Arc<Answers>,
    bucket: String,
    /// `$JS.API.DIRECT.GET.KV_<bucket>`.
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
    /// A fault hook: how long each claim write waits first.
    claim_delay: Option<Duration>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse(value: &[u8], deleted: bool) -> State {
    if deleted {
        return State::Gone;
    }
    let text = String::from_utf8_lossy(value);
    let mut parts = text.split(' ');
    match parts.next() {
        Some("done") => State::Done,
        Some("run") => {
            // `run <instance> <unix ms> <stream seq>`; the time is for
            // people reading the bucket, never for deciding.
            let instance = parts
                .next()
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .unwrap_or(0);
            let stream_seq = parts.nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
            State::Running {
                instance,
                stream_seq,
            }
        }
        _ => State::Gone,
    }
}

fn record_of(entry: &kv::Entry) -> Record {
    Record {
        revision: entry.revision,
        state: parse(&entry.value, !matches!(entry.operation, kv::Operation::Put)),
    }
}

/// Most keys one batched read asks for (the server's limit is far higher).
pub(crate) const READ_BATCH: usize = 256;

impl Inbox {
    /// Opens the service's bucket, creating it if missing.
    pub(crate) async fn open(
        js: &jetstream::Context,
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
            direct_get: format!("$JS.API.DIRECT.GET.KV_{bucket}"),
            key_prefix: format!("$KV.{bucket}."),
            direct,
            batches_paused_until: Arc::new(AtomicU64::new(0)),
            trouble_since: Arc::new(AtomicU64::new(0)),
            claim_delay: None,
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
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| self.fail("cannot read", e))?;
        Ok(entry.as_ref().map(record_of))
    }

    /// Reads up to [`READ_BATCH`] keys with one batched direct get; keys
    /// without a value are absent from the answer.
    pub(crate) async fn read_many(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Record>, InboxError> {
        let read = self.read_batch(keys).await;
        if let Err((failure, e)) = &read {
            // Only a failure that will happen again pauses batched reads: a
            // refusal (a server without batched gets), or no answer while a
            // permission violation was reported (a denied batch). A timeout
            // or no responders during an election passes; the batch's
            // events read their own keys this once.
            let lasting = failure.recurs(|| recent_permission_error(&self.client).is_some());
            if lasting {
                let until = now_ms().saturating_add(BATCH_PAUSE_MS);
                self.batches_paused_until.store(until, Ordering::Relaxed);
            }
            tracing::debug!(bucket = %self.bucket, error = %e, paused = lasting, "batched inbox read failed");
        }
        read.map_err(|(_, e)| e)
    }

    async fn read_batch(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Record>, (BatchFailure, InboxError)> {
        let unavailable = |e: InboxError| (BatchFailure::Unavailable, e);
        let mut found = HashMap::new();
        if keys.is_empty() {
            return Ok(found);
        }
        let subjects: Vec<String> = keys
            .iter()
            .map(|k| format!("{}{k}", self.key_prefix))
            .collect();
        let request = serde_json::json!({ "multi_last": subjects, "batch": keys.len() });
        let body = serde_json::to_vec(&request)
            .map_err(|e| unavailable(self.fail("cannot encode a batched read", e)))?;
        let token = self.answers.next.fetch_add(1, Ordering::Relaxed);
        let reply = format!("{}.{token}", self.answers.prefix);
        let (tx, mut answers) = mpsc::unbounded_channel();
        self.answers.lock().insert(token, tx);
        let _waiting = Waiting {
            answers: &self.answers,
            token,
        };
        self.client
            .publish_with_reply(self.direct_get.clone(), reply, body.into())
            .await
            .map_err(|e| unavailable(self.fail("cannot read", e)))?;
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            let answer = tokio::time::timeout_at(deadline, answers.recv())
                .await
                .map_err(|_| {
                    (
                        BatchFailure::NoAnswer,
                        self.err(format!(
                            "no answer to a batched read within {READ_TIMEOUT:?}"
                        )),
                    )
                })?
                .ok_or_else(|| {
                    unavailable(self.err("the connection closed during a batched read"))
                })?;
            if let Some(status) = answer.status {
                return match status.as_u16() {
                    // End of batch, or none of the keys has a value.
                    204 | 404 => Ok(found),
                    503 => Err(unavailable(
                        self.err("the bucket's stream is not available (no responders)"),
                    )),
                    code => Err((
                        BatchFailure::Refused,
                        self.err(format!(
                            "batched read failed: {code} {}",
                            answer.description.as_deref().unwrap_or("")
                        )),
                    )),
                };
            }
            let Some(headers) = answer.headers.as_ref() else {
                continue;
            };
            let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
            let (Some(subject), Some(revision)) = (
                header("Nats-Subject"),
                header("Nats-Sequence").and_then(|s| s.parse().ok()),
            ) else {
                continue;
            };
            let Some(key) = subject.strip_prefix(&self.key_prefix) else {
                continue;
            };
            let deleted = header("KV-Operation").is_some();
            found.insert(
                key.to_owned(),
                Record {
                    revision,
                    state: parse(&answer.payload, deleted),
                },
            );
        }
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

/// How a batched read failed, for whether batched reads pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchFailure {
    /// The server answered with an error: it will again.
    Refused,
    /// No answer in time (an election, or a denied request).
    NoAnswer,
    /// No responders, or the connection failed: passing.
    Unavailable,
}

impl BatchFailure {
    /// Whether it will happen again, so batched reads should pause:
    /// `denied` says whether the connection reported a permission violation.
    fn recurs(self, denied: impl FnOnce() -> bool) -> bool {
        match self {
            Self::Refused => true,
            Self::NoAnswer => denied(),
            Self::Unavailable => false,
        }
    }
}

/// How long a batched read may take (it answers in milliseconds; a read
/// that does not is given up and its events read their own keys).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long batched reads pause after one failed.
const BATCH_PAUSE_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 0xabc;

    fn rec(revision: u64, state: State) -> Option<Record> {
        Some(Record { revision, state })
    }

    fn first(stream_seq: u64) -> Sighting {
        Sighting {
            attempt: 1,
            stream_seq,
            me: ME,
        }
    }

    fn claim(instance: u64, stream_seq: u64) -> State {
        State::Running {
            instance,
            stream_seq,
        }
    }

    #[test]
    fn absent_keys_run_from_revision_zero() {
        assert_eq!(decide(None, first(1)), Verdict::Run(0));
    }

    #[test]
    fn done_keys_are_skipped() {
        assert_eq!(decide(rec(7, State::Done), first(1)), Verdict::Done);
    }

    #[test]
    fn another_instances_claim_is_watched() {
        assert_eq!(decide(rec(3, claim(0x999, 5)), first(5)), Verdict::Busy);
        // A copy on another message, redelivered: the server's timer says
        // nothing about the claim on the first message.
        let copy = Sighting {
            attempt: 3,
            stream_seq: 6,
            me: ME,
        };
        assert_eq!(decide(rec(3, claim(0x999, 5)), copy), Verdict::Busy);
        // An old-format claim (no instance, no sequence) is watched too.
        assert_eq!(decide(rec(3, claim(0, 0)), copy), Verdict::Busy);
    }

    #[test]
    fn a_claim_on_the_redelivered_message_itself_is_stale() {
        let again = Sighting {
            attempt: 2,
            stream_seq: 5,
            me: ME,
        };
        assert_eq!(decide(rec(3, claim(0x999, 5)), again), Verdict::Run(3));
    }

    #[test]
    fn this_instances_own_claim_does_not_block_it() {
        assert_eq!(decide(rec(4, claim(ME, 5)), first(5)), Verdict::Run(4));
    }

    #[test]
    fn deleted_keys_run_at_their_revision() {
        assert_eq!(decide(rec(9, State::Gone), first(1)), Verdict::Run(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_claim_is_stale_only_after_a_lease_at_one_revision() {
        let lease = Duration::from_secs(2);
        let mut w = Watch::default();
        assert!(!w.stale(3, lease));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!w.stale(3, lease));
        // Refreshed: the lease starts again.
        assert!(!w.stale(4, lease));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!w.stale(4, lease));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(w.stale(4, lease));
    }

    #[test]
    fn only_failures_that_recur_pause_batched_reads() {
        assert!(BatchFailure::Refused.recurs(|| false));
        // A denied batch gets no answer, and the connection says why.
        assert!(BatchFailure::NoAnswer.recurs(|| true));
        // A timeout during an election, or no responders, passes.
        assert!(!BatchFailure::NoAnswer.recurs(|| false));
        assert!(!BatchFailure::Unavailable.recurs(|| true));
    }

    #[test]
    fn values_parse_into_states() {
        assert_eq!(parse(b"done 17", false), State::Done);
        assert_eq!(
            parse(b"run 00000000000000ab 1700000000000 42", false),
            claim(0xab, 42)
        );
        assert_eq!(
            parse(b"run ab12cd34 1700000000000", false),
            claim(0xab12_cd34, 0)
        );
        assert_eq!(parse(b"done 17", true), State::Gone);
        assert_eq!(parse(b"something else", false), State::Gone);
    }
}
