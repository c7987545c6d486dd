//! Deadlines: "B within T of A, or else", kept in JetStream alone.
//!
//! One stream, [`STREAM`], holds every service's deadlines, under
//! `choreo.deadline.<service>.<handler>.<part>.<token>`, where `token` is
//! what matches B to A (A's correlation id, or its key) and `part` is:
//!
//! - `at`: the schedule, written when A is handled, with `Nats-Schedule:
//!   @at <A's time + T>`. It carries A's headers and payload. The server
//!   removes it when it fires, and choreo purges it when B comes first.
//! - `fire`: the server's copy of the schedule at its time: A again, which
//!   the deadline handler consumes (`Nats-TTL`: the retention).
//! - `outcome`: the decision, `met <B id> <ms>` or `fired <A id> <ms>`,
//!   written once with `Nats-Expected-Last-Subject-Sequence: 0`: whichever
//!   of B's watcher and the fired copy writes it first wins, and the other
//!   stands down. That is the whole of "exactly one outcome".

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;

use crate::event::EventId;
use crate::nats::{Source, message, moved_on, source};
use crate::topology::{StreamError, StreamSettings};
use crate::wire::headers as h;

mod handlers;
mod watch;

pub(crate) use handlers::{Fire, Met, Schedule};

/// The stream that holds every service's deadlines.
pub(crate) const STREAM: &str = crate::topology::DEADLINE_STREAM;
/// Its subjects.
pub(crate) const SUBJECTS: &str = "choreo.deadline.>";

/// How long a decision is kept past its deadline's time. It stops a fired
/// copy that comes after all (a schedule that fired as B's purge ran, or
/// A's schedule written after B was seen) from running the handler; B
/// normally comes within `within`, so an hour past it is ample, and each
/// kept decision costs the server up to about 1 KB of memory
/// (`scripts/bench deadlines`).
pub(crate) const DECISION_KEEP: Duration = Duration::from_secs(3600);

/// The default [`Service::deadline_retention`](crate::Service::deadline_retention):
/// a fired copy waits a day for a deadline service that is down.
pub const DEFAULT_DEADLINE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The header that carries a deadline's due time (Unix ms) on its
/// schedule and fired copy: A's stored time + `within`.
pub(crate) const DUE: &str = "choreo-deadline-due";

/// The header that carries, on a schedule and its fired copy, the subject
/// A was published on (for `choreo status`: which event a deadline is for).
pub(crate) const FOR_SUBJECT: &str = "choreo-deadline-subject";

/// The due time a schedule or fired copy carries: [`DUE`], or on a
/// schedule written before it, the time its `Nats-Schedule` names.
pub(crate) fn due_of(headers: &HeaderMap) -> Option<time::OffsetDateTime> {
    if let Some(ms) = headers
        .get(DUE)
        .and_then(|v| v.as_str().parse::<i128>().ok())
    {
        return time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok();
    }
    let at = headers
        .get("Nats-Schedule")?
        .as_str()
        .strip_prefix("@at ")?;
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
}

/// A time as Unix ms.
pub(crate) fn unix_ms(t: time::OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos() / 1_000_000
}

/// The oldest server with message schedules.
const NEEDS: (u64, u64) = (2, 12);

/// `choreo.deadline.<service>.<handler>.<part>.<token>`.
pub(crate) fn subject(service: &str, handler: &str, part: &str, token: &str) -> String {
    format!("choreo.deadline.{service}.{handler}.{part}.{token}")
}

/// The filter of one part of one handler's deadlines.
pub(crate) fn filter(service: &str, handler: &str, part: &str) -> String {
    subject(service, handler, part, ">")
}

/// A deadline's token from A's or B's match value: the value itself if it
/// is one plain subject token (a correlation id, a key like `o-42`), else
/// a name-based id of its parts.
pub(crate) fn token(parts: &[String]) -> String {
    if let [one] = parts
        && !one.is_empty()
        && one.len() <= 64
        && one
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return one.clone();
    }
    let mut bytes: Vec<&[u8]> = vec![b"deadline-key"];
    bytes.extend(parts.iter().map(String::as_bytes));
    EventId::from_parts(&bytes).to_string()
}

