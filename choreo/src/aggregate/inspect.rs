//! An aggregate's state at a point, asked over NATS: a service that
//! registers an aggregate type with
//! [`Service::aggregate`](crate::Service::aggregate) answers requests on
//! [`state_subject`]`(service)` (a queue group, so one instance answers) by
//! folding the instance's events up to the point with its own
//! [`Aggregate::apply`] ([`Aggregates::load_at`]) and returning the state as
//! JSON. Only the service has the code that folds; `choreo console` and
//! `choreo::admin::aggregate_state` ask it.

use std::sync::Arc;

use async_nats::Client;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument as _;

use super::{Aggregate, AggregateEvent, Aggregates, At};

/// The subjects state requests go to: `$CHOREO.STATE.<service>`.
pub const STATE_PREFIX: &str = "$CHOREO.STATE";

/// Where `service` answers state requests.
pub fn state_subject(service: &str) -> String {
    format!("{STATE_PREFIX}.{service}")
}

/// A request for one aggregate instance's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StateRequest {
    /// The aggregate's [`Aggregate::NAME`].
    pub aggregate: String,
    /// The instance.
    pub id: String,
    /// Up to and with this stream sequence (none: the whole history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_sequence: Option<u64>,
    /// Up to and with this time, RFC 3339 (none: the whole history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_time: Option<String>,
}

impl StateRequest {
    /// The state of `aggregate` `id`, at the end of its history.
    pub fn new(aggregate: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            aggregate: aggregate.into(),
            id: id.into(),
            until_sequence: None,
            until_time: None,
        }
    }

    /// Up to and with stream sequence `seq`.
    #[must_use]
    pub fn until_sequence(mut self, seq: u64) -> Self {
        self.until_sequence = Some(seq);
        self
    }

    /// Up to and with `time` (when each event was stored).
    #[must_use]
    pub fn until_time(mut self, time: time::OffsetDateTime) -> Self {
        self.until_time = time
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        self
    }
}

/// A service's answer to a [`StateRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StateAnswer {
    /// The state (the aggregate type serialized as JSON); none on an error.
    pub state: Option<serde_json::Value>,
    /// The stream sequence of the last event folded (0: none).
    pub version: u64,
    /// How many events were folded.
    pub events: u64,
    /// Why there is no state: an unknown aggregate, a bad point, a read
    /// that failed.
    pub error: Option<String>,
}

impl StateAnswer {
    fn failed(error: String) -> Self {
        Self {
            state: None,
            version: 0,
            events: 0,
            error: Some(error),
        }
    }
}

type Load =
    Arc<dyn Fn(Aggregates, String, Option<At>) -> BoxFuture<'static, StateAnswer> + Send + Sync>;

/// One aggregate type a service answers for.
#[derive(Clone)]
pub(crate) struct Inspected {
    /// [`Aggregate::NAME`].
    pub(crate) name: &'static str,
    /// `A::filter("{id}")`: where an instance's events are.
    pub(crate) filter: String,
    /// The stream its events are stored in.
    pub(crate) stream: &'static str,
    load: Load,
}

impl std::fmt::Debug for Inspected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspected")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl Inspected {
    /// The description and loader of `A`.
    pub(crate) fn of<A: Aggregate + Serialize>() -> Self {
        Self {
            name: A::NAME,
            filter: A::filter("{id}"),
            stream: A::Event::TYPES.first().map_or("", |t| t.stream),
            load: Arc::new(|store: Aggregates, id: String, at: Option<At>| {
                Box::pin(async move {
                    let loaded = match at {
                        Some(at) => store.load_at::<A>(&id, at).await,
                        None => store.load::<A>(&id).await,
                    };
                    match loaded {
                        Ok(l) => match serde_json::to_value(&l.state) {
                            Ok(state) => StateAnswer {
                                state: Some(state),
                                version: l.version,
                                events: l.events,
                                error: None,
                            },
                            Err(e) => StateAnswer::failed(format!(
                                "{} cannot be written as JSON: {e}",
                                A::NAME
                            )),
                        },
                        Err(e) => StateAnswer::failed(e.to_string()),
                    }
                })
            }),
        }
    }
}

fn point(r: &StateRequest) -> Result<Option<At>, String> {
    match (r.until_sequence, r.until_time.as_deref()) {
        (Some(s), _) => Ok(Some(At::Sequence(s))),
        (None, Some(t)) => {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|t| Some(At::Time(t)))
                .map_err(|_| format!("{t:?} is not an RFC 3339 time"))
        }
        (None, None) => Ok(None),
    }
}

/// Answers state requests for `service` until `stop`, one at a time.
pub(crate) async fn answer(
    client: Client,
    service: Arc<str>,
    store: Aggregates,
    inspected: Vec<Inspected>,
    mut stop: watch::Receiver<bool>,
) {
    let subject = state_subject(&service);
    let mut requests = match client
        .queue_subscribe(subject.clone(), service.to_string())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service = %service, subject = %subject, error = %e, "cannot answer aggregate state requests");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = requests.next() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<StateRequest>(&msg.payload) {
            Err(e) => StateAnswer::failed(format!("not a state request: {e}")),
            Ok(r) => {
                let span = tracing::info_span!("choreo.aggregate_state", service = %service, aggregate = %r.aggregate, aggregate_id = %r.id);
                async {
                    match (inspected.iter().find(|i| i.name == r.aggregate), point(&r)) {
                        (None, _) => StateAnswer::failed(format!(
                            "{service} answers for {}, not {}",
                            inspected
                                .iter()
                                .map(|i| i.name)
                                .collect::<Vec<_>>()
                                .join(", "),
                            r.aggregate
                        )),
                        (_, Err(e)) => StateAnswer::failed(e),
                        (Some(i), Ok(at)) => (i.load)(store.clone(), r.id.clone(), at).await,
                    }
                }
                .instrument(span)
                .await
            }
        };
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        if let Err(e) = client.publish(reply, body.into()).await {
            tracing::warn!(service = %service, error = %e, "cannot answer a state request");
        }
    }
}
