//! Rewinding one handler over a stretch of its stream while its instances
//! keep running: what `choreo replay` does.
//!
//! [`plan`] finds the range (from a sequence or a time, to a sequence or a
//! time or the end), counts the handler's events in it and how many its
//! inbox records as handled. [`replay`] then leaves a marker the instances
//! read (so `Context::is_replay` is true in the range), with `rerun`
//! deletes the range's inbox records (so the handler runs again for them;
//! its emissions keep their ids, so nothing downstream runs twice), and
//! rewinds the durable: the server's consumer reset (nats-server 2.14+), or
//! with `recreate`, while no instance runs, a new durable at the start. An
//! ordered handler has no durable to rewind: its range is copied into its
//! partitions instead (see `requeue`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Serialize;

use super::AdminError;
use crate::topology::{REPLAYS_BUCKET, ReplayMarker, inbox_bucket, replay_key};

/// Where a replay starts or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Point {
    /// A stream sequence.
    Sequence(u64),
    /// The handler's first event at or after this time (for an end: the
    /// last before it).
    Time(time::OffsetDateTime),
}

/// What a replay will do, exactly: [`plan`] works it out, [`replay`] does it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Plan {
    /// The service.
    pub service: String,
    /// The handler.
    pub handler: String,
    /// Its durable.
    pub durable: String,
    /// The stream it reads.
    pub stream: String,
    /// The first stream sequence replayed.
    pub from: u64,
    /// The last stream sequence in the range.
    pub until: u64,
    /// The handler's events in the range.
    pub events: u64,
    /// Of those, how many its inbox records as handled: skipped, or with
    /// `rerun`, run again.
    pub already_handled: u64,
    /// Whether handled events run again.
    pub rerun: bool,
    #[serde(skip)]
    handled: Vec<crate::EventId>,
    /// The handler's filter on `stream`.
    #[serde(skip)]
    pub(super) filter: String,
    /// An ordered handler: its events are copied into its partitions
    /// (see `requeue`), not rewound.
    #[serde(skip)]
    pub(super) ordered: bool,
}

impl Plan {
    /// What it does, as `choreo replay` says it: `12 events of
    /// billing.bill in INVOICES 1..=12: 12 already handled (skipped by the
    /// inbox), 0 to run`.
    pub fn summary(&self) -> String {
        let (skip, to_run) = if self.rerun {
            ("they run again: --rerun", self.events)
        } else {
            ("skipped by the inbox", self.events - self.already_handled)
        };
        format!(
            "{} of {}.{} in {} {}..={}: {} already handled ({skip}), {to_run} to run",
            crate::__private::counted(self.events, "event"),
            self.service,
            self.handler,
            self.stream,
            self.from,
            self.until,
            self.already_handled,
        )
    }
}

/// How long instances take to see a marker: they read it every
/// `ack_wait`, clamped to 1–5 s.
const MARKER_SEEN: Duration = Duration::from_secs(6);

fn bad(what: &str, why: String) -> AdminError {
    AdminError::bad_request(what, why)
}

/// Works out a replay of `handler` of `service` from `from` to `until`
/// (default: the stream's end), without changing anything.
///
/// # Errors
/// An unknown service or handler, a start in the future
/// or past the stream's end, an empty range, or a server that cannot be read.
pub async fn plan(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
    from: Point,
    until: Option<Point>,
    rerun: bool,
) -> Result<Plan, AdminError> {
    let what = format!("a replay of {service}.{handler}");
    let h = target(js, service, handler, &what).await?;
    let stream = &h.stream;
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| AdminError::new(js, format!("stream {stream}"), crate::nats::source(e)))?;
    let last = s.cached_info().state.last_sequence;
    let now = time::OffsetDateTime::now_utc();
    let start = match from {
        Point::Sequence(0) => return Err(bad(&what, "sequences start at 1".into())),
        Point::Sequence(n) if n > last => {
            return Err(bad(
                &what,
                format!("stream {stream} ends at sequence {last}; {n} is past its end"),
            ));
        }
        Point::Sequence(n) => n,
        Point::Time(t) if t > now => {
            return Err(bad(&what, format!("{t} is in the future")));
        }
        Point::Time(t) => first_at(js, stream, &h, t).await?.ok_or_else(|| {
            bad(
                &what,
                format!("{handler} has no event in {stream} at or after {t}"),
            )
        })?,
    };
    let end = match until {
        None => last,
        Some(Point::Sequence(n)) => n.min(last),
        Some(Point::Time(t)) => first_at(js, stream, &h, t)
            .await?
            .map_or(last, |seq| seq.saturating_sub(1)),
    };
    if end < start {
        return Err(bad(&what, format!("the range {start}..={end} is empty")));
    }
    let ids = event_ids(js, stream, &h, start, end).await?;
    let mut handled = Vec::new();
    if h.idempotent
        && let Some(inbox) = crate::inbox::View::open(js, service).await
    {
        handled = inbox
            .handled(handler, &ids)
            .await
            .map_err(|e| AdminError::new(js, format!("the inbox of {service}"), e))?;
    }
    Ok(Plan {
        service: service.to_owned(),
        handler: handler.to_owned(),
        durable: h.durable.clone(),
        stream: h.stream.clone(),
        from: start,
        until: end,
        events: ids.len() as u64,
        already_handled: handled.len() as u64,
        rerun,
        handled,
        filter: h.filter.clone(),
        ordered: h.ordered,
    })
}

