//! `choreo lint`'s checks of the outbox relays services report
//! (`registry::outboxes`): a relay that could publish a row later than a
//! stream it writes to remembers ids for (its duplicate window) could store
//! an event twice, and rows that fail to publish wait for someone to look.

use async_nats::jetstream;

use super::graph::{Finding, FindingKind, Severity};
use crate::registry::{self, Manifest};

/// The findings about every reported outbox relay: an error when the relay
/// could publish a row after the duplicate window of a stream the service's
/// handlers emit into, a warning while rows fail to publish. No reports
/// (no service keeps an outbox of its own) is no finding.
pub async fn lint_outboxes(js: &jetstream::Context, manifests: &[Manifest]) -> Vec<Finding> {
    let reports = registry::outboxes(js).await.unwrap_or_default();
    let mut out = Vec::new();
    for r in reports {
        let mut streams: Vec<&str> = manifests
            .iter()
            .filter(|m| m.service == r.service)
            .flat_map(|m| &m.handlers)
            .flat_map(|h| h.emits.iter().flatten())
            .map(|e| e.stream.as_str())
            .collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            let Ok(mut s) = js.get_stream(stream).await else {
                continue;
            };
            let Ok(info) = s.info().await else { continue };
            let window_ms =
                u64::try_from(info.config.duplicate_window.as_millis()).unwrap_or(u64::MAX);
            if r.relay_latest_ms() >= window_ms {
                out.push(Finding {
                    severity: Severity::Error,
                    kind: FindingKind::RelayOutsideDuplicateWindow,
                    message: format!(
                        "{}'s outbox relay publishes a row up to {} ms after its commit (delay {} ms + twice every {} ms), not inside stream {stream}'s duplicate window of {window_ms} ms: a row both the handler and the relay publish could be stored twice; shorten the relay delay or widen the window",
                        r.service, r.relay_latest_ms(), r.relay_delay_ms, r.relay_every_ms
                    ),
                });
            }
        }
        if r.failing > 0 {
            out.push(Finding {
                severity: Severity::Warning,
                kind: FindingKind::OutboxFailing,
                message: format!(
                    "{}'s outbox has {} rows whose publish failed and is retried: {}",
                    r.service,
                    r.failing,
                    r.last_error.as_deref().unwrap_or("no reason reported")
                ),
            });
        }
    }
    out
}
