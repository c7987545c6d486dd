//! The state of every handler of a running choreography, read from NATS
//! alone: the registry's instance records, each stream's `max_age` and
//! consumer list (two requests per stream for every handler on it), the
//! dead-letter
//! stream's per-subject counts (one request), and per handler with work
//! waiting, the oldest event not yet done (one request).
//!
//! A [`Snapshot`] is one reading; [`Status::judge`] compares two readings
//! and gives each handler a [`State`] by the rules documented on it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::read::{
    Reading, consumers_of, dead_letters, guarded, inbox_keys, merge_partitions, oldest_waiting,
    reading,
};
use super::{AdminError, read_registry};
use crate::registry::{self, HandlerManifest, Instance};
use crate::topology::DLQ_STREAM;

/// A handler's state, judged over the window between two readings.
///
/// The rules use no thresholds of their own; the only time they use is the
/// handler's own `ack_wait`, the time JetStream gives one delivery before it
/// counts it as lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum State {
    /// Live instances run it, and it keeps up: nothing waits, or what waits
    /// did not grow while the ack floor advanced.
    Ok,
    /// Live instances run it, and it falls behind: the events waiting (not
    /// yet delivered, or delivered and not yet done) grew over the window,
    /// or the ack floor did not advance while other events were done.
    Lagging,
    /// Events wait, the ack floor did not advance over the window, and no
    /// event was done for longer than the handler's `ack_wait`: nothing
    /// gets through.
    Stalled,
    /// No live instance runs it: every instance's record is stale (two
    /// missed heartbeats) or gone, while its durable consumer remains.
    Stopped,
}

impl State {
    /// `OK`, `LAGGING`, `STALLED` or `STOPPED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Lagging => "LAGGING",
            Self::Stalled => "STALLED",
            Self::Stopped => "STOPPED",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading of the whole choreography: see the module docs for what it
/// reads. Two of them make a [`Status`].
#[derive(Clone, Debug)]
pub struct Snapshot {
    taken_at_ms: u64,
    instances: Vec<Instance>,
    /// By durable name.
    readings: BTreeMap<String, Reading>,
    dead_letters: BTreeMap<String, u64>,
    outboxes: Vec<registry::OutboxReport>,
    /// What could not be read, one line each.
    problems: Vec<String>,
}

/// One service instance in a [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstanceStatus {
    /// Its service.
    pub service: String,
    /// Its instance id.
    pub instance: String,
    /// Its host.
    pub host: String,
    /// The choreo version it runs.
    pub choreo_version: String,
    /// When it started, Unix milliseconds.
    pub started_at_ms: u64,
    /// How long ago it last wrote its record, milliseconds.
    pub heartbeat_age_ms: u64,
    /// `false` once it missed two heartbeats.
    pub live: bool,
}

/// One handler in a [`Status`]. A figure is `None` when it could not be
/// read (the reason is in [`Status::problems`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlerStatus {
    /// Its service.
    pub service: String,
    /// The handler's name.
    pub handler: String,
    /// Its durable consumer.
    pub durable: String,
    /// The stream it reads.
    pub stream: String,
    /// Its state, by the rules on [`State`].
    pub state: State,
    /// Which rule gave the state, in words.
    pub reason: String,
    /// How many live instances run it.
    pub live_instances: usize,
    /// Events not yet delivered (the consumer's `num_pending`).
    pub pending: Option<u64>,
    /// Events delivered and not yet done (`num_ack_pending`).
    pub unacked: Option<u64>,
    /// Events delivered more than once and not yet done (`num_redelivered`).
    pub redelivered: Option<u64>,
    /// Events not yet done: `pending + unacked`.
    pub lag_messages: Option<u64>,
    /// How long the oldest event not yet done has been in the stream,
    /// seconds; 0 when nothing waits.
    pub lag_seconds: Option<f64>,
    /// Its letters in the dead-letter stream.
    pub dead_letters: u64,
    /// The keys it holds in the service's inbox bucket: its record groups
    /// in use and its live claims (what its inbox costs the server, about
    /// 350 bytes of memory each), not the events it remembers.
    pub inbox_keys: Option<u64>,
    /// For a deadline handler: its pending deadlines and the next to fire.
    #[serde(default)]
    pub deadlines: Option<super::deadlines::Pending>,
    /// For a deadline handler: its deadline as declared (`within`,
    /// `unless`, how B is matched).
    #[serde(default)]
    pub rule: Option<crate::registry::DeadlineManifest>,
    /// For a consumer choreo runs as part of a deadline handler (its
    /// schedule step or a B watcher): that handler's name. Such rows sort
    /// right after their handler's.
    #[serde(default)]
    pub part_of: Option<String>,
    /// How long until its stream's `max_age` removes the oldest event not
    /// yet done, seconds (0 or less: any moment now); `None` when nothing
    /// waits or the stream keeps every event. Once it is under half the
    /// age, [`reason`](Self::reason) says so too.
    #[serde(default)]
    pub removed_in_seconds: Option<f64>,
}

