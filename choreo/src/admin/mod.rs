//! See a running choreography from NATS alone: what the `choreo` tool
//! shows, as a library.
//!
//! - [`status()`]: every instance, and per handler its backlog, lag,
//!   dead letters, inbox records and [`State`].
//! - [`Graph`]: who emits what to whom; [`lint`]: what would go wrong.
//! - [`asyncapi()`]: an AsyncAPI 3.0 document of the whole system.
//! - [`trace()`]: one flow as its causation tree, with every handler's
//!   state for every event.
//! - [`plan`] and [`replay()`]: rewind one handler over a stretch of its
//!   stream while its instances run.
//! - [`deadlines`]: pending deadlines, and one deadline's state.
//! - [`aggregate_state()`]: an aggregate instance's state at a point, asked
//!   of the service that keeps it.
//! - [`manifests()`]: each service's manifest and the publishers' records,
//!   from the registry, which the others take.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = choreo::connect("nats://127.0.0.1:4222", Default::default()).await?;
//! let js = choreo::async_nats::jetstream::new(client);
//! let (manifests, publishers) = choreo::admin::manifests(&js).await?;
//! for finding in choreo::admin::lint(&manifests, &publishers) {
//!     println!("{}", finding.message);
//! }
//! # Ok(()) }
//! ```

use async_nats::jetstream;

use crate::registry::{self, Manifest, PublishedEvent};

mod asyncapi;
pub mod deadlines;
mod error;
mod events;
mod graph;
mod marker;
mod read;
mod relays;
mod replay;
mod requeue;
mod state;
mod status;
pub(crate) mod trace;

pub use asyncapi::asyncapi;
pub use error::{AdminError, AdminErrorKind};
pub use events::{StoredEvent, events};
pub use graph::{Finding, FindingKind, Graph, Severity, lint};
pub use marker::{Marker, marker, replay_done};
pub use relays::lint_outboxes;
pub use replay::{Plan, Point, Rewound, plan, replay};
pub use state::aggregate_state;
pub use status::{HandlerStatus, InstanceStatus, Snapshot, State, Status, status};
pub use trace::{Flow, HandlerStep, Query, Step, Trace, TracedEvent, trace};

/// One manifest per service (from its newest instance: instances run the
/// same code, or are being rolled out) and every publisher record.
///
/// # Errors
/// The registry cannot be read (no service ever started on this server,
/// or the credentials may not read its bucket). No publisher records is
/// not an error.
pub async fn manifests(
    js: &jetstream::Context,
) -> Result<(Vec<Manifest>, Vec<PublishedEvent>), AdminError> {
    let mut instances = read_registry(js).await?;
    instances.sort_by_key(|i| i.started_at_ms);
    let mut by_service = std::collections::BTreeMap::new();
    for i in instances {
        by_service.insert(i.manifest.service.clone(), i.manifest);
    }
    let publishers = registry::publishers(js).await.unwrap_or_default();
    Ok((by_service.into_values().collect(), publishers))
}

/// Every instance record, or an error that says why there are none.
pub(crate) async fn read_registry(
    js: &jetstream::Context,
) -> Result<Vec<registry::Instance>, AdminError> {
    let what = format!("the registry (bucket {})", registry::BUCKET);
    match crate::nats::or_denied(&js.client(), registry::instances(js)).await {
        Ok(read) => read.map_err(|e| AdminError::new(js, what, e.into_source())),
        Err(violation) => Err(AdminError::denied(what, violation)),
    }
}
