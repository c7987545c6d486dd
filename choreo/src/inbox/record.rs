//! What one inbox key says, and what a delivery does about it: the
//! [`decide`] rule, and the [`Watch`] that judges another instance's claim.

use std::time::Duration;

/// What the inbox says about one key, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    /// The key's revision (its sequence in the bucket's stream).
    pub(crate) revision: u64,
    pub(crate) state: State,
}

/// The value of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Handled.
    Done,
    /// Claimed by a running handler: the instance that wrote the claim (0
    /// if unreadable) and the stream sequence of the delivery it runs (0 if
    /// not given, as claims of older versions).
    Running { instance: u64, stream_seq: u64 },
    /// Deleted, purged, or not a value choreo writes.
    Gone,
}

/// The delivery a claim or a retry note is about: its stream sequence,
/// and its attempt of the handler's `max_deliver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) stream_seq: u64,
    pub(crate) attempt: u32,
    pub(crate) of: u32,
}

/// What a claim key tells a reader (`choreo trace`) of an event not yet
/// handled: a handler running it, or a failed attempt waiting for its
/// retry. Never used to decide a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    /// `run <instance> <unix ms> <stream seq> <attempt>/<max>`: running
    /// since (the claim's last refresh), on this attempt.
    Running { at_ms: u64, attempt: u32, of: u32 },
    /// `retry <instance> <unix ms> <stream seq> <attempt>/<max> <retry at
    /// ms> <error>`: this attempt failed with `error`; the next is due at
    /// `retry_at_ms`.
    Retrying {
        attempt: u32,
        of: u32,
        retry_at_ms: u64,
        error: String,
    },
}

/// The note in a claim key's value, if it is one that says its attempt
/// (claims of older versions do not).
pub(crate) fn note(value: &[u8]) -> Option<Note> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.splitn(7, ' ');
    let kind = parts.next()?;
    let _instance = parts.next()?;
    let at_ms = parts.next()?.parse().ok()?;
    let _seq = parts.next()?;
    let (attempt, of) = parts.next()?.split_once('/')?;
    let (attempt, of) = (attempt.parse().ok()?, of.parse().ok()?);
    match kind {
        "run" => Some(Note::Running { at_ms, attempt, of }),
        "retry" => Some(Note::Retrying {
            attempt,
            of,
            retry_at_ms: parts.next()?.parse().ok()?,
            error: parts.next().unwrap_or_default().to_owned(),
        }),
        _ => None,
    }
}

/// What to do with a delivery, given what the inbox says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run the handler; the key is at this revision (0: absent).
    Run(u64),
    /// The handler already handled the event: ack and skip.
    Done,
    /// Another invocation may be running it: watch its claim (see
    /// [`Watch`]).
    Busy,
}

/// The delivery a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sighting {
    /// Its delivery attempt (1 for the first).
    pub(crate) attempt: u32,
    /// Its stream sequence.
    pub(crate) stream_seq: u64,
    /// This instance's id, as its claims carry it.
    pub(crate) me: u64,
}

/// Decides from a read record, judging claims without any clock:
///
/// - a claim this very instance wrote does not block it (an invocation of
///   the same key still running here is waited for by the watchdog's
///   registry, not through the inbox);
/// - a claim on the very message being redelivered is stale: JetStream
///   redelivers only after the claim's holder sent no in-progress ack for
///   `ack_wait`, and the holder refreshes its claim with each of those, so
///   the server's own timer has judged it;
/// - any other claim is [`Verdict::Busy`]: the waiter watches it, and takes
///   it over once its revision has not moved for a lease (the holder
///   refreshes it every third of `ack_wait`), measured on the waiter's
///   monotonic clock. Neither clock skew between instances nor a jump of a
///   wall clock can make a live claim look stale.
pub(crate) fn decide(record: Option<Record>, at: Sighting) -> Verdict {
    let Some(record) = record else {
        return Verdict::Run(0);
    };
    match record.state {
        State::Done => Verdict::Done,
        State::Running {
            instance,
            stream_seq,
        } => {
            let own = instance != 0 && instance == at.me;
            let redelivered = at.attempt > 1 && stream_seq != 0 && stream_seq == at.stream_seq;
            if own || redelivered {
                Verdict::Run(record.revision)
            } else {
                Verdict::Busy
            }
        }
        State::Gone => Verdict::Run(record.revision),
    }
}

/// How long a claim may keep one revision before a waiter takes it over:
/// `ack_wait`, three refresh periods.
pub(crate) fn claim_lease(ack_wait: Duration) -> Duration {
    ack_wait
}

/// How long a claim outlives its last refresh before the server drops it
/// (where the bucket allows per-message TTLs): three leases, at least ten
/// seconds. A waiter judges a claim stale after one lease, so the TTL only
/// cleans up; it never decides.
pub(crate) fn claim_ttl(ack_wait: Duration) -> Duration {
    (claim_lease(ack_wait) * 3).max(Duration::from_secs(10))
}

/// A waiter's view of one claim: stale once its revision has not changed
/// for the lease, on the waiter's monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    seen: Option<(u64, tokio::time::Instant)>,
}