/// The state of a running choreography: its instances and every handler,
/// judged between two [`Snapshot`]s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// When the later reading was taken, Unix milliseconds.
    pub taken_at_ms: u64,
    /// The time between the two readings, milliseconds.
    pub window_ms: u64,
    /// Every instance in the registry, live and stale.
    pub instances: Vec<InstanceStatus>,
    /// Every handler, by service and name.
    pub handlers: Vec<HandlerStatus>,
    /// The outboxes services keep in their own database
    /// (`choreo-postgres`), as their relays last reported them.
    #[serde(default)]
    pub outboxes: Vec<registry::OutboxReport>,
    /// What could not be read, one line each.
    pub problems: Vec<String>,
}

/// Reads the choreography twice, `window` apart, and judges each handler.
///
/// ```no_run
/// # async fn demo(js: choreo::async_nats::jetstream::Context) -> Result<(), choreo::admin::AdminError> {
/// let status = choreo::admin::status(&js, std::time::Duration::from_secs(1)).await?;
/// for h in &status.handlers {
///     println!("{} {} {} lag={:?}", h.service, h.handler, h.state, h.lag_messages);
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
/// The registry cannot be read (no service ever started on this server,
/// or the credentials may not read its bucket).
pub async fn status(js: &jetstream::Context, window: Duration) -> Result<Status, AdminError> {
    let before = Snapshot::take(js).await?;
    tokio::time::sleep(window).await;
    let after = Snapshot::take(js).await?;
    Ok(Status::judge(&before, &after))
}

impl Snapshot {
    /// Reads the registry, every consumer on the streams it names, the
    /// dead-letter counts and the inbox record counts.
    ///
    /// # Errors
    /// The registry cannot be read. Anything else that cannot be read
    /// leaves its figures empty and says why in [`Status::problems`].
    pub async fn take(js: &jetstream::Context) -> Result<Snapshot, AdminError> {
        let instances = read_registry(js).await?;
        let mut problems = Vec::new();
        let manifests = newest_manifests(&instances);
        let mut streams: BTreeSet<String> = BTreeSet::new();
        for (service, h) in manifests
            .values()
            .flat_map(|m| m.handlers.iter().map(move |h| (&m.service, h)))
        {
            streams.insert(h.consumes.stream.clone());
            if h.options.partitions > 0 {
                streams.insert(crate::topology::ordered::stream_name(service, &h.name));
            }
        }
        // A stopped service's record is gone, but its durable is on a stream
        // another service reads or a publisher writes.
        for p in registry::publishers(js).await.unwrap_or_default() {
            streams.insert(p.event.stream);
        }
        let mut readings = BTreeMap::new();
        let lists = futures::future::join_all(streams.iter().map(|s| consumers_of(js, s))).await;
        for (s, list) in streams.iter().zip(lists) {
            match list {
                Ok((max_age, infos)) => {
                    for info in infos {
                        if let Some(mut r) = reading(&info) {
                            r.max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
                            readings.insert(r.durable.clone(), r);
                        }
                    }
                }
                Err(e) => problems.push(format!("cannot list the consumers of stream {s}: {e}")),
            }
        }
        merge_partitions(&manifests, &mut readings);
        let filters: BTreeMap<&str, &str> = manifests
            .values()
            .flat_map(|m| &m.handlers)
            .map(|h| (h.durable.as_str(), h.consumes.subject_filter.as_str()))
            .collect();
        let extra =
            futures::stream::iter(readings.values_mut()).for_each_concurrent(16, |r| async {
                if r.pending + r.unacked > 0 {
                    let filter = filters.get(r.durable.as_str()).copied().unwrap_or(">");
                    r.oldest_waiting_ms =
                        guarded(js, async { Ok(oldest_waiting(js, r, filter).await) })
                            .await
                            .ok()
                            .flatten();
                }
                r.inbox_keys = guarded(js, async {
                    Ok(inbox_keys(js, &r.service, &r.handler).await)
                })
                .await
                .ok()
                .flatten();
                if r.stream == crate::deadline::STREAM {
                    r.deadlines = super::deadlines::pending(js, &r.service, &r.handler)
                        .await
                        .ok();
                }
            });
        extra.await;
        let dead_letters = match guarded(js, dead_letters(js)).await {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("cannot count the dead letters ({DLQ_STREAM}): {e}"));
                BTreeMap::new()
            }
        };
        // No report: no service keeps an outbox of its own.
        let outboxes = registry::outboxes(js).await.unwrap_or_default();
        Ok(Snapshot {
            taken_at_ms: crate::event::now_ms(),
            instances,
            readings,
            dead_letters,
            outboxes,
            problems,
        })
    }
}

