//! Deadlines as the server holds them: how many are pending per deadline
//! handler and which fires next ([`pending`]), and one deadline's state
//! ([`deadline`]): what `choreo status` shows and the testkit asserts.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use serde::{Deserialize, Serialize};

use super::AdminError;
use crate::deadline::{Outcome, filter, subject};

/// The stream that holds every service's deadlines: schedules (`at`),
/// fired copies (`fire`) and decisions (`outcome`) under
/// `choreo.deadline.<service>.<handler>.<part>.<token>`.
pub const STREAM: &str = crate::deadline::STREAM;
use crate::event::EventId;
use crate::wire::headers as h;

/// One deadline handler's pending deadlines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Pending {
    /// Scheduled, not yet fired or cancelled.
    pub pending: u64,
    /// The oldest pending one: the next to fire.
    pub next: Option<Next>,
    /// Events its B watchers (`<handler>__met_<B>`) have not handled yet.
    /// A deadline that falls due waits for them to handle every B stored
    /// by its due time before it fires, so a backlog here delays outcomes
    /// (filled by [`status`](crate::admin::status()); 0 from [`pending`]).
    #[serde(default)]
    pub watchers_waiting: u64,
    /// How long the oldest event its B watchers have not handled has been
    /// stored, ms (0: they keep up). A deadline due now is decided about
    /// this much later.
    #[serde(default)]
    pub watchers_behind_ms: u64,
}

/// The next deadline to fire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Next {
    /// The event A that started it.
    pub event: EventId,
    /// What B is matched by (A's correlation id, or its key).
    pub token: String,
    /// When it fires (Unix ms).
    pub at_ms: u64,
    /// The subject A was published on (`None` for a deadline scheduled
    /// before choreo recorded it, in 0.1.0).
    #[serde(default)]
    pub subject: Option<String>,
}

/// One deadline, for one match token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DeadlineState {
    /// Nothing is recorded for it: never scheduled (A not handled yet), or
    /// decided longer ago than the records are kept.
    Unknown,
    /// Scheduled, to fire at this Unix ms.
    Scheduled {
        /// The event A.
        event: EventId,
        /// When it fires.
        at_ms: u64,
    },
    /// Past its due time and not decided yet: the fired copy is on its
    /// way to the handler, or waits for a B watcher to handle every B
    /// stored by the due time (a B stored in time still meets it).
    Due {
        /// The event A.
        event: EventId,
        /// When it fell due: A's stored time + `within` (Unix ms).
        due_ms: u64,
    },
    /// B came in time: the deadline was cancelled.
    Met {
        /// The event B.
        by: EventId,
        /// When B was seen (Unix ms).
        at_ms: u64,
    },
    /// It fired, and its handler ran (or is running) with A.
    Fired {
        /// The event A.
        event: EventId,
        /// When it fired (Unix ms).
        at_ms: u64,
    },
}

fn ms(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The time a schedule's `Nats-Schedule: @at <RFC 3339>` names.
fn schedule_at(headers: &async_nats::HeaderMap) -> Option<u64> {
    let v = headers.get("Nats-Schedule")?.as_str();
    let at = v.strip_prefix("@at ")?;
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(ms)
}

fn event_of(headers: &async_nats::HeaderMap) -> Option<EventId> {
    headers.get(h::CE_ID)?.as_str().parse().ok()
}

async fn stream(js: &jetstream::Context) -> Result<Option<jetstream::stream::Stream>, AdminError> {
    match js.get_stream(STREAM).await {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(AdminError::new(
            js,
            format!("the deadline stream {STREAM}"),
            crate::nats::source(e),
        )),
    }
}

/// How many deadlines of `handler` in `service` are pending, and the next
/// to fire. A service that never declared a deadline has none.
///
/// # Errors
/// The deadline stream cannot be read.
pub async fn pending(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
) -> Result<Pending, AdminError> {
    let none = Pending {
        pending: 0,
        next: None,
        watchers_waiting: 0,
        watchers_behind_ms: 0,
    };
    let Some(s) = stream(js).await? else {
        return Ok(none);
    };
    let what = || format!("the deadlines of {service}.{handler}");
    let on = filter(service, handler, "at");
    // Counted by an ephemeral consumer, without reading one: the server
    // works it out from its subject index.
    let c = s
        .create_consumer(consumer::pull::Config {
            filter_subject: on.clone(),
            inactive_threshold: Duration::from_secs(2),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| AdminError::new(js, what(), crate::nats::source(e)))?;
    let pending = c.cached_info().num_pending;
    if pending == 0 {
        return Ok(none);
    }
    // Deadlines of one handler share their `within`, so the first stored
    // schedule is the first to fire (up to the A events' own order).
    let next = match s.direct_get_first_for_subject(on).await {
        Ok(m) => event_of(&m.headers)
            .zip(schedule_at(&m.headers))
            .map(|(event, at_ms)| Next {
                event,
                token: m.subject.rsplit('.').next().unwrap_or_default().to_owned(),
                at_ms,
                subject: m
                    .headers
                    .get(crate::deadline::FOR_SUBJECT)
                    .map(|v| v.as_str().to_owned()),
            }),
        Err(_) => None,
    };
    Ok(Pending {
        pending,
        next,
        ..none
    })
}

/// The state of the deadline of `handler` in `service` for match token
/// `token` (A's correlation id, or its key's single value).
///
/// # Errors
/// The deadline stream cannot be read.
pub async fn deadline(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
    token: &str,
) -> Result<DeadlineState, AdminError> {
    let Some(s) = stream(js).await? else {
        return Ok(DeadlineState::Unknown);
    };
    let last = |part: &'static str| {
        let s = &s;
        async move {
            s.get_last_raw_message_by_subject(&subject(service, handler, part, token))
                .await
                .ok()
        }
    };
    if let Some(m) = last("outcome").await
        && let Some((o, at_ms)) = Outcome::parse(&m.payload)
    {
        return Ok(match o {
            Outcome::Met(by) => DeadlineState::Met { by, at_ms },
            Outcome::Fired(event) => DeadlineState::Fired { event, at_ms },
        });
    }
    if let Some(m) = last("at").await
        && let (Some(event), Some(at_ms)) = (event_of(&m.headers), schedule_at(&m.headers))
    {
        // A fired copy put off to look again is past its due time.
        return Ok(match crate::deadline::due_of(&m.headers).map(ms) {
            Some(due_ms) if due_ms < at_ms => DeadlineState::Due { event, due_ms },
            _ => DeadlineState::Scheduled { event, at_ms },
        });
    }
    // Fired, and the decision not written yet.
    if let Some(m) = last("fire").await
        && let Some(event) = event_of(&m.headers)
    {
        let due_ms = crate::deadline::due_of(&m.headers).map_or(ms(m.time), ms);
        return Ok(DeadlineState::Due { event, due_ms });
    }
    Ok(DeadlineState::Unknown)
}
