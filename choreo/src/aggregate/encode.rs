//! Encoding a decision's events with the metadata of their flow: roots of
//! one new flow, or caused by a handled event with ids derived from it.
//! The decision loop (`decision.rs`) checks each against its boundary and
//! the server's size limit.

use super::EventVisitor;
use super::store::Flow;
use crate::event::id::EmitCounts;
use crate::event::{Event, EventId};
use crate::publish::{Outgoing, PublishError, Publisher};
use crate::wire::headers::Metadata;

/// Encodes a decision's events with the metadata of their flow.
pub(super) struct Encode<'a> {
    pub(super) publisher: &'a Publisher,
    pub(super) flow: &'a Flow<'a>,
    pub(super) first: Option<EventId>,
    /// Per event type, how many this decision encoded (the emission
    /// index).
    pub(super) counts: EmitCounts,
    pub(super) outs: Vec<Outgoing>,
}

impl EventVisitor for Encode<'_> {
    type Output = Result<(), PublishError>;

    fn visit<E: Event>(&mut self, event: &E) -> Self::Output {
        let meta = match (self.flow, self.first) {
            (Flow::Root, None) => {
                self.publisher.record::<E>();
                Metadata::root(event, self.publisher.source())?
            }
            (Flow::Root, Some(first)) => {
                Metadata::in_flow(event, self.publisher.source(), first, first)?
            }
            (Flow::Caused { cause, ns, source }, _) => {
                // In the registry as the publisher's, as a root is: what a
                // decision appends is a choreography event other services
                // read (`graph`, `lint` and `asyncapi` see it).
                self.publisher.record::<E>();
                Metadata::emitted(event, source, cause, ns, self.counts.next(E::NAME))?
            }
        };
        self.first.get_or_insert(meta.id());
        self.outs.push(Outgoing::new(event, meta)?);
        Ok(())
    }
}