/// A deadline's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// B came first: this is B's id.
    Met(EventId),
    /// The deadline fired first, for this A.
    Fired(EventId),
}

impl Outcome {
    fn text(&self) -> String {
        let now = crate::event::now_ms();
        match self {
            Self::Met(b) => format!("met {b} {now}"),
            Self::Fired(a) => format!("fired {a} {now}"),
        }
    }

    /// Parses `met <id> <ms>` / `fired <id> <ms>`; also the time.
    pub(crate) fn parse(text: &[u8]) -> Option<(Self, u64)> {
        let text = std::str::from_utf8(text).ok()?;
        let mut t = text.split_whitespace();
        let word = t.next()?;
        let id = t.next()?.parse().ok()?;
        let at = t.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        match word {
            "met" => Some((Self::Met(id), at)),
            "fired" => Some((Self::Fired(id), at)),
            _ => None,
        }
    }
}

/// The deadlines' records of one service, as its handlers read and write
/// them. Kept in the service's states, where the deadline parts find it.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    js: jetstream::Context,
    service: std::sync::Arc<str>,
    /// How long a fired copy is kept for a handler that is down.
    fired_keep: Duration,
}

/// How many times a decision refused because another stands is read
/// before giving up (the event is retried): 2 ms doubling to 200 ms apart,
/// about half a second in all.
const DECISION_READS: u32 = 9;

