//! What a service checks and says at start, and the signals it stops on.

use std::time::Duration;

use async_nats::jetstream;

use super::StartError;
use crate::event::{human_duration, human_until};
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

/// Warns at start when the handler's oldest unhandled event has been in its
/// stream (`stream`, read at start) for more than half the stream's
/// `max_age`: events the handler has not handled by `max_age` are removed
/// unread. Says nothing for a stream that keeps every event, or when the
/// event cannot be read.
pub(super) async fn say_behind(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
    (stream, filter): (&jetstream::stream::Info, &str),
    info: &jetstream::consumer::Info,
) {
    let max_age = stream.config.max_age;
    if max_age.is_zero() || info.num_pending == 0 && info.num_ack_pending == 0 {
        return;
    }
    let stream = stream.config.name.as_str();
    let Ok(s) = js.get_stream_no_info(stream).await else {
        return;
    };
    let Ok(oldest) = s
        .raw_message_builder()
        .sequence(info.ack_floor.stream_sequence + 1)
        .next_by_subject(filter)
        .send()
        .await
    else {
        return;
    };
    let age = (time::OffsetDateTime::now_utc() - oldest.time)
        .try_into()
        .unwrap_or(Duration::ZERO);
    if let Some(message) = behind(age, max_age) {
        tracing::warn!(
            service,
            handler,
            stream,
            stream_sequence = oldest.sequence,
            pending = info.num_pending + info.num_ack_pending as u64,
            "handler {handler} is behind: {message} in stream {stream}; catch up (more \
             instances, a higher concurrency) or keep events longer (StreamSettings::max_age \
             for a new stream, `nats stream edit {stream} --max-age` for this one)"
        );
    }
}

/// What to say of a handler whose oldest unhandled event is `age` old in a
/// stream that keeps events `max_age`: something once it is past half.
pub(super) fn behind(age: Duration, max_age: Duration) -> Option<String> {
    (age * 2 > max_age).then(|| {
        format!(
            "its oldest unhandled event is {} old and is removed unread at {} (max_age), {}",
            human_duration(age),
            human_duration(max_age),
            human_until(max_age.saturating_sub(age)),
        )
    })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::behind;

    #[test]
    fn a_handler_is_behind_past_half_its_streams_age() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(behind(Duration::from_secs(3 * 86_400), week), None);
        assert_eq!(
            behind(Duration::from_secs(5 * 86_400), week).as_deref(),
            Some(
                "its oldest unhandled event is 5.0 days old and is removed unread at 7.0 days \
                 (max_age), in 2.0 days"
            )
        );
        assert_eq!(
            behind(Duration::from_secs(10 * 86_400), week).as_deref(),
            Some(
                "its oldest unhandled event is 10.0 days old and is removed unread at 7.0 days \
                 (max_age), any moment now"
            )
        );
        assert_eq!(
            behind(Duration::from_millis(2_500), Duration::from_secs(4)).as_deref(),
            Some(
                "its oldest unhandled event is 2.5 s old and is removed unread at 4.0 s (max_age), in 1.5 s"
            )
        );
    }
}
