//! What choreo keeps on a nats-server, measured: server memory and disk per
//! retained event and per inbox record, for the inbox's grouped layout and
//! for one key per event, and what the defaults cost at a given rate.
//! `scripts/bench capacity` runs it.
//!
//! ```sh
//! cargo run --release -p choreo-examples --example capacity -- --events 100000 --groups 1024
//! ```
//!
//! Three fresh servers (one nats-server each, started by choreo-testkit):
//!
//! 1. **events only**: `--events` keyed events (about 128 bytes of CBOR
//!    each, as in the benchmark) published into their stream;
//! 2. **one key per event**: the same events, and for each a key
//!    `<handler>.<id>` = `done <ms>` written into a bucket like choreo's
//!    inbox (the layout choreo used before records were grouped, and what a
//!    hand-written relay does);
//! 3. **grouped inbox**: the same events, handled by a choreo service whose
//!    handler remembers them in its inbox, spread over `--groups` groups,
//!    and emits nothing. With `--events` well above `--groups` each group
//!    holds as many records as a default inbox (65,536 groups) holds at
//!    `events / groups × 65,536` remembered events: the steady state of a
//!    busy handler, reached in seconds.
//!
//! Each server's resident memory (`VmRSS` from `/proc`) and its store's
//! size on disk are read before, after writing, and after a restart (when
//! the server has rebuilt its index from disk: what a long-running server
//! holds); the bytes the server wrote (`wchar` from `/proc/<pid>/io`) and
//! the handling rate are read while the inbox is written. The differences,
//! divided by the number of events, give the cost of one retained event and
//! of one remembered event in each layout. A projection then prices the
//! defaults.
//!
//! It prints a table and one `capacity <metric> <value>` line per figure.
//!
//! `--shop N [--rounds K] [--horizon S]` measures the shop instead: its
//! four services with their defaults on one fresh server, K rounds of N
//! orders each, and the server's memory and disk per order after the rounds
//! and after a restart, with the keys its inbox buckets and streams hold.
//! `--groups G` gives every service's inbox G groups (65,536 by default).
//! With `--horizon S`, the streams keep events S seconds (`max_age`), the
//! inboxes remember S seconds, and a round starts every S seconds: many
//! horizons, and what the server holds after each round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use choreo::{Publisher, Service, event, event_handler};
use choreo_examples::footprint::{disk, rss};
use choreo_testkit::NatsServer;
use futures::StreamExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A root event the size of the benchmark's (about 128 bytes of CBOR).
#[event(subject = "capacity.{id}.placed", key = id)]
#[derive(Clone, Debug)]
pub struct CapacityPlaced {
    /// Sequence number.
    pub id: u64,
    /// Filler.
    pub note: String,
}

/// Remembers each event in the inbox, and does nothing else.
#[event_handler(concurrency = 256)]
async fn remember(_e: CapacityPlaced) {}