/// Each service's manifest from its newest instance (instances run the same
/// code, or are being rolled out, and then the newest start wins).
fn newest_manifests(instances: &[Instance]) -> BTreeMap<String, &registry::Manifest> {
    let mut sorted: Vec<&Instance> = instances.iter().collect();
    sorted.sort_by_key(|i| i.started_at_ms);
    sorted
        .into_iter()
        .map(|i| (i.manifest.service.clone(), &i.manifest))
        .collect()
}

impl Status {
    /// Judges each handler by comparing two readings of the same
    /// choreography, `before` taken first; see [`State`] for the rules.
    pub fn judge(before: &Snapshot, after: &Snapshot) -> Status {
        let now = after.taken_at_ms;
        let window_ms = after.taken_at_ms.saturating_sub(before.taken_at_ms);
        let instances: Vec<InstanceStatus> = after
            .instances
            .iter()
            .map(|i| InstanceStatus {
                service: i.manifest.service.clone(),
                instance: i.instance.clone(),
                host: i.host.clone(),
                choreo_version: i.manifest.choreo_version.clone(),
                started_at_ms: i.started_at_ms,
                heartbeat_age_ms: now.saturating_sub(i.heartbeat_at_ms),
                live: !i.stale(now),
            })
            .collect();
        let manifests = newest_manifests(&after.instances);
        let handlers_of: BTreeMap<&str, &HandlerManifest> = manifests
            .values()
            .flat_map(|m| &m.handlers)
            .map(|h| (h.durable.as_str(), h))
            .collect();
        let mut durables: BTreeSet<&str> = handlers_of.keys().copied().collect();
        durables.extend(after.readings.keys().map(String::as_str));
        let handlers = durables
            .into_iter()
            .filter_map(|d| {
                let manifest = handlers_of.get(d).copied();
                let now_r = after.readings.get(d);
                let then_r = before.readings.get(d);
                let (service, handler) = match (manifest, now_r) {
                    (_, Some(r)) => (r.service.clone(), r.handler.clone()),
                    (Some(_), None) => d
                        .split_once("--")
                        .map(|(s, h)| (s.to_owned(), h.to_owned()))?,
                    (None, None) => return None,
                };
                let live_instances = after
                    .instances
                    .iter()
                    .filter(|i| !i.stale(now) && i.manifest.handlers.iter().any(|h| h.durable == d))
                    .count();
                let ack_wait_ms = manifest.map_or(30_000, |m| m.options.ack_wait_ms);
                let (state, mut reason) = judge(then_r, now_r, live_instances, ack_wait_ms, now);
                let lag_seconds = now_r.map(|r| {
                    r.oldest_waiting_ms
                        .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0)
                });
                // When the stream's age removes the oldest waiting event.
                let removed_at_ms = now_r
                    .filter(|r| r.max_age_ms > 0)
                    .and_then(|r| Some(r.oldest_waiting_ms? + r.max_age_ms));
                let removed_in_seconds = removed_at_ms.map(|at| (at as f64 - now as f64) / 1000.0);
                if let (Some(at), Some(r)) = (removed_at_ms, now_r)
                    && at.saturating_sub(now) * 2 < r.max_age_ms
                {
                    reason.push_str(&format!(
                        "; its oldest waiting event is removed unread {} (stream {}'s max_age)",
                        crate::event::human_until(Duration::from_millis(at.saturating_sub(now))),
                        r.stream
                    ));
                }
                let dead_letters = after
                    .dead_letters
                    .get(&crate::topology::dlq_subject(&service, &handler))
                    .copied()
                    .unwrap_or(0);
                Some(HandlerStatus {
                    stream: manifest
                        .map(|m| m.consumes.stream.clone())
                        .or_else(|| now_r.map(|r| r.stream.clone()))
                        .unwrap_or_default(),
                    durable: d.to_owned(),
                    state,
                    reason,
                    live_instances,
                    pending: now_r.map(|r| r.pending),
                    unacked: now_r.map(|r| r.unacked),
                    redelivered: now_r.map(|r| r.redelivered),
                    lag_messages: now_r.map(|r| r.pending + r.unacked),
                    lag_seconds,
                    removed_in_seconds,
                    dead_letters,
                    inbox_keys: now_r.and_then(|r| r.inbox_keys),
                    deadlines: now_r.and_then(|r| r.deadlines.clone()),
                    rule: manifest.and_then(|m| m.deadline.clone()),
                    part_of: manifest.and_then(|m| m.part_of.clone()),
                    service,
                    handler,
                })
            })
            .collect::<Vec<_>>();
        let mut handlers = handlers;
        watchers_behind(&mut handlers);
        let mut problems = before.problems.clone();
        problems.extend(after.problems.iter().cloned());
        problems.dedup();
        Status {
            taken_at_ms: now,
            window_ms,
            instances,
            handlers,
            outboxes: after.outboxes.clone(),
            problems,
        }
    }
}

