//! Error types, one per operation, each `#[non_exhaustive]`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::codec::EncodeError;
use crate::envelope::EnvelopeError;
use crate::headers::HeaderError;
use crate::subject::SubjectError;

/// A stream could not be found, created or used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The server has no JetStream.
    #[error(
        "JetStream is not available on this server ({reason}): start nats-server with `-js`, or add \
         `jetstream {{}}` to its configuration"
    )]
    JetStreamUnavailable {
        /// What the server or client said.
        reason: String,
    },
    /// An existing stream does not store the event's subjects.
    #[error(
        "stream {stream} exists with subjects {subjects:?}, which do not cover {needed:?}: add the subject to the \
         stream, or give the event another `stream = \"...\"`"
    )]
    DoesNotCover {
        /// The stream.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
        /// The event's subject filter.
        needed: String,
    },
    /// The server refused the request because of permissions.
    #[error("permission denied while using stream {stream}: {reason}")]
    PermissionDenied {
        /// The stream.
        stream: String,
        /// The server's message, naming the subject.
        reason: String,
    },
    /// The cluster cannot serve the stream right now: peers offline, no
    /// quorum, no leader. It passes when the nodes are back.
    #[error(
        "stream {stream}: the cluster cannot serve it right now ({reason}); it passes when its nodes are back"
    )]
    ClusterUnavailable {
        /// The stream.
        stream: String,
        /// What the server said.
        reason: String,
    },
    /// Any other failure.
    #[error("stream {stream}: {reason}")]
    Other {
        /// The stream.
        stream: String,
        /// What went wrong.
        reason: String,
    },
}

/// Publishing an event failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The subject could not be rendered.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The payload could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A header value is not allowed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The message is larger than the server's `max_payload`; nothing was sent.
    #[error(
        "{event} is {size} bytes with headers, above the server's max_payload of {max} bytes; nothing was sent. \
         Store large data elsewhere and put a reference in the event, or raise max_payload on the server"
    )]
    TooLarge {
        /// The event's name.
        event: &'static str,
        /// The message size.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// The event's stream could not be made ready.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// JetStream already holds an event with this id (the same key) inside
    /// its duplicate window, with different content: the new one was not
    /// stored. A corrected fact is a new fact (its own key), or carries a
    /// revision in its key.
    #[error(
        "{event} with key ({key}) is already in stream {stream} at sequence {sequence} with different content, \
         so this one was not stored (event id {id}). One key is one fact: publish a correction as a new event \
         with its own key, or put a revision in the key"
    )]
    Conflict {
        /// The event's name.
        event: &'static str,
        /// The key's values, comma-separated.
        key: String,
        /// The event id both share.
        id: crate::EventId,
        /// Where the stored one is.
        stream: String,
        /// Its sequence there.
        sequence: u64,
    },
    /// JetStream did not store the event.
    #[error("publishing {event} on {subject} failed: {reason}")]
    Failed {
        /// The event's name.
        event: &'static str,
        /// The subject.
        subject: String,
        /// What JetStream or the client said.
        reason: String,
    },
}

impl From<EnvelopeError> for PublishError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Subject(e) => Self::Subject(e),
            EnvelopeError::Encode(e) => Self::Encode(e),
            EnvelopeError::Header(e) => Self::Header(e),
        }
    }
}

impl PublishError {
    pub(crate) fn from_nats(
        client: &async_nats::Client,
        event: &'static str,
        subject: &str,
        e: jetstream::context::PublishError,
    ) -> Self {
        let mut reason = e.to_string();
        if let Some(p) = recent_permission_error(client) {
            reason = format!("{reason}; the server reported: {p}");
        }
        Self::Failed {
            event,
            subject: subject.to_owned(),
            reason,
        }
    }
}

