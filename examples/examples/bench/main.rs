//! choreo against hand-written async-nats, in one run, against one local
//! nats-server per case (started by choreo-testkit, so each side starts clean).
//!
//! ```sh
//! cargo run --release -p choreo-examples --example bench
//! cargo run --release -p choreo-examples --example bench -- --events 5000 --latency-events 1000
//! cargo run --release -p choreo-examples --example bench -- --only publish --side choreo
//! ```
//!
//! `--events` (20,000) sets the events per throughput run,
//! `--latency-events` (10,000) and `--rate` (1,000/s) the chain's roots,
//! `--only <case>` runs one case, `--repeat <n>` sets the runs per side, and
//! `--side choreo|raw` runs one side only (for a profiler).
//! `--url nats://… [--creds FILE] [--replicas N]` runs the handler cases
//! against that server or cluster instead of local ones, and deletes every
//! stream each run made.
//! `--inbox-groups G` spreads choreo's inbox records over G groups instead
//! of the default 65,536: with G well below `--events`, each group holds
//! `events / G` records, as a default inbox does at `events / G × 65,536`
//! remembered events (its steady state under load). Before each inbox-on
//! run, every group gets `--inbox-prefill R` records of other events
//! (default 9: one event a second over the default 7-day horizon in the
//! default 65,536 groups, the steady state the defaults are sized for;
//! R = 90 is a handler at 10 events/s), so the inbox-on cases run against
//! a full inbox; `handler_inbox` is also run on a new inbox (a second
//! line). The raw relay's bucket starts empty either way.
//!
//! Cases, each run with choreo's default settings and with raw async-nats
//! doing the same work (the same headers, CBOR payloads and acks and, where
//! the inbox is on, the same key-value read before and write after each
//! event) written the fast way: pipelined publishes, ~256 messages in
//! flight, plain acks.
//!
//! - `publish`: N keyed events published with dedup ids, every PubAck
//!   awaited: choreo's `Publisher::publish_all` against the raw loop, both
//!   sending in order and awaiting the acks apart.
//! - `publish_each`: the same events, one `Publisher::publish` future each,
//!   256 polled at once, against raw publishes driven the same way.
//! - `publish_pattern` (only with `--only`): the raw loop driven both ways,
//!   what the pattern costs apart from choreo.
//! - `aggregate_decide`: N decisions on N aggregates, 256 at once, each a
//!   load and an append guarded by `Nats-Expected-Last-Subject-Sequence`,
//!   against the same by hand (a batched direct get, a publish with the
//!   same headers).
//! - `postgres_handler`: a Postgres handler (`choreo-postgres`: its effect
//!   row, inbox row and emission's outbox row in one transaction, then the
//!   publish, the row's delete and the ack) against a hand-written
//!   async-nats + sqlx consumer doing the same SQL, publish and delete, on
//!   a real Postgres the testkit starts.
//! - `storefront`: requests per second of the shop storefront's `POST
//!   /orders` (a process of its own; this one generates the load over 32
//!   keep-alive connections) with the outbox, against the same endpoint
//!   committing the row and then publishing (the unsafe dual write), at
//!   most 10,000 requests a side, each side first in every other pair;
//!   each side's latency from the order's commit to its event stored, and
//!   its CPU per request by process.
//! - `console`: `choreo console` (the release binary, built with `cargo
//!   build --release -p choreo-cli`) over 100 handlers: the main view's
//!   server time (p50, p99), one reading of the system against raw
//!   async-nats listing the same consumers and registry keys, and the
//!   page's heap and the console's memory over `--console-minutes` (1) of
//!   live updates in headless Chromium.
//! - `postgres_relay` (only with `--only`): the latency from a Postgres
//!   handler's commit to its emission stored, and from rows a process left
//!   in the outbox (it died between its commit and its publish) to the
//!   relay's stored copy, with the default relay options; p50 and p99.
//! - `aggregate_append`: N decisions on N aggregates this process holds in
//!   memory (created before the clock starts), 256 at once: the append
//!   guarded by `Nats-Expected-Last-Subject-Sequence` alone, against raw
//!   async-nats publishing with the same headers.
//! - `aggregate_hot`: decisions per second on one aggregate with 2 and 8
//!   writers, each its own instance, and 8 sharing one `Aggregates`, and
//!   the share of attempts that conflicted (no raw side).
//! - `aggregate_load`: loading a 10,000-event aggregate against a
//!   hand-written batched read that decodes and sums the same events, and
//!   the load from a snapshot in ms.
//! - `handler`: a 1-hop handler (consume → emit one event → ack), inbox off.
//! - `handler_inbox`: the same with choreo's inbox on, its groups full (see
//!   `--inbox-prefill`), then on a new inbox; the raw relay reads
//!   the event's key first (skipping the event when it is there) and writes
//!   it once the emission is acked, which is the least an idempotent
//!   handler that survives a crash can do by hand.
//! - `handler_inbox_cluster`: `handler_inbox` on a 3-node cluster, every
//!   stream and bucket with 3 replicas, on both sides.
//! - `latency`: a 3-hop chain at a fixed rate, each hop as `handler_inbox`;
//!   end-to-end p50 and p99.
//! - `handler_metrics`: the 1-hop handler (inbox off) with a Prometheus
//!   metrics recorder taking choreo's metrics, against the same handler
//!   with none: the price of the metrics (its ratio is on / off).
//! - `replay`: the 1-hop handler (inbox on) over N events live, its inbox
//!   groups each holding a record of another event (its steady state), then
//!   `choreo::admin::replay` with `rerun` over those N while it runs: the
//!   replay's rate against the live rate, in the same run.
//! - `ordered`: N steps of 1,000 accounts through a 1-hop handler with the
//!   inbox on, its groups full (see `--inbox-prefill`), `ordered_by =
//!   account` (16 partitions) against the same
//!   handler in any order: the price of order on many keys (choreo on both
//!   sides; its ratio is ordered / any order).
//! - `ordered_4` (only with `--only`): the same with `partitions = 4`
//!   against any order: what a partition costs.
//! - `keyed_stream` (only with `--only`): the `ordered` case's handler in
//!   any order, its events in a stream of their own whose one subject is
//!   the handler's filter (`benchord.*.stepped`), against the same on the
//!   stream choreo makes (`benchord.>`): what the server spends matching a
//!   filter against 1,000 subjects per event (its ratio is own / shared).
//! - `handler_inbox_grouped`: the inbox-on handler against a raw relay
//!   keeping its records grouped as choreo does (same hash, groups,
//!   encoding, compare-and-set, as full): choreo's code apart from the
//!   layout. `layout` (only with `--only`): that raw relay against the
//!   per-key one, the layout's own price; `layout_unchecked` (only with
//!   `--only`): the same with plain puts instead of compare-and-sets (not
//!   safe), the check's price; `layout_appended` (only with `--only`): a
//!   raw relay appending each record as a message of its own under its
//!   group's subject (no rewrite, no compare-and-set; the look-up reads
//!   the group's messages with one batched direct get), against the
//!   per-key one.
//! - `handler_inbox_grouped_cluster`, `layout_cluster` (only with
//!   `--only`): the same two comparisons on the 3-node cluster, R3.
//! - `handler_inbox_write_only`, `latency_write_only`: the same, against a
//!   raw relay that writes the key but never reads it. Not the same work
//!   (a copy of an event is emitted again), shown to price the read: no
//!   ratio line.
//!
//! It prints a table and one `ratio <case> <value>` line per case: choreo
//! throughput / raw throughput (for latency: raw p99 / choreo p99), so 1.0
//! means no overhead. Each case runs `--repeat` times (5) per side on fresh
//! servers, the two sides one after the other (which goes first
//! alternates). The table shows each side's median; the ratio is the median
//! of the ratios of the pairs (a pair shares the machine's state of the
//! moment). Under the table, each run's CPU per event, client and server, is
//! printed too.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use choreo::{Context, Event, Publisher, Service, StreamSettings, event, event_handler};
use choreo_testkit::NatsServer;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, Semaphore};

mod aggregates;
mod breakdown;
mod console;
mod postgres;
mod storefront;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const IN_FLIGHT: usize = 256;

// ---- a metrics recorder that can be switched on and off ---------------------

/// Whether the recorder hands out real handles. choreo takes its handles
/// when a service starts, so a service started while it is off records
/// nothing: one process can run both sides of `handler_metrics`.
static METRICS_ON: AtomicBool = AtomicBool::new(false);

struct Switch(metrics_exporter_prometheus::PrometheusRecorder);

