//! Encoding a decision's events with the metadata of their flow: roots of
//! one new flow, or caused by a handled event with ids derived from it.

use std::collections::HashMap;

use super::append::MAX_BATCH;
use super::error::{AggregateError, AggregateErrorKind};
use super::store::{Aggregates, Flow};
use super::{Aggregate, AggregateEvent, EventVisitor};
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
    pub(super) counts: HashMap<&'static str, u32>,
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
                let index = self.counts.entry(E::NAME).or_default();
                let meta = Metadata::emitted(event, source, cause, ns, *index)?;
                *index += 1;
                meta
            }
        };
        self.first.get_or_insert(meta.id());
        self.outs.push(Outgoing::new(event, meta)?);
        Ok(())
    }
}

impl Aggregates {
    /// Encodes a decision's events, each checked to lie inside the boundary
    /// and under the server's size limit.
    pub(super) fn encode<A: Aggregate>(
        &self,
        id: &str,
        filter: &str,
        flow: &Flow<'_>,
        events: &[A::Event],
    ) -> Result<Vec<Outgoing>, AggregateError> {
        let fail = |kind, detail: String| AggregateError::new(A::NAME, id, kind, detail);
        if events.len() > MAX_BATCH {
            return Err(fail(
                AggregateErrorKind::TooManyEvents,
                format!(
                    "the decision returned {} events; one atomic batch holds {MAX_BATCH}",
                    events.len()
                ),
            ));
        }
        let mut encode = Encode {
            publisher: &self.publisher,
            flow,
            first: None,
            counts: HashMap::new(),
            outs: Vec::with_capacity(events.len()),
        };
        for e in events {
            e.visit(&mut encode)
                .map_err(|e| fail(AggregateErrorKind::Append, e.to_string()).with_source(e))?;
        }
        for out in &encode.outs {
            if !crate::event::subject::covers(filter, &out.subject) {
                return Err(fail(
                    AggregateErrorKind::Append,
                    format!(
                        "{} on {} is outside the aggregate's subjects {filter}: the next load would not see it",
                        out.event, out.subject
                    ),
                ));
            }
            self.publisher
                .check_size(out)
                .map_err(|e| fail(AggregateErrorKind::Append, e.to_string()).with_source(e))?;
        }
        Ok(encode.outs)
    }
}
