//! One decision, on one aggregate instance or across several: take each
//! instance's turn, load each, decide, append every event in one batch that
//! guards every instance, and on a conflict read what changed and decide
//! again. [`Aggregates::decide`] is this with one instance;
//! [`Aggregates::decide_across`] with several.

use std::ops::Range;
use std::time::Duration;

use super::append::{self, Check, IMMEDIATE_RETRIES, Outcome};
use super::encode::Encode;
use super::error::{AggregateError, AggregateErrorKind, DecideError};
use super::fold::Cause;
use super::parts::{Part, Parts};
use super::read::{self, Until};
use super::store::{Aggregates, Appended, Flow};
use crate::event::EventId;
use crate::event::id::EmitCounts;
use crate::nats::jitter;
use crate::publish::Outgoing;

/// What [`Aggregates::run`] did.
pub(super) struct Run {
    pub(super) appended: Vec<Appended>,
    pub(super) earlier: bool,
    pub(super) attempts: u32,
}

impl Aggregates {
    /// Runs one decision on `parts`: `decide` stages each instance's events
    /// through [`Parts::stage`] from their states, or refuses.
    pub(super) async fn run<E>(
        &self,
        parts: &mut Parts,
        flow: &Flow<'_>,
        mut decide: impl FnMut(&mut Parts) -> Result<(), DecideError<E>>,
    ) -> Result<Run, DecideError<E>> {
        parts.check_distinct()?;
        let stream = parts.prepare(self).await?;
        let cause = match flow {
            Flow::Caused { cause, source, ns } => Some(Cause {
                id: cause.id(),
                source: (*source).to_owned(),
                ns: ns.clone(),
            }),
            Flow::Root => None,
        };
        for p in &mut parts.parts {
            p.set_cause(cause.clone());
        }
        // Decisions on an instance from this process take turns; several
        // instances are taken in one order, so two decisions never wait
        // for each other.
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by(|&a, &b| parts.parts[a].key().cmp(&parts.parts[b].key()));
        let mut turns = Vec::with_capacity(order.len());
        for &i in &order {
            let (ty, id) = parts.parts[i].key();
            turns.push(self.turns.take(ty, id).await);
        }
        for p in &mut parts.parts {
            if !p.open_in_memory(self) {
                p.open(self).await?;
            }
        }
        // The first retries at once (each decides on the fresh state just
        // read, and its round trip paces it), then after a jittered pause
        // of 1 ms doubling to 100 ms.
        let mut delay = Duration::ZERO;
        let mut contended = 0;
        for attempt in 1..=self.attempts {
            // A decision that appends nothing, on a state taken from memory
            // unread, is made again on the state read to the end: only an
            // append's check tells a stale state, and a refusal has none.
            let (outs, spans) = loop {
                let earlier: Vec<Appended> =
                    parts.parts.iter_mut().flat_map(|p| p.earlier()).collect();
                if !earlier.is_empty() {
                    tracing::info!(
                        events = earlier.len(),
                        "this event's decision was appended by an earlier delivery; not deciding again"
                    );
                    return Ok(Run {
                        appended: earlier,
                        earlier: true,
                        attempts: attempt,
                    });
                }
                for p in &mut parts.parts {
                    p.clear();
                }
                let staged = decide(parts);
                let nothing = match &staged {
                    Ok(()) => {
                        let encoded = self.encode_parts(parts, flow)?;
                        if !encoded.0.is_empty() {
                            break encoded;
                        }
                        true
                    }
                    Err(DecideError::Refused(_)) => true,
                    Err(_) => false,
                };
                if nothing && self.refresh(stream, parts).await? {
                    continue;
                }
                staged?;
                return Ok(Run {
                    appended: Vec::new(),
                    earlier: false,
                    attempts: attempt,
                });
            };
            let ids: Vec<EventId> = outs.iter().map(|o| o.id).collect();
            let outs = guard(parts, outs, &spans)?;
            match append::append(self.publisher.client(), outs).await {
                Outcome::Stored(stored) => {
                    let appended: Vec<Appended> = stored
                        .into_iter()
                        .map(|(event_id, subject, sequence)| Appended {
                            event_id,
                            subject,
                            sequence,
                        })
                        .collect();
                    for (p, span) in parts.parts.iter_mut().zip(&spans) {
                        p.stored(self, &appended[span.clone()]);
                    }
                    tracing::debug!(attempt, "decided");
                    return Ok(Run {
                        appended,
                        earlier: false,
                        attempts: attempt,
                    });
                }
                Outcome::Conflict => {
                    tracing::debug!(attempt, "others appended since the load; deciding again");
                }
                Outcome::Unknown(why) => {
                    tracing::debug!(attempt, why, "the append's outcome is unknown; reading it");
                }
                Outcome::NoAtomic(why) => {
                    let p = &parts.parts[0];
                    return Err(AggregateError::new(
                        p.name(),
                        p.id(),
                        AggregateErrorKind::Stream,
                        format!("stream {stream} refuses atomic batches ({why}); a decision of several events needs nats-server 2.12 or later with allow_atomic on the stream"),
                    )
                    .into());
                }
                Outcome::Refused(why) => {
                    let p = &parts.parts[0];
                    return Err(AggregateError::new(
                        p.name(),
                        p.id(),
                        AggregateErrorKind::Append,
                        format!("the append was refused: {why}"),
                    )
                    .into());
                }
            }
            // Read what was appended since: others' events, or ours after
            // an answer that did not come.
            let mut ours = Vec::new();
            for (i, p) in parts.parts.iter_mut().enumerate() {
                let before = p.version();
                p.expect(&ids);
                self.read_part(stream, p.as_mut()).await?;
                ours.extend(p.ours());
                if p.version() != before {
                    contended = i;
                    p.contended();
                }
            }
            if !ours.is_empty() {
                tracing::debug!(attempt, "the append had gone through");
                ours.sort_by_key(|a| a.sequence);
                return Ok(Run {
                    appended: ours,
                    earlier: false,
                    attempts: attempt,
                });
            }
            if attempt < self.attempts && attempt > IMMEDIATE_RETRIES {
                // Jittered, so writers that lost together do not meet again.
                tokio::time::sleep(jitter(delay)).await;
                delay = (delay * 2).clamp(Duration::from_millis(1), Duration::from_millis(100));
            }
        }
        drop(turns);
        let p = &parts.parts[contended];
        Err(DecideError::Conflict {
            aggregate: p.name(),
            id: p.id().to_owned(),
            attempts: self.attempts,
        })
    }

