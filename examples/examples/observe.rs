//! What seeing a choreography costs, measured against raw async-nats in the
//! same run: `scripts/bench observe`.
//!
//! - `status_100`: one reading of `choreo::admin` (`Snapshot::take`) over
//!   100 handlers (20 services of 5 handlers, 1,000 events handled), against
//!   the same reads written in raw async-nats (the stream's consumer list,
//!   the registry's keys and records, a last-per-subject consumer per
//!   handler to count its inbox records, the dead-letter counts); and the whole `choreo status` (two readings, its
//!   default 500 ms apart), which must stay under 1 s.
//! - `lag`: the `choreo.consumer.lag` gauge a handler sets from each
//!   delivery's pending count, against the consumer's `num_pending` read
//!   from the server at the same moment, at a steady 10,000 events/s.
//!
//! - `trace`: `choreo::admin::trace` of one flow in a stream of
//!   `--trace-events` events (100,000), with the default window: by
//!   subject, by a root's v7 id, by a keyed id (placed by inbox records),
//!   and by the id of an event stored in the same seconds as all the others.
//!
//! `cargo run --release -p choreo-examples --example observe -- [--rate R] [--seconds S] [--trace-events N] [--trace-only]`

use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo::admin::{self, Snapshot};
use choreo::{Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;
use futures::{StreamExt, TryStreamExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The events every handler reads.
#[event(subject = "observe.{n}.ticked", key = n)]
pub struct Ticked {
    /// Its number.
    pub n: u64,
}

/// A flow's root: no key, so a random (v7) id.
#[event(subject = "observe.flow.started")]
pub struct FlowStarted {
    /// Its number.
    pub n: u64,
}

/// What the flow's first handler emits.
#[event(subject = "observe.flow.{n}.ended")]
pub struct FlowEnded {
    /// The root's number.
    pub n: u64,
}

#[event_handler(emits = [FlowEnded])]
async fn start_flow(s: FlowStarted, ctx: choreo::Context) {
    ctx.emit(FlowEnded { n: s.n });
}

#[event_handler(emits = [])]
async fn end_flow(_e: FlowEnded) {}

#[event_handler(emits = [])]
async fn h1(_t: Ticked) {}
#[event_handler(emits = [])]
async fn h2(_t: Ticked) {}
#[event_handler(emits = [])]
async fn h3(_t: Ticked) {}
#[event_handler(emits = [])]
async fn h4(_t: Ticked) {}
#[event_handler(emits = [])]
async fn h5(_t: Ticked) {}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

async fn wait_handled(js: &jetstream::Context, n: u64) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = js
            .get_stream_no_info(<Ticked as choreo::Event>::STREAM)
            .await?;
        let infos: Vec<jetstream::consumer::Info> = s.consumers().try_collect().await?;
        if infos.len() >= 100 && infos.iter().all(|i| i.ack_floor.stream_sequence >= n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the 100 handlers did not finish in 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One reading of 100 handlers, against the raw reads under it.
async fn status_100() -> Result<(), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    let mut services = Vec::new();
    for i in 0..20 {
        let s = Service::new(format!("svc{i:02}"))
            .handler(h1)
            .handler(h2)
            .handler(h3)
            .handler(h4)
            .handler(h5)
            .start(client.clone())
            .await?;
        services.push(s);
    }
    let publisher = Publisher::new(client.clone(), "observe")?;
    futures::stream::iter(0..1000u64)
        .map(|n| {
            let p = publisher.clone();
            async move { p.publish(&Ticked { n }).await }
        })
        .buffered(256)
        .try_collect::<Vec<_>>()
        .await?;
    wait_handled(&js, 1000).await?;

    let mut choreo_ms = Vec::new();
    let mut raw_ms = Vec::new();
    let mut handlers = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let s = Snapshot::take(&js).await?;
        choreo_ms.push(t.elapsed().as_secs_f64() * 1e3);
        handlers = admin::Status::judge(&s, &s).handlers.len();

        let t = Instant::now();
        let stream = js
            .get_stream_no_info(<Ticked as choreo::Event>::STREAM)
            .await?;
        let infos: Vec<jetstream::consumer::Info> = stream.consumers().try_collect().await?;
        let kv = js.get_key_value(choreo::registry::BUCKET).await?;
        let keys: Vec<String> = kv.keys().await?.try_collect().await?;
        for k in &keys {
            let _ = kv.get(k).await?;
        }
        // The same inbox counts: a last-per-subject consumer per handler.
        futures::stream::iter(infos.iter())
            .for_each_concurrent(16, |i| {
                let js = js.clone();
                async move {
                    let name = i.name.clone();
                    let (svc, handler) = name.split_once("--").unwrap_or_default();
                    let bucket = format!("choreo_inbox_{svc}");
                    if let Ok(s) = js.get_stream_no_info(format!("KV_{bucket}")).await {
                        let _ = s
                            .create_consumer(jetstream::consumer::pull::Config {
                                filter_subject: format!("$KV.{bucket}.{handler}.>"),
                                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                                inactive_threshold: Duration::from_secs(2),
                                memory_storage: true,
                                ..Default::default()
                            })
                            .await;
                    }
                }
            })
            .await;
        if let Ok(dlq) = js.get_stream(choreo::dlq::DLQ_STREAM).await {
            let _: Vec<(String, usize)> = dlq
                .info_with_subjects("choreo.dlq.>")
                .await?
                .try_collect()
                .await?;
        }
        raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(infos.len() >= 100 && keys.len() == 20);
    }
    let t = Instant::now();
    let status = admin::status(&js, Duration::from_millis(500)).await?;
    let whole = t.elapsed().as_secs_f64() * 1e3;
    let (c, r) = (median(choreo_ms.clone()), median(raw_ms));
    println!(
        "status_100: {handlers} handlers; one reading {c:.1} ms (median of 10, max {:.1}), the same reads in raw async-nats {r:.1} ms; ratio {:.2}",
        choreo_ms.iter().copied().fold(0.0, f64::max),
        r / c
    );
    println!(
        "status_100: `choreo status` (two readings 500 ms apart) {whole:.0} ms for {} handlers, all {}",
        status.handlers.len(),
        if status.handlers.iter().all(|h| h.state == admin::State::Ok) {
            "OK"
        } else {
            "judged"
        }
    );
    for s in services {
        s.shutdown().await;
    }
    Ok(())
}

/// `choreo trace` of one flow in a stream holding `n` events, with the
/// default window (the last hour: all of them): by subject; then by id, of
/// a two-event flow stored after the `n` (its root's v7 id, and its second
/// event's keyed one, which only the inbox records place); and by the id of
/// one of the `n`, stored in the same seconds as all the others (the case
/// an id query cannot narrow).
async fn trace_in(n: u64) -> Result<(), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    let svc = Service::new("tracesvc")
        .handler(h1)
        .handler(start_flow)
        .handler(end_flow)
        .start(client.clone())
        .await?;
    let publisher = Publisher::new(client.clone(), "observe")?;
    let receipts = futures::stream::iter(0..n)
        .map(|i| {
            let p = publisher.clone();
            async move { p.publish(&Ticked { n: i }).await }
        })
        .buffered(256)
        .try_collect::<Vec<_>>()
        .await?;
    wait_handled_by(&js, "tracesvc--h1", n).await?;
    let timed = |q: admin::Query| {
        let js = js.clone();
        async move {
            let mut ms = Vec::new();
            let mut events = 0;
            for _ in 0..3 {
                let t = Instant::now();
                let found = admin::trace(&js, &q, None, Duration::from_secs(3600)).await?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(found.flows.len(), 1);
                events = found.flows[0].events.len();
            }
            Ok::<_, BoxError>((median(ms), events))
        }
    };
    let (ms, _) = timed(format!("observe.{}.ticked", n / 2).parse()?).await?;
    println!(
        "trace: one flow by subject in a stream of {n} events (default window): {ms:.0} ms median of 3"
    );
    // The flow, stored at least 6 s after the last of the n (a trace by id
    // reads 5 s either side of what it finds).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let root = publisher.publish(&FlowStarted { n }).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.stats("end_flow").map_or(0, |s| s.handled()) == 0 {
        if Instant::now() > deadline {
            return Err("the flow did not finish in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ms, events) = timed(admin::Query::Id(root.event_id)).await?;
    println!(
        "trace: a flow by its root's id (v7) in a stream of {n} events (default window): {ms:.0} ms median of 3, {events} events"
    );
    let found = admin::trace(
        &js,
        &admin::Query::Id(root.event_id),
        None,
        Duration::from_secs(3600),
    )
    .await?;
    let child: choreo::EventId = found.flows[0].events[1].id.parse()?;
    let (ms, events) = timed(admin::Query::Id(child)).await?;
    println!(
        "trace: the same flow by its second event's (keyed) id: {ms:.0} ms median of 3, {events} events"
    );
    let middle = receipts[receipts.len() / 2].event_id;
    let (ms, _) = timed(admin::Query::Id(middle)).await?;
    println!(
        "trace: one of the {n} by its id, all {n} stored within seconds of it: {ms:.0} ms median of 3"
    );
    svc.shutdown().await;
    Ok(())
}

async fn wait_handled_by(js: &jetstream::Context, durable: &str, n: u64) -> Result<(), BoxError> {
    let stream = js
        .get_stream_no_info(<Ticked as choreo::Event>::STREAM)
        .await?;
    for _ in 0..1200 {
        if stream
            .consumer_info(durable)
            .await?
            .ack_floor
            .stream_sequence
            >= n
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{durable} did not finish").into())
}

/// The lag gauge against `num_pending` at a steady input rate.
async fn lag(rate: u64, seconds: u64, probe: &choreo_testkit::GaugeProbe) -> Result<(), BoxError> {
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    let svc = Service::new("lagsvc")
        .handler(h1)
        .start(client.clone())
        .await?;
    let publisher = Publisher::new(client.clone(), "observe")?;
    publisher.publish(&Ticked { n: 0 }).await?;
    // Paced: every 10 ms, rate/100 publishes in flight at once.
    let per_tick = (rate / 100).max(1);
    let feeding = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut n = 1u64;
        loop {
            tick.tick().await;
            let batch: Vec<u64> = (n..n + per_tick).collect();
            n += per_tick;
            let p = publisher.clone();
            tokio::spawn(async move {
                futures::future::join_all(batch.into_iter().map(|n| {
                    let p = p.clone();
                    async move { p.publish(&Ticked { n }).await }
                }))
                .await
            });
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stream = js
        .get_stream_no_info(<Ticked as choreo::Event>::STREAM)
        .await?;
    let mut diffs = Vec::new();
    let mut pendings = Vec::new();
    let start_seq = stream.get_info().await?.state.last_sequence;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(seconds) {
        let before = probe.value().unwrap_or(f64::NAN);
        let info = stream.consumer_info("lagsvc--h1").await?;
        let after = probe.value().unwrap_or(f64::NAN);
        let p = info.num_pending as f64;
        // The gauge read nearest the server's figure.
        let d = (p - before).abs().min((p - after).abs());
        diffs.push(d);
        pendings.push(p);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end_seq = stream.get_info().await?.state.last_sequence;
    feeding.abort();
    let achieved = (end_seq - start_seq) as f64 / t0.elapsed().as_secs_f64();
    let within = diffs.iter().filter(|d| **d <= 1.0).count();
    println!(
        "lag: at {achieved:.0} events/s in, {} samples: |gauge - num_pending| median {:.0}, p90 {:.0}, max {:.0}; within ±1 in {within} ({:.0}%); num_pending itself median {:.0}",
        diffs.len(),
        median(diffs.clone()),
        percentile(diffs.clone(), 0.9),
        diffs.iter().copied().fold(0.0, f64::max),
        100.0 * within as f64 / diffs.len() as f64,
        median(pendings),
    );
    svc.shutdown().await;
    Ok(())
}

/// What seeing a choreography costs, against raw async-nats in the same run.
#[derive(Debug, clap::Parser)]
#[command(name = "observe")]
struct Args {
    /// Events per second in the lag run.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of the lag run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Events in the stream the trace runs read.
    #[arg(long, default_value_t = 100_000)]
    trace_events: u64,
    /// Runs the trace runs only.
    #[arg(long)]
    trace_only: bool,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    let probe = choreo_testkit::GaugeProbe::install(choreo::observe::LAG)?;
    if !args.trace_only {
        status_100().await?;
        lag(args.rate, args.seconds, &probe).await?;
    }
    trace_in(args.trace_events).await?;
    Ok(())
}
