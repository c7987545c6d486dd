//! The inbox: a JetStream key-value bucket per service that records which
//! events each handler has handled, so a redelivered or re-published event is
//! acknowledged and skipped instead of handled again.
//!
//! Bucket `choreo_inbox_<service>`, key `<handler>.<event id>`. A key moves
//! through two states:
//!
//! - `run <instance> <unix ms>`: a **claim**, written with `create` (which fails
//!   if the key exists) before the handler runs, and refreshed with the
//!   in-progress acks. While it is fresh, another instance that receives the
//!   same event (its `ack_wait` lapsed, say, because the first instance's
//!   thread was blocked) waits for the outcome instead of running the handler
//!   a second time. A claim not refreshed within the lease (twice the
//!   handler's `ack_wait`) belongs to a crashed instance and is taken over.
//! - `done <unix ms>`: the **record**, written (conditional on the claim's
//!   revision) only after the handler returned `Ok` and every event it emitted
//!   was acknowledged by JetStream, and before the handled event is acked.
//!
//! A failed handler's claim is deleted, so its retry can claim again. If the
//! inbox cannot be read or written, the event is not acked and comes back:
//! never handled without a record, never recorded without being handled.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::id::EventId;

/// How long records are kept by default: 7 days, far more than the streams'
/// 2-minute duplicate window, so a re-published event is still recognised.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The bucket name of a service's inbox.
pub fn bucket(service: &str) -> String {
    format!("choreo_inbox_{service}")
}

/// The key of one handler's record of one event.
pub fn key(handler: &str, event: EventId) -> String {
    format!("{handler}.{event}")
}

/// The inbox could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("inbox {bucket}: {reason}")]
pub struct InboxError {
    bucket: String,
    reason: String,
}

/// What a claim attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This instance may run the handler; the claim has this revision.
    Won(u64),
    /// The handler already handled the event.
    Done,
    /// Another instance is running it; its claim is fresh for this long.
    Busy(Duration),
}

#[derive(Clone, Debug)]
pub(crate) struct Inbox {
    kv: kv::Store,
    bucket: String,
    instance: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

enum State {
    Done,
    Running { at_ms: u64 },
    Gone,
}

fn parse(entry: &kv::Entry) -> State {
    if !matches!(entry.operation, kv::Operation::Put) {
        return State::Gone;
    }
    let text = String::from_utf8_lossy(&entry.value);
    let mut parts = text.split(' ');
    match parts.next() {
        Some("done") => State::Done,
        Some("run") => {
            let at_ms = parts.nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
            State::Running { at_ms }
        }
        _ => State::Gone,
    }
}

impl Inbox {
    /// Opens the service's bucket, creating it if missing.
    pub(crate) async fn open(
        js: &jetstream::Context,
        service: &str,
        retention: Duration,
        replicas: usize,
    ) -> Result<Self, InboxError> {
        let bucket = bucket(service);
        let err = |reason: String| InboxError {
            bucket: bucket.clone(),
            reason,
        };
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
                    Err(e) => js
                        .get_key_value(&bucket)
                        .await
                        .map_err(|_| err(format!("cannot create the bucket: {e}")))?,
                }
            }
        };
        let instance = EventId::new_random().short();
        Ok(Self {
            kv,
            bucket,
            instance,
        })
    }

    fn claim_value(&self) -> Bytes {
        Bytes::from(format!("run {} {}", self.instance, now_ms()))
    }

    fn err(&self, reason: impl std::fmt::Display) -> InboxError {
        InboxError {
            bucket: self.bucket.clone(),
            reason: reason.to_string(),
        }
    }

    /// Claims `key` for this instance, or says why not.
    pub(crate) async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, InboxError> {
        match self.kv.create(key, self.claim_value()).await {
            Ok(rev) => return Ok(Claim::Won(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.err(e)),
        }
        let Some(entry) = self.kv.entry(key).await.map_err(|e| self.err(e))? else {
            // Removed in between: claim again on the next delivery.
            return Ok(Claim::Busy(Duration::ZERO));
        };
        match parse(&entry) {
            State::Done => Ok(Claim::Done),
            State::Running { at_ms } => {
                let age = Duration::from_millis(now_ms().saturating_sub(at_ms));
                if age < lease {
                    return Ok(Claim::Busy(lease - age));
                }
                self.take_over(key, entry.revision).await
            }
            State::Gone => self.take_over(key, entry.revision).await,
        }
    }

    async fn take_over(&self, key: &str, revision: u64) -> Result<Claim, InboxError> {
        match self.kv.update(key, self.claim_value(), revision).await {
            Ok(rev) => Ok(Claim::Won(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Ok(Claim::Busy(Duration::ZERO))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Refreshes a claim this instance holds; returns its new revision.
    pub(crate) async fn refresh(&self, key: &str, revision: u64) -> Result<u64, InboxError> {
        self.kv
            .update(key, self.claim_value(), revision)
            .await
            .map_err(|e| self.err(e))
    }

    /// Records the event as handled.
    pub(crate) async fn done(&self, key: &str, revision: u64) -> Result<(), InboxError> {
        let value = Bytes::from(format!("done {}", now_ms()));
        match self.kv.update(key, value.clone(), revision).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Another instance took the claim over while this one worked
                // (it looked crashed). The handling is complete either way.
                tracing::warn!(key, "inbox claim was taken over while the handler ran");
                self.kv
                    .put(key, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err(e))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives a claim up after a failure, so the retry can claim again.
    pub(crate) async fn release(&self, key: &str, revision: u64) {
        if let Err(e) = self.kv.delete_expect_revision(key, Some(revision)).await {
            tracing::debug!(key, error = %e, "could not release the inbox claim; it will expire");
        }
    }
}
