//! The events of one subject filter as stored, payloads as JSON (what
//! `choreo events` prints): an aggregate's history up to a point, read
//! with batched direct gets like a load, without the state (that needs the
//! user's type, so it comes from the library: `Aggregates::load_at`).

use serde::Serialize;

use super::AdminError;
use super::replay::Point;
use crate::aggregate::At;
use crate::aggregate::read::{self, Until};
use crate::nats::{JetStreamApi, LazyAnswers};
use crate::wire::headers::{CE_EVENTVERSION, CE_ID, CE_TYPE};

/// One stored event.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StoredEvent {
    /// Its stream sequence.
    pub sequence: u64,
    /// The subject it was stored on.
    pub subject: String,
    /// When the server stored it, RFC 3339.
    pub stored_at: String,
    /// `ce-type`, if it is a choreo event.
    pub event_type: Option<String>,
    /// `ce-eventversion`.
    pub version: Option<u32>,
    /// `ce-id`.
    pub id: Option<String>,
    /// The CBOR payload as JSON (a payload that is not CBOR: `null`).
    pub payload: serde_json::Value,
}

/// The events of `filter` in `stream`, in order, up to and with `until`
/// (a sequence or a time; all without).
///
/// # Errors
/// The stream cannot be read (missing, no direct gets, denied).
pub async fn events(
    client: &async_nats::Client,
    api: &JetStreamApi,
    (stream, filter): (&str, &str),
    until: Option<Point>,
) -> Result<Vec<StoredEvent>, AdminError> {
    let until = until.map(|p| match p {
        Point::Sequence(s) => At::Sequence(s),
        Point::Time(t) => At::Time(t),
    });
    let mut out = Vec::new();
    let what = format!("the events of {filter} in {stream}");
    // One read: a subscription for its answers, gone with it.
    read::read(
        (client, &LazyAnswers::default()),
        (&api.prefix(), stream),
        ("events", filter, filter),
        0,
        until.map(Until::from).unwrap_or_default(),
        |raw| {
            let header = |name: &str| raw.headers.get(name).map(|v| v.as_str().to_owned());
            out.push(StoredEvent {
                sequence: raw.sequence,
                subject: raw.subject,
                stored_at: raw
                    .stored_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                event_type: header(CE_TYPE),
                version: header(CE_EVENTVERSION).and_then(|v| v.parse().ok()),
                id: header(CE_ID),
                payload: crate::dlq::payload_to_json(&raw.payload)
                    .unwrap_or(serde_json::Value::Null),
            });
            Ok(())
        },
    )
    .await
    .map_err(|e| {
        let js = api.context(client.clone());
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
        AdminError::new(&js, what, crate::nats::Source::from(boxed))
    })?;
    Ok(out)
}
