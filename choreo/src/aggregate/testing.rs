//! Given-when-then tests of decisions: given past events, when a decision
//! runs, then these events (or this refusal). [`given`] runs without a
//! server; [`given_stored`] appends the past to a real stream and runs the
//! decision through [`Aggregates`], reading back what it stored.
//!
//! ```
//! use choreo::aggregate::testing::given;
//! # use choreo::{event, Aggregate, AggregateEvent};
//! # #[event(subject = "stock.{sku}.received")]
//! # #[derive(Debug, PartialEq)]
//! # pub struct StockReceived { pub sku: String, pub qty: u32 }
//! # #[event(subject = "stock.{sku}.reserved")]
//! # #[derive(Debug, PartialEq)]
//! # pub struct StockReserved { pub sku: String, pub qty: u32 }
//! # #[derive(AggregateEvent, Debug, PartialEq)]
//! # pub enum StockEvent { Received(StockReceived), Reserved(StockReserved) }
//! # #[derive(Default, Clone)]
//! # pub struct Stock { pub on_hand: u32 }
//! # impl Aggregate for Stock {
//! #     const NAME: &'static str = "Stock";
//! #     type Event = StockEvent;
//! #     fn filter(sku: &str) -> String { format!("stock.{sku}.*") }
//! #     fn apply(&mut self, e: &StockEvent) {
//! #         match e { StockEvent::Received(e) => self.on_hand += e.qty, StockEvent::Reserved(e) => self.on_hand -= e.qty }
//! #     }
//! # }
//! fn reserve(s: &Stock, qty: u32) -> Result<Vec<StockEvent>, &'static str> {
//!     if s.on_hand < qty {
//!         return Err("out of stock");
//!     }
//!     Ok(vec![StockEvent::Reserved(StockReserved { sku: "s1".into(), qty })])
//! }
//!
//! let received = || StockEvent::Received(StockReceived { sku: "s1".into(), qty: 3 });
//! given::<Stock>([received()])
//!     .when(|s| reserve(s, 2))
//!     .then([StockEvent::Reserved(StockReserved { sku: "s1".into(), qty: 2 })]);
//! given::<Stock>([received()]).when(|s| reserve(s, 5)).then_refused();
//! ```

use std::fmt::Debug;

use super::Aggregate;
use super::error::DecideError;
use super::store::Aggregates;

/// The past of a decision under test, folded.
pub struct Given<A> {
    state: A,
}

/// Starts a test without a server: `A`'s state is the fold of `events`.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for e in events {
        state.apply(&e);
    }
    Given { state }
}

impl<A: Aggregate> Given<A> {
    /// Runs the decision on the state.
    pub fn when<E>(self, decide: impl FnOnce(&A) -> Result<Vec<A::Event>, E>) -> Then<A::Event, E> {
        Then {
            outcome: decide(&self.state),
        }
    }

    /// The state the past folds into.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// What a decision under test did.
#[must_use = "a decision under test asserts nothing until `then` or `then_refused`"]
pub struct Then<Ev, E> {
    outcome: Result<Vec<Ev>, E>,
}

impl<Ev: Debug + PartialEq, E: Debug> Then<Ev, E> {
    /// Asserts the decision returned (or stored) exactly `expected`, in
    /// order; the failure prints both lists.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = Ev>) {
        let expected: Vec<Ev> = expected.into_iter().collect();
        match self.outcome {
            Ok(got) => assert!(
                got == expected,
                "the decision's events differ\n  expected: {expected:#?}\n  got:      {got:#?}"
            ),
            Err(e) => panic!("the decision refused ({e:?})\n  expected: {expected:#?}"),
        }
    }

    /// Asserts the decision refused, and returns its error.
    #[track_caller]
    pub fn then_refused(self) -> E {
        match self.outcome {
            Ok(got) => panic!("the decision did not refuse\n  got: {got:#?}"),
            Err(e) => e,
        }
    }
}

/// A past stored in a real stream, for a decision run through
/// [`Aggregates`].
pub struct GivenStored<'a> {
    store: &'a Aggregates,
    id: String,
    version: u64,
}

/// Appends `events` to instance `id` of `A` (through `store`, checked like
/// any decision) as the past of a test.
///
/// # Panics
/// When the events cannot be appended.
pub async fn given_stored<'a, A: Aggregate>(
    store: &'a Aggregates,
    id: &str,
    events: impl IntoIterator<Item = A::Event>,
) -> GivenStored<'a> {
    let mut events: Vec<A::Event> = events.into_iter().collect();
    let decided = store
        .decide::<A, _, std::convert::Infallible>(id, |_| Ok(std::mem::take(&mut events)))
        .await
        .unwrap_or_else(|e| panic!("cannot store the past of {} {id}: {e}", A::NAME));
    GivenStored {
        store,
        id: id.to_owned(),
        version: decided.version,
    }
}

impl GivenStored<'_> {
    /// Runs the decision through [`Aggregates::decide`] and reads back the
    /// events it stored.
    ///
    /// # Panics
    /// When it conflicts, fails, or what it stored cannot be read.
    pub async fn when<A: Aggregate, E: std::fmt::Display>(
        self,
        decide: impl FnMut(&A) -> Result<Vec<A::Event>, E>,
    ) -> Then<A::Event, E> {
        let outcome = match self.store.decide::<A, _, E>(&self.id, decide).await {
            Ok(_) => {
                let history = self
                    .store
                    .history::<A>(&self.id, None)
                    .await
                    .unwrap_or_else(|e| panic!("cannot read back {} {}: {e}", A::NAME, self.id));
                Ok(history
                    .into_iter()
                    .filter(|r| r.sequence > self.version)
                    .map(|r| r.event)
                    .collect())
            }
            Err(DecideError::Refused(e)) => Err(e),
            Err(e) => panic!("the decision on {} {} failed: {e}", A::NAME, self.id),
        };
        Then { outcome }
    }
}
