//! [`HandlerError`]: why a handler failed, and whether a retry can help.

use std::fmt;
use std::time::Duration;

/// The error type every failure converts into.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a handler failed, and whether trying again can help.
///
/// `?` works on any error that converts into `Box<dyn Error + Send + Sync>`:
/// every `std::error::Error + Send + Sync` type, `Box<dyn Error + Send +
/// Sync>` itself, `anyhow::Error`, and `String` or `&str` messages. Each
/// gives a retryable error; say [`HandlerError::permanent`] when a retry
/// cannot succeed (the event is then dead-lettered at once).
///
/// ```
/// use std::time::Duration;
/// use choreo::HandlerError;
///
/// fn parse(text: &str) -> Result<u32, HandlerError> {
///     let n: u32 = text.parse().map_err(HandlerError::permanent)?; // bad data: no retry
///     if n == 0 {
///         // the provider asked us to come back in a minute
///         return Err(HandlerError::retryable("rate limited").retry_after(Duration::from_secs(60)));
///     }
///     Ok(n)
/// }
/// # assert!(parse("x").unwrap_err().is_permanent());
/// ```
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
pub struct HandlerError {
    kind: HandlerErrorKind,
    retry_after: Option<Duration>,
    source: BoxError,
}

/// Whether a [`HandlerError`] may succeed on a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandlerErrorKind {
    /// Redelivered after the backoff (or [`HandlerError::retry_after`]), up
    /// to `max_deliver` times.
    Retryable,
    /// Dead-lettered at once.
    Permanent,
}

impl HandlerError {
    /// A failure that may succeed later: the event is redelivered after the
    /// handler's backoff, up to `max_deliver` times.
    pub fn retryable(e: impl Into<BoxError>) -> Self {
        Self {
            kind: HandlerErrorKind::Retryable,
            retry_after: None,
            source: e.into(),
        }
    }

    /// A failure no retry can fix: the event goes to the dead-letter stream
    /// at once.
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        Self {
            kind: HandlerErrorKind::Permanent,
            retry_after: None,
            source: e.into(),
        }
    }

    /// Redeliver after `delay` this once, instead of the handler's backoff
    /// (a rate limit's `Retry-After`, a lock held elsewhere). Ignored for a
    /// permanent error, and on the last delivery (the event is
    /// dead-lettered).
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Whether a retry may succeed.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// Whether this error is permanent.
    pub fn is_permanent(&self) -> bool {
        self.kind == HandlerErrorKind::Permanent
    }

    /// The delay set with [`retry_after`](Self::retry_after).
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes the underlying error out.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

// `HandlerError` does not implement `std::error::Error`: if it did, this
// impl would overlap `impl From<T> for T`. The same is true of
// `anyhow::Error` and `Box<dyn Error>`.
impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::retryable(e)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_permanent() {
            "permanent"
        } else {
            "retryable"
        };
        write!(f, "{kind} error: {}", self.source)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            f.debug_struct("HandlerError")
                .field("kind", &self.kind)
                .field("retry_after", &self.retry_after)
                .field("source", &self.source)
                .finish()
        } else {
            fmt::Display::fmt(self, f)
        }
    }
}

/// What a handler may return: `()` or `Result<(), E>` with `E` convertible
/// into [`HandlerError`].
#[diagnostic::on_unimplemented(
    message = "a choreo handler must return `()` or `Result<(), E>` where `E` converts into `HandlerError`, not `{Self}`",
    label = "unsupported return type",
    note = "`E` may be `HandlerError`, any `std::error::Error + Send + Sync + 'static`, `Box<dyn Error + Send + Sync>` or `anyhow::Error`; wrap anything else with `HandlerError::retryable(..)` or `HandlerError::permanent(..)`",
    note = "events are facts: handlers emit new events with `ctx.emit(...)` instead of returning values"
)]
pub trait IntoHandlerResult {
    /// Converts into the handler's verdict.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}
