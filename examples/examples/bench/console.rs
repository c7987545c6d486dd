//! The console case: `choreo console` (the release binary next to this
//! one) over 100 handlers (10 services of 10, events trickling in):
//!
//! - the main view's server time (its `Server-Timing`), p50 and p99 over
//!   500 requests: what a page costs once the reading is made;
//! - one reading of the system (`admin::Snapshot::take`, what the console
//!   does every second for every open page together) against raw
//!   async-nats listing the same consumers and registry keys;
//! - the page's JavaScript heap (after a garbage collection) and the
//!   console's resident memory over `--console-minutes` (1) of live
//!   updates in a real headless Chromium.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo::{Publisher, Service, event, event_handler};
use choreo_examples::http::HttpClient;
use choreo_testkit::{Browser, NatsServer};
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;

use super::BoxError;

#[event(subject = "beats.{n}", key = n)]
pub(crate) struct Beat {
    pub(crate) n: u64,
}

macro_rules! handlers {
    ($($h:ident),*) => {
        $(
            #[event_handler(emits = [])]
            async fn $h(_b: Beat) {}
        )*
    };
}
handlers!(h0, h1, h2, h3, h4, h5, h6, h7, h8, h9);

/// What the case measured.
pub(super) struct Figures {
    /// The main view's server time, ms: p50, p99.
    pub(super) render: (f64, f64),
    /// One reading: choreo's snapshot, raw listing, ms (medians of 20).
    pub(super) reading: (f64, f64),
    /// The page's heap, KB: first sample (after 10 s), last, highest.
    pub(super) heap_kb: (f64, f64, f64),
    /// The console's resident memory, MB: first sample, last.
    pub(super) rss_mb: (f64, f64),
    /// Live updates the page took over the run.
    pub(super) updates: u64,
}

/// The `choreo` binary next to this one (`target/<profile>/choreo`).
fn choreo_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join("choreo")))
        .unwrap_or_else(|| "choreo".into())
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(((xs.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

pub(super) async fn run(minutes: f64) -> Result<Figures, BoxError> {
    let nats = NatsServer::start().await?;
    let client = nats.connect().await?;
    let mut services = Vec::new();
    for i in 0..10 {
        let s = Service::new(format!("svc{i}"))
            .handler(h0)
            .handler(h1)
            .handler(h2)
            .handler(h3)
            .handler(h4)
            .handler(h5)
            .handler(h6)
            .handler(h7)
            .handler(h8)
            .handler(h9)
            .start(client.clone())
            .await?;
        services.push(s);
    }
    let publisher = Publisher::new(client.clone(), "metronome")?;
    let beating = tokio::spawn(async move {
        for n in 0.. {
            let _ = publisher.publish(&Beat { n }).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let mut child = tokio::process::Command::new(choreo_binary())
        .args(["-s", &nats.url(), "console", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: build it with `cargo build --release -p choreo-cli`: {e}",
                choreo_binary().display()
            )
        })?;
    let pid = child.id().unwrap_or_default();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or("the console printed nothing")?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .ok_or_else(|| format!("no address in {line:?}"))?
        .trim_end_matches('/')
        .to_owned();
    let addr: SocketAddr = base.trim_start_matches("http://").parse()?;
    let mut http = HttpClient::new(addr);
    // The first reading covers all 100 handlers.
    loop {
        let r = http.get("/api/status").await?;
        if r.status == 200 {
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            if v["handlers"].as_array().map_or(0, Vec::len) == 100 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times = Vec::new();
    for _ in 0..500 {
        let r = http.get("/").await?;
        let ms: f64 = r
            .header("server-timing")
            .and_then(|v| v.split("dur=").nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or("no Server-Timing on /")?;
        if !String::from_utf8_lossy(&r.body).contains("svc9") {
            return Err("the main view does not show the services".into());
        }
        times.push(ms);
    }
    let render = (percentile(times.clone(), 0.5), percentile(times, 0.99));

    // One reading, as the console makes it, against the same reads by hand.
    let js = jetstream::new(client.clone());
    let mut ours = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        choreo::admin::Snapshot::take(&js).await?;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        raw_reading(&js).await?;
        raw.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let reading = (percentile(ours, 0.5), percentile(raw, 0.5));

    // The page, live, for `minutes`.
    let browser = Browser::start().await?;
    let page = browser.open(&format!("{base}/")).await?;
    page.wait_for(
        "document.querySelectorAll('#handlers tr').length === 100",
        Duration::from_secs(30),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let start = Instant::now();
    let first = page.heap_used().await? as f64 / 1024.0;
    let rss_first = rss_mb(pid);
    let (mut last, mut max) = (first, first);
    while start.elapsed() < Duration::from_secs_f64(minutes * 60.0) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        last = page.heap_used().await? as f64 / 1024.0;
        max = max.max(last);
    }
    let updates = page
        .eval("Number(document.body.dataset.updates || 0)")
        .await?
        .as_u64()
        .unwrap_or(0);
    let rss_last = rss_mb(pid);
    beating.abort();
    drop(child);
    for s in services {
        s.shutdown().await;
    }
    Ok(Figures {
        render,
        reading,
        heap_kb: (first, last, max),
        rss_mb: (rss_first, rss_last),
        updates,
    })
}

/// By hand: the registry's keys and values, and every consumer of every
/// stream (the least the handler table needs).
async fn raw_reading(js: &jetstream::Context) -> Result<(), BoxError> {
    let kv = js.get_key_value("choreo_registry").await?;
    let mut keys = kv.keys().await?;
    while let Some(k) = keys.next().await {
        let _ = kv.get(k?).await?;
    }
    let mut names = js.stream_names();
    let mut streams = Vec::new();
    while let Some(n) = names.next().await {
        streams.push(n?);
    }
    for s in streams {
        let stream = js.get_stream_no_info(&s).await?;
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            let _ = c?;
        }
    }
    Ok(())
}
