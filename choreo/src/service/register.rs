//! Registering plain handlers: `Service::handler` refuses a deadline
//! handler at compile time (see `deadlines` for those).

use std::sync::Arc;

use super::Service;
use crate::handler::Handler;
use crate::runtime::Typed;

impl Service {
    /// Adds a handler (the value `#[event_handler]` makes of an `async fn`).
    ///
    /// A deadline handler (`#[event_handler(within = .., unless = ..)]`) is
    /// a compile error here: it runs as several consumers, which
    /// [`deadline`](Self::deadline) sets up. (A hand-written [`Handler`]
    /// whose `deadline()` is `Some` is refused at start instead.)
    pub fn handler<H: Handler>(self, handler: H) -> Self {
        const {
            assert!(
                !H::DEADLINE,
                "a deadline handler (`#[event_handler(within = .., unless = ..)]`) is registered with `Service::deadline`, not `Service::handler`"
            );
        }
        self.plain_handler(handler)
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
