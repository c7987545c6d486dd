//! Event streams: how choreo creates one ([`StreamSettings`]) and checks an
//! existing one.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::StreamError;
use crate::nats::{Cause, message};

/// How long the event streams choreo creates keep an event by default:
/// 7 days, the inbox's default horizon ([`crate::DEFAULT_INBOX_RETENTION`]).
///
/// So every copy a stream can still deliver or replay is one the inbox can
/// still recognise, and a stream holds at most a week of events: at ~600
/// bytes of server memory and ~490 of disk per keyed event (measured by
/// `scripts/bench capacity`), about 360 MB and 300 MB at 1 event/s. A
/// handler stopped for longer than this loses the events it had not read;
/// a service warns at start when a handler is past half of it.
pub const DEFAULT_STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How choreo creates a stream that does not exist yet. An existing stream is
/// used as it is: changing these never changes a stream already made.
///
/// Defaults: file storage, limits retention (messages stay after they are
/// consumed, so every service can read them and dedup survives restarts),
/// one replica, a two-minute duplicate window, events kept
/// [`DEFAULT_STREAM_MAX_AGE`] (7 days), no size limit. The dead-letter
/// stream keeps its letters without an age limit whatever `max_age` says:
/// a letter is an event nobody has handled yet.
///
/// ```
/// use std::time::Duration;
/// use choreo::{DEFAULT_STREAM_MAX_AGE, StreamSettings};
///
/// assert_eq!(StreamSettings::default().max_age, DEFAULT_STREAM_MAX_AGE);
/// // A day of history, three replicas:
/// let settings = StreamSettings::default()
///     .max_age(Duration::from_secs(86_400))
///     .replicas(3);
/// // Every event, for ever (the server's memory grows with them):
/// let forever = StreamSettings::default().max_age(Duration::ZERO);
/// # let _ = (settings, forever);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StreamSettings {
    /// Replicas of each stream (3 on a production cluster).
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop repeats.
    pub duplicate_window: Duration,
    /// How long events are kept ([`DEFAULT_STREAM_MAX_AGE`] by default);
    /// `Duration::ZERO` keeps every event.
    pub max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: DEFAULT_STREAM_MAX_AGE,
        }
    }
}

impl StreamSettings {
    /// Sets the number of replicas.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }
    /// Sets the duplicate window.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }
    /// Sets how long events are kept; `Duration::ZERO` keeps every event. A
    /// duplicate window longer than it is shortened to it, as the server
    /// requires.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    pub(crate) fn config(&self, name: &str, subjects: Vec<String>) -> stream::Config {
        stream::Config {
            name: name.to_owned(),
            subjects,
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            // The server refuses a window longer than the age.
            duplicate_window: if self.max_age > Duration::ZERO {
                self.duplicate_window.min(self.max_age)
            } else {
                self.duplicate_window
            },
            max_age: self.max_age,
            ..Default::default()
        }
    }
}

/// Creates stream `name` if missing; checks an existing one covers `filter`.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    subjects: Vec<String>,
    filter: &str,
) -> Result<(), StreamError> {
    for _ in 0..3 {
        match js.get_stream(name).await {
            Ok(stream) => {
                let have = &stream.cached_info().config.subjects;
                if have
                    .iter()
                    .any(|s| crate::event::subject::covers(s, filter))
                {
                    return Ok(());
                }
                return Err(StreamError::DoesNotCover {
                    stream: name.to_owned(),
                    subjects: have.clone(),
                    needed: filter.to_owned(),
                });
            }
            Err(e) => match Cause::of(&e) {
                Cause::Code(code) if code == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                _ => return Err(StreamError::from_nats(&js.client(), name, e)),
            },
        }
        match js
            .create_stream(settings.config(name, subjects.clone()))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    stream = name,
                    ?subjects,
                    replicas = settings.replicas,
                    "created stream"
                );
                return Ok(());
            }
            Err(e) => {
                // Another instance created it first: look again.
                if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST)
                {
                    continue;
                }
                return Err(StreamError::from_create(&js.client(), name, &subjects, e));
            }
        }
    }
    Err(StreamError::Other {
        stream: name.to_owned(),
        source: message("the stream kept changing while it was being created"),
    })
}

/// Checks that the account has JetStream (in the context's domain).
pub(crate) async fn check_jetstream(js: &jetstream::Context) -> Result<(), StreamError> {
    match js.query_account().await {
        Ok(_) => Ok(()),
        Err(e) => Err(StreamError::from_nats(&js.client(), "(account)", e)),
    }
}