impl metrics::Recorder for Switch {
    fn describe_counter(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.describe_counter(k, u, d);
    }
    fn describe_gauge(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.describe_gauge(k, u, d);
    }
    fn describe_histogram(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.0.describe_histogram(k, u, d);
    }
    fn register_counter(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Counter {
        if METRICS_ON.load(Ordering::Relaxed) {
            self.0.register_counter(key, m)
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Gauge {
        if METRICS_ON.load(Ordering::Relaxed) {
            self.0.register_gauge(key, m)
        } else {
            metrics::Gauge::noop()
        }
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        m: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if METRICS_ON.load(Ordering::Relaxed) {
            self.0.register_histogram(key, m)
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// The 1-hop handler with the recorder on or off.
async fn handler_with_metrics(n: u64, on: bool) -> Result<f64, BoxError> {
    METRICS_ON.store(on, Ordering::Relaxed);
    let rate = choreo_handler(n, false).await;
    METRICS_ON.store(false, Ordering::Relaxed);
    rate
}

// ---- events --------------------------------------------------------------------

/// The root event (about 128 bytes with its CBOR field names).
#[event(subject = "bench.{id}.placed", key = id)]
#[derive(Clone, Debug)]
pub struct BenchPlaced {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

/// What the 1-hop handler emits.
#[event(subject = "benchout.{id}.relayed")]
#[derive(Clone, Debug)]
pub struct BenchRelayed {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

/// Chain hop 1.
#[event(subject = "hop1.{id}.seen")]
pub struct Hop1Seen {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

/// Chain hop 2.
#[event(subject = "hop2.{id}.seen")]
pub struct Hop2Seen {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

/// Chain hop 3, the end.
#[event(subject = "hop3.{id}.seen")]
pub struct Hop3Seen {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

fn note() -> String {
    "x".repeat(64)
}

// ---- choreo handlers --------------------------------------------------------------

#[event_handler(idempotent = false)]
async fn relay(e: BenchPlaced, ctx: Context) {
    ctx.emit(BenchRelayed {
        id: e.id,
        note: e.note,
    });
}

#[event_handler]
async fn relay_inbox(e: BenchPlaced, ctx: Context) {
    ctx.emit(BenchRelayed {
        id: e.id,
        note: e.note,
    });
}

#[event_handler]
async fn hop1(e: BenchPlaced, ctx: Context) {
    ctx.emit(Hop1Seen {
        id: e.id,
        note: e.note,
    });
}

#[event_handler]
async fn hop2(e: Hop1Seen, ctx: Context) {
    ctx.emit(Hop2Seen {
        id: e.id,
        note: e.note,
    });
}

#[event_handler]
async fn hop3(e: Hop2Seen, ctx: Context) {
    ctx.emit(Hop3Seen {
        id: e.id,
        note: e.note,
    });
}

/// One step of one account, for the ordered case.
#[event(subject = "benchord.{account}.stepped", key = (account, n))]
pub struct BenchStep {
    /// The account: what the ordered handler orders by.
    pub account: String,
    /// The step.
    pub n: u64,
    /// Filler.
    pub note: String,
}

#[event_handler(name = "step")]
async fn step_any_order(e: BenchStep, ctx: Context) {
    ctx.emit(BenchRelayed {
        id: e.n,
        note: e.note,
    });
}

#[event_handler(name = "step", ordered_by = account)]
async fn step_in_order(e: BenchStep, ctx: Context) {
    ctx.emit(BenchRelayed {
        id: e.n,
        note: e.note,
    });
}

#[event_handler(name = "step", ordered_by = account, partitions = 4)]
async fn step_in_order_on_4(e: BenchStep, ctx: Context) {
    ctx.emit(BenchRelayed {
        id: e.n,
        note: e.note,
    });
}

/// How the steps are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepOrder {
    /// In any order.
    Any,
    /// `ordered_by = account`, on the default 16 partitions.
    Ordered,
    /// The same on 4 partitions.
    OrderedOn4,
}

/// The stream the steps are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepStream {
    /// The one choreo makes: subjects `benchord.>`, which any event type
    /// whose subject starts with `benchord` shares.
    Shared,
    /// A stream of this event type only, its one subject the handler's
    /// filter (`benchord.*.stepped`).
    Exact,
}

/// `n` steps of 1,000 accounts through the 1-hop handler (inbox on, its
/// groups holding `--inbox-prefill` records each), ordered by account or
/// not: the price of order on many keys.
async fn choreo_steps(n: u64, order: StepOrder, stream: StepStream) -> Result<f64, BoxError> {
    use futures::{StreamExt, TryStreamExt};
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    breakdown::watch(
        &client,
        server.pid().into_iter().collect(),
        vec![server.monitor_port()],
    );
    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(client.clone(), "bench")?;
    publisher.ensure_stream::<BenchRelayed>().await?;
    if stream == StepStream::Exact {
        // Made before choreo would make it: choreo uses a stream that
        // exists and stores the event's subjects, as it is.
        js.create_stream(stream::Config {
            name: BenchStep::STREAM.into(),
            subjects: vec![BenchStep::SUBJECT_FILTER.into()],
            ..Default::default()
        })
        .await?;
    }
    futures::stream::iter(0..n)
        .map(|i| {
            let p = publisher.clone();
            async move {
                p.publish(&BenchStep {
                    account: format!("acct-{}", i % 1000),
                    n: i,
                    note: note(),
                })
                .await
            }
        })
        .buffered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    // The inbox in its steady state, as for `handler_inbox`: every group
    // already holds `--inbox-prefill` records of other events.
    let prefill = PREFILL.load(Ordering::Relaxed);
    if prefill > 0 {
        prefill_groups(&js, ("choreo_inbox_steps", "step"), prefill, 1).await?;
    }
    let svc = Service::new("steps").inbox_groups(inbox_groups());
    let svc = match order {
        StepOrder::Any => svc.handler(step_any_order),
        StepOrder::Ordered => svc.handler(step_in_order),
        StepOrder::OrderedOn4 => svc.handler(step_in_order_on_4),
    };
    let started = (Instant::now(), cpu_seconds());
    let handle = svc.start(client.clone()).await?;
    let stats = || handle.stats("step").map_or(0, |s| s.handled());
    let what = match (order, stream) {
        (StepOrder::Ordered, _) => "choreo ordered handler",
        (StepOrder::OrderedOn4, _) => "choreo ordered handler, 4 partitions",
        (StepOrder::Any, StepStream::Shared) => "choreo handler, any order",
        (StepOrder::Any, StepStream::Exact) => "choreo handler, any order, a stream of its own",
    };
    let rate = rate_until(stats, n, what, started).await?;
    handle.shutdown().await;
    // Every step emitted once and recorded once, besides the prefill.
    let recorded = records_besides(&js, ("steps", "step"), prefill).await?;
    check_work(
        &js,
        what,
        <BenchRelayed as choreo::Event>::STREAM,
        n,
        Some(recorded),
    )
    .await?;
    // An ordered run had the partitions it says: one durable each.
    let partitions = match order {
        StepOrder::Any => None,
        StepOrder::Ordered => Some(16),
        StepOrder::OrderedOn4 => Some(4),
    };
    if let Some(expected) = partitions {
        let durables = js
            .get_stream("CHOREO_ORDERED_steps_step")
            .await?
            .info()
            .await?
            .state
            .consumer_count;
        if durables != expected {
            return Err(format!("{what}: {durables} partition durables, not {expected}").into());
        }
    }
    // The run was on the stream it says.
    let subjects = js
        .get_stream(BenchStep::STREAM)
        .await?
        .info()
        .await?
        .config
        .subjects
        .clone();
    let expected = match stream {
        StepStream::Shared => BenchStep::STREAM_SUBJECTS,
        StepStream::Exact => BenchStep::SUBJECT_FILTER,
    };
    if subjects != [expected] {
        return Err(
            format!("{what}: the stream's subjects are {subjects:?}, not [{expected}]").into(),
        );
    }
    Ok(rate)
}

/// The 1-hop handler (inbox on) in a handler's steady state, then `choreo
/// replay --rerun` over what it just handled, while it runs: (live rate on a
/// new inbox, live rate, replay rate). A first service handles `n` events
/// into a new inbox (its rate is the first figure, not compared) and stops.
/// Every inbox group is then given `--inbox-prefill` records (at least one)
/// of other events, as a handler's groups hold them once it has run for a
/// while; `n` more events are published, and a second service handles them
/// (the live rate); then the second `n` are replayed with `rerun`, the
/// service still running. So the live run and the replay both write over
/// groups that exist. The replay's rate counts from the durable's reset to
/// the last event handled again (the 6 s it waits for instances to see its
/// marker is not in it).
async fn live_then_replay(n: u64) -> Result<(f64, f64, f64), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(client.clone(), "bench")?;
    publisher.ensure_stream::<BenchPlaced>().await?;
    publisher.ensure_stream::<BenchRelayed>().await?;
    let service = || Service::new("relay").handler(relay_inbox);
    raw_publish_range(&js, "bench", "BenchPlaced", 0..n).await?;
    let started = (Instant::now(), cpu_seconds());
    let first = service().start(client.clone()).await?;
    let handled = |h: &choreo::ServiceHandle| h.stats("relay_inbox").map_or(0, |s| s.handled());
    let new_inbox = rate_until(|| handled(&first), n, "live handler, new inbox", started).await?;
    first.shutdown().await;
    prefill_inbox(&js, PREFILL.load(Ordering::Relaxed).max(1), 1).await?;
    raw_publish_range(&js, "bench", "BenchPlaced", n..2 * n).await?;
    let started = (Instant::now(), cpu_seconds());
    let handle = service().start(client.clone()).await?;
    let live = rate_until(|| handled(&handle), n, "live handler", started).await?;
    let plan = choreo::admin::plan(
        &js,
        "relay",
        "relay_inbox",
        choreo::admin::Point::Sequence(n + 1),
        None,
        true,
    )
    .await?;
    if plan.events != n || plan.already_handled != n {
        return Err(format!(
            "the replay plan has {} events, {} handled; expected {n} of each",
            plan.events, plan.already_handled
        )
        .into());
    }
    let t = Instant::now();
    choreo::admin::replay(&js, &plan, false).await?;
    eprintln!(
        "  choreo::admin::replay (the marker, {n} records forgotten, the reset): {:.1?}, 6 s of it waiting for instances to see the marker",
        t.elapsed()
    );
    let started = (Instant::now(), cpu_seconds());
    let again = || handled(&handle).saturating_sub(n);
    let replay = rate_until(again, n, "replay --rerun", started).await?;
    handle.shutdown().await;
    Ok((new_inbox, live, replay))
}

// ---- the raw side: the same wire format, by hand ------------------------------------

#[derive(serde::Serialize, serde::Deserialize)]
struct RawEvent {
    id: u64,
    note: String,
}

const NS: uuid::Uuid = uuid::uuid!("d4d24400-673e-5162-8b61-a6388e27565d");

fn v5(parts: &[&[u8]]) -> uuid::Uuid {
    let mut name = Vec::with_capacity(64);
    for p in parts {
        name.extend_from_slice(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_be_bytes());
        name.extend_from_slice(p);
    }
    uuid::Uuid::new_v5(&NS, &name)
}

fn raw_headers(
    id: &str,
    ty: &str,
    source: &str,
    correlation: &str,
    causation: Option<&str>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", id);
    h.insert("ce-type", ty);
    h.insert("ce-source", source);
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    h.insert("ce-time", now);
    h.insert("ce-eventversion", "1");
    h.insert("ce-correlationid", correlation);
    if let Some(c) = causation {
        h.insert("ce-causationid", c);
    }
    h.insert("content-type", "application/cbor");
    h
}

fn cbor(e: &RawEvent) -> bytes::Bytes {
    let mut out = Vec::with_capacity(128);
    ciborium::into_writer(e, &mut out).unwrap_or_default();
    out.into()
}

async fn raw_stream(js: &jetstream::Context, name: &str, subject: &str) -> Result<(), BoxError> {
    raw_stream_r(js, name, subject, 1).await
}

async fn raw_stream_r(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
) -> Result<(), BoxError> {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Publishes `n` root events the fast way: pipelined, IN_FLIGHT acks pending.
async fn raw_publish(
    js: &jetstream::Context,
    prefix: &str,
    ty: &str,
    n: u64,
) -> Result<(), BoxError> {
    raw_publish_range(js, prefix, ty, 0..n).await
}

/// [`raw_publish`] of the events keyed `keys`.
async fn raw_publish_range(
    js: &jetstream::Context,
    prefix: &str,
    ty: &str,
    keys: std::ops::Range<u64>,
) -> Result<(), BoxError> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in keys {
        let key = i.to_string();
        let id = v5(&[b"key", ty.as_bytes(), key.as_bytes()]).to_string();
        let h = raw_headers(&id, ty, "bench", &id, None);
        let payload = cbor(&RawEvent {
            id: i,
            note: note(),
        });
        acks.push(
            js.publish_with_headers(format!("{prefix}.{i}.placed"), h, payload)
                .await?
                .into_future(),
        );
        if acks.len() >= IN_FLIGHT {
            acks.next().await.transpose()?;
        }
    }
    while let Some(a) = acks.next().await {
        a?;
    }
    Ok(())
}

/// A hand-written relay: consume from `stream`, emit one event on
/// What a raw relay does with its key-value bucket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawKv {
    /// No bucket (the inbox-off cases).
    Off,
    /// The same work as choreo's inbox: read the event's key first (skip
    /// the event when found), write it after the emission is acked.
    ReadThenWrite,
    /// Write the key after the emission, never read it: not idempotent (a
    /// copy is emitted again, and its write then fails), shown for
    /// comparison.
    WriteOnly,
    /// choreo's layout by hand: records grouped many to a key (the same
    /// hash, groups and encoding), read first, written back with a
    /// compare-and-set on the group's revision (retried on a conflict).
    /// What the layout costs the server, apart from choreo's code.
    Grouped,
    /// The same, written back with a plain put instead of a
    /// compare-and-set: not safe (two instances writing one group at once
    /// lose a record), shown to price the check.
    GroupedUnchecked,
    /// Records appended, one message each, under their group's subject in
    /// a bucket that keeps up to 64 messages per subject: the look-up
    /// reads the group's messages with one batched direct get, the record
    /// is a plain publish (no rewrite, so no compare-and-set). A layout
    /// tried for the full inbox, priced against the per-key relay.
    Appended,
}

/// `<out>.<id>.seen` with causation headers, optionally write a KV record,
/// ack. IN_FLIGHT messages at once.
#[derive(Clone)]
struct RawRelay {
    js: jetstream::Context,
    out_prefix: &'static str,
    out_type: &'static str,
    handler: &'static str,
    kv: Option<kv::Store>,
    /// With `kv`: read the event's key before handling it and skip the
    /// event when it is there, as choreo's inbox does (and as any
    /// hand-written idempotent handler must). Without, the record is only
    /// written, never read: cheaper, but a copy is handled (and emitted)
    /// again.
    read_first: bool,
    /// With `kv`: records grouped as choreo groups them, over this many
    /// groups ([`RawKv::Grouped`]).
    groups: Option<u32>,
    /// Grouped records are written back with a plain put
    /// ([`RawKv::GroupedUnchecked`]).
    unchecked: bool,
    /// With `groups`: records appended one message each
    /// ([`RawKv::Appended`]), their batched reads' answers routed here.
    appended: Option<Arc<AnswerRouter>>,
    done: Arc<AtomicU64>,
}

impl RawRelay {
    async fn run(
        self,
        stream: &str,
        durable: &str,
    ) -> Result<tokio::task::JoinHandle<()>, BoxError> {
        let consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_stream(stream)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some(durable.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_deliver: 5,
                max_ack_pending: 1024,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(IN_FLIGHT)
            .messages()
            .await?;
        Ok(tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            // Owned here, so aborting this task aborts the handling too (no
            // stray task outlives its run and its server).
            let mut handling = tokio::task::JoinSet::new();
            while let Some(Ok(msg)) = messages.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                while handling.try_join_next().is_some() {}
                let this = self.clone();
                handling.spawn(async move {
                    if let Err(e) = this.handle(&msg).await {
                        eprintln!("raw relay: {e}");
                        let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                    }
                    drop(permit);
                });
            }
        }))
    }

    async fn handle(&self, msg: &jetstream::Message) -> Result<(), BoxError> {
        let h = msg.headers.as_ref().ok_or("no headers")?;
        let cause = h.get("ce-id").ok_or("no ce-id")?.as_str();
        let corr = h
            .get("ce-correlationid")
            .ok_or("no ce-correlationid")?
            .as_str();
        let e: RawEvent = ciborium::from_reader(&msg.payload[..])?;
        let handler_id = self.handler;
        if let (Some(router), Some(groups)) = (&self.appended, self.groups) {
            return self
                .handle_appended(msg, router, groups, cause, corr, e)
                .await;
        }
        if let (Some(kv), Some(groups)) = (&self.kv, self.groups) {
            return self.handle_grouped(msg, kv, groups, cause, corr, e).await;
        }
        let key = format!("{handler_id}.{cause}");
        if let (Some(kv), true) = (&self.kv, self.read_first) {
            let seen = kv.entry(key.as_str()).await?;
            if seen.is_some_and(|e| e.operation == kv::Operation::Put) {
                return self.finish(msg).await;
            }
        }
        self.emit(cause, corr, e).await?;
        if let Some(kv) = &self.kv {
            kv.create(key, "done".into()).await?;
        }
        self.finish(msg).await
    }
}

impl RawRelay {
    /// Acks `msg` and counts it handled.
    async fn finish(&self, msg: &jetstream::Message) -> Result<(), BoxError> {
        msg.ack().await?;
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The emission for `e`, caused by `cause`: published, its PubAck
    /// awaited.
    async fn emit(&self, cause: &str, corr: &str, e: RawEvent) -> Result<(), BoxError> {
        let id = v5(&[
            b"emit",
            self.handler.as_bytes(),
            cause.as_bytes(),
            self.out_type.as_bytes(),
            b"0",
        ])
        .to_string();
        let headers = raw_headers(&id, self.out_type, "raw", corr, Some(cause));
        let payload = cbor(&RawEvent {
            id: e.id,
            note: e.note,
        });
        self.js
            .publish_with_headers(
                format!("{}.{}.seen", self.out_prefix, e.id),
                headers,
                payload,
            )
            .await?
            .await?;
        Ok(())
    }

    /// [`RawKv::Grouped`]: look the event up in its group, handle it, add
    /// its record to the group with a compare-and-set, ack.
    async fn handle_grouped(
        &self,
        msg: &jetstream::Message,
        kv: &kv::Store,
        groups: u32,
        cause: &str,
        corr: &str,
        e: RawEvent,
    ) -> Result<(), BoxError> {
        let id = *uuid::Uuid::parse_str(cause)?.as_bytes();
        let key = format!("{}.g.{:x}", self.handler, group_of(&id, groups));
        let holds = |value: &[u8]| {
            value
                .get(1..)
                .is_some_and(|b| b.chunks_exact(24).any(|c| c[..16] == id))
        };
        let mut entry = kv.entry(key.as_str()).await?;
        if entry.as_ref().is_some_and(|e| holds(&e.value)) {
            return self.finish(msg).await;
        }
        self.emit(cause, corr, e).await?;
        let now = unix_ms()?;
        loop {
            let mut value = match &entry {
                Some(e) if e.operation == kv::Operation::Put => e.value.to_vec(),
                _ => vec![1u8],
            };
            value.extend_from_slice(&id);
            value.extend_from_slice(&now.to_be_bytes());
            let written = match &entry {
                Some(_) if self.unchecked => kv.put(key.as_str(), value.into()).await.is_ok(),
                Some(e) => kv
                    .update(key.as_str(), value.into(), e.revision)
                    .await
                    .is_ok(),
                None => kv.create(key.as_str(), value.into()).await.is_ok(),
            };
            if written {
                break;
            }
            // Another writer came first: read the group again.
            entry = kv.entry(key.as_str()).await?;
        }
        self.finish(msg).await
    }
}

/// Now, in unix milliseconds.
fn unix_ms() -> Result<u64, BoxError> {
    Ok(u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?)
}

/// The group of an event id in `groups` groups: FNV-1a over the id's
/// bytes, modulo the groups (choreo's hash).
fn group_of(id: &[u8; 16], groups: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % u64::from(groups)
}

/// One subscription for the answers of batched direct gets, each read
/// given a reply subject of its own (`<prefix>.<n>`) and its answers sent
/// to it: what a careful hand-written relay does, rather than a
/// subscription per read.
struct AnswerRouter {
    client: async_nats::Client,
    prefix: String,
    next: AtomicU64,
    waiting:
        std::sync::Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>>,
}

impl AnswerRouter {
    async fn start(client: &async_nats::Client) -> Result<Arc<Self>, BoxError> {
        let prefix = client.new_inbox();
        let mut sub = client.subscribe(format!("{prefix}.*")).await?;
        let router = Arc::new(AnswerRouter {
            client: client.clone(),
            prefix,
            next: AtomicU64::new(0),
            waiting: std::sync::Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(router) = weak.upgrade() else { break };
                let token = m.subject.rsplit('.').next().and_then(|t| t.parse().ok());
                if let Some(tx) = token.and_then(|t| router.waiting().get(&t).cloned()) {
                    let _ = tx.send(m);
                }
            }
        });
        Ok(router)
    }

    /// The reads waiting for answers, by reply token.
    fn waiting(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<u64, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>,
    > {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every message of `subject` in `stream`, oldest first (at most 64).
    async fn all_of(&self, stream: &str, subject: &str) -> Result<Vec<bytes::Bytes>, BoxError> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.waiting().insert(token, tx);
        let request = format!(r#"{{"batch":64,"next_by_subj":"{subject}"}}"#);
        let sent = self
            .client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("{}.{token}", self.prefix),
                request.into(),
            )
            .await;
        let mut found = Vec::new();
        let answer = async {
            sent?;
            while let Some(m) = rx.recv().await {
                match m.status {
                    // The end of the batch (204), or nothing found (404).
                    Some(s) if s.as_u16() == 204 || s.as_u16() == 404 => break,
                    Some(s) => return Err(format!("direct get: {s}").into()),
                    None => found.push(m.payload),
                }
            }
            Ok::<(), BoxError>(())
        };
        let r = tokio::time::timeout(Duration::from_secs(5), answer).await;
        self.waiting().remove(&token);
        r.map_err(|_| "direct get timed out")??;
        Ok(found)
    }
}

impl RawRelay {
    /// [`RawKv::Appended`]: look the event up among its group's messages,
    /// handle it, append its record (a plain publish), ack.
    async fn handle_appended(
        &self,
        msg: &jetstream::Message,
        router: &AnswerRouter,
        groups: u32,
        cause: &str,
        corr: &str,
        e: RawEvent,
    ) -> Result<(), BoxError> {
        let id = *uuid::Uuid::parse_str(cause)?.as_bytes();
        let subject = format!(
            "$KV.raw_inbox.{}.g.{:x}",
            self.handler,
            group_of(&id, groups)
        );
        let records = router.all_of("KV_raw_inbox", &subject).await?;
        if records.iter().any(|r| r.get(..16) == Some(&id[..])) {
            return self.finish(msg).await;
        }
        self.emit(cause, corr, e).await?;
        let now = unix_ms()?;
        let mut record = Vec::with_capacity(24);
        record.extend_from_slice(&id);
        record.extend_from_slice(&now.to_be_bytes());
        self.js.publish(subject, record.into()).await?.await?;
        self.finish(msg).await
    }
}

/// CPU seconds used so far by this process and by its children (the
/// nats-servers), from `/proc` (zeros where there is none), and the
/// machine's stolen time: what the hypervisor gave other guests while this
/// one's CPUs had work.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    client: f64,
    servers: f64,
    /// Seconds stolen from every CPU of the machine so far.
    steal: f64,
    at: Instant,
}

impl Cpu {
    fn zero() -> Cpu {
        Cpu {
            client: 0.0,
            servers: 0.0,
            steal: 0.0,
            at: Instant::now(),
        }
    }

    /// The share of the machine's CPU time since this reading that the
    /// hypervisor stole, in percent: a run that crawls with little CPU
    /// used and much stolen was the machine's, not the code's.
    fn stolen_since(&self) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.at.elapsed().as_secs_f64() * cpus;
        if wall <= 0.0 {
            return 0.0;
        }
        (steal_seconds() - self.steal) / wall * 100.0
    }
}

fn cpu_seconds() -> Cpu {
    let me = process_cpu("self");
    let mut kids = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace() {
            kids += process_cpu(pid);
        }
    }
    Cpu {
        client: me,
        servers: kids,
        steal: steal_seconds(),
        at: Instant::now(),
    }
}

/// Seconds stolen from all CPUs since boot (`steal` on `/proc/stat`'s
/// first line; zero where there is none).
fn steal_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |ticks| ticks / 100.0)
}

/// CPU seconds process `pid` (or `self`) used so far, user and system, from
/// `/proc` (zero where there is none).
fn process_cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux counts these in clock ticks of 1/100 s (USER_HZ).
    (t(11) + t(12)) / 100.0
}

