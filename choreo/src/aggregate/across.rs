//! Decisions that hold across several aggregate instances (a transfer
//! between two accounts, a course's seats and a student's timetable, an
//! order's lines on several SKUs): every instance is loaded, the decision
//! sees all their states, and what it appends is one atomic batch that
//! guards each instance with its own check.

use tracing::Instrument;

use super::Aggregate;
use super::error::{AggregateError, AggregateErrorKind, DecideError};
use super::parts::Parts;
use super::store::{Aggregates, Decided, Flow};
use super::{AggregateEvent, EventVisitor};
use crate::event::Event;
use crate::event::subject::covers;

/// The aggregates a decision holds across, as the state it decides on:
///
/// - a tuple of two to four [`Aggregate`]s, one instance each, in the order
///   of the ids (`(Course, Student)` with `["c1", "s7"]`; the same type may
///   come twice, as in `(Account, Account)`); the decision returns a tuple
///   of event lists, one per instance;
/// - a `Vec` of one aggregate type, any number of its instances
///   (`Vec<Stock>` with an order's SKUs); the decision returns one list,
///   each event going to the instance whose subjects it is on.
///
/// See [`Aggregates::decide_across`].
pub trait Boundaries: Sized + Send + 'static {
    /// What a decision across these returns.
    type Events;
    /// The instances `ids` names, in order.
    #[doc(hidden)]
    fn parts(ids: &[&str]) -> Result<Parts, String>;
    /// A copy of their states.
    #[doc(hidden)]
    fn states(parts: &Parts) -> Self;
    /// Their states, taken out.
    #[doc(hidden)]
    fn take(parts: &mut Parts) -> Self;
    /// Gives each instance its events.
    #[doc(hidden)]
    fn stage(parts: &mut Parts, events: Self::Events) -> Result<(), AggregateError>;
}

macro_rules! tuple_boundaries {
    ($n:literal; $($a:ident $i:tt),+) => {
        impl<$($a: Aggregate),+> Boundaries for ($($a,)+) {
            type Events = ($(Vec<$a::Event>,)+);

            fn parts(ids: &[&str]) -> Result<Parts, String> {
                if ids.len() != $n {
                    return Err(format!(
                        "{} ids for a decision across {} aggregates; give one id per aggregate, in order",
                        ids.len(),
                        $n
                    ));
                }
                let mut parts = Parts::new();
                $(parts.push::<$a>(ids[$i]);)+
                Ok(parts)
            }

            fn states(parts: &Parts) -> Self {
                ($(parts.state::<$a>($i),)+)
            }

            fn take(parts: &mut Parts) -> Self {
                ($(parts.take_state::<$a>($i),)+)
            }

            fn stage(parts: &mut Parts, events: Self::Events) -> Result<(), AggregateError> {
                $(parts.stage::<$a>($i, events.$i);)+
                Ok(())
            }
        }
    };
}

tuple_boundaries!(2; A 0, B 1);
tuple_boundaries!(3; A 0, B 1, C 2);
tuple_boundaries!(4; A 0, B 1, C 2, D 3);

impl<A: Aggregate> Boundaries for Vec<A> {
    type Events = Vec<A::Event>;

    fn parts(ids: &[&str]) -> Result<Parts, String> {
        if ids.is_empty() {
            return Err("a decision across no instance".to_owned());
        }
        let mut parts = Parts::new();
        for id in ids {
            parts.push::<A>(id);
        }
        Ok(parts)
    }

    fn states(parts: &Parts) -> Self {
        (0..parts.len()).map(|i| parts.state::<A>(i)).collect()
    }

    fn take(parts: &mut Parts) -> Self {
        (0..parts.len()).map(|i| parts.take_state::<A>(i)).collect()
    }

    fn stage(parts: &mut Parts, events: Self::Events) -> Result<(), AggregateError> {
        for event in events {
            let subject = event.visit(&mut SubjectOf).map_err(|e| {
                AggregateError::new(A::NAME, "", AggregateErrorKind::Append, e.to_string())
            })?;
            let Some(i) = parts
                .filters_of::<A>()
                .find(|(_, f)| covers(f, &subject))
                .map(|(i, _)| i)
            else {
                return Err(AggregateError::new(
                    A::NAME,
                    "",
                    AggregateErrorKind::Append,
                    format!(
                        "an event on {subject} is on none of the instances the decision is on ({})",
                        parts.names()
                    ),
                ));
            };
            parts.stage::<A>(i, vec![event]);
        }
        Ok(())
    }
}

