//! What waits on a replay reads: the marker `choreo replay` leaves for a
//! handler ([`marker`]), and whether the handler has done the replayed
//! range ([`replay_done`]) — what a read model's rebuild waits for before
//! it is swapped in.

use async_nats::jetstream::{self, consumer};
use serde::Serialize;

use super::AdminError;
use crate::topology::{REPLAYS_BUCKET, ReplayMarker, replay_key};

/// The last replay `choreo replay` made of a handler, as its marker in
/// the `choreo_replays` bucket says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Marker {
    /// The first stream sequence replayed.
    pub from: u64,
    /// The last stream sequence in the range.
    pub until: u64,
    /// Whether handled events run again (`--rerun`).
    pub rerun: bool,
    /// When the replay was made, Unix ms: it names the replay.
    pub at_ms: u64,
    /// When the handler was rewound, Unix ms; `None` until then.
    pub rewound_at_ms: Option<u64>,
    /// Whether the handler is ordered (its range was copied into its
    /// partitions).
    pub ordered: bool,
    /// The stream the handler reads.
    pub stream: String,
    /// Its durable (for an unordered handler).
    pub durable: String,
}

/// The marker of the last replay of `service`'s `handler`; `None` when it
/// was never replayed (or the marker expired, after 7 days).
///
/// # Errors
/// The bucket exists but cannot be read.
pub async fn marker(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
) -> Result<Option<Marker>, AdminError> {
    let Ok(store) = js.get_key_value(REPLAYS_BUCKET).await else {
        return Ok(None);
    };
    let value = store
        .get(replay_key(service, handler))
        .await
        .map_err(|e| AdminError::new(js, REPLAYS_BUCKET.to_owned(), crate::nats::source(e)))?;
    Ok(value
        .and_then(|v| serde_json::from_slice::<ReplayMarker>(&v).ok())
        .map(|m| Marker {
            from: m.from,
            until: m.until,
            rerun: m.rerun,
            at_ms: m.at_ms,
            rewound_at_ms: (m.rewound_at_ms > 0).then_some(m.rewound_at_ms),
            ordered: m.ordered,
            stream: m.stream,
            durable: m.durable,
        }))
}

/// Whether `service`'s `handler` has done every event of the replay
/// `marker` names: it was rewound, and its durable's ack floor has reached
/// the range's end. For an ordered handler, whose copies leave its work
/// queue once handled, whether the queue holds nothing older than the
/// rewind.
///
/// # Errors
/// The durable or the work queue cannot be read.
pub async fn replay_done(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
    marker: &Marker,
) -> Result<bool, AdminError> {
    let Some(rewound_at_ms) = marker.rewound_at_ms else {
        return Ok(false);
    };
    if marker.ordered {
        let name = crate::topology::ordered::stream_name(service, handler);
        let mut queue = js
            .get_stream(&name)
            .await
            .map_err(|e| AdminError::new(js, format!("stream {name}"), crate::nats::source(e)))?;
        let state = &queue
            .info()
            .await
            .map_err(|e| AdminError::new(js, format!("stream {name}"), crate::nats::source(e)))?
            .state;
        let oldest_ms = (state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as u64;
        return Ok(state.messages == 0 || oldest_ms > rewound_at_ms);
    }
    let durable = &marker.durable;
    let info = js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(durable, &marker.stream)
        .await
        .map_err(|e| AdminError::new(js, format!("durable {durable}"), crate::nats::source(e)))?
        .cached_info()
        .clone();
    Ok(info.ack_floor.stream_sequence >= marker.until)
}
