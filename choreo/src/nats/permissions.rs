//! Permission violations, remembered per connection.
//!
//! NATS reports a permission violation only asynchronously, through the
//! connection's event callback; the request that caused it then times out.
//! `connect` installs a callback that keeps the recent ones here, per
//! connection (server id and client id), so the error of the timed-out
//! operation can name the subject. A client made without `connect`, or
//! one that reconnected since, falls back to the bare timeout.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether a server error line (`-ERR '...'`) reports a permission
/// violation. The NATS protocol carries these as text only: this parses the
/// protocol line the server defines (`Permissions Violation for Publish to
/// "subject"`), not an error's message.
pub(crate) fn is_violation(line: &str) -> bool {
    line.trim_start()
        .get(..21)
        .is_some_and(|p| p.eq_ignore_ascii_case("permissions violation"))
}

/// A connection, as the server knows it.
pub(crate) type ConnKey = (String, u64);

type Violations = std::collections::HashMap<ConnKey, VecDeque<(Instant, String)>>;

static PERMISSION_ERRORS: Mutex<Option<Violations>> = Mutex::new(None);
const PERMISSION_MEMORY: Duration = Duration::from_secs(30);

pub(crate) fn conn_key(client: &async_nats::Client) -> ConnKey {
    let info = client.server_info();
    (info.server_id, info.client_id)
}

pub(crate) fn record_permission_error(conn: &ConnKey, msg: String) {
    let mut guard = PERMISSION_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(Default::default);
    // Forget connections with nothing recent, so the map stays small.
    map.retain(|_, q| {
        q.back()
            .is_some_and(|(at, _)| at.elapsed() < PERMISSION_MEMORY)
    });
    let q = map.entry(conn.clone()).or_default();
    q.push_back((Instant::now(), msg));
    while q.len() > 16 {
        q.pop_front();
    }
}

/// The latest permission violation the server reported on `client`'s
/// connection in the last 30 seconds.
pub(crate) fn recent_permission_error(client: &async_nats::Client) -> Option<String> {
    latest(client, |at| at.elapsed() < PERMISSION_MEMORY)
}

/// A permission violation the server reported on `client`'s connection
/// after `since`.
pub(crate) fn permission_error_since(
    client: &async_nats::Client,
    since: Instant,
) -> Option<String> {
    latest(client, |at| at >= since)
}

/// The newest violation on `client`'s connection whose time passes `when`.
fn latest(client: &async_nats::Client, when: impl Fn(Instant) -> bool) -> Option<String> {
    let key = conn_key(client);
    let guard = PERMISSION_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()?
        .get(&key)?
        .iter()
        .rev()
        .find(|(at, _)| when(*at))
        .map(|(_, m)| m.clone())
}

/// Runs `request`, or gives up as soon as the server reports a permission
/// violation on `client`'s connection (the request would otherwise wait
/// for its timeout, since the server never answers a denied request).
/// `Err` holds the violation.
pub(crate) async fn or_denied<T>(
    client: &async_nats::Client,
    request: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    let since = Instant::now();
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(v) = permission_error_since(client, since) {
                return v;
            }
        }
    };
    tokio::select! {
        out = request => Ok(out),
        v = watch => Err(v),
    }
}