/// An event's subject.
struct SubjectOf;

impl EventVisitor for SubjectOf {
    type Output = Result<String, crate::event::SubjectError>;

    fn visit<E: Event>(&mut self, event: &E) -> Self::Output {
        event.subject()
    }
}

impl Aggregates {
    /// Loads the instances `ids` of the aggregates `B`, runs `decide` on
    /// their states and appends the events it returns as one atomic batch,
    /// if nobody appended to any of the instances since they were loaded
    /// (each instance's check rides on one of the batch's events: the
    /// decision must append at least as many events as there are
    /// instances). On a conflict it loads and decides again, as
    /// [`decide`](Self::decide) does.
    ///
    /// ```no_run
    /// # use choreo::{event, Aggregate, AggregateEvent, Aggregates, Publisher};
    /// #[event(subject = "account.{account}.debited")]
    /// pub struct Debited { pub account: String, pub transfer: String, pub amount: u64 }
    /// #[event(subject = "account.{account}.credited")]
    /// pub struct Credited { pub account: String, pub transfer: String, pub amount: u64 }
    /// #[derive(AggregateEvent)]
    /// pub enum AccountEvent { Debited(Debited), Credited(Credited) }
    ///
    /// #[derive(Default, Clone)]
    /// pub struct Account { pub balance: u64 }
    /// impl Aggregate for Account {
    ///     const NAME: &'static str = "Account";
    ///     type Event = AccountEvent;
    ///     fn filter(id: &str) -> String { format!("account.{id}.*") }
    ///     fn apply(&mut self, e: &AccountEvent) {
    ///         match e {
    ///             AccountEvent::Debited(e) => self.balance -= e.amount,
    ///             AccountEvent::Credited(e) => self.balance += e.amount,
    ///         }
    ///     }
    /// }
    ///
    /// # async fn t(accounts: Aggregates) -> Result<(), Box<dyn std::error::Error>> {
    /// let (from, to, amount) = ("alice", "bob", 30);
    /// accounts
    ///     .decide_across::<(Account, Account), _, _>(&[from, to], |(a, _)| {
    ///         if a.balance < amount {
    ///             return Err("insufficient funds");
    ///         }
    ///         let transfer = "t-1".to_owned();
    ///         Ok((
    ///             vec![AccountEvent::Debited(Debited { account: from.into(), transfer: transfer.clone(), amount })],
    ///             vec![AccountEvent::Credited(Credited { account: to.into(), transfer, amount })],
    ///         ))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`decide`](Self::decide); [`AggregateErrorKind::Usage`] when an
    /// instance is named twice, the ids do not fit `B`, or the decision
    /// appends fewer events than there are instances;
    /// [`AggregateErrorKind::Stream`] when the instances' events live in
    /// different streams (an atomic batch is one stream).
    pub async fn decide_across<B, F, E>(
        &self,
        ids: &[&str],
        decide: F,
    ) -> Result<Decided<B>, DecideError<E>>
    where
        B: Boundaries,
        F: FnMut(&B) -> Result<B::Events, E>,
    {
        let parts = parts::<B>(ids)?;
        self.across_in::<B, F, E>(parts, &Flow::Root, decide).await
    }

    pub(crate) async fn across_in<B, F, E>(
        &self,
        mut parts: Parts,
        flow: &Flow<'_>,
        mut decide: F,
    ) -> Result<Decided<B>, DecideError<E>>
    where
        B: Boundaries,
        F: FnMut(&B) -> Result<B::Events, E>,
    {
        let span = tracing::info_span!("choreo.decide", choreo.aggregates = %parts.names());
        let run = self
            .run(&mut parts, flow, |parts| {
                let states = B::states(parts);
                let events = decide(&states).map_err(DecideError::Refused)?;
                B::stage(parts, events).map_err(DecideError::Failed)
            })
            .instrument(span)
            .await?;
        Ok(Decided {
            version: parts.version(),
            state: B::take(&mut parts),
            appended: run.appended,
            earlier: run.earlier,
            attempts: run.attempts,
        })
    }
}

/// The instances `ids` of `B`, or the usage error.
pub(super) fn parts<B: Boundaries>(ids: &[&str]) -> Result<Parts, AggregateError> {
    B::parts(ids).map_err(|e| {
        AggregateError::new(
            std::any::type_name::<B>(),
            &ids.join(", "),
            AggregateErrorKind::Usage,
            e,
        )
    })
}
