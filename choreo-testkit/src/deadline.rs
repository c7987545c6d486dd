//! Asserting a deadline: that it was scheduled, cancelled (met by an
//! `unless` event) or fired, for one flow.

use std::time::Duration;

use choreo::EventId;
use choreo::admin::deadlines::{self, DeadlineState};

use crate::flow::{FlowError, Recorder};

/// What a deadline is expected to have become ([`Recorder::deadline`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadlineIs {
    /// Scheduled and pending: A was handled, no B yet, its time not come.
    Scheduled,
    /// Cancelled: an `unless` event came in time; the handler never runs.
    Cancelled,
    /// Fired: its time passed first, and the handler ran (or runs) with A.
    Fired,
}

impl DeadlineIs {
    fn holds(self, s: &DeadlineState) -> bool {
        matches!(
            (self, s),
            (Self::Scheduled, DeadlineState::Scheduled { .. })
                | (Self::Cancelled, DeadlineState::Met { .. })
                | (Self::Fired, DeadlineState::Fired { .. })
        )
    }
}

impl Recorder {
    /// Waits up to `timeout` until the deadline that `handler` of `service`
    /// keeps for the flow `correlation` (a deadline matched by correlation)
    /// is what `want` says, and returns its state.
    ///
    /// ```no_run
    /// # async fn t(recorder: choreo_testkit::Recorder, order: choreo::EventId) -> Result<(), choreo_testkit::FlowError> {
    /// use choreo_testkit::DeadlineIs;
    /// use std::time::Duration;
    /// recorder
    ///     .deadline("orders", "expire_unpaid", order, DeadlineIs::Fired, Duration::from_secs(10))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// It is not so within `timeout` (the error names its last state), or
    /// the deadline stream cannot be read.
    pub async fn deadline(
        &self,
        service: &str,
        handler: &str,
        correlation: EventId,
        want: DeadlineIs,
        timeout: Duration,
    ) -> Result<DeadlineState, FlowError> {
        let token = correlation.to_string();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let last = deadlines::deadline(&self.js, service, handler, &token).await;
            match &last {
                Ok(s) if want.holds(s) => return Ok(s.clone()),
                // A decided deadline does not change again.
                Ok(s @ (DeadlineState::Met { .. } | DeadlineState::Fired { .. })) => {
                    return Err(FlowError(format!(
                        "the deadline {service}.{handler} of flow {token}: expected {want:?}, but it is decided: {s:?}"
                    )));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= until {
                return Err(FlowError(format!(
                    "the deadline {service}.{handler} of flow {token}: expected {want:?} within {timeout:?}, last {last:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
