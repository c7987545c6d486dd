//! Shared helpers for the integration tests.
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

use choreo::async_nats::{self, jetstream};
use futures::StreamExt;

/// Collects everything a tracing subscriber prints (its writer).
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// What was printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures what this thread's tracing prints under `filter` (an
/// `EnvFilter` directive), without colours, until the guard drops.
pub fn capture_logs(filter: &str) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message stored in `stream`, in order.
pub async fn stream_messages(
    client: &async_nats::Client,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let js = jetstream::new(client.clone());
    let Ok(mut s) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let info = s.info().await.unwrap();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in first..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// A header value.
pub fn header_of(h: &async_nats::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.as_str().to_owned())
}

/// A header value of a stored message.
pub fn header(m: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_owned())
}

/// Waits until the DLQ holds `n` messages and returns them.
pub async fn dead_letters(
    client: &async_nats::Client,
    n: usize,
    within: Duration,
) -> Vec<jetstream::message::StreamMessage> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msgs = stream_messages(client, choreo::dlq::DLQ_STREAM).await;
        if msgs.len() >= n {
            return msgs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} dead letters; have {}: {:?}",
            msgs.len(),
            msgs.iter()
                .map(|m| header(m, choreo::dlq::REASON))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drains a core subscription's pending messages (unused helper kept small).
pub async fn next_within(
    sub: &mut async_nats::Subscriber,
    within: Duration,
) -> Option<async_nats::Message> {
    tokio::time::timeout(within, sub.next())
        .await
        .ok()
        .flatten()
}

/// `choreo::admin::status` over `window`, again until `ok` holds of it
/// (failing after `within`, with `what` and the last reading).
pub async fn status_until(
    js: &jetstream::Context,
    window: Duration,
    within: Duration,
    what: &str,
    mut ok: impl FnMut(&choreo::admin::Status) -> bool,
) -> choreo::admin::Status {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // The registry's bucket appears with the first heartbeat, just
        // after a service starts.
        let s = choreo::admin::status(js, window).await;
        if let Ok(s) = &s
            && ok(s)
        {
            return s.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
    }
}
