//! A deadline handler in a trace: its deadline's state as its step under
//! the event A that started it, its helper consumers left out.

use async_nats::jetstream;

use super::{Read, Step};

/// Whether `handler` of `service` is a deadline's helper consumer
/// (`<deadline>__schedule`, `<deadline>__met_<B>`).
pub(super) fn is_deadline_helper(
    manifests: &[crate::registry::Manifest],
    service: &str,
    handler: &str,
) -> bool {
    manifests
        .iter()
        .filter(|m| m.service == service)
        .flat_map(|m| &m.handlers)
        .filter(|h| h.deadline.is_some())
        .any(|h| {
            handler
                .strip_prefix(h.name.as_str())
                .is_some_and(|rest| rest.starts_with("__"))
        })
}

/// A deadline handler's step for the event A that started its deadline
/// (matched by correlation: the token is the flow's correlation id).
pub(super) async fn deadline_step(
    js: &jetstream::Context,
    service: &str,
    hm: &crate::registry::HandlerManifest,
    correlation: &str,
    id: &str,
    read: &mut Read,
) -> Step {
    use crate::admin::deadlines::DeadlineState as D;
    match crate::admin::deadlines::deadline(js, service, &hm.name, correlation).await {
        Ok(D::Scheduled { at_ms, .. }) => Step::DeadlinePending { fires_at_ms: at_ms },
        Ok(D::Due { due_ms, .. }) => Step::DeadlineDue { due_ms },
        Ok(D::Met { by, .. }) => Step::DeadlineMet { by: by.to_string() },
        Ok(D::Fired { at_ms, .. }) => Step::DeadlineFired {
            at_ms,
            handled_at_ms: match id.parse() {
                Ok(id) => read.inboxes.recorded(js, service, &hm.name, id).await,
                Err(_) => None,
            },
        },
        _ => Step::NotDelivered,
    }
}
