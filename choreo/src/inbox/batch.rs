//! Batched reads: the keys of a whole pulled batch read with one direct
//! get (`multi_last`), answered on the connection's long-lived
//! subscription for answers ([`crate::nats::Answers`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::record::Record;
use super::{Inbox, InboxError, Raw, now_ms};
use crate::nats::recent_permission_error;

/// Most keys one batched read asks for (the server's limit is far higher).
pub(crate) const READ_BATCH: usize = 256;

impl Inbox {
    /// Reads the claim keys of up to [`READ_BATCH`] events and their
    /// groups with one batched direct get; returns what the inbox says of
    /// each (see [`Inbox::judge`]), without the events it says nothing of.
    pub(crate) async fn read_many(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Record>, InboxError> {
        self.metrics.batch_reads.increment(1);
        let groups: Vec<Option<(String, crate::EventId)>> =
            keys.iter().map(|k| self.group_of(k)).collect();
        let mut subjects: Vec<&str> = keys.to_vec();
        subjects.extend(groups.iter().flatten().map(|(g, _)| g.as_str()));
        subjects.sort_unstable();
        subjects.dedup();
        let read = self.read_batch(&subjects).await;
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
        let found = read.map_err(|(_, e)| e)?;
        Ok(keys
            .iter()
            .zip(&groups)
            .filter_map(|(key, group)| {
                let group = group
                    .as_ref()
                    .map(|(g, id)| (*id, g.as_str(), found.get(g.as_str())));
                self.judge(found.get(*key), group)
                    .map(|r| ((*key).to_owned(), r))
            })
            .collect())
    }

    async fn read_batch(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Raw>, (BatchFailure, InboxError)> {
        let unavailable = |e: InboxError| (BatchFailure::Unavailable, e);
        let mut found = HashMap::new();
        if keys.is_empty() {
            return Ok(found);
        }
        let subjects: Vec<String> = keys
            .iter()
            .map(|k| format!("{}{k}", self.key_prefix))
            .collect();
        let request = MultiLast {
            multi_last: &subjects,
            batch: keys.len(),
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| unavailable(self.fail("cannot encode a batched read", e)))?;
        let (subject, mut reply) = self.answers.reply();
        self.client
            .publish_with_reply(self.direct_get.clone(), subject, body.into())
            .await
            .map_err(|e| unavailable(self.fail("cannot read", e)))?;
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            let answer = tokio::time::timeout_at(deadline, reply.next())
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
            let header = |name: &str| headers.get(name).map(|v| v.as_str());
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
                Raw {
                    revision,
                    deleted,
                    value: answer.payload,
                },
            );
        }
    }
}

/// A batched direct get's request: the newest message of each subject.
#[derive(serde::Serialize)]
struct MultiLast<'a> {
    multi_last: &'a [String],
    batch: usize,
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
    use super::BatchFailure;

    #[test]
    fn only_failures_that_recur_pause_batched_reads() {
        assert!(BatchFailure::Refused.recurs(|| false));
        // A denied batch gets no answer, and the connection says why.
        assert!(BatchFailure::NoAnswer.recurs(|| true));
        // A timeout during an election, or no responders, passes.
        assert!(!BatchFailure::NoAnswer.recurs(|| false));
        assert!(!BatchFailure::Unavailable.recurs(|| true));
    }
}