    /// Encodes every instance's events, checked to lie inside its boundary
    /// and under the server's size limit; with the range of each
    /// instance's events.
    fn encode_parts(
        &self,
        parts: &Parts,
        flow: &Flow<'_>,
    ) -> Result<(Vec<Outgoing>, Vec<Range<usize>>), AggregateError> {
        let mut encode = Encode {
            publisher: &self.publisher,
            flow,
            first: None,
            counts: EmitCounts::default(),
            outs: Vec::new(),
        };
        let mut spans = Vec::with_capacity(parts.len());
        for p in &parts.parts {
            let start = encode.outs.len();
            p.encode(&mut encode)?;
            let span = start..encode.outs.len();
            for out in &encode.outs[span.clone()] {
                let fail = |detail: String| {
                    AggregateError::new(p.name(), p.id(), AggregateErrorKind::Append, detail)
                };
                if !crate::event::subject::covers(p.filter(), &out.subject) {
                    return Err(fail(format!(
                        "{} on {} is outside the aggregate's subjects {}: the next load would not see it",
                        out.event,
                        out.subject,
                        p.filter()
                    )));
                }
                self.publisher
                    .check_size(out)
                    .map_err(|e| fail(e.to_string()).with_source(e))?;
            }
            spans.push(span);
        }
        if encode.outs.len() > append::MAX_BATCH {
            let p = &parts.parts[0];
            return Err(AggregateError::new(
                p.name(),
                p.id(),
                AggregateErrorKind::TooManyEvents,
                format!(
                    "the decision returned {} events; one atomic batch holds {}",
                    encode.outs.len(),
                    append::MAX_BATCH
                ),
            ));
        }
        Ok((encode.outs, spans))
    }

    /// Reads the instances taken from memory unread to the stream's end;
    /// whether any had new events.
    async fn refresh(&self, stream: &str, parts: &mut Parts) -> Result<bool, AggregateError> {
        let mut changed = false;
        for p in &mut parts.parts {
            if !p.fresh() {
                let before = p.version();
                self.read_part(stream, p.as_mut()).await?;
                changed |= p.version() != before;
            }
        }
        Ok(changed)
    }

    /// Reads the events after `part`'s version into it (it is then
    /// fresh).
    async fn read_part(&self, stream: &str, part: &mut dyn Part) -> Result<(), AggregateError> {
        let filter = part.filter().to_owned();
        let id = part.id().to_owned();
        read::read(
            (self.publisher.client(), &self.answers),
            (self.publisher.api_prefix(), stream),
            (part.name(), &id, &filter),
            part.version(),
            Until::default(),
            |raw| part.take(raw),
        )
        .await?;
        part.read_to_end();
        Ok(())
    }
}

/// Puts each instance's check on a message: on its first event, or, for an
/// instance the decision gave no event, on another instance's event that
/// carries none. A message carries one check, and the server checks every
/// message of a batch before it stores any, so the checks hold together.
fn guard(
    parts: &Parts,
    outs: Vec<Outgoing>,
    spans: &[Range<usize>],
) -> Result<Vec<(Outgoing, Option<Check>)>, AggregateError> {
    let mut checks: Vec<Option<Check>> = vec![None; outs.len()];
    let mut unwritten = Vec::new();
    for (p, span) in parts.parts.iter().zip(spans) {
        let check = Check {
            filter: p.filter().to_owned(),
            expected: p.version(),
        };
        if span.is_empty() {
            unwritten.push(check);
        } else {
            checks[span.start] = Some(check);
        }
    }
    // An instance without events of its own (rare) rides on a free one.
    let mut free = 0;
    for check in unwritten {
        while free < checks.len() && checks[free].is_some() {
            free += 1;
        }
        if free == checks.len() {
            let p = &parts.parts[0];
            return Err(AggregateError::new(
                p.name(),
                p.id(),
                AggregateErrorKind::Usage,
                format!(
                    "the decision on {} appends {} events, fewer than the {} instances it guards: each instance's check rides on an appended event, so append at least one event per instance, or decide on fewer",
                    parts.names(),
                    outs.len(),
                    parts.len()
                ),
            ));
        }
        checks[free] = Some(check);
    }
    Ok(outs.into_iter().zip(checks).collect())
}
