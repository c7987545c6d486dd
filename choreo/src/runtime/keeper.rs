//! The keeper: a thread that keeps some worker of the runtime driving its
//! I/O and timers while a handler blocks its own worker.
//!
//! Tokio drives I/O and timers from one idle worker at a time. A task woken
//! by that driver runs next on the very worker that was driving, and no
//! other worker is told (nothing else is queued). If the handler then blocks
//! its thread, nobody drives: every connection and timer of the runtime
//! stops, the watchdog's in-progress acks with them, and the event is
//! redelivered elsewhere after `ack_wait`. (Without a remedy, the test whose
//! handler blocks in its first poll failed about one run in twelve, and the
//! one whose handler blocks after awaiting a timer 16 runs in 20.)
//!
//! So every [`EVERY`] the keeper spawns an empty task from outside the
//! runtime: tokio queues it and wakes an idle worker, which runs it, finds
//! nothing else, and parks on the driver. A blocked handler stalls the I/O
//! for at most [`EVERY`], against an `ack_wait` of seconds, at the cost of
//! 20 wake-ups a second per service. (The remedy before this requeued every
//! poll of every handler, which put a thread wake-up on each event's path:
//! the 3-hop chain's p99 ratio read 0.69–0.88 with it and 0.92–1.23 without,
//! `docs/benchmarks.md`.)

use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::watch;

/// How often the keeper wakes an idle worker.
pub(crate) const EVERY: Duration = Duration::from_millis(50);

/// Starts the keeper of the current runtime, until `stop` says stop or its
/// sender is gone. On a current-thread runtime there is no other worker to
/// wake, so there is nothing to keep.
pub(crate) fn spawn(stop: watch::Receiver<bool>) {
    let Ok(handle) = Handle::try_current() else {
        return;
    };
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return;
    }
    let started = std::thread::Builder::new()
        .name("choreo-keeper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EVERY);
                if stop.has_changed().is_err() || *stop.borrow() {
                    return;
                }
                drop(handle.spawn(async {}));
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the keeper thread; a handler that blocks its thread may stall the runtime's I/O");
    }
}