/// Waits until `counter` reaches `n`; returns the steady-state rate, timed
/// from the first handled message (so start-up work on either side does not
/// count).
///
/// If more than half the events were handled before the first sample (tiny
/// runs), it is timed from `started`, the moment the handler side was
/// started, instead: a slower figure, never a zero.
async fn rate_until(
    counter: impl Fn() -> u64,
    n: u64,
    what: &str,
    started: (Instant, Cpu),
) -> Result<f64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, u64)> = None;
    let mut cpu0 = Cpu::zero();
    // The counters at the start, for a run too short to time from its
    // first event (so its breakdown line is printed all the same).
    let at_start = breakdown::read().await;
    let mut before = None;
    // When the count passed each quarter of `n`: a run's rate by quarter
    // shows a slow start (or end) that its mean hides.
    let mut quarters: Vec<(Instant, u64)> = Vec::with_capacity(4);
    loop {
        let c = counter();
        if first.is_none() && c > 0 {
            first = Some((Instant::now(), c));
            cpu0 = cpu_seconds();
            before = breakdown::read().await;
        }
        while quarters.len() < 4 && c >= n * (quarters.len() as u64 + 1) / 4 {
            quarters.push((Instant::now(), c));
        }
        if c >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: only {c} of {n} after 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (t0, c0) = match first {
        Some((t0, c0)) if c0 <= n / 2 => (t0, c0),
        _ => {
            cpu0 = started.1;
            before = at_start;
            (started.0, 0)
        }
    };
    let rate = report_rate(what, n - c0, t0, cpu0);
    let mut last = (t0, c0);
    let by_quarter: Vec<String> = quarters
        .iter()
        .filter(|(_, c)| *c > c0)
        .map(|&(t, c)| {
            let r = (c - last.1) as f64 / t.duration_since(last.0).as_secs_f64().max(1e-6);
            last = (t, c);
            format!("{r:.0}")
        })
        .collect();
    eprintln!("    {what} by quarter (msgs/s): {}", by_quarter.join(" / "));
    breakdown::report(what, before, n - c0).await;
    Ok(rate)
}

