//! Event streams: how choreo creates one ([`StreamSettings`]) and checks an
//! existing one.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::StreamError;
use crate::nats::{Cause, message};

/// How choreo creates a stream that does not exist yet. An existing stream is
/// used as it is.
///
/// Defaults: file storage, limits retention (messages stay after they are
/// consumed, so every service can read them and dedup survives restarts),
/// one replica, a two-minute duplicate window, no age or size limit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StreamSettings {
    /// Replicas of each stream (3 on a production cluster).
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop repeats.
    pub duplicate_window: Duration,
    /// How long messages are kept; `Duration::ZERO` keeps them until limits
    /// are set by hand.
    pub max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
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
    /// Sets the maximum message age. A duplicate window longer than it is
    /// shortened to it, as the server requires.
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