/// The durable a replay rewinds.
struct Target {
    durable: String,
    stream: String,
    filter: String,
    idempotent: bool,
    ordered: bool,
}

/// The handler from the registry, or, for a stopped service (whose
/// records are gone), from its durable on whichever stream holds it.
async fn target(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
    what: &str,
) -> Result<Target, AdminError> {
    let durable = crate::topology::consumer_name(service, handler);
    let manifests = super::manifests(js).await.map(|m| m.0).unwrap_or_default();
    if let Some(m) = manifests.iter().find(|m| m.service == service) {
        let Some(h) = m.handlers.iter().find(|h| h.name == handler) else {
            let known: Vec<&str> = m.handlers.iter().map(|h| h.name.as_str()).collect();
            return Err(bad(
                what,
                format!("service {service} has no handler {handler}; its handlers are {known:?}"),
            ));
        };
        return Ok(Target {
            durable,
            stream: h.consumes.stream.clone(),
            filter: h.consumes.subject_filter.clone(),
            idempotent: h.options.idempotent,
            ordered: h.options.partitions > 0,
        });
    }
    let mut names = js.stream_names();
    while let Some(Ok(stream)) = names.next().await {
        if stream.starts_with("KV_") || stream.starts_with("CHOREO_") {
            continue;
        }
        if let Ok(c) = js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(&durable, &stream)
            .await
        {
            let idempotent = js.get_key_value(inbox_bucket(service)).await.is_ok();
            return Ok(Target {
                durable,
                filter: c.cached_info().config.filter_subject.clone(),
                stream,
                idempotent,
                ordered: false,
            });
        }
    }
    let known: Vec<&str> = manifests.iter().map(|m| m.service.as_str()).collect();
    Err(bad(
        what,
        format!(
            "no service {service} in the registry (the services are {known:?}) and no durable {durable} on any stream"
        ),
    ))
}

/// The stream sequence of `h`'s first event at or after `t`.
async fn first_at(
    js: &jetstream::Context,
    stream: &str,
    h: &Target,
    t: time::OffsetDateTime,
) -> Result<Option<u64>, AdminError> {
    let mut msgs = ordered(
        js,
        stream,
        h,
        consumer::DeliverPolicy::ByStartTime { start_time: t },
    )
    .await?;
    match tokio::time::timeout(Duration::from_secs(1), msgs.next()).await {
        Ok(Some(Ok(m))) => Ok(m.info().ok().map(|i| i.stream_sequence)),
        _ => Ok(None),
    }
}

/// The ids of `h`'s events in `from..=until`, read headers only.
async fn event_ids(
    js: &jetstream::Context,
    stream: &str,
    h: &Target,
    from: u64,
    until: u64,
) -> Result<Vec<crate::EventId>, AdminError> {
    let mut msgs = ordered(
        js,
        stream,
        h,
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
    )
    .await?;
    let mut ids = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(1), msgs.next()).await {
        let Ok(info) = m.info() else { break };
        if info.stream_sequence > until {
            break;
        }
        if let Some(id) = m
            .headers
            .as_ref()
            .and_then(|hd| hd.get(crate::wire::headers::CE_ID))
            .and_then(|v| v.as_str().parse().ok())
        {
            ids.push(id);
        }
        if info.stream_sequence == until || info.pending == 0 {
            break;
        }
    }
    Ok(ids)
}

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    h: &Target,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<consumer::pull::Ordered, AdminError> {
    let what = || format!("stream {stream}");
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| AdminError::new(js, what(), crate::nats::source(e)))?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: h.filter.clone(),
            deliver_policy,
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| AdminError::new(js, what(), crate::nats::source(e)))?;
    c.messages()
        .await
        .map_err(|e| AdminError::new(js, what(), crate::nats::source(e)))
}

/// What [`replay`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum Rewound {
    /// The server reset the durable (nats-server 2.14+).
    Reset,
    /// The durable was deleted and made again at the start (`recreate`).
    Recreated,
    /// An ordered handler's events were copied into its partitions, in
    /// stream order (any server version).
    Requeued {
        /// How many.
        events: u64,
    },
}

