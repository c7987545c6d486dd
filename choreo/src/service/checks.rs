//! What a service checks and says at start, and the signals it stops on.

use std::time::Duration;

use async_nats::jetstream;

use super::StartError;
use crate::handler::HandlerOptions;

/// Says at start how many stored events the handler has ahead of it: for a
/// new consumer, what its `deliver` policy takes from the stream's history
/// (a new notifications service should not mail every past customer: give
/// it `deliver = new`); for an existing one, its backlog.
pub(super) fn say_backlog(
    service: &str,
    handler: &str,
    stream: &str,
    options: &HandlerOptions,
    info: &jetstream::consumer::Info,
) {
    let pending = info.num_pending;
    let new = info.delivered.stream_sequence == 0 && info.ack_floor.stream_sequence == 0;
    if new {
        tracing::info!(
            service,
            handler,
            stream,
            pending,
            deliver = ?options.deliver,
            "new consumer: the handler will process {pending} events already in the stream"
        );
    } else {
        tracing::info!(
            service,
            handler,
            stream,
            pending,
            "consumer resumes with {pending} events to process"
        );
    }
}

pub(super) fn validate_options(handler: &str, o: &HandlerOptions) -> Result<(), StartError> {
    let problem = if o.concurrency == 0 {
        Some("concurrency must be at least 1")
    } else if o.max_deliver == 0 {
        Some("max_deliver must be at least 1")
    } else if o.ack_wait < Duration::from_millis(100) {
        Some("ack_wait must be at least 100ms")
    } else if o.timeout < Duration::from_millis(100) {
        Some("timeout must be at least 100ms")
    } else if !handler
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        || handler.is_empty()
    {
        Some("a handler name must be a non-empty identifier (A-Z, a-z, 0-9, _)")
    } else {
        None
    };
    match problem {
        Some(p) => Err(StartError::InvalidOptions {
            handler: handler.into(),
            problem: p.into(),
        }),
        None => Ok(()),
    }
}

pub(super) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