/// Bytes the server process has written (`wchar`: every write call, to
/// its store or its clients).
fn written(server: &NatsServer) -> u64 {
    let Some(pid) = server.pid() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `--settle`: seconds to wait before each reading.
static SETTLE: AtomicU64 = AtomicU64::new(2);

/// Memory and disk of a server, once it has settled.
#[derive(Clone, Copy, Debug)]
struct Reading {
    rss: u64,
    disk: u64,
}

async fn read(server: &NatsServer) -> Reading {
    // Let the server finish flushing and its runtime settle (`--settle`
    // seconds; Go returns freed memory to the system over minutes).
    tokio::time::sleep(Duration::from_secs(SETTLE.load(Ordering::Relaxed))).await;
    Reading {
        rss: rss(server),
        disk: disk(server.dir()),
    }
}

async fn publish_all(publisher: &Publisher, n: u64) -> Result<(), BoxError> {
    let note = "x".repeat(96);
    let mut results = futures::stream::iter(0..n)
        .map(|id| {
            let event = CapacityPlaced {
                id,
                note: note.clone(),
            };
            async move { publisher.publish(&event).await.map(|_| ()) }
        })
        .buffer_unordered(256);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

/// What a server's run keeps: how the inbox is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Events only.
    None,
    /// One key per event, written by hand.
    PerKey,
    /// choreo's inbox, in this many groups.
    Grouped(u32),
}

/// One server's run.
struct Run {
    before: Reading,
    written: Reading,
    restarted: Reading,
    /// Bytes the server wrote while the inbox was written, per event.
    wrote_per_event: f64,
    /// Inbox records written per second.
    rate: f64,
}

async fn run(n: u64, layout: Layout) -> Result<Run, BoxError> {
    let mut server = NatsServer::start().await?;
    let client = server.connect().await?;
    let publisher = Publisher::new(client.clone(), "capacity")?;
    publisher.ensure_stream::<CapacityPlaced>().await?;
    let before = read(&server).await;
    publish_all(&publisher, n).await?;
    let wrote_before = written(&server);
    let started = std::time::Instant::now();
    match layout {
        Layout::None => {}
        Layout::PerKey => write_keys(&client, n).await?,
        Layout::Grouped(groups) => {
            let svc = Service::new("keeper")
                .inbox_groups(groups)
                .handler(remember)
                .start(client)
                .await?;
            let stats = svc.stats("remember").ok_or("no stats")?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while stats.handled() < n {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("handled {} of {n} in 600 s", stats.handled()).into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            svc.shutdown().await;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let wrote_per_event = per(wrote_before, written(&server), n);
    let written = read(&server).await;
    server.restart().await?;
    let restarted = read(&server).await;
    Ok(Run {
        before,
        written,
        restarted,
        wrote_per_event,
        rate,
    })
}

/// One key per event, as choreo's inbox wrote them before records were
/// grouped: `<handler>.<uuid>` = `done <unix ms>`, in a bucket made the same
/// way (history 1, file storage).
async fn write_keys(client: &choreo::async_nats::Client, n: u64) -> Result<(), BoxError> {
    use choreo::async_nats::jetstream::{self, kv};
    let js = jetstream::new(client.clone());
    let kv = js
        .create_key_value(kv::Config {
            bucket: "choreo_inbox_perkey".into(),
            history: 1,
            max_age: choreo::DEFAULT_INBOX_RETENTION,
            ..Default::default()
        })
        .await?;
    let mut writes = futures::stream::iter(0..n)
        .map(|_| {
            let kv = kv.clone();
            async move {
                let key = format!("remember.{}", uuid::Uuid::now_v7());
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let value = format!("done {ms}");
                kv.put(key, value.into()).await.map(|_| ())
            }
        })
        .buffer_unordered(256);
    while let Some(r) = writes.next().await {
        r?;
    }
    Ok(())
}

fn per(delta_from: u64, delta_to: u64, n: u64) -> f64 {
    delta_to.saturating_sub(delta_from) as f64 / n as f64
}

use choreo::__private::human_bytes as human;

/// Memory and disk per remembered event of one inbox layout, net of the
/// events themselves (the same on every server).
struct Cost {
    ram_writing: f64,
    ram: f64,
    disk: f64,
    wrote: f64,
    rate: f64,
}

fn cost(events: &Run, inbox: &Run, n: u64) -> Cost {
    let net = |e0: u64, e: u64, b0: u64| e.saturating_sub(e0) + b0;
    Cost {
        ram_writing: per(
            net(events.before.rss, events.written.rss, inbox.before.rss),
            inbox.written.rss,
            n,
        ),
        ram: per(
            net(events.before.rss, events.restarted.rss, inbox.before.rss),
            inbox.restarted.rss,
            n,
        ),
        disk: per(
            net(events.before.disk, events.restarted.disk, inbox.before.disk),
            inbox.restarted.disk,
            n,
        ),
        wrote: inbox.wrote_per_event,
        rate: inbox.rate,
    }
}

/// Keys in the inbox buckets, and subjects in the other streams (not
/// buckets), that the server holds now, with each such stream's subjects.
async fn inbox_keys_and_subjects(
    client: &choreo::async_nats::Client,
) -> Result<(u64, u64, Vec<(String, u64)>), BoxError> {
    let js = choreo::async_nats::jetstream::new(client.clone());
    let mut names = js.stream_names();
    let (mut inbox_keys, mut stream_subjects, mut each) = (0, 0, Vec::new());
    while let Some(name) = names.next().await {
        let name = name?;
        let info = js.get_stream(&name).await?.info().await?.clone();
        if name.starts_with("KV_choreo_inbox_") {
            inbox_keys += info.state.subjects_count;
        } else if !name.starts_with("KV_") {
            stream_subjects += info.state.subjects_count;
            each.push((name, info.state.subjects_count));
        }
    }
    each.sort();
    Ok((inbox_keys, stream_subjects, each))
}

/// The shop's four services on one fresh server, `rounds` rounds of `n`
/// orders: what the server holds per order.
async fn shop_run(
    n: u64,
    rounds: u64,
    horizon: Option<Duration>,
    groups: u32,
) -> Result<(), BoxError> {
    use choreo_examples::shop::{self, Ledger, SERVICES};
    let mut server = NatsServer::start().await?;
    let pg = choreo_testkit::PostgresServer::start().await?;
    let client = server.connect().await?;
    let pool = choreo_postgres::sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg.url())
        .await?;
    let ledger = Ledger::open(&client, pool).await?;
    let mut settings = choreo::StreamSettings::default();
    if let Some(h) = horizon {
        settings = settings
            .max_age(h)
            .duplicate_window(h.min(Duration::from_secs(120)));
    }
    let mut handles = Vec::new();
    for name in SERVICES {
        let mut svc = shop::service(name, ledger.clone(), settings.clone())
            .await?
            .inbox_groups(groups);
        if let Some(h) = horizon {
            // Fired deadlines' copies follow the horizon too; a deadline's
            // decision is kept its `within` and an hour (docs/deadlines.md).
            svc = svc.inbox_retention(h).deadline_retention(h);
        }
        handles.push(svc.start(client.clone()).await?);
    }
    let recorder = choreo_testkit::Recorder::start(&client).await?;
    let publisher = Publisher::new(client.clone(), "storefront")?.stream_settings(settings);
    let before = read(&server).await;
    for round in 0..rounds {
        let started = tokio::time::Instant::now();
        let run = format!("r{round}");
        shop::place_orders(&publisher, &run, n).await?;
        let s =
            shop::wait_for_endings(&recorder, &ledger, &run, n, Duration::from_secs(60), |_| {})
                .await?;
        if !s.is_clean() || s.lost > 0 {
            return Err(format!("round {round}: {s}").into());
        }
        let held = inbox_keys_and_subjects(&client).await?;
        eprintln!(
            "round {round}: {s}; server RSS {} MB; inbox keys {}, stream subjects {}",
            rss(&server) / 1_000_000,
            held.0,
            held.1
        );
        if let Some(h) = horizon {
            tokio::time::sleep_until(started + h).await;
        }
    }
    for h in handles {
        h.shutdown().await;
    }
    drop(recorder);
    let written = read(&server).await;
    let (inbox_keys, stream_subjects, each) = inbox_keys_and_subjects(&client).await?;
    drop(client);
    server.restart().await?;
    let restarted = read(&server).await;
    let orders = n * rounds;
    println!("shop: {orders} orders in {rounds} rounds");
    println!(
        "server RAM per order: {:.0} B while running, {:.0} B after a restart; disk {:.0} B",
        per(before.rss, written.rss, orders),
        per(before.rss, restarted.rss, orders),
        per(before.disk, restarted.disk, orders)
    );
    println!(
        "keys held: {inbox_keys} in the inbox buckets (4 records per order: {}), {stream_subjects} subjects in the streams",
        4 * orders
    );
    let each: Vec<String> = each.iter().map(|(n, k)| format!("{n} {k}")).collect();
    println!("subjects by stream: {}", each.join(", "));
    println!(
        "capacity shop_ram_per_order_bytes {:.0}",
        per(before.rss, restarted.rss, orders)
    );
    println!("capacity shop_inbox_keys {inbox_keys}");
    Ok(())
}

/// What choreo keeps on a nats-server, measured.
#[derive(Debug, clap::Parser)]
#[command(name = "capacity")]
struct Args {
    /// Events per layout.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["shop", "rounds", "horizon"])]
    events: u64,
    /// Inbox groups (default 1,024; with `--shop`, 65,536).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    groups: Option<u32>,
    /// Seconds to let the server settle before each reading.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Measures the shop instead: orders per round.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    shop: Option<u64>,
    /// Rounds of the shop's orders.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), requires = "shop")]
    rounds: u64,
    /// Seconds the shop's streams and inboxes keep (and between rounds).
    #[arg(long, requires = "shop", value_parser = clap::value_parser!(u64).range(1..))]
    horizon: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    SETTLE.store(args.settle, Ordering::Relaxed);
    if let Some(orders) = args.shop {
        return shop_run(
            orders,
            args.rounds,
            args.horizon.map(Duration::from_secs),
            args.groups.unwrap_or(65_536),
        )
        .await;
    }
    let n = args.events;
    let groups = args.groups.unwrap_or(1024);
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for figures worth comparing");
    }
    eprintln!("events={n} groups={groups}");

    let events = run(n, Layout::None).await?;
    let per_key = cost(&events, &run(n, Layout::PerKey).await?, n);
    let grouped = cost(&events, &run(n, Layout::Grouped(groups)).await?, n);

    let event_ram_writing = per(events.before.rss, events.written.rss, n);
    let event_ram = per(events.before.rss, events.restarted.rss, n);
    let event_disk = per(events.before.disk, events.restarted.disk, n);

    let g = n as f64 / f64::from(groups);
    println!(
        "{:<46} {:>11} {:>11} {:>9} {:>12} {:>10}",
        "per unit", "RAM writing", "RAM", "disk", "written", "records/s"
    );
    println!(
        "{:<46} {:>11} {:>11} {:>9}",
        "retained event",
        format!("{event_ram_writing:.0} B"),
        format!("{event_ram:.0} B"),
        format!("{event_disk:.0} B"),
    );
    for (name, c) in [
        ("remembered event, one key per event".to_owned(), &per_key),
        (
            format!("remembered event, grouped ({g:.0} per group)"),
            &grouped,
        ),
    ] {
        println!(
            "{:<46} {:>11} {:>11} {:>9} {:>12} {:>10}",
            name,
            format!("{:.0} B", c.ram_writing),
            format!("{:.0} B", c.ram),
            format!("{:.0} B", c.disk),
            format!("{:.0} B", c.wrote),
            format!("{:.0}", c.rate),
        );
    }
    println!(
        "grouped / one key per event, RAM after a restart: {:.3} ({:.0}x smaller)",
        grouped.ram / per_key.ram.max(1.0),
        per_key.ram / grouped.ram.max(1.0)
    );
    println!();
    // The sizing table of docs/capacity.md: a key (one per event, or one
    // per group) at the measured cost of one key per event.
    let key_ram = per_key.ram;
    let default_groups = f64::from(choreo::DEFAULT_INBOX_GROUPS);
    println!(
        "sizing (one handler; a key at {key_ram:.0} B, a record 24 B; default {} groups)",
        choreo::DEFAULT_INBOX_GROUPS
    );
    println!(
        "{:>8} {:>8} {:>11} {:>14} {:>17} {:>13} {:>18}",
        "rate/s",
        "horizon",
        "remembered",
        "one key each",
        "groups for ~10",
        "their memory",
        "default: per group"
    );
    for (rate, horizon_s, label) in [
        (1.0, 7.0 * 86_400.0, "7 days"),
        (10.0, 7.0 * 86_400.0, "7 days"),
        (10.0, 86_400.0, "1 day"),
        (50.0, 86_400.0, "1 day"),
        (1000.0, 3_600.0, "1 hour"),
    ] {
        let records: f64 = rate * horizon_s;
        let groups = (records / 10.0).ceil().max(default_groups);
        let per_group = records / default_groups;
        println!(
            "{:>8} {:>8} {:>11.0} {:>14} {:>17.0} {:>13} {:>18}",
            rate,
            label,
            records,
            human(records * key_ram),
            groups,
            human(groups.min(records) * key_ram),
            format!("{per_group:.0}, write {}", human(24.0 * per_group + 100.0)),
        );
    }
    println!();
    let kept = choreo::DEFAULT_STREAM_MAX_AGE.as_secs_f64();
    println!(
        "event streams, kept {:.0} days by default (DEFAULT_STREAM_MAX_AGE); a keyed event at {event_ram:.0} B of RAM, {event_disk:.0} B of disk",
        kept / 86_400.0
    );
    println!("{:>8} {:>14} {:>14}", "rate/s", "RAM once full", "disk");
    for rate in [1.0, 10.0, 50.0, 100.0] {
        println!(
            "{:>8} {:>14} {:>14}",
            rate,
            human(rate * kept * event_ram),
            human(rate * kept * event_disk)
        );
    }
    println!();
    println!("capacity event_ram_bytes {event_ram:.0}");
    println!("capacity event_disk_bytes {event_disk:.0}");
    println!("capacity perkey_record_ram_bytes {:.0}", per_key.ram);
    println!("capacity perkey_record_disk_bytes {:.0}", per_key.disk);
    println!("capacity perkey_written_bytes {:.0}", per_key.wrote);
    println!("capacity grouped_record_ram_bytes {:.0}", grouped.ram);
    println!("capacity grouped_record_disk_bytes {:.0}", grouped.disk);
    println!("capacity grouped_written_bytes {:.0}", grouped.wrote);
    println!("capacity grouped_records_per_second {:.0}", grouped.rate);
    Ok(())
}
