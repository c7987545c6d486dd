//! [`aggregate_state`]: an aggregate instance's state at a point, asked of
//! the service that keeps it (see `Service::aggregate`).

use std::time::Duration;

use async_nats::jetstream;

use super::AdminError;
use crate::aggregate::inspect::{StateAnswer, StateRequest, state_subject};

/// Asks `service` for the state `request` names, waiting up to `within`.
///
/// # Errors
/// No instance of `service` answers for aggregates (none runs, or none
/// registered one with `Service::aggregate`), the request is denied, or
/// the service says why it has no state (an unknown aggregate, a read that
/// failed): [`AdminErrorKind::BadRequest`](super::AdminErrorKind::BadRequest)
/// with its reason.
pub async fn aggregate_state(
    js: &jetstream::Context,
    service: &str,
    request: &StateRequest,
    within: Duration,
) -> Result<StateAnswer, AdminError> {
    let what = format!(
        "the state of {} {} from {service}",
        request.aggregate, request.id
    );
    let body = serde_json::to_vec(request).unwrap_or_default();
    let client = js.client();
    let asked =
        tokio::time::timeout(within, client.request(state_subject(service), body.into())).await;
    let msg = match asked {
        Err(_) => {
            return Err(AdminError::bad_request(
                what,
                format!("no answer within {within:?}: is an instance of {service} running?"),
            ));
        }
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(AdminError::bad_request(
                what,
                format!(
                    "no instance of {service} answers state requests (none runs, or it does not \
                     register the aggregate with Service::aggregate)"
                ),
            ));
        }
        Ok(Err(e)) => {
            let e: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
            return Err(AdminError::new(js, what, e.into()));
        }
        Ok(Ok(m)) => m,
    };
    let answer: StateAnswer = serde_json::from_slice(&msg.payload).map_err(|e| {
        AdminError::bad_request(what.clone(), format!("an answer that is not one: {e}"))
    })?;
    match &answer.error {
        Some(e) => Err(AdminError::bad_request(what, e.clone())),
        None => Ok(answer),
    }
}
