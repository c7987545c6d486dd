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

/// Ctrl-C or SIGTERM. The SIGTERM handler is installed when this is
/// called, not when the future is first polled, so a SIGTERM that arrives
/// while the service is still starting is not lost (nor does it kill the
/// process): the service stops gracefully as soon as it has started.
pub(super) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        #[cfg(unix)]
        {
            let Some(mut term) = term else {
                let _ = tokio::signal::ctrl_c().await;
                return;
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
}
