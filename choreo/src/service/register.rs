//! The service's limits (inbox horizon and groups, server budget, start and
//! recovery timeouts), and registering a handler without the compile-time
//! check `Service::handler` makes (see `deadlines`).

use std::sync::Arc;
use std::time::Duration;

use super::Service;
use crate::handler::Handler;
use crate::runtime::Typed;

impl Service {
    /// Answers requests for the state of aggregate `A` at a point (its own
    /// events up to a stream sequence or a time, folded by its `apply`),
    /// which `choreo console` and `choreo::admin::aggregate_state` make:
    /// only the service has the code that folds. One instance answers each
    /// request (a queue group on `$CHOREO.STATE.<service>`); the manifest
    /// lists the aggregate, and [`permissions`](Self::permissions) add what
    /// answering needs.
    ///
    /// ```
    /// use choreo::{Aggregate, AggregateEvent, Service, event};
    ///
    /// #[event(subject = "stock.{sku}.received")]
    /// pub struct StockReceived { pub sku: String, pub quantity: u32 }
    ///
    /// #[derive(AggregateEvent)]
    /// pub enum StockEvent { Received(StockReceived) }
    ///
    /// #[derive(Clone, Default, serde::Serialize)]
    /// pub struct Stock { pub on_hand: u32 }
    ///
    /// impl Aggregate for Stock {
    ///     const NAME: &'static str = "Stock";
    ///     type Event = StockEvent;
    ///     fn filter(sku: &str) -> String { format!("stock.{sku}.*") }
    ///     fn apply(&mut self, e: &StockEvent) {
    ///         match e { StockEvent::Received(r) => self.on_hand += r.quantity }
    ///     }
    /// }
    ///
    /// let inventory = Service::new("inventory").aggregate::<Stock>();
    /// assert_eq!(inventory.manifest().aggregates[0].filter, "stock.{id}.*");
    /// ```
    pub fn aggregate<A: crate::Aggregate + serde::Serialize>(mut self) -> Self {
        self.aggregates
            .push(crate::aggregate::inspect::Inspected::of::<A>());
        self
    }

    /// How long the inbox remembers handled events (default 7 days; keep it
    /// at least the streams' duplicate window). Bucket-wide, so it applies
    /// when the bucket is created.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// How many groups each handler's inbox records are spread over
    /// (default [`DEFAULT_INBOX_GROUPS`](crate::DEFAULT_INBOX_GROUPS),
    /// clamped to 1..=[`MAX_INBOX_GROUPS`](crate::MAX_INBOX_GROUPS)).
    ///
    /// The server holds one key per group, about 350 bytes of its memory
    /// each, so a handler's inbox costs at most `groups × 350` bytes of
    /// server memory however many events it remembers; each record written
    /// rewrites its group, about `24 × rate × horizon / groups` bytes. See
    /// `docs/capacity.md` for choosing it. The count is recorded in the
    /// bucket when it is created, and an instance configured with another
    /// count refuses to start.
    pub fn inbox_groups(mut self, groups: u32) -> Self {
        self.inbox_groups = groups.clamp(1, crate::topology::MAX_INBOX_GROUPS);
        self
    }

    /// How much nats-server memory this service's streams and inbox may
    /// take (default [`DEFAULT_SERVER_BUDGET`](super::DEFAULT_SERVER_BUDGET), 1 GiB). At start the service
    /// projects what they will hold from what the server holds now — a
    /// stream with no `max_age`, `max_bytes` or `max_msgs` over 30 days at
    /// its rate so far, the inbox at its group bound — and logs a warning
    /// that says what to change when a projection passes the budget (or
    /// when, at a stream's rate, each inbox record would rewrite more than
    /// 16 KB of its group). It never refuses to start.
    pub fn server_budget(mut self, bytes: u64) -> Self {
        self.server_budget = bytes;
        self
    }

    /// How long start-up retries timeouts before it fails (default 30 s,
    /// enough for a cluster to elect leaders). Errors that cannot pass —
    /// a permission denial, no JetStream, a bad name — fail at once.
    ///
    /// While nodes keep failing, a start can run out of time (seen in 2 of
    /// ~100 starts with a node killed every 4–8 s). Choose what happens
    /// then: keep the default and let a supervisor restart the process on
    /// the error (systemd `Restart=on-failure`, a Kubernetes restart
    /// policy) — the error says what failed — or pass `Duration::MAX` to
    /// retry (with backoff up to 2 s) for as long as the errors are
    /// transient.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// How long a running service retries a failure that may pass — a
    /// handler's consumer deleted and not recreatable, the inbox bucket
    /// missing — before it stops and [`ServiceHandle::wait`](crate::ServiceHandle::wait) (or
    /// [`run`](Self::run)) returns the [`RunError`](crate::RunError). Default 60 s.
    pub fn recovery_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_timeout = timeout;
        self
    }

    /// [`handler`](Self::handler) without the compile-time check: a handler
    /// that says it has a deadline is refused at start.
    pub(crate) fn plain_handler<H: Handler>(mut self, handler: H) -> Self {
        if handler.deadline().is_some() {
            self.misregistered.push(handler.name());
        }
        self.handlers.push(Arc::new(Typed(handler)));
        self
    }
}