/// A NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a NATS URL.
    #[error("invalid NATS URL {url:?}: {reason}; expected e.g. nats://127.0.0.1:4222")]
    InvalidUrl {
        /// The URL, with any password removed.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No server answered.
    #[error(
        "cannot reach a NATS server at {url}: {reason}; is nats-server running and the address right?"
    )]
    Unreachable {
        /// The URL, with any password removed.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// The server refused the credentials.
    #[error(
        "the NATS server at {url} refused the credentials ({reason}); check the user, token, nkey or creds file"
    )]
    Auth {
        /// The URL, with any password removed.
        url: String,
        /// What the server said.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("TLS with the NATS server at {url} failed: {reason}")]
    Tls {
        /// The URL, with any password removed.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// Removes `user:password@` from a URL for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// JetStream error codes that say a cluster cannot serve a request right
/// now, and will when its nodes are back.
pub(crate) fn is_cluster_unavailable(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode as C;
    [
        C::CLUSTER_NO_PEERS,
        C::CLUSTER_NOT_AVAILABLE,
        C::CLUSTER_INCOMPLETE,
        C::CLUSTER_NOT_ASSIGNED,
        C::CLUSTER_NOT_LEADER,
        C::CLUSTER_NOT_ACTIVE,
    ]
    .contains(&code)
}

pub(crate) fn classify_jetstream(
    e: &jetstream::context::GetStreamError,
) -> Option<jetstream::ErrorCode> {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::JetStream(j) => Some(j.error_code()),
        _ => None,
    }
}

impl StreamError {
    pub(crate) fn from_get(
        client: &async_nats::Client,
        stream: &str,
        e: &jetstream::context::GetStreamError,
    ) -> Self {
        Self::from_message(client, stream, &e.to_string(), &format!("{e:?}"))
    }

    pub(crate) fn from_create(
        client: &async_nats::Client,
        stream: &str,
        subjects: &[String],
        e: &jetstream::context::CreateStreamError,
    ) -> Self {
        if let jetstream::context::CreateStreamErrorKind::JetStream(j) = e.kind()
            && is_cluster_unavailable(j.error_code())
        {
            return Self::ClusterUnavailable {
                stream: stream.to_owned(),
                reason: j.to_string(),
            };
        }
        if let jetstream::context::CreateStreamErrorKind::JetStream(j) = e.kind()
            && j.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
        {
            return Self::Other {
                stream: stream.to_owned(),
                reason: format!(
                    "cannot create it: its subjects {subjects:?} overlap another stream's ({j}); \
                     give the event `stream = \"...\"` naming that stream"
                ),
            };
        }
        Self::from_message(
            client,
            stream,
            &format!("cannot create it: {e}"),
            &format!("{e:?}"),
        )
    }

    pub(crate) fn from_message(
        client: &async_nats::Client,
        stream: &str,
        text: &str,
        debug: &str,
    ) -> Self {
        let both = format!("{text} {debug}").to_lowercase();
        if both.contains("not enabled")
            || both.contains("noresponders")
            || both.contains("no responders")
        {
            return Self::JetStreamUnavailable {
                reason: text.to_owned(),
            };
        }
        if let Some(p) = recent_permission_error(client) {
            return Self::PermissionDenied {
                stream: stream.to_owned(),
                reason: p,
            };
        }
        Self::Other {
            stream: stream.to_owned(),
            reason: text.to_owned(),
        }
    }
}

// ---- permission violations -------------------------------------------------
//
// NATS reports a permission violation only asynchronously, through the
// connection's event callback; the request that caused it then times out.
// `crate::connect` installs a callback that keeps the recent ones here, per
// connection (server id and client id), so the error of the timed-out
// operation can name the subject. A client made without `crate::connect`, or
// one that reconnected since, falls back to the bare timeout.

/// A connection, as the server knows it.
pub(crate) type ConnKey = (String, u64);

type Violations = std::collections::HashMap<ConnKey, VecDeque<(Instant, String)>>;

static PERMISSION_ERRORS: Mutex<Option<Violations>> = Mutex::new(None);
const PERMISSION_MEMORY: Duration = Duration::from_secs(30);

pub(crate) fn conn_key(client: &async_nats::Client) -> ConnKey {
    let info = client.server_info();
    (info.server_id, info.client_id)
}

pub(crate) fn record_permission_error(conn: &ConnKey, msg: String) {
    let mut guard = PERMISSION_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(Default::default);
    // Forget connections with nothing recent, so the map stays small.
    map.retain(|_, q| {
        q.back()
            .is_some_and(|(at, _)| at.elapsed() < PERMISSION_MEMORY)
    });
    let q = map.entry(conn.clone()).or_default();
    q.push_back((Instant::now(), msg));
    while q.len() > 16 {
        q.pop_front();
    }
}

/// The latest permission violation the server reported on `client`'s
/// connection in the last 30 seconds.
pub(crate) fn recent_permission_error(client: &async_nats::Client) -> Option<String> {
    let key = conn_key(client);
    let guard = PERMISSION_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()?
        .get(&key)?
        .iter()
        .rev()
        .find(|(at, _)| at.elapsed() < PERMISSION_MEMORY)
        .map(|(_, m)| m.clone())
}