/// Gives each deadline handler what its B watchers (its helpers
/// `<handler>__met_<B>` in the same service) have yet to handle: a
/// deadline waits for them before it fires.
fn watchers_behind(handlers: &mut [HandlerStatus]) {
    let behind: Vec<(usize, u64, u64)> = handlers
        .iter()
        .enumerate()
        .filter(|(_, h)| h.deadlines.is_some())
        .map(|(i, d)| {
            let prefix = format!("{}__met_", d.handler);
            let (waiting, secs) = handlers
                .iter()
                .filter(|w| w.service == d.service && w.handler.starts_with(&prefix))
                .fold((0, 0.0_f64), |(n, s), w| {
                    (
                        n + w.lag_messages.unwrap_or(0),
                        s.max(w.lag_seconds.unwrap_or(0.0)),
                    )
                });
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            (i, waiting, (secs * 1000.0) as u64)
        })
        .collect();
    for (i, waiting, ms) in behind {
        if let Some(d) = handlers[i].deadlines.as_mut() {
            d.watchers_waiting = waiting;
            d.watchers_behind_ms = ms;
        }
    }
}

/// The rules of [`State`], applied to one handler.
fn judge(
    before: Option<&Reading>,
    after: Option<&Reading>,
    live_instances: usize,
    ack_wait_ms: u64,
    now_ms: u64,
) -> (State, String) {
    if live_instances == 0 {
        return (State::Stopped, "no live instance runs it".to_owned());
    }
    let Some(after) = after else {
        return (State::Stalled, "its durable consumer is missing".to_owned());
    };
    let waiting = after.pending + after.unacked;
    if waiting == 0 {
        return (State::Ok, "nothing waits".to_owned());
    }
    let before = before.unwrap_or(after);
    let floor_moved = after.ack_floor > before.ack_floor;
    let quiet_ms = now_ms.saturating_sub(after.last_ack_ms);
    let events = crate::event::counted(waiting, "event");
    let human = |ms: u64| crate::event::human_duration(Duration::from_millis(ms));
    if !floor_moved && quiet_ms > ack_wait_ms {
        let oldest = after.oldest_waiting_ms.map_or_else(String::new, |t| {
            format!(", the oldest for {}", human(now_ms.saturating_sub(t)))
        });
        return (
            State::Stalled,
            format!(
                "{events} wait{oldest}, and none was finished for longer than its ack_wait of {}",
                human(ack_wait_ms)
            ),
        );
    }
    let grew = waiting > before.pending + before.unacked;
    if grew {
        return (
            State::Lagging,
            format!(
                "the events waiting grew from {} to {waiting}",
                before.pending + before.unacked
            ),
        );
    }
    if !floor_moved {
        return (
            State::Lagging,
            format!("{events} wait and the ack floor did not advance"),
        );
    }
    (State::Ok, format!("{events} wait and it keeps up"))
}
