//! [`connect`]: a NATS connection whose failures say what to do.

use std::sync::{Arc, OnceLock};

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};

use super::error::{ConnectError, redact_url};
use super::permissions::{self, ConnKey, conn_key, record_permission_error};

/// Connects to NATS at `url` (or a comma-separated list of URLs) with
/// `options` (credentials, TLS, ...), turning failures into a [`ConnectError`]
/// that says what is wrong, with any password removed from the URL.
///
/// Credentials written in a URL (`nats://user:pass@host` or
/// `nats://token@host`) are moved into `options`, so that no URL that
/// async-nats logs carries them. (async-nats logs the whole CONNECT message,
/// credentials included, at TRACE level: keep the `async_nats` target below
/// TRACE wherever logs are kept.)
///
/// It also installs an event callback that remembers the permission
/// violations the server reports on this connection (NATS reports them only
/// asynchronously), so that an operation the server refused fails with an
/// error naming the subject and the permission instead of a bare timeout. A
/// callback set on `options` is replaced.
///
/// # Errors
/// A malformed URL, an unreachable server, refused credentials, or TLS
/// failure.
pub async fn connect(
    url: &str,
    options: ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let shown = redact_url(url);
    let mut options = options;
    let mut addrs = Vec::new();
    for u in url.split(',') {
        let (clean, credentials) = split_credentials(u.trim());
        match credentials {
            Some(Credentials::UserPassword(user, pass)) => {
                options = options.user_and_password(user, pass)
            }
            Some(Credentials::Token(token)) => options = options.token(token),
            None => {}
        }
        let addr = clean
            .parse::<ServerAddr>()
            .map_err(|e| ConnectError::InvalidUrl {
                url: redact_url(u.trim()),
                reason: e.to_string(),
            })?;
        addrs.push(addr);
    }
    let key: Arc<OnceLock<ConnKey>> = Arc::new(OnceLock::new());
    let callback_key = key.clone();
    let options = options.event_callback(move |event| {
        let key = callback_key.clone();
        async move {
            match event {
                async_nats::Event::ServerError(async_nats::ServerError::Other(msg))
                    if permissions::is_violation(&msg) =>
                {
                    tracing::error!(error = %msg, "NATS permission violation");
                    if let Some(k) = key.get() {
                        record_permission_error(k, msg);
                    }
                }
                async_nats::Event::ServerError(e) => {
                    tracing::warn!(error = %e, "NATS server error")
                }
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::debug!(event = %other, "NATS connection event"),
            }
        }
    });
    let client = options.connect(addrs).await.map_err(|e| {
        let kind = e.kind();
        let reason = e.to_string();
        let source = super::error::source(e);
        match kind {
            ConnectErrorKind::ServerParse => ConnectError::InvalidUrl { url: shown, reason },
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                ConnectError::Auth { url: shown, source }
            }
            ConnectErrorKind::Tls => ConnectError::Tls { url: shown, source },
            _ => ConnectError::Unreachable { url: shown, source },
        }
    })?;
    let _ = key.set(conn_key(&client));
    Ok(client)
}

#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// Removes `user:pass@` or `token@` from a URL, percent-decoding them.
fn split_credentials(url: &str) -> (String, Option<Credentials>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let clean = format!("{scheme}{}", &rest[at + 1..]);
    let credentials = match userinfo.split_once(':') {
        Some((user, pass)) => Credentials::UserPassword(percent_decode(user), percent_decode(pass)),
        None => Credentials::Token(percent_decode(userinfo)),
    };
    (clean, Some(credentials))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{Credentials, percent_decode, split_credentials};

    #[test]
    fn credentials_leave_the_url() {
        assert_eq!(
            split_credentials("nats://al%40ice:p%3Ass@127.0.0.1:4222"),
            (
                "nats://127.0.0.1:4222".into(),
                Some(Credentials::UserPassword("al@ice".into(), "p:ss".into()))
            )
        );
        assert_eq!(
            split_credentials("tls://s3cr3t@host:4222/x"),
            (
                "tls://host:4222/x".into(),
                Some(Credentials::Token("s3cr3t".into()))
            )
        );
        assert_eq!(
            split_credentials("127.0.0.1:4222"),
            ("127.0.0.1:4222".into(), None)
        );
        assert_eq!(
            split_credentials("nats://h:1/a@b"),
            ("nats://h:1/a@b".into(), None)
        );
        assert_eq!(percent_decode("%aé%"), "%aé%");
    }
}
