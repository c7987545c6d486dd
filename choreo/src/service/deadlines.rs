//! Registering deadline handlers: each runs as its schedule step on A's
//! stream, a watcher per `unless` event, and the handler itself on the
//! deadline stream's fired copies (see `crate::deadline`).

use std::sync::Arc;
use std::time::Duration;

use super::Service;
use crate::handler::DeadlineHandler;
use crate::runtime::{Erased, Routed, Typed};

impl Service {
    /// How long a fired deadline waits for its handler when no instance
    /// runs (default [`DEFAULT_DEADLINE_RETENTION`](crate::DEFAULT_DEADLINE_RETENTION),
    /// a day): the server keeps each fired copy this long, up to about 2 KB
    /// of its memory each (`scripts/bench deadlines`), and a service down
    /// for longer loses the deadlines that fired meanwhile. See
    /// `docs/deadlines.md`.
    pub fn deadline_retention(mut self, retention: Duration) -> Self {
        self.deadline_retention = retention.max(Duration::from_secs(1));
        self
    }

    /// Adds a deadline handler (`#[event_handler(within = "15m", unless =
    /// PaymentCaptured)]` on an `async fn` taking A). When A is handled,
    /// its copy is scheduled in JetStream for A's time + `within`; a B
    /// matched to it before then cancels it; otherwise the copy fires and
    /// the handler runs with A, exactly once per A either way. Needs
    /// nats-server 2.12 or later. See `docs/deadlines.md`.
    ///
    /// ```no_run
    /// use choreo::{event, event_handler, Context, Service};
    ///
    /// #[event(subject = "orders.{order_id}.placed", key = order_id)]
    /// pub struct OrderPlaced { pub order_id: String }
    /// #[event(subject = "payments.{order_id}.captured", key = order_id)]
    /// pub struct PaymentCaptured { pub order_id: String }
    /// #[event(subject = "orders.{order_id}.cancelled", key = order_id)]
    /// pub struct OrderCancelled { pub order_id: String }
    ///
    /// /// Cancels an order whose payment has not come 15 minutes after it was placed.
    /// #[event_handler(within = "15m", unless = PaymentCaptured)]
    /// async fn cancel_unpaid(order: OrderPlaced, ctx: Context) {
    ///     ctx.emit(OrderCancelled { order_id: order.order_id });
    /// }
    ///
    /// # async fn t(client: choreo::async_nats::Client) -> Result<(), choreo::RunError> {
    /// Service::new("orders").deadline(cancel_unpaid).run(client).await
    /// # }
    /// ```
    pub fn deadline<H: DeadlineHandler>(self, handler: H) -> Self {
        let within = handler.deadline().map(|d| d.within);
        self.deadline_within(handler, within.unwrap_or_default())
    }

    /// [`deadline`](Self::deadline) with `within` in place of the one the
    /// attribute declares: for a deadline that comes from configuration,
    /// or a short one in a test.
    pub fn deadline_within<H: DeadlineHandler>(mut self, handler: H, within: Duration) -> Self {
        let Some(mut d) = handler.deadline() else {
            self.misregistered.push(handler.name());
            return self.plain_handler(handler);
        };
        d.within = within;
        let name = handler.name();
        self.deadlines = true;
        // The B watchers first: consumers are made in this order, and each
        // starts at new events, so every B of an A the schedule step sees
        // (stored after its consumer, so after theirs) reaches a watcher.
        // The other way round, a B stored between the two was never seen,
        // and its A's deadline fired though B came in time.
        struct Watchers<'a>(&'a mut Vec<Arc<dyn Erased>>, &'static str, crate::Deadline);
        impl crate::UnlessVisitor for Watchers<'_> {
            fn visit<B: crate::Event>(&mut self, index: usize) {
                let Self(handlers, name, d) = self;
                let met = d.met.get(index).copied().unwrap_or("__met");
                handlers.push(Arc::new(Typed(crate::deadline::Met::<B>::new(
                    name, *d, met,
                ))));
            }
        }
        <H::Unless as crate::Unless>::each(&mut Watchers(&mut self.handlers, name, d));
        self.handlers
            .push(Arc::new(Typed(crate::deadline::Schedule::<H>::new(
                name, d,
            ))));
        // Leaked once per registration: a handler's filter lives as long
        // as the program's handlers do.
        let filter: &'static str =
            Box::leak(crate::deadline::filter(&self.name, name, "fire").into_boxed_str());
        self.handlers.push(Arc::new(Routed {
            inner: Arc::new(Typed(crate::deadline::Fire::new(handler, d))),
            stream: (crate::deadline::STREAM, crate::deadline::SUBJECTS, filter),
        }));
        self
    }
}
