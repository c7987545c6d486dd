//! [`Decider`]: deciding on aggregates from a handler, with the handled
//! event as the cause of what is appended.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Aggregate;
use super::across::{self, Boundaries};
use super::error::{AggregateError, DecideError};
use super::store::{Aggregates, Decided, Flow, Loaded};
use crate::handler::{Context, FromContext, HandlerError, MissingState, States};
use crate::wire::headers::Metadata;

/// A handler argument that decides on aggregates, through the service's
/// [`Aggregates`] (register it with `Service::state(aggregates)`).
///
/// What a decision appends is caused by the handled event: it carries the
/// event's correlation id, has it as causation id, and gets ids derived
/// from the handler, the event, the aggregate instance and the decision's
/// place among the handler's decisions on that instance, so the handler's
/// own emissions keep their ids. When the handled event is delivered again
/// after its decision was appended (the process died before acking), the
/// decision finds its events in the history and returns them
/// ([`Decided::earlier`]) instead of deciding twice.
///
/// ```no_run
/// # use choreo::{event, event_handler, Aggregate, AggregateEvent, Context, DecideError, Decider, HandlerError};
/// # #[event(subject = "stock.{sku}.received")]
/// # pub struct StockReceived { pub sku: String, pub qty: u32 }
/// # #[event(subject = "stock.{sku}.reserved")]
/// # pub struct StockReserved { pub sku: String, pub order_id: String, pub qty: u32 }
/// # #[derive(AggregateEvent)]
/// # pub enum StockEvent { Received(StockReceived), Reserved(StockReserved) }
/// # #[derive(Default, Clone)]
/// # pub struct Stock { pub on_hand: u32 }
/// # impl Aggregate for Stock {
/// #     const NAME: &'static str = "Stock";
/// #     type Event = StockEvent;
/// #     fn filter(sku: &str) -> String { format!("stock.{sku}.*") }
/// #     fn apply(&mut self, e: &StockEvent) {
/// #         match e { StockEvent::Received(e) => self.on_hand += e.qty, StockEvent::Reserved(e) => self.on_hand -= e.qty }
/// #     }
/// # }
/// #[event(subject = "orders.{order_id}.placed")]
/// pub struct OrderPlaced { pub order_id: String, pub sku: String, pub qty: u32 }
/// #[event(subject = "orders.{order_id}.rejected")]
/// pub struct OrderRejected { pub order_id: String }
///
/// #[event_handler]
/// async fn reserve(order: OrderPlaced, ctx: Context, stock: Decider) -> Result<(), HandlerError> {
///     let reserved = stock
///         .decide::<Stock, _, _>(&order.sku, |s| {
///             if s.on_hand < order.qty {
///                 return Err("out of stock");
///             }
///             Ok(vec![StockEvent::Reserved(StockReserved {
///                 sku: order.sku.clone(),
///                 order_id: order.order_id.clone(),
///                 qty: order.qty,
///             })])
///         })
///         .await;
///     match reserved {
///         Ok(_) => Ok(()),
///         Err(DecideError::Refused(_)) => {
///             ctx.emit(OrderRejected { order_id: order.order_id });
///             Ok(())
///         }
///         Err(e) => Err(e.into_handler_error()),
///     }
/// }
/// ```
pub struct Decider {
    store: Aggregates,
    cause: Metadata,
    service: String,
    handler_id: String,
    /// Per aggregate instance, how many decisions this invocation made.
    decisions: Mutex<HashMap<String, u32>>,
}

impl Decider {
    /// [`Aggregates::decide`], with the handled event as the cause.
    ///
    /// # Errors
    /// See [`DecideError`].
    pub async fn decide<A, F, E>(&self, id: &str, decide: F) -> Result<Decided<A>, DecideError<E>>
    where
        A: Aggregate,
        F: FnMut(&A) -> Result<Vec<A::Event>, E>,
    {
        let flow = self.flow(&format!("{}/{id}", A::NAME));
        self.store.decide_in(id, &flow, decide).await
    }

    /// [`Aggregates::decide_across`], with the handled event as the cause.
    ///
    /// # Errors
    /// See [`DecideError`].
    pub async fn decide_across<B, F, E>(
        &self,
        ids: &[&str],
        decide: F,
    ) -> Result<Decided<B>, DecideError<E>>
    where
        B: Boundaries,
        F: FnMut(&B) -> Result<B::Events, E>,
    {
        let parts = across::parts::<B>(ids)?;
        let flow = self.flow(&parts.path());
        self.store.across_in::<B, F, E>(parts, &flow, decide).await
    }

    /// The flow of this invocation's next decision on `on` (the instances
    /// it is on): ids derived from the handler, the instances and how many
    /// decisions on them came before.
    fn flow(&self, on: &str) -> Flow<'_> {
        let n = {
            let mut d = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
            let n = d.entry(on.to_owned()).or_default();
            *n += 1;
            *n
        };
        Flow::Caused {
            cause: &self.cause,
            ns: format!("{}/decide/{on}/{n}", self.handler_id),
            source: &self.service,
        }
    }

    /// [`Aggregates::load`].
    ///
    /// # Errors
    /// See [`AggregateError`].
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, AggregateError> {
        self.store.load(id).await
    }
}

impl FromContext for Decider {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        let store = ctx
            .states()
            .get::<Aggregates>()
            .ok_or_else(|| HandlerError::permanent(MissingState::of::<Aggregates>()))?;
        Ok(Self {
            store,
            cause: ctx.meta().clone(),
            service: ctx.service().to_owned(),
            handler_id: ctx.handler_id().to_owned(),
            decisions: Mutex::new(HashMap::new()),
        })
    }

    fn check(states: &States) -> Result<(), MissingState> {
        if states.contains::<Aggregates>() {
            Ok(())
        } else {
            Err(MissingState::of::<Aggregates>())
        }
    }
}