// ---- the cases ------------------------------------------------------------------------

/// The rate of `n` events since `start`; prints it with the CPU per event
/// used since `cpu0`.
fn report_rate(what: &str, n: u64, start: Instant, cpu0: Cpu) -> f64 {
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let (client, server) = cpu_per_event(cpu0, n);
    let server = if TARGET.get().is_some() {
        "n/a".to_owned()
    } else {
        format!("{server:.1} µs")
    };
    eprintln!(
        "  {what}: {rate:.0} msgs/s, CPU per event: client {client:.1} µs, server {server}; stolen {:.0}%",
        cpu0.stolen_since()
    );
    rate
}

/// CPU used since `cpu0` (see [`cpu_seconds`]) per event, client and
/// server, in µs.
fn cpu_per_event(cpu0: Cpu, events: u64) -> (f64, f64) {
    let cpu1 = cpu_seconds();
    let per = |a: f64, b: f64| (b - a) * 1e6 / events.max(1) as f64;
    (
        per(cpu0.client, cpu1.client),
        per(cpu0.servers, cpu1.servers),
    )
}

/// `n` events with [`Publisher::publish_all`]: sent in order, up to 256
/// PubAcks awaited at once, as [`raw_publish`] does.
async fn choreo_publish(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let publisher = Publisher::new(server.connect().await?, "bench")?;
    publisher.ensure_stream::<BenchPlaced>().await?;
    let events: Vec<BenchPlaced> = (0..n).map(|id| BenchPlaced { id, note: note() }).collect();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    publisher.publish_all(&events).await?;
    Ok(report_rate("choreo publish_all", n, start, cpu0))
}

/// `n` events, one [`Publisher::publish`] future each, 256 polled at once
/// (`buffer_unordered`), as a handler of many requests drives them.
async fn choreo_publish_each(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let publisher = Publisher::new(server.connect().await?, "bench")?;
    publisher.ensure_stream::<BenchPlaced>().await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let p = publisher.clone();
            async move {
                p.publish(&BenchPlaced {
                    id: i,
                    note: note(),
                })
                .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(report_rate(
        "choreo publish, one future each",
        n,
        start,
        cpu0,
    ))
}

async fn raw_publish_case(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.connect().await?);
    raw_stream(&js, "RAWBENCH", "rawbench.>").await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    raw_publish(&js, "rawbench", "BenchPlaced", n).await?;
    Ok(report_rate("raw publish", n, start, cpu0))
}

