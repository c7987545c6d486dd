//! Setting up an aggregate's stream: it exists, keeps every event when
//! choreo creates it, and allows direct gets and atomic batches.

use std::time::Duration;

use super::error::{AggregateError, AggregateErrorKind};
use super::store::Aggregates;
use super::{Aggregate, AggregateEvent};
use crate::event::EventType;
use crate::topology::stream::ensure_stream;

/// The first of `A`'s event types, whose stream holds every one of them;
/// or why there is no such stream.
fn first_type<A: Aggregate>() -> Result<&'static EventType, String> {
    let types: &'static [EventType] = <A::Event as AggregateEvent>::TYPES;
    let first = types
        .first()
        .ok_or("the aggregate's event enum lists no event type")?;
    match types.iter().find(|t| t.stream != first.stream) {
        Some(other) => Err(format!(
            "its events live in two streams ({} in {}, {} in {}); an aggregate's history is one stream",
            first.name, first.stream, other.name, other.stream
        )),
        None => Ok(first),
    }
}

impl Aggregates {
    /// `A`'s stream, if it was set up already (no wait). `None` for an
    /// aggregate whose events live in two streams, whatever was set up
    /// (so [`Self::prepare`] says what is wrong).
    pub(super) fn prepared<A: Aggregate>(&self) -> Option<&'static str> {
        let first = first_type::<A>().ok()?;
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(first.stream)
            .then_some(first.stream)
    }

    /// Makes sure `A`'s stream exists and allows direct gets and atomic
    /// batches; returns its name.
    pub(super) async fn prepare<A: Aggregate>(
        &self,
        id: &str,
    ) -> Result<&'static str, AggregateError> {
        match self.prepared::<A>() {
            Some(stream) => Ok(stream),
            // Boxed: the setup's requests make a future of several KB, which
            // every load's future would otherwise carry (and copy).
            None => Box::pin(self.set_up::<A>(id)).await,
        }
    }

    /// [`Self::prepare`] when [`Self::prepared`] knows no stream.
    async fn set_up<A: Aggregate>(&self, id: &str) -> Result<&'static str, AggregateError> {
        let fail =
            |detail: String| AggregateError::new(A::NAME, id, AggregateErrorKind::Stream, detail);
        let first = first_type::<A>().map_err(fail)?;
        let types: &'static [EventType] = <A::Event as AggregateEvent>::TYPES;
        let js = self.publisher.js();
        // A history is kept whole: a state missing its oldest events is
        // wrong, so a stream made here keeps every event.
        let keep_all = self.publisher.settings().clone().max_age(Duration::ZERO);
        for t in types {
            ensure_stream(
                js,
                &keep_all,
                t.stream,
                vec![t.stream_subjects.to_owned()],
                t.subject_filter,
            )
            .await
            .map_err(|e| fail(e.to_string()).with_source(e))?;
        }
        let mut stream = js
            .get_stream(first.stream)
            .await
            .map_err(|e| fail(format!("cannot read stream {}", first.stream)).with_source(e))?;
        let config = &stream
            .info()
            .await
            .map_err(|e| fail(format!("cannot read stream {}", first.stream)).with_source(e))?
            .config;
        if config.max_age > Duration::ZERO {
            tracing::warn!(
                aggregate = A::NAME,
                stream = first.stream,
                max_age = ?config.max_age,
                "stream {} drops events older than {:?}: an aggregate's state loses its oldest events with them; give the stream a max_age of 0",
                first.stream,
                config.max_age
            );
        }
        if !config.allow_direct || !config.allow_atomic_publish {
            let mut config = config.clone();
            config.allow_direct = true;
            config.allow_atomic_publish = true;
            js.update_stream(config).await.map_err(|e| {
                fail(format!(
                    "cannot allow direct gets and atomic batches on stream {} (nats-server 2.12 or later is needed, and the right to update the stream)",
                    first.stream
                ))
                .with_source(e)
            })?;
            tracing::info!(
                stream = first.stream,
                "stream set up for aggregates (allow_direct, allow_atomic)"
            );
        }
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(first.stream);
        Ok(first.stream)
    }
}