/// Calls `read` until it finds something, `tries` times at most, pausing
/// 2 ms doubling to 200 ms between calls; `None` if it never did.
async fn read_until_found<T, F, Fut>(tries: u32, mut read: F) -> Result<Option<T>, Source>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, Source>>,
{
    let mut pause = Duration::from_millis(2);
    for i in 0..tries {
        if i > 0 {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        if let Some(found) = read().await? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

impl Store {
    pub(crate) fn new(
        js: jetstream::Context,
        service: std::sync::Arc<str>,
        fired_keep: Duration,
    ) -> Self {
        Self {
            js,
            service,
            fired_keep,
        }
    }

    fn subject(&self, handler: &str, part: &str, token: &str) -> String {
        subject(&self.service, handler, part, token)
    }

    /// The JetStream context the records are written through.
    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The decision, if one was written (read from the stream's leader).
    pub(crate) async fn outcome(
        &self,
        handler: &str,
        token: &str,
    ) -> Result<Option<Outcome>, Source> {
        let stream = self.js.get_stream_no_info(STREAM).await.map_err(source)?;
        match stream
            .get_last_raw_message_by_subject(&self.subject(handler, "outcome", token))
            .await
        {
            Ok(m) => Ok(Outcome::parse(&m.payload).map(|(o, _)| o)),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(source(e)),
        }
    }

    /// Writes `outcome` unless a decision exists; returns the decision that
    /// stands (`outcome` itself when this write won).
    pub(crate) async fn decide(
        &self,
        handler: &str,
        token: &str,
        outcome: Outcome,
        correlation: EventId,
        keep: Duration,
    ) -> Result<Outcome, Source> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Nats-TTL", format!("{}s", keep.as_secs().max(1)).as_str());
        headers.insert(h::CE_CORRELATIONID, correlation.to_string().as_str());
        let subject = self.subject(handler, "outcome", token);
        let sent = self
            .js
            .publish_with_headers(subject, headers, outcome.text().into())
            .await
            .map_err(source)?
            .await;
        match sent {
            Ok(_) => Ok(outcome),
            // Refused: a decision stands. On a cluster the leader also
            // refuses (10164) while the other decision is still being
            // replicated, before it can be read: read until it shows.
            Err(e) if moved_on(&e) => read_until_found(DECISION_READS, || {
                self.outcome(handler, token)
            })
            .await?
            .ok_or_else(|| {
                message(format!(
                    "the deadline's decision was written by another writer but cannot be read after {DECISION_READS} reads"
                ))
            }),
            Err(e) => Err(source(e)),
        }
    }

    /// Schedules A's copy to fire at `at`, unless one is scheduled already.
    /// `due` is the deadline itself (A's stored time + `within`), which
    /// rides on the schedule and its fired copy as [`DUE`]; `at` is later
    /// than `due` when a fired copy is put off (see [`Fire`]). `msg_id`
    /// makes a repeat of the same write one write. `a_subject` is the
    /// subject A was published on, when known.
    pub(crate) async fn schedule(
        &self,
        handler: &str,
        token: &str,
        (at, due): (time::OffsetDateTime, time::OffsetDateTime),
        (a, a_subject): ((HeaderMap, bytes::Bytes), Option<&str>),
        msg_id: &str,
    ) -> Result<(), Source> {
        let (mut headers, payload) = a;
        let at = at
            .to_offset(time::UtcOffset::UTC)
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(source)?;
        headers.insert("Nats-Schedule", format!("@at {at}").as_str());
        headers.insert(
            "Nats-Schedule-Target",
            self.subject(handler, "fire", token).as_str(),
        );
        headers.insert(
            "Nats-Schedule-TTL",
            format!("{}s", self.fired_keep.as_secs().max(1)).as_str(),
        );
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert(DUE, unix_ms(due).to_string().as_str());
        if let Some(subject) = a_subject {
            headers.insert(FOR_SUBJECT, subject);
        }
        headers.insert(h::NATS_MSG_ID, msg_id);
        let sent = self
            .js
            .publish_with_headers(self.subject(handler, "at", token), headers, payload)
            .await
            .map_err(source)?
            .await;
        match sent {
            Ok(_) => Ok(()),
            // Scheduled already (a redelivery of A, or a second A).
            Err(e) if moved_on(&e) => Ok(()),
            Err(e) => Err(source(e)),
        }
    }

    /// When the deadline for `token` falls due, if it is known: from its
    /// schedule, or once that fired, from its fired copy (read from the
    /// stream's leader). `None` before A's schedule step ran (or once the
    /// fired copy is past its retention).
    /// With it, the subject A was published on, if the record says.
    pub(crate) async fn due(
        &self,
        handler: &str,
        token: &str,
    ) -> Result<Option<(time::OffsetDateTime, Option<String>)>, Source> {
        let stream = self.js.get_stream_no_info(STREAM).await.map_err(source)?;
        for part in ["at", "fire"] {
            match stream
                .get_last_raw_message_by_subject(&self.subject(handler, part, token))
                .await
            {
                Ok(m) => {
                    let subject = m.headers.get(FOR_SUBJECT).map(|v| v.as_str().to_owned());
                    return Ok(Some((due_of(&m.headers).unwrap_or(m.time), subject)));
                }
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(source(e)),
            }
        }
        Ok(None)
    }

    /// Removes the schedule, if it has not fired yet.
    pub(crate) async fn cancel(&self, handler: &str, token: &str) -> Result<u64, Source> {
        let stream = self.js.get_stream_no_info(STREAM).await.map_err(source)?;
        let purged = stream
            .purge()
            .filter(self.subject(handler, "at", token))
            .await
            .map_err(source)?;
        Ok(purged.purged)
    }
}

/// Checks that the server has message schedules and makes the deadline
/// stream (schedules and per-message TTLs allowed) if it is missing.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), StreamError> {
    check_version(&js.client().server_info().version)?;
    // A missing stream is made below; any other failure shows there too.
    if let Ok(s) = js.get_stream(STREAM).await {
        let c = &s.cached_info().config;
        if c.allow_message_schedules && c.allow_message_ttl {
            return Ok(());
        }
        return Err(StreamError::Other {
            stream: STREAM.to_owned(),
            source: message(
                "the stream exists without message schedules or per-message TTLs; \
                 set `allow_msg_schedules` and `allow_msg_ttl` on it (nats stream edit)",
            ),
        });
    }
    let mut config = settings.config(STREAM, vec![SUBJECTS.to_owned()]);
    config.allow_message_schedules = true;
    config.allow_message_ttl = true;
    config.allow_direct = true;
    config.max_age = Duration::ZERO;
    config.duplicate_window = Duration::from_secs(120);
    match js.create_stream(config).await {
        Ok(_) => {
            tracing::info!(stream = STREAM, "created the deadline stream");
            Ok(())
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
        {
            Ok(())
        }
        Err(e) => Err(StreamError::from_create(
            &js.client(),
            STREAM,
            &[SUBJECTS.to_owned()],
            e,
        )),
    }
}

/// Refuses a server older than message schedules, naming its version and
/// the feature.
fn check_version(version: &str) -> Result<(), StreamError> {
    if version_at_least(version, NEEDS) {
        return Ok(());
    }
    Err(StreamError::Other {
        stream: STREAM.to_owned(),
        source: message(format!(
            "deadlines need message schedules, which nats-server {}.{} added; this server is {version}. \
             Upgrade the server, or remove the service's deadline handlers",
            NEEDS.0, NEEDS.1
        )),
    })
}

pub(crate) use crate::nats::version_at_least;

#[cfg(test)]
mod tests {
    use crate::event::EventId;
    use crate::nats::version_at_least;

    use super::{DECISION_READS, NEEDS, Outcome, check_version, read_until_found, token};

    #[test]
    fn versions_before_2_12_have_no_schedules() {
        assert!(version_at_least("2.12.0", NEEDS));
        assert!(version_at_least("2.15.1", NEEDS));
        assert!(version_at_least("v3.0.0", NEEDS));
        assert!(!version_at_least("2.11.9", NEEDS));
        assert!(!version_at_least("2.10.22", NEEDS));
        assert!(!version_at_least("", NEEDS));
    }

    #[test]
    fn an_old_server_is_refused_with_its_version_and_the_feature() {
        let e = check_version("2.11.4").unwrap_err().to_string();
        assert!(
            e.contains("2.11.4") && e.contains("message schedules") && e.contains("2.12"),
            "{e}"
        );
        assert!(check_version("2.12.0").is_ok());
    }

    #[test]
    fn tokens_are_subject_safe() {
        assert_eq!(token(&["o-42".to_owned()]), "o-42");
        let odd = token(&["a b.c".to_owned()]);
        assert!(odd.parse::<EventId>().is_ok(), "{odd}");
        assert_ne!(token(&["a".into(), "b".into()]), token(&["ab".into()]));
        assert_eq!(
            token(&["x".into(), "y".into()]),
            token(&["x".into(), "y".into()])
        );
    }

    #[test]
    fn outcomes_read_back() {
        let id = EventId::new_random();
        for o in [Outcome::Met(id), Outcome::Fired(id)] {
            assert_eq!(Outcome::parse(o.text().as_bytes()).map(|(o, _)| o), Some(o));
        }
        assert_eq!(Outcome::parse(b"later"), None);
    }

    /// A decision another writer's write stands for, still being
    /// replicated: the reads go on until it shows, and give up after
    /// `DECISION_READS` with `None`, waiting about half a second in all.
    #[tokio::test(start_paused = true)]
    async fn a_refused_decision_is_read_until_the_other_shows() {
        let reads = std::cell::Cell::new(0);
        let started = tokio::time::Instant::now();
        let found = read_until_found(DECISION_READS, || {
            reads.set(reads.get() + 1);
            let n = reads.get();
            async move { Ok((n == 3).then_some("fired")) }
        })
        .await
        .unwrap();
        assert_eq!((found, reads.get()), (Some("fired"), 3));
        assert_eq!(started.elapsed(), std::time::Duration::from_millis(2 + 4));

        reads.set(0);
        let started = tokio::time::Instant::now();
        let never = read_until_found(DECISION_READS, || {
            reads.set(reads.get() + 1);
            async { Ok(None::<&str>) }
        })
        .await
        .unwrap();
        assert_eq!((never, reads.get()), (None, DECISION_READS));
        let waited = started.elapsed();
        assert!(
            (std::time::Duration::from_millis(400)..std::time::Duration::from_millis(600))
                .contains(&waited),
            "{waited:?}"
        );
    }
}