/// The raw publish loop written as [`choreo_publish_each`] drives its
/// publishes: 256 futures polled at once, each sending its event and
/// awaiting its PubAck, where [`raw_publish`] sends one at a time and
/// collects the acks apart.
async fn raw_publish_buffered_case(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let js = jetstream::new(server.connect().await?);
    raw_stream(&js, "RAWBENCH", "rawbench.>").await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let js = js.clone();
            async move {
                let key = i.to_string();
                let id = v5(&[b"key", b"BenchPlaced", key.as_bytes()]).to_string();
                let h = raw_headers(&id, "BenchPlaced", "bench", &id, None);
                let payload = cbor(&RawEvent {
                    id: i,
                    note: note(),
                });
                js.publish_with_headers(format!("rawbench.{i}.placed"), h, payload)
                    .await?
                    .await?;
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    Ok(report_rate("raw publish, buffered", n, start, cpu0))
}

/// `--inbox-prefill`: records already in each inbox group before a run.
static PREFILL: AtomicU64 = AtomicU64::new(0);

/// The records per group of an inbox in its steady state at the default
/// sizing: one event a second remembered for the default horizon (7 days),
/// spread over the default 65,536 groups — 604,800 records, 9 per group,
/// the rate the defaults are chosen for (see docs/capacity.md).
fn steady_prefill() -> u64 {
    choreo::DEFAULT_INBOX_RETENTION.as_secs() / u64::from(choreo::DEFAULT_INBOX_GROUPS)
}

/// Fills every group of the relay's inbox with `per_group` records of other
/// events, in the layout `choreo::topology` documents (version byte 1, then
/// 16 bytes of id and 8 of unix ms per record), as a busy handler's inbox
/// holds them: the steady state, before the run is timed.
async fn prefill_inbox(
    js: &jetstream::Context,
    per_group: u64,
    replicas: usize,
) -> Result<(), BoxError> {
    prefill_groups(
        js,
        ("choreo_inbox_relay", "relay_inbox"),
        per_group,
        replicas,
    )
    .await
}

/// Fills every group `<handler>.g.<n>` of `bucket` (made if missing, as
/// choreo makes an inbox) with `per_group` records of other events.
async fn prefill_groups(
    js: &jetstream::Context,
    (bucket, handler): (&str, &str),
    per_group: u64,
    replicas: usize,
) -> Result<(), BoxError> {
    let kv = match js.get_key_value(bucket).await {
        Ok(kv) => kv,
        Err(_) => {
            js.create_key_value(kv::Config {
                bucket: bucket.into(),
                history: 1,
                max_age: choreo::DEFAULT_INBOX_RETENTION,
                num_replicas: replicas,
                ..Default::default()
            })
            .await?
        }
    };
    let now = unix_ms()?;
    let mut puts = futures::stream::iter(0..inbox_groups())
        .map(|g| {
            let kv = kv.clone();
            let mut value = vec![1u8];
            for _ in 0..per_group {
                value.extend_from_slice(uuid::Uuid::now_v7().as_bytes());
                value.extend_from_slice(&now.to_be_bytes());
            }
            async move { kv.put(format!("{handler}.g.{g:x}"), value.into()).await }
        })
        .buffer_unordered(256);
    while let Some(r) = puts.next().await {
        r?;
    }
    Ok(())
}

/// [`RawKv::Appended`]'s bucket `raw_inbox`, keeping up to 64 messages per
/// key for the default horizon, with `per_group` records (one message
/// each) of other events under every group's subject.
async fn prefill_appended(
    js: &jetstream::Context,
    per_group: u64,
    replicas: usize,
) -> Result<(), BoxError> {
    js.create_key_value(kv::Config {
        bucket: "raw_inbox".into(),
        history: 64,
        max_age: choreo::DEFAULT_INBOX_RETENTION,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let now = unix_ms()?;
    let mut puts = futures::stream::iter((0..per_group).flat_map(|_| 0..inbox_groups()))
        .map(|g| {
            let js = js.clone();
            let mut record = uuid::Uuid::now_v7().as_bytes().to_vec();
            record.extend_from_slice(&now.to_be_bytes());
            async move {
                js.publish(format!("$KV.raw_inbox.relay.relay.g.{g:x}"), record.into())
                    .await?
                    .await
            }
        })
        .buffer_unordered(256);
    while let Some(r) = puts.next().await {
        r?;
    }
    Ok(())
}

/// `--inbox-groups`.
static INBOX_GROUPS: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(choreo::DEFAULT_INBOX_GROUPS);

fn inbox_groups() -> u32 {
    INBOX_GROUPS.load(Ordering::Relaxed)
}

/// The servers of one run: one node, or a 3-node cluster (held, never
/// read: they stop when the run drops them), or a server or cluster the
/// user runs (`--url`), with the streams it had before the run.
#[allow(dead_code)]
enum Servers {
    One(NatsServer),
    Three(choreo_testkit::NatsCluster),
    Theirs(async_nats::Client, std::collections::BTreeSet<String>),
}

/// `--url` (and `--creds`, `--replicas`): the handler cases run against
/// this server or cluster instead of local ones.
struct Target {
    url: String,
    creds: Option<std::path::PathBuf>,
    replicas: usize,
}

static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

/// The cases that run against a server of the user's: the handler cases.
const THEIRS: [&str; 3] = ["handler", "handler_inbox", "handler_inbox_write_only"];

/// The streams (and key-value buckets, `KV_<bucket>`) a handler run makes
/// under fixed names; on a server of the user's, a run refuses to start
/// while any of them exists.
fn bench_streams() -> [&'static str; 6] {
    [
        <BenchPlaced as choreo::Event>::STREAM,
        <BenchRelayed as choreo::Event>::STREAM,
        "KV_choreo_inbox_relay",
        "RAWIN",
        "RAWOUT",
        "KV_raw_inbox",
    ]
}

/// The names of the streams `js` sees.
async fn stream_names(
    js: &jetstream::Context,
) -> Result<std::collections::BTreeSet<String>, BoxError> {
    let mut names = std::collections::BTreeSet::new();
    let mut list = js.stream_names();
    while let Some(name) = list.next().await {
        names.insert(name?);
    }
    Ok(names)
}

/// How many replicas the handler cases give their streams and buckets:
/// `--replicas` against a server of the user's, else one.
fn target_replicas() -> usize {
    TARGET.get().map_or(1, |t| t.replicas)
}

impl Servers {
    /// On a server of the user's, deletes every stream (and bucket) the
    /// run made, saying which.
    async fn finish(&self) -> Result<(), BoxError> {
        let Self::Theirs(client, before) = self else {
            return Ok(());
        };
        let js = jetstream::new(client.clone());
        let made: Vec<String> = stream_names(&js)
            .await?
            .difference(before)
            .cloned()
            .collect();
        for name in &made {
            js.delete_stream(name).await?;
        }
        eprintln!("  deleted what the run made: {}", made.join(", "));
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        breakdown::forget();
    }
}

impl Servers {
    async fn start(replicas: usize) -> Result<(Self, choreo::async_nats::Client), BoxError> {
        if let Some(t) = TARGET.get() {
            let mut options = async_nats::ConnectOptions::new();
            if let Some(creds) = &t.creds {
                options = options
                    .credentials_file(creds)
                    .await
                    .map_err(|e| format!("--creds {}: {e}", creds.display()))?;
            }
            let client = options
                .connect(t.url.as_str())
                .await
                .map_err(|e| format!("cannot connect to --url {}: {e}", t.url))?;
            let before = stream_names(&jetstream::new(client.clone())).await?;
            let there: Vec<&str> = bench_streams()
                .into_iter()
                .filter(|s| before.contains(*s))
                .collect();
            if !there.is_empty() {
                return Err(format!(
                    "{} already on {} (left by an interrupted run?): the bench makes and \
                     deletes these; delete them (`nats stream rm <name>`) and run again",
                    there.join(", "),
                    t.url
                )
                .into());
            }
            breakdown::watch(&client, Vec::new(), Vec::new());
            return Ok((Self::Theirs(client.clone(), before), client));
        }
        if replicas > 1 {
            let c = choreo_testkit::NatsCluster::start(3).await?;
            let client = c.connect().await?;
            let nodes = (0..c.len()).map(|i| c.node(i));
            breakdown::watch(
                &client,
                nodes.clone().filter_map(NatsServer::pid).collect(),
                nodes.map(NatsServer::monitor_port).collect(),
            );
            Ok((Self::Three(c), client))
        } else {
            let s = NatsServer::start().await?;
            let client = s.connect().await?;
            breakdown::watch(
                &client,
                s.pid().into_iter().collect(),
                vec![s.monitor_port()],
            );
            Ok((Self::One(s), client))
        }
    }
}

async fn choreo_handler(n: u64, inbox: bool) -> Result<f64, BoxError> {
    choreo_handler_r(n, inbox, target_replicas(), PREFILL.load(Ordering::Relaxed)).await
}

/// The 1-hop handler, with `replicas` replicas of every stream and bucket
/// (3: on a 3-node cluster), its inbox groups (if on) holding `prefill`
/// records each before the run.
async fn choreo_handler_r(
    n: u64,
    inbox: bool,
    replicas: usize,
    prefill: u64,
) -> Result<f64, BoxError> {
    let (servers, client) = Servers::start(replicas).await?;
    let settings = StreamSettings::default().replicas(replicas);
    let publisher = Publisher::new(client.clone(), "bench")?.stream_settings(settings.clone());
    publisher.ensure_stream::<BenchPlaced>().await?;
    publisher.ensure_stream::<BenchRelayed>().await?;
    raw_publish(&jetstream::new(client.clone()), "bench", "BenchPlaced", n).await?;
    if inbox && prefill > 0 {
        prefill_inbox(&jetstream::new(client.clone()), prefill, replicas).await?;
    }
    let svc = if inbox {
        Service::new("relay")
            .inbox_groups(inbox_groups())
            .handler(relay_inbox)
    } else {
        Service::new("relay").handler(relay)
    }
    .stream_settings(settings);
    let started = (Instant::now(), cpu_seconds());
    let handle_client = client.clone();
    let handle = svc.start(client).await?;
    if replicas > 1 {
        // Apart from the timed span, which starts at the first event
        // handled; said, since on R3 it is a visible part of a short run.
        eprintln!(
            "  choreo service start (R{replicas}, not timed): {:?}",
            started.0.elapsed()
        );
    }
    let name = if inbox { "relay_inbox" } else { "relay" };
    let stats = || handle.stats(name).map_or(0, |s| s.handled());
    let rate = rate_until(stats, n, "choreo handler", started).await?;
    if inbox && let Some(s) = handle.stats(name) {
        // Writes of a record that met another of its group (retried on top).
        eprintln!(
            "    choreo handler inbox conflicts per event: {:.4}",
            s.inbox_conflicts() as f64 / n as f64
        );
    }
    let js = jetstream::new(handle_client);
    let recorded = if inbox {
        Some(records_besides(&js, ("relay", name), prefill).await?)
    } else {
        None
    };
    check_work(
        &js,
        "choreo",
        <BenchRelayed as choreo::Event>::STREAM,
        n,
        recorded,
    )
    .await?;
    handle.shutdown().await;
    servers.finish().await?;
    Ok(rate)
}

async fn raw_handler(n: u64, inbox: RawKv) -> Result<f64, BoxError> {
    raw_handler_r(n, inbox, target_replicas()).await
}

async fn raw_handler_r(n: u64, inbox: RawKv, replicas: usize) -> Result<f64, BoxError> {
    let (servers, client) = Servers::start(replicas).await?;
    let js = jetstream::new(client.clone());
    raw_stream_r(&js, "RAWIN", "rawin.>", replicas).await?;
    raw_stream_r(&js, "RAWOUT", "rawout.>", replicas).await?;
    raw_publish(&js, "rawin", "BenchPlaced", n).await?;
    let prefill = PREFILL.load(Ordering::Relaxed);
    let grouped = matches!(
        inbox,
        RawKv::Grouped | RawKv::GroupedUnchecked | RawKv::Appended
    );
    let appended = if inbox == RawKv::Appended {
        prefill_appended(&js, prefill, replicas).await?;
        Some(AnswerRouter::start(&client).await?)
    } else {
        None
    };
    let kv = if inbox == RawKv::Appended {
        None
    } else if grouped {
        // The same bucket as choreo's inbox, as full as choreo's.
        prefill_groups(&js, ("raw_inbox", "relay.relay"), prefill, replicas).await?;
        Some(js.get_key_value("raw_inbox").await?)
    } else if inbox != RawKv::Off {
        Some(
            js.create_key_value(kv::Config {
                bucket: "raw_inbox".into(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await?,
        )
    } else {
        None
    };
    let done = Arc::new(AtomicU64::new(0));
    let raw_relay = RawRelay {
        js: js.clone(),
        out_prefix: "rawout",
        out_type: "BenchRelayed",
        handler: "relay.relay",
        kv,
        read_first: inbox == RawKv::ReadThenWrite,
        groups: grouped.then(inbox_groups),
        unchecked: inbox == RawKv::GroupedUnchecked,
        appended,
        done: done.clone(),
    };
    let started = (Instant::now(), cpu_seconds());
    let task = raw_relay.run("RAWIN", "relay").await?;
    let rate = rate_until(|| done.load(Ordering::Relaxed), n, "raw handler", started).await?;
    task.abort();
    let recorded = match inbox {
        // Grouped: the emissions are checked, not the records.
        RawKv::Off | RawKv::Grouped | RawKv::GroupedUnchecked => None,
        // Appended: the records, less the prefill's.
        RawKv::Appended => Some(
            js.get_stream("KV_raw_inbox")
                .await?
                .info()
                .await?
                .state
                .messages
                .saturating_sub(prefill * u64::from(inbox_groups())),
        ),
        _ => Some(
            js.get_stream("KV_raw_inbox")
                .await?
                .info()
                .await?
                .state
                .messages,
        ),
    };
    check_work(&js, "raw", "RAWOUT", n, recorded).await?;
    servers.finish().await?;
    Ok(rate)
}

/// Fails unless a handler run left `n` emissions in `stream` and, with an
/// inbox, `n` records in it: both sides did the work they are timed for.
/// The records `handler` of `service` left in its inbox, less the
/// `prefill` records per group written before the run.
async fn records_besides(
    js: &jetstream::Context,
    (service, handler): (&str, &str),
    prefill: u64,
) -> Result<u64, BoxError> {
    let all = choreo::__private::inbox_records(js, service, handler)
        .await
        .map_err(|e| e.to_string())?;
    Ok(all.saturating_sub(prefill * u64::from(inbox_groups())))
}

async fn check_work(
    js: &jetstream::Context,
    side: &str,
    stream: &str,
    n: u64,
    recorded: Option<u64>,
) -> Result<(), BoxError> {
    let emitted = js.get_stream(stream).await?.info().await?.state.messages;
    if emitted != n || recorded.is_some_and(|r| r != n) {
        return Err(format!(
            "{side}: {emitted} emissions and {recorded:?} inbox records after {n} events"
        )
        .into());
    }
    Ok(())
}

/// Latencies of a 3-hop chain, publishing `n` roots at `rate` per second:
/// choreo's, or (`raw` set) hand-written relays' using the bucket so.
async fn chain_latency(n: u64, rate: u64, raw: Option<RawKv>) -> Result<(f64, f64), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    let publisher = Publisher::new(client.clone(), "bench")?;
    let end_subject = if let Some(raw_kv) = raw {
        for (name, subject) in [
            ("RAWHOP0", "rawhop0.>"),
            ("RAWHOP1", "rawhop1.>"),
            ("RAWHOP2", "rawhop2.>"),
            ("RAWHOP3", "rawhop3.>"),
        ] {
            raw_stream(&js, name, subject).await?;
        }
        let make = |out_prefix, out_type, handler| RawRelay {
            js: js.clone(),
            out_prefix,
            out_type,
            handler,
            kv: None,
            read_first: raw_kv == RawKv::ReadThenWrite,
            groups: None,
            unchecked: false,
            appended: None,
            done: Arc::new(AtomicU64::new(0)),
        };
        // The chain's raw relays use a bucket as choreo's inbox does.
        let kv = js
            .create_key_value(kv::Config {
                bucket: "raw_inbox".into(),
                history: 1,
                ..Default::default()
            })
            .await?;
        for (i, (from, out_prefix, out_type)) in [
            ("RAWHOP0", "rawhop1", "Hop1Seen"),
            ("RAWHOP1", "rawhop2", "Hop2Seen"),
            ("RAWHOP2", "rawhop3", "Hop3Seen"),
        ]
        .into_iter()
        .enumerate()
        {
            let handler: &'static str = ["hop.hop1", "hop.hop2", "hop.hop3"][i];
            let mut r = make(out_prefix, out_type, handler);
            if raw_kv != RawKv::Off {
                r.kv = Some(kv.clone());
            }
            tasks.push(r.run(from, &format!("hop{i}")).await?);
        }
        "rawhop3.>"
    } else {
        publisher.ensure_stream::<BenchPlaced>().await?;
        for (name, svc) in [
            ("hop1", Service::new("hop1").handler(hop1)),
            ("hop2", Service::new("hop2").handler(hop2)),
            ("hop3", Service::new("hop3").handler(hop3)),
        ] {
            let _ = name;
            handles.push(svc.start(client.clone()).await?);
        }
        publisher.ensure_stream::<Hop3Seen>().await?;
        "hop3.>"
    };
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut ends = client.subscribe(end_subject).await?;
    client.flush().await?;
    let collector = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            while let Some(m) = ends.next().await {
                let now = Instant::now();
                let id: u64 = m
                    .subject
                    .split('.')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u64::MAX);
                if let Some(t) = sent.lock().await.remove(&id) {
                    lat.push(now.duration_since(t).as_secs_f64() * 1e3);
                }
                if lat.len() as u64 == n {
                    break;
                }
            }
            lat
        })
    };
    let started = cpu_seconds();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..n {
        tick.tick().await;
        sent.lock().await.insert(i, Instant::now());
        if raw.is_some() {
            let js = js.clone();
            tokio::spawn(async move {
                let key = i.to_string();
                let id = v5(&[b"key", b"BenchPlaced", key.as_bytes()]).to_string();
                let h = raw_headers(&id, "BenchPlaced", "bench", &id, None);
                if let Ok(ack) = js
                    .publish_with_headers(
                        format!("rawhop0.{i}.placed"),
                        h,
                        cbor(&RawEvent {
                            id: i,
                            note: note(),
                        }),
                    )
                    .await
                {
                    let _ = ack.await;
                }
            });
        } else {
            let p = publisher.clone();
            tokio::spawn(async move {
                let _ = p
                    .publish(&BenchPlaced {
                        id: i,
                        note: note(),
                    })
                    .await;
            });
        }
    }
    let mut lat = tokio::time::timeout(Duration::from_secs(120), collector).await??;
    for h in handles {
        h.shutdown().await;
    }
    for t in tasks {
        t.abort();
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let (client, server) = cpu_per_event(started, 3 * n);
    eprintln!(
        "  {} chain: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}, CPU per hop: client {client:.1} µs, server {server:.1} µs; stolen {:.0}%",
        match raw {
            None => "choreo",
            Some(RawKv::ReadThenWrite) => "raw",
            Some(RawKv::WriteOnly) => "raw (write only)",
            Some(RawKv::Off) => "raw (no bucket)",
            Some(RawKv::Grouped | RawKv::GroupedUnchecked) => "raw (grouped)",
            Some(RawKv::Appended) => "raw (appended)",
        },
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        started.stolen_since(),
    );
    Ok((pct(0.50), pct(0.99)))
}

/// Runs both sides `repeat` times, in pairs made one after the other
/// (which side goes first alternates, so neither always pays for the
/// process's first run); returns each side's runs. With `--side`, the other
/// side is not run and reports `none`.
async fn run_pairs<T, C, CF, R, RF>(
    repeat: u64,
    none: T,
    mut choreo: C,
    mut raw: R,
) -> Result<(Vec<T>, Vec<T>), BoxError>
where
    T: Copy,
    C: FnMut() -> CF,
    CF: std::future::Future<Output = Result<T, BoxError>>,
    R: FnMut() -> RF,
    RF: std::future::Future<Output = Result<T, BoxError>>,
{
    let (mut c, mut r) = (Vec::new(), Vec::new());
    let side = side();
    let mut stolen = Vec::new();
    for i in 0..repeat {
        let pair = cpu_seconds();
        let raw_first = i % 2 == 1;
        let mut raw_run = none;
        if raw_first && side != Some(Side::Choreo) {
            raw_run = raw().await?;
        }
        c.push(if side != Some(Side::Raw) {
            choreo().await?
        } else {
            none
        });
        if !raw_first && side != Some(Side::Choreo) {
            raw_run = raw().await?;
        }
        r.push(raw_run);
        stolen.push(format!("{:.0}%", pair.stolen_since()));
    }
    // A pair the hypervisor took much CPU from measured the machine, not
    // the code: read its ratio with this.
    eprintln!("  stolen per pair: {}", stolen.join(", "));
    Ok((c, r))
}

/// Each side's median of `f` over its runs, and the median of the pairs'
/// ratios `ratio(choreo, raw)` (a pair shares the machine's state of the
/// moment, so its ratio is steadier than the ratio of two medians).
fn summary<T>(c: &[T], r: &[T], f: fn(&T) -> f64, ratio: fn(f64, f64) -> f64) -> (f64, f64, f64) {
    (
        median(c.iter().map(f).collect()),
        median(r.iter().map(f).collect()),
        median(c.iter().zip(r).map(|(c, r)| ratio(f(c), f(r))).collect()),
    )
}

/// A throughput case: (choreo median, raw median, median pair ratio choreo
/// / raw).
async fn median_pair<C, CF, R, RF>(
    repeat: u64,
    choreo: C,
    raw: R,
) -> Result<(f64, f64, f64), BoxError>
where
    C: FnMut() -> CF,
    CF: std::future::Future<Output = Result<f64, BoxError>>,
    R: FnMut() -> RF,
    RF: std::future::Future<Output = Result<f64, BoxError>>,
{
    let (c, r) = run_pairs(repeat, f64::NAN, choreo, raw).await?;
    Ok(summary(&c, &r, |x| *x, |c, r| c / r))
}

/// The latency case, the raw side using its bucket as `raw_kv` says: for
/// p50 and for p99, (choreo median, raw median, median pair ratio raw /
/// choreo), so 1.0 means no overhead.
async fn latency_pair(
    repeat: u64,
    n: u64,
    rate: u64,
    raw_kv: RawKv,
) -> Result<((f64, f64, f64), (f64, f64, f64)), BoxError> {
    let (c, r) = run_pairs(
        repeat,
        (f64::NAN, f64::NAN),
        || chain_latency(n, rate, None),
        || chain_latency(n, rate, Some(raw_kv)),
    )
    .await?;
    let raw_over_choreo = |c: f64, r: f64| r / c;
    Ok((
        summary(&c, &r, |x| x.0, raw_over_choreo),
        summary(&c, &r, |x| x.1, raw_over_choreo),
    ))
}

/// The median (of an even count, the mean of the middle two).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => xs[n / 2],
        _ => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The cases `--only` accepts: those of the default run, and those run
/// only when named.
const CASES: [&str; 28] = [
    "publish",
    "publish_each",
    "publish_pattern",
    "handler",
    "handler_inbox",
    "handler_inbox_write_only",
    "handler_inbox_grouped",
    "layout",
    "layout_unchecked",
    "layout_appended",
    "handler_inbox_cluster",
    "handler_inbox_grouped_cluster",
    "layout_cluster",
    "ordered",
    "ordered_4",
    "keyed_stream",
    "replay",
    "handler_metrics",
    "aggregate_decide",
    "postgres_handler",
    "postgres_relay",
    "storefront",
    "console",
    "aggregate_append",
    "aggregate_hot",
    "aggregate_load",
    "latency",
    "latency_write_only",
];

/// One side of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    /// choreo's side only.
    Choreo,
    /// The hand-written async-nats side only.
    Raw,
}

/// `--side`: the one side to run (to profile it), if given.
static SIDE: std::sync::OnceLock<Side> = std::sync::OnceLock::new();

fn side() -> Option<Side> {
    SIDE.get().copied()
}

/// choreo against hand-written async-nats doing the same work, in one run
/// (the cases are listed in docs/benchmarks.md and at the top of
/// examples/examples/bench/main.rs).
#[derive(Debug, clap::Parser)]
#[command(name = "bench")]
struct Args {
    /// Events per throughput run.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Roots per latency run (a 3-hop chain). 10 s per run at 1,000/s: a
    /// p99 of 100 samples, steadier than one of 30.
    #[arg(long, default_value_t = 10_000)]
    latency_events: u64,
    /// Roots per second in the latency runs.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Runs per side of each case.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    repeat: u64,
    /// Runs this case only.
    #[arg(long, value_parser = CASES)]
    only: Option<String>,
    /// Runs this side only (for a profiler).
    #[arg(long, value_enum)]
    side: Option<Side>,
    /// Groups of choreo's inbox records (default: choreo's default).
    #[arg(long, default_value_t = choreo::DEFAULT_INBOX_GROUPS, value_parser = clap::value_parser!(u32).range(1..))]
    inbox_groups: u32,
    /// Records of other events written into every inbox group before an
    /// inbox-on run (default: the defaults' steady state).
    #[arg(long)]
    inbox_prefill: Option<u64>,
    /// Runs the handler cases against this server or cluster instead of
    /// local ones (and deletes every stream each run made).
    #[arg(long)]
    url: Option<String>,
    /// A credentials file for `--url`.
    #[arg(long, requires = "url")]
    creds: Option<std::path::PathBuf>,
    /// Replicas of every stream and bucket made on `--url`.
    #[arg(long, default_value_t = 1, requires = "url")]
    replicas: usize,
    /// Minutes of live updates the console case watches.
    #[arg(long, default_value_t = 1)]
    console_minutes: u64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    let n = args.events;
    let groups = args.inbox_groups;
    INBOX_GROUPS.store(groups, Ordering::Relaxed);
    let prefill = args.inbox_prefill.unwrap_or_else(steady_prefill);
    PREFILL.store(prefill, Ordering::Relaxed);
    let ln = args.latency_events;
    let rate = args.rate;
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for figures worth comparing");
    }
    let repeat = args.repeat;
    if let Some(side) = args.side {
        let _ = SIDE.set(side);
    }
    eprintln!(
        "events={n} latency-events={ln} rate={rate}/s in-flight={IN_FLIGHT} repeat={repeat} inbox-groups={groups} inbox-prefill={prefill}"
    );

    let only = args.only.clone();
    if let Some(url) = args.url.clone() {
        if let Some(o) = only.as_deref()
            && !THEIRS.contains(&o)
        {
            return Err(format!(
                "--url runs the handler cases ({}), not {o}",
                THEIRS.join(", ")
            )
            .into());
        }
        let replicas = args.replicas;
        eprintln!(
            "against {url}, R{replicas}: each run makes streams {} (and the service's \
             registry, dead-letter and other streams where the account has none yet) and \
             deletes every stream it made when it ends",
            bench_streams().join(", ")
        );
        let _ = TARGET.set(Target {
            url,
            creds: args.creds.clone(),
            replicas,
        });
    }
    // Every case is asked for by name through these two, which refuse a
    // name missing from `CASES` (where `--only` could not choose it): any
    // run, even one of another case, stops at such a name.
    let named = |case: &str| {
        assert!(
            CASES.contains(&case),
            "the case {case} is missing from CASES"
        );
        only.as_deref() == Some(case)
    };
    let wanted = |case: &str| {
        let chosen = named(case);
        match only {
            Some(_) => chosen,
            None => TARGET.get().is_none() || THEIRS.contains(&case),
        }
    };
    // A case of the default run, or one run only when named.
    let asked = |case: &str, by_default: bool| {
        if by_default {
            wanted(case)
        } else {
            named(case)
        }
    };

    // Each case runs `repeat` times (default 5) per side, in pairs, on fresh
    // servers; each side's median is reported, and the ratio is the median of
    // the ratios of runs made one after the other.
    let mut rows: Vec<(&str, f64, f64, f64)> = Vec::new();
    let mut ratios = Vec::new();
    if wanted("publish") {
        let (c, r, ratio) =
            median_pair(repeat, || choreo_publish(n), || raw_publish_case(n)).await?;
        rows.push(("publish (msgs/s)", c, r, ratio));
        ratios.push(("publish", ratio));
    }
    if wanted("publish_each") {
        let (c, r, ratio) = median_pair(
            repeat,
            || choreo_publish_each(n),
            || raw_publish_buffered_case(n),
        )
        .await?;
        rows.push(("publish, a future each (msgs/s)", c, r, ratio));
        ratios.push(("publish_each", ratio));
    }
    // The two ways of driving raw publishes against each other: what the
    // pattern costs, apart from choreo.
    if named("publish_pattern") {
        let (c, r, ratio) = median_pair(
            repeat,
            || raw_publish_buffered_case(n),
            || raw_publish_case(n),
        )
        .await?;
        rows.push(("raw publish, 256 futures vs one loop (msgs/s)", c, r, ratio));
        ratios.push(("publish_pattern", ratio));
    }
    // The handler cases; the last one prices the inbox's read (no ratio line).
    for (case, label, inbox, raw_kv, ratio_line) in [
        (
            "handler",
            "handler, inbox off (msgs/s)",
            false,
            RawKv::Off,
            true,
        ),
        (
            "handler_inbox",
            "handler, inbox on, full (msgs/s)",
            true,
            RawKv::ReadThenWrite,
            true,
        ),
        (
            "handler_inbox_write_only",
            "  vs raw writing only (msgs/s)",
            true,
            RawKv::WriteOnly,
            false,
        ),
    ] {
        if wanted(case) {
            let (c, r, ratio) = median_pair(
                repeat,
                || choreo_handler(n, inbox),
                || raw_handler(n, raw_kv),
            )
            .await?;
            rows.push((label, c, r, ratio));
            if ratio_line {
                ratios.push((case, ratio));
            }
        }
    }
    // The inbox's layout apart from choreo's code, on one node and (only
    // with `--only`) on the cluster: choreo against a raw relay keeping
    // its records grouped as choreo does (as full), and (only with
    // `--only`) that relay against the per-key one.
    let here = target_replicas();
    for (case, replicas, label, by_default) in [
        (
            "handler_inbox_grouped",
            here,
            "  vs raw, grouped (msgs/s)",
            true,
        ),
        (
            "handler_inbox_grouped_cluster",
            3,
            "R3: choreo vs raw grouped (msgs/s)",
            false,
        ),
    ] {
        if asked(case, by_default) {
            let (c, r, ratio) = median_pair(
                repeat,
                || choreo_handler_r(n, true, replicas, prefill),
                || raw_handler_r(n, RawKv::Grouped, replicas),
            )
            .await?;
            rows.push((label, c, r, ratio));
            // On one node the row sits under the full-inbox case's.
            if !by_default {
                ratios.push((case, ratio));
            }
        }
    }
    for (case, kind, replicas, label) in [
        (
            "layout",
            RawKv::Grouped,
            here,
            "raw: grouped vs per key (msgs/s)",
        ),
        (
            "layout_unchecked",
            RawKv::GroupedUnchecked,
            here,
            "raw: grouped, put vs per key",
        ),
        (
            "layout_appended",
            RawKv::Appended,
            here,
            "raw: appended vs per key (msgs/s)",
        ),
        (
            "layout_cluster",
            RawKv::Grouped,
            3,
            "R3 raw: grouped vs per key (msgs/s)",
        ),
    ] {
        if named(case) {
            let (c, r, ratio) = median_pair(
                repeat,
                || raw_handler_r(n, kind, replicas),
                || raw_handler_r(n, RawKv::ReadThenWrite, replicas),
            )
            .await?;
            rows.push((label, c, r, ratio));
            ratios.push((case, ratio));
        }
    }
    // The second line: the same handler on a new inbox (its first
    // minutes), against the same raw relay.
    if wanted("handler_inbox") && prefill > 0 {
        let (c, r, ratio) = median_pair(
            repeat,
            || choreo_handler_r(n, true, 1, 0),
            || raw_handler(n, RawKv::ReadThenWrite),
        )
        .await?;
        rows.push(("  on a new inbox (msgs/s)", c, r, ratio));
        ratios.push(("handler_inbox_new", ratio));
    }
    // The inbox-on handler on a 3-node cluster, every stream and bucket R3:
    // what outgrowing one node costs.
    if wanted("handler_inbox_cluster") {
        let (c, r, ratio) = median_pair(
            repeat,
            || choreo_handler_r(n, true, 3, prefill),
            || raw_handler_r(n, RawKv::ReadThenWrite, 3),
        )
        .await?;
        rows.push(("handler, inbox on, R3 (msgs/s)", c, r, ratio));
        ratios.push(("handler_inbox_cluster", ratio));
    }
    // Order's price (ordered against any order, both on the shared
    // stream), and (only with `--only`) what the server spends matching a
    // handler's filter against the subjects of a stream other event types
    // could share (a stream of its own against the shared one).
    for (case, label, by_default, first) in [
        (
            "ordered",
            "ordered vs any order (msgs/s)",
            true,
            (StepOrder::Ordered, StepStream::Shared),
        ),
        (
            "ordered_4",
            "ordered on 4 partitions vs any order (msgs/s)",
            false,
            (StepOrder::OrderedOn4, StepStream::Shared),
        ),
        (
            "keyed_stream",
            "stream of its own vs shared (msgs/s)",
            false,
            (StepOrder::Any, StepStream::Exact),
        ),
    ] {
        if asked(case, by_default) {
            let (c, r, ratio) = median_pair(
                repeat,
                || choreo_steps(n, first.0, first.1),
                || choreo_steps(n, StepOrder::Any, StepStream::Shared),
            )
            .await?;
            rows.push((label, c, r, ratio));
            ratios.push((case, ratio));
        }
    }
    if wanted("replay") {
        let mut pairs = Vec::new();
        for _ in 0..repeat {
            pairs.push(live_then_replay(n).await?);
        }
        let new_inbox = median(pairs.iter().map(|p| p.0).collect());
        let live = median(pairs.iter().map(|p| p.1).collect());
        let replayed = median(pairs.iter().map(|p| p.2).collect());
        let ratio = median(pairs.iter().map(|p| p.2 / p.1).collect());
        let against_new = median(pairs.iter().map(|p| p.2 / p.0).collect());
        // Not a ratio line: a new inbox is a handler's first minutes only.
        eprintln!("  replay against live on a new inbox ({new_inbox:.0} msgs/s): {against_new:.2}");
        rows.push(("replay --rerun vs live (msgs/s)", replayed, live, ratio));
        ratios.push(("replay", ratio));
    }
    if wanted("handler_metrics") {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(Switch(recorder)).map_err(|e| e.to_string())?;
        let (c, r, ratio) = median_pair(
            repeat,
            || handler_with_metrics(n, true),
            || handler_with_metrics(n, false),
        )
        .await?;
        rows.push(("handler, metrics on vs off", c, r, ratio));
        ratios.push(("handler_metrics", ratio));
    }
    // Aggregates: a decision (a load and a guarded append) against the
    // same by hand; decisions on one hot aggregate; a long history's load.
    if wanted("aggregate_decide") {
        let (c, r, ratio) = median_pair(
            repeat,
            || aggregates::choreo_decide(n),
            || aggregates::raw_decide(n),
        )
        .await?;
        rows.push(("decide: load + guarded append (/s)", c, r, ratio));
        ratios.push(("aggregate_decide", ratio));
    }
    if wanted("postgres_handler") {
        let (c, r, ratio) =
            median_pair(repeat, || postgres::choreo_pg(n), || postgres::raw_pg(n)).await?;
        rows.push(("postgres handler (events/s)", c, r, ratio));
        ratios.push(("postgres_handler", ratio));
    }
    // Not in the default run (about 20 s of a paced load): the latency
    // from a Postgres handler's commit to its emission stored, and from
    // rows a dead process left to the relay's stored copy.
    if named("postgres_relay") {
        let (by_handler, by_relay) =
            postgres::commit_to_stored(ln.min(2_000), rate.min(500)).await?;
        println!(
            "postgres emission, commit to stored: p50 {:.1} ms, p99 {:.1} ms",
            by_handler.0, by_handler.1
        );
        println!(
            "postgres relay (rows a dead process left), commit to stored: p50 {:.0} ms, p99 {:.0} ms (relay_delay 5 s, every 1 s)",
            by_relay.0, by_relay.1
        );
    }
    // The storefront: POST /orders with the outbox against the same
    // endpoint committing and then publishing (the unsafe dual write), the
    // storefront in its own process, this one the load generator.
    if wanted("storefront") {
        let mut runs = Vec::new();
        for round in 0..repeat {
            // Each side first in every other pair: neither gets the
            // machine's warm-up (or its cooling) every time.
            let requests = n.min(10_000);
            let (outbox, direct) = if round % 2 == 0 {
                let o = storefront::post_orders(requests, false).await?;
                (o, storefront::post_orders(requests, true).await?)
            } else {
                let d = storefront::post_orders(requests, true).await?;
                (storefront::post_orders(requests, false).await?, d)
            };
            eprintln!("{}", outbox.cost.line("outbox"));
            eprintln!("{}", direct.cost.line("direct"));
            runs.push((outbox, direct));
        }
        let o = median(runs.iter().map(|r| r.0.rate).collect());
        let d = median(runs.iter().map(|r| r.1.rate).collect());
        let ratio = median(runs.iter().map(|r| r.0.rate / r.1.rate).collect());
        rows.push(("POST /orders, outbox vs direct (/s)", o, d, ratio));
        ratios.push(("storefront", ratio));
        let p = |f: fn(&storefront::Run) -> f64, side: usize| {
            median(
                runs.iter()
                    .map(|r| if side == 0 { f(&r.0) } else { f(&r.1) })
                    .collect(),
            )
        };
        println!(
            "storefront, commit to stored: outbox p50 {:.1} ms, p99 {:.1} ms; direct publish p50 {:.1} ms, p99 {:.1} ms",
            p(|r| r.latency.0, 0),
            p(|r| r.latency.1, 0),
            p(|r| r.latency.0, 1),
            p(|r| r.latency.1, 1)
        );
    }
    if wanted("console") {
        let minutes = args.console_minutes as f64;
        let f = console::run(minutes).await?;
        rows.push((
            "console: one reading, 100 handlers (ms)",
            f.reading.0,
            f.reading.1,
            f.reading.1 / f.reading.0,
        ));
        println!(
            "console, main view with 100 handlers: server time p50 {:.2} ms, p99 {:.2} ms",
            f.render.0, f.render.1
        );
        println!(
            "console page over {minutes} min of live updates ({} taken): JS heap {:.0} KB at the start, {:.0} KB at the end, {:.0} KB at most; console RSS {:.1} MB, then {:.1} MB",
            f.updates, f.heap_kb.0, f.heap_kb.1, f.heap_kb.2, f.rss_mb.0, f.rss_mb.1
        );
    }
    if wanted("aggregate_append") {
        let (c, r, ratio) = median_pair(
            repeat,
            || aggregates::choreo_append(n),
            || aggregates::raw_append(n),
        )
        .await?;
        rows.push(("append: decide on a state in memory (/s)", c, r, ratio));
        ratios.push(("aggregate_append", ratio));
    }
    if wanted("aggregate_hot") {
        for (writers, shared) in [(2, false), (8, false), (8, true)] {
            let (rate, conflicts) = aggregates::hot(2_000, writers, shared).await?;
            let how = if shared {
                " sharing one Aggregates"
            } else {
                ""
            };
            println!(
                "hot aggregate, {writers} writers{how}: {rate:.0} decisions/s, {:.0}% of attempts conflicted",
                conflicts * 100.0
            );
        }
    }
    if wanted("aggregate_load") {
        let mut pairs = Vec::new();
        for _ in 0..repeat {
            pairs.push(aggregates::load(10_000).await?);
        }
        let c = median(pairs.iter().map(|p| p.0).collect());
        let r = median(pairs.iter().map(|p| p.1).collect());
        let ratio = median(pairs.iter().map(|p| p.0 / p.1).collect());
        let snapshot = median(pairs.iter().map(|p| p.2).collect());
        rows.push(("load 10,000 events (events/s)", c, r, ratio));
        ratios.push(("aggregate_load", ratio));
        println!("load 10,000 events from a snapshot: {snapshot:.2} ms");
    }
    if wanted("latency") {
        let (p50, p99) = latency_pair(repeat, ln, rate, RawKv::ReadThenWrite).await?;
        rows.push(("3-hop latency p50 (ms)", p50.0, p50.1, p50.2));
        rows.push(("3-hop latency p99 (ms)", p99.0, p99.1, p99.2));
        ratios.push(("latency", p99.2));
    }
    if wanted("latency_write_only") {
        let (p50, p99) = latency_pair(repeat, ln, rate, RawKv::WriteOnly).await?;
        rows.push(("  vs raw writing only, p50", p50.0, p50.1, p50.2));
        rows.push(("  vs raw writing only, p99", p99.0, p99.1, p99.2));
        // The moonshot: the chain's p50 against relays that never read
        // their keys (not idempotent; no target, measured every run).
        ratios.push(("latency_p50_vs_write_only", p50.2));
    }

    println!(
        "{:<30} {:>12} {:>12} {:>7}",
        "case", "choreo", "raw", "ratio"
    );
    for (case, c, r, ratio) in &rows {
        println!("{case:<30} {c:>12.1} {r:>12.1} {ratio:>7.2}");
    }
    println!();
    for (case, v) in ratios {
        println!("ratio {case} {v:.2}");
    }
    Ok(())
}
