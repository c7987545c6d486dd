//! [`connect`]: a NATS connection whose failures say what to do.

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};

use crate::error::{ConnectError, record_permission_error, redact_url};

/// Connects to NATS at `url` (or a comma-separated list of URLs) with
/// `options` (credentials, TLS, ...), turning failures into a [`ConnectError`]
/// that says what is wrong, with any password removed from the URL.
///
/// It also installs an event callback that remembers permission violations
/// (NATS reports them only asynchronously), so that an operation the server
/// refused fails with an error naming the subject instead of a bare timeout.
/// A callback set on `options` is replaced.
///
/// # Errors
/// A malformed URL, an unreachable server, refused credentials, or TLS
/// failure.
pub async fn connect(
    url: &str,
    options: ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let shown = redact_url(url);
    let addrs: Vec<ServerAddr> = url
        .split(',')
        .map(|u| {
            u.trim()
                .parse::<ServerAddr>()
                .map_err(|e| ConnectError::InvalidUrl {
                    url: redact_url(u.trim()),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let options = options.event_callback(|event| async move {
        match event {
            async_nats::Event::ServerError(async_nats::ServerError::Other(msg))
                if msg.to_lowercase().contains("permissions violation") =>
            {
                tracing::error!(error = %msg, "NATS permission violation");
                record_permission_error(msg);
            }
            async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
            async_nats::Event::Connected => tracing::info!("connected to NATS"),
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    });
    options.connect(addrs).await.map_err(|e| {
        let reason = e.to_string();
        match e.kind() {
            ConnectErrorKind::ServerParse => ConnectError::InvalidUrl { url: shown, reason },
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                ConnectError::Auth { url: shown, reason }
            }
            ConnectErrorKind::Tls => ConnectError::Tls { url: shown, reason },
            _ => ConnectError::Unreachable { url: shown, reason },
        }
    })
}