impl Watch {
    /// Notes the claim's revision as read now; whether it has been at that
    /// revision for at least `lease`.
    pub(crate) fn stale(&mut self, revision: u64, lease: Duration) -> bool {
        let now = tokio::time::Instant::now();
        match self.seen {
            Some((r, since)) if r == revision => now.duration_since(since) >= lease,
            _ => {
                self.seen = Some((revision, now));
                false
            }
        }
    }
}

pub(super) fn parse(value: &[u8], deleted: bool) -> State {
    if deleted {
        return State::Gone;
    }
    let text = String::from_utf8_lossy(value);
    let mut parts = text.split(' ');
    match parts.next() {
        Some("done") => State::Done,
        // A failed attempt's note frees the key, as a released claim does.
        Some("retry") => State::Gone,
        Some("run") => {
            // `run <instance> <unix ms> <stream seq>`; the time is for
            // people reading the bucket, never for deciding.
            let instance = parts
                .next()
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .unwrap_or(0);
            let stream_seq = parts.nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
            State::Running {
                instance,
                stream_seq,
            }
        }
        _ => State::Gone,
    }
}

pub(super) fn record_of(raw: &super::Raw) -> Record {
    Record {
        revision: raw.revision,
        state: parse(&raw.value, raw.deleted),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Note, Record, Sighting, State, Verdict, Watch, decide, note, parse};

    const ME: u64 = 0xabc;

    fn rec(revision: u64, state: State) -> Option<Record> {
        Some(Record { revision, state })
    }

    fn first(stream_seq: u64) -> Sighting {
        Sighting {
            attempt: 1,
            stream_seq,
            me: ME,
        }
    }

    fn claim(instance: u64, stream_seq: u64) -> State {
        State::Running {
            instance,
            stream_seq,
        }
    }

    #[test]
    fn notes_say_the_attempt_and_free_the_key() {
        let run = b"run 0000000000000abc 1700000000000 42 2/5";
        assert_eq!(
            note(run),
            Some(Note::Running {
                at_ms: 1_700_000_000_000,
                attempt: 2,
                of: 5
            })
        );
        assert_eq!(
            parse(run, false),
            claim(0xabc, 42),
            "the attempt does not change the claim"
        );
        let retry =
            b"retry 0000000000000abc 1700000000000 42 3/5 1700000030000 the ledger is down: 503";
        assert_eq!(
            note(retry),
            Some(Note::Retrying {
                attempt: 3,
                of: 5,
                retry_at_ms: 1_700_000_030_000,
                error: "the ledger is down: 503".into()
            })
        );
        assert_eq!(parse(retry, false), State::Gone);
        assert_eq!(
            decide(rec(9, parse(retry, false)), first(42)),
            Verdict::Run(9)
        );
        // Claims of older versions carry no attempt.
        assert_eq!(note(b"run 0000000000000abc 1700000000000 42"), None);
        assert_eq!(note(b"done 1700000000000"), None);
    }

    #[test]
    fn absent_keys_run_from_revision_zero() {
        assert_eq!(decide(None, first(1)), Verdict::Run(0));
    }

    #[test]
    fn done_keys_are_skipped() {
        assert_eq!(decide(rec(7, State::Done), first(1)), Verdict::Done);
    }

    #[test]
    fn another_instances_claim_is_watched() {
        assert_eq!(decide(rec(3, claim(0x999, 5)), first(5)), Verdict::Busy);
        // A copy on another message, redelivered: the server's timer says
        // nothing about the claim on the first message.
        let copy = Sighting {
            attempt: 3,
            stream_seq: 6,
            me: ME,
        };
        assert_eq!(decide(rec(3, claim(0x999, 5)), copy), Verdict::Busy);
        // An old-format claim (no instance, no sequence) is watched too.
        assert_eq!(decide(rec(3, claim(0, 0)), copy), Verdict::Busy);
    }

    #[test]
    fn a_claim_on_the_redelivered_message_itself_is_stale() {
        let again = Sighting {
            attempt: 2,
            stream_seq: 5,
            me: ME,
        };
        assert_eq!(decide(rec(3, claim(0x999, 5)), again), Verdict::Run(3));
    }

    #[test]
    fn this_instances_own_claim_does_not_block_it() {
        assert_eq!(decide(rec(4, claim(ME, 5)), first(5)), Verdict::Run(4));
    }

    #[test]
    fn deleted_keys_run_at_their_revision() {
        assert_eq!(decide(rec(9, State::Gone), first(1)), Verdict::Run(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_claim_is_stale_only_after_a_lease_at_one_revision() {
        let lease = Duration::from_secs(2);
        let mut w = Watch::default();
        assert!(!w.stale(3, lease));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!w.stale(3, lease));
        // Refreshed: the lease starts again.
        assert!(!w.stale(4, lease));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!w.stale(4, lease));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(w.stale(4, lease));
    }

    #[test]
    fn values_parse_into_states() {
        assert_eq!(parse(b"done 17", false), State::Done);
        assert_eq!(
            parse(b"run 00000000000000ab 1700000000000 42", false),
            claim(0xab, 42)
        );
        assert_eq!(
            parse(b"run ab12cd34 1700000000000", false),
            claim(0xab12_cd34, 0)
        );
        assert_eq!(parse(b"done 17", true), State::Gone);
        assert_eq!(parse(b"something else", false), State::Gone);
    }
}
