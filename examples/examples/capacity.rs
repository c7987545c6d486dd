//! What choreo keeps on a nats-server, measured: server memory and disk per
//! retained event and per inbox record, and what the defaults cost at a
//! given rate. `scripts/bench capacity` runs it.
//!
//! ```sh
//! cargo run --release -p choreo-examples --example capacity -- --events 100000
//! ```
//!
//! Two fresh servers (one nats-server each, started by choreo-testkit):
//!
//! 1. **events only**: `--events` keyed events (about 128 bytes of CBOR
//!    each, as in the benchmark) published into their stream;
//! 2. **events and inbox**: the same events, then handled by a service
//!    whose handler remembers them in its inbox (one record per event) and
//!    emits nothing.
//!
//! Each server's resident memory (`VmRSS` from `/proc`) and its store's
//! size on disk are read before, after writing, and after a restart (when
//! the server has rebuilt its index from disk: what a long-running server
//! holds). The differences, divided by the number of events, give the cost
//! of one retained event and of one inbox record. A projection then prices
//! the defaults: streams keep every event (no age limit), the inbox keeps a
//! record per handled event for 7 days.
//!
//! It prints a table and one `capacity <metric> <value>` line per figure.

use std::path::Path;
use std::time::Duration;

use choreo::{Publisher, Service, event, event_handler};
use choreo_examples::arg;
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

/// The server's resident memory in bytes.
fn rss(server: &NatsServer) -> u64 {
    let Some(pid) = server.pid() else { return 0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of the files below `dir`.
fn disk(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                disk(&path)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

/// Memory and disk of a server, once it has settled.
#[derive(Clone, Copy, Debug)]
struct Reading {
    rss: u64,
    disk: u64,
}

async fn read(server: &NatsServer) -> Reading {
    // Let the server finish flushing and its runtime settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
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

/// One server's run: (before, after writing, after a restart).
async fn run(n: u64, inbox: bool) -> Result<(Reading, Reading, Reading), BoxError> {
    let mut server = NatsServer::start().await?;
    let client = server.connect().await?;
    let publisher = Publisher::new(client.clone(), "capacity")?;
    publisher.ensure_stream::<CapacityPlaced>().await?;
    let before = read(&server).await;
    publish_all(&publisher, n).await?;
    if inbox {
        let svc = Service::new("keeper")
            .handler(remember)
            .start(client)
            .await?;
        let stats = svc.stats("remember").ok_or("no stats")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while stats.handled() < n {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("handled {} of {n} in 300 s", stats.handled()).into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        svc.shutdown().await;
    }
    let written = read(&server).await;
    server.restart().await?;
    let restarted = read(&server).await;
    Ok((before, written, restarted))
}

fn per(delta_from: u64, delta_to: u64, n: u64) -> f64 {
    delta_to.saturating_sub(delta_from) as f64 / n as f64
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--events", 100_000).max(1);
    let horizon_days = arg(&args, "--horizon-days", 7).max(1);
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; run with --release for figures worth comparing");
    }
    eprintln!("events={n} horizon={horizon_days} days");

    let (e0, e1, e2) = run(n, false).await?;
    let (b0, b1, b2) = run(n, true).await?;

    let event_ram_writing = per(e0.rss, e1.rss, n);
    let event_ram = per(e0.rss, e2.rss, n);
    let event_disk = per(e0.disk, e2.disk, n);
    // The second server holds the same events plus one record each.
    let record_ram_writing = per(e1.rss - e0.rss + b0.rss, b1.rss, n);
    let record_ram = per(e2.rss - e0.rss + b0.rss, b2.rss, n);
    let record_disk = per(e2.disk - e0.disk + b0.disk, b2.disk, n);

    println!("{:<44} {:>12} {:>12}", "per unit", "server RAM", "disk");
    println!(
        "{:<44} {:>12} {:>12}",
        "retained event, while writing",
        format!("{event_ram_writing:.0} B"),
        ""
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "retained event, after a restart",
        format!("{event_ram:.0} B"),
        format!("{event_disk:.0} B")
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "inbox record, while writing",
        format!("{record_ram_writing:.0} B"),
        ""
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "inbox record, after a restart",
        format!("{record_ram:.0} B"),
        format!("{record_disk:.0} B")
    );
    println!();
    let horizon = (horizon_days * 86_400) as f64;
    println!(
        "defaults at a steady rate (one handler, inbox {horizon_days} days; streams keep every event)"
    );
    println!(
        "{:>10} {:>16} {:>16} {:>16} {:>16}",
        "events/s", "inbox RAM", "inbox disk", "events RAM/day", "events disk/day"
    );
    for rate in [10.0, 50.0, 100.0, 1000.0] {
        let records = rate * horizon;
        let per_day = rate * 86_400.0;
        println!(
            "{:>10} {:>16} {:>16} {:>16} {:>16}",
            rate,
            human(records * record_ram),
            human(records * record_disk),
            human(per_day * event_ram),
            human(per_day * event_disk)
        );
    }
    println!();
    println!("capacity event_ram_bytes {event_ram:.0}");
    println!("capacity event_disk_bytes {event_disk:.0}");
    println!("capacity record_ram_bytes {record_ram:.0}");
    println!("capacity record_disk_bytes {record_disk:.0}");
    Ok(())
}