/// Carries out `plan`: the marker, the inbox records (with `rerun`), and
/// the durable rewound by the server's reset, or with `recreate` (for
/// servers before 2.14, while none of the service's instances runs)
/// deleted and made again at the start.
///
/// # Errors
/// The server cannot do it: no consumer reset (use `recreate`), a live
/// instance while recreating, a refused request.
pub async fn replay(
    js: &jetstream::Context,
    plan: &Plan,
    recreate: bool,
) -> Result<Rewound, AdminError> {
    let what = format!("a replay of {}.{}", plan.service, plan.handler);
    let fail = |e: &dyn std::fmt::Display| bad(&what, e.to_string());
    if plan.ordered && recreate {
        return Err(bad(
            &what,
            format!(
                "{} is ordered: its events are copied into its partitions on any server, so --recreate does not apply; leave it out",
                plan.handler
            ),
        ));
    }
    if recreate {
        let live = crate::registry::instances(js)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.manifest.service == plan.service && !i.stale(crate::event::now_ms()))
            .count();
        if live > 0 {
            return Err(bad(
                &what,
                format!(
                    "{live} instances of {} are running; stop them before --recreate",
                    plan.service
                ),
            ));
        }
    }
    let store = match js.get_key_value(REPLAYS_BUCKET).await {
        Ok(s) => s,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: REPLAYS_BUCKET.to_owned(),
                description: "choreo: the ranges choreo replay rewound handlers over".to_owned(),
                history: 1,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?,
    };
    let mut marker = ReplayMarker {
        from: plan.from,
        until: plan.until,
        rerun: plan.rerun,
        at_ms: crate::event::now_ms(),
        rewound_at_ms: 0,
        ordered: plan.ordered,
        stream: plan.stream.clone(),
        durable: plan.durable.clone(),
    };
    let key = replay_key(&plan.service, &plan.handler);
    store
        .put(&key, serde_json::to_vec(&marker).unwrap_or_default().into())
        .await
        .map_err(|e| fail(&e))?;
    if plan.rerun
        && let Some(inbox) = crate::inbox::View::open(js, &plan.service).await
    {
        inbox
            .forget(&plan.handler, &plan.handled)
            .await
            .map_err(|e| fail(&e))?;
    }
    let rewound = rewind(js, plan, recreate, marker.at_ms).await?;
    // Say when the rewind happened, so that what waits for the replay to
    // be done (`replay_done`) knows the durable's floor is the new one.
    marker.rewound_at_ms = crate::event::now_ms();
    store
        .put(&key, serde_json::to_vec(&marker).unwrap_or_default().into())
        .await
        .map_err(|e| fail(&e))?;
    Ok(rewound)
}

/// The rewind itself: copies into an ordered handler's partitions, the
/// durable recreated at the start, or the server's consumer reset.
async fn rewind(
    js: &jetstream::Context,
    plan: &Plan,
    recreate: bool,
    at_ms: u64,
) -> Result<Rewound, AdminError> {
    let what = format!("a replay of {}.{}", plan.service, plan.handler);
    let fail = |e: &dyn std::fmt::Display| bad(&what, e.to_string());
    if plan.ordered {
        let events = super::requeue::requeue(js, plan, at_ms).await?;
        return Ok(Rewound::Requeued { events });
    }
    if recreate {
        let s = js.get_stream(&plan.stream).await.map_err(|e| fail(&e))?;
        let info = s
            .get_consumer::<consumer::pull::Config>(&plan.durable)
            .await
            .map_err(|e| fail(&e))?
            .cached_info()
            .config
            .clone();
        let old =
            <consumer::pull::Config as consumer::FromConsumer>::try_from_consumer_config(info)
                .map_err(|e| fail(&e))?;
        s.delete_consumer(&plan.durable)
            .await
            .map_err(|e| fail(&e))?;
        s.create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: plan.from,
            },
            ..old
        })
        .await
        .map_err(|e| fail(&e))?;
        return Ok(Rewound::Recreated);
    }
    // Running instances read the marker before their redeliveries start.
    tokio::time::sleep(MARKER_SEEN).await;
    let answer: serde_json::Value = js
        .request(
            format!("CONSUMER.RESET.{}.{}", plan.stream, plan.durable),
            &serde_json::json!({ "seq": plan.from }),
        )
        .await
        .map_err(|e| {
            bad(
                &what,
                format!("the server did not reset the durable ({e}); consumer reset needs nats-server 2.14+: on an older server stop the service's instances and use --recreate"),
            )
        })?;
    if let Some(err) = answer.get("error") {
        return Err(bad(
            &what,
            format!("the server refused to reset {}: {err}", plan.durable),
        ));
    }
    Ok(Rewound::Reset)
}
