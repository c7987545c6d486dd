//! The wire headers (CloudEvents 1.0, NATS binding, binary mode) and the
//! [`Metadata`] they carry.
//!
//! Every choreo event is one JetStream message whose headers are:
//!
//! | header | value |
//! | --- | --- |
//! | `Nats-Msg-Id` | the event id (JetStream's dedup key) |
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | the event id |
//! | `ce-type` | the event name |
//! | `ce-source` | the emitting service |
//! | `ce-time` | RFC 3339 time of emission, UTC |
//! | `ce-eventversion` | the schema version, a positive integer |
//! | `ce-correlationid` | the id shared by every event of one flow |
//! | `ce-causationid` | the id of the event whose handler emitted this one (absent on a root) |
//! | `traceparent` | W3C trace context, when there is one |
//! | `content-type` | `application/cbor` |
//! | `choreo-replay` | only on a copy that a replay stored again: `dlq <letter sequence> <service>.<handler>` (`choreo dlq replay`; the handler that dead-lettered it), or `<service>.<handler>` for what that handler emitted while `choreo replay` rewound it |
//!
//! `choreo-replay` is optional and informative: readers that ignore it
//! lose nothing, and it tells a replayed copy of an event from a duplicate
//! (what the testkit's `assert_no_duplicates` looks for).
//!
//! Header names are written in lower case (except `Nats-Msg-Id`, which is
//! JetStream's spelling); lookups are case-sensitive.

use async_nats::{HeaderMap, HeaderName};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::event::{Event, EventId, HeaderError};
use crate::wire::codec::CONTENT_TYPE as CBOR;

/// `Nats-Msg-Id`: JetStream's deduplication key; the event id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// `ce-specversion`: always [`SPEC_VERSION`].
pub const CE_SPECVERSION: &str = "ce-specversion";
/// `ce-id`: the event id.
pub const CE_ID: &str = "ce-id";
/// `ce-type`: the event name.
pub const CE_TYPE: &str = "ce-type";
/// `ce-source`: the service that emitted the event.
pub const CE_SOURCE: &str = "ce-source";
/// `ce-time`: when the event was emitted, RFC 3339.
pub const CE_TIME: &str = "ce-time";
/// `ce-eventversion`: the schema version (a CloudEvents extension attribute).
pub const CE_EVENTVERSION: &str = "ce-eventversion";
/// `ce-correlationid`: the id shared by every event of one flow.
pub const CE_CORRELATIONID: &str = "ce-correlationid";
/// `ce-causationid`: the id of the event that caused this one.
pub const CE_CAUSATIONID: &str = "ce-causationid";
/// `traceparent`: W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// `content-type`: always `application/cbor`.
pub const CONTENT_TYPE: &str = "content-type";
/// `choreo-replay`: on a copy stored again by a replay, what replayed it
/// (`dlq <letter sequence> <service>.<handler>`, or `<service>.<handler>` for the emissions of
/// a handler that `choreo replay` rewound). Absent on everything else.
pub const CHOREO_REPLAY: &str = "choreo-replay";
/// The CloudEvents spec version choreo writes and accepts.
pub const SPEC_VERSION: &str = "1.0";

/// A stored event's headers less JetStream's own (`Nats-*`), for a copy
/// stored again (a dead letter, a replay): control headers
/// (`Nats-Expected-*`, `Nats-Rollup`, `Nats-TTL`, `Nats-Schedule*`,
/// `Nats-Batch-*`, …) would make the target stream refuse the copy or act on
/// it, and the rest describe the original store.
pub(crate) fn without_jetstream(original: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, values) in original.iter() {
        let jetstream = AsRef::<str>::as_ref(name)
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"));
        if !jetstream {
            for v in values {
                h.append(name.clone(), v.clone());
            }
        }
    }
    h
}

/// What the headers of one event say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    id: EventId,
    event_type: String,
    source: String,
    time: OffsetDateTime,
    version: u32,
    correlation_id: EventId,
    causation_id: Option<EventId>,
    traceparent: Option<String>,
}

impl Metadata {
    /// The metadata of a root event, the first of a new flow: its id follows
    /// the `key` rule or is fresh, and it is its own correlation id.
    ///
    /// # Errors
    /// `source` is not a legal header value (see [`check_source`]).
    pub fn root<E: Event>(event: &E, source: &str) -> Result<Self, HeaderError> {
        Self::root_with_key::<E>(event.key().as_ref(), source)
    }

    /// [`root`](Self::root) for an event whose key the caller already has
    /// (the publisher keeps it for a duplicate's check).
    pub(crate) fn root_with_key<E: Event>(
        key: Option<&crate::EventKey>,
        source: &str,
    ) -> Result<Self, HeaderError> {
        check_source(source)?;
        let id = key.map_or_else(EventId::new_random, |key| EventId::keyed(E::NAME, key));
        Ok(Self::new::<E>(id, source, id, None))
    }

    /// The metadata of the `index`-th `E` that handler `handler_id` of service
    /// `source` emitted while handling the event described by `cause`. The
    /// id follows the `key` rule, else the emission rule; the correlation id
    /// is inherited and the causation id is `cause`'s id.
    ///
    /// # Errors
    /// `source` is not a legal header value (see [`check_source`]).
    pub fn emitted<E: Event>(
        event: &E,
        source: &str,
        cause: &Metadata,
        handler_id: &str,
        index: u32,
    ) -> Result<Self, HeaderError> {
        check_source(source)?;
        let id = match event.key() {
            Some(key) => EventId::keyed(E::NAME, &key),
            None => EventId::emitted(handler_id, cause.id, E::NAME, index),
        };
        let mut meta = Self::new::<E>(id, source, cause.correlation_id, Some(cause.id));
        meta.traceparent.clone_from(&cause.traceparent);
        Ok(meta)
    }

    /// The metadata of an event in the flow `correlation` started, caused
    /// by `causation`: its id follows the `key` rule, else is random.
    ///
    /// # Errors
    /// `source` is not a legal header value (see [`check_source`]).
    pub(crate) fn in_flow<E: Event>(
        event: &E,
        source: &str,
        correlation: EventId,
        causation: EventId,
    ) -> Result<Self, HeaderError> {
        check_source(source)?;
        let id = event
            .key()
            .map_or_else(EventId::new_random, |key| EventId::keyed(E::NAME, &key));
        Ok(Self::new::<E>(id, source, correlation, Some(causation)))
    }

    fn new<E: Event>(
        id: EventId,
        source: &str,
        correlation_id: EventId,
        causation_id: Option<EventId>,
    ) -> Self {
        Self {
            id,
            event_type: E::NAME.to_owned(),
            source: source.to_owned(),
            time: OffsetDateTime::now_utc(),
            version: E::VERSION,
            correlation_id,
            causation_id,
            traceparent: None,
        }
    }

    /// Sets the W3C `traceparent`.
    ///
    /// # Errors
    /// The value is not `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn with_traceparent(mut self, traceparent: &str) -> Result<Self, HeaderError> {
        check_traceparent(traceparent)?;
        self.traceparent = Some(traceparent.to_owned());
        Ok(self)
    }

    /// Replaces the emission time (tests and replays).
    pub fn with_time(mut self, time: OffsetDateTime) -> Self {
        self.time = time;
        self
    }

    /// The event id.
    pub fn id(&self) -> EventId {
        self.id
    }
    /// The event name (`ce-type`).
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The emitting service (`ce-source`).
    pub fn source(&self) -> &str {
        &self.source
    }
    /// When the event was emitted (`ce-time`).
    pub fn time(&self) -> OffsetDateTime {
        self.time
    }
    /// The schema version (`ce-eventversion`).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The flow's id (`ce-correlationid`).
    pub fn correlation_id(&self) -> EventId {
        self.correlation_id
    }
    /// The causing event's id (`ce-causationid`); `None` on a root event.
    pub fn causation_id(&self) -> Option<EventId> {
        self.causation_id
    }
    /// The W3C trace context, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The headers of the wire format.
    pub fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        self.write_headers(&mut h);
        h
    }

    /// Writes the wire-format headers into `headers`, replacing any of the
    /// same names.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        // Static names: no allocation for the header names on the hot path.
        let name = HeaderName::from_static;
        let id = self.id.to_string();
        h.insert(name(NATS_MSG_ID), id.as_str());
        h.insert(name(CE_SPECVERSION), SPEC_VERSION);
        h.insert(name(CE_ID), id);
        // Every string below was checked for CR/LF when the metadata was built.
        h.insert(name(CE_TYPE), self.event_type.as_str());
        h.insert(name(CE_SOURCE), self.source.as_str());
        h.insert(name(CE_TIME), format_time(self.time));
        h.insert(name(CE_EVENTVERSION), self.version.to_string());
        h.insert(name(CE_CORRELATIONID), self.correlation_id.to_string());
        if let Some(c) = self.causation_id {
            h.insert(name(CE_CAUSATIONID), c.to_string());
        }
        if let Some(t) = &self.traceparent {
            h.insert(name(TRACEPARENT), t.as_str());
        }
        h.insert(name(CONTENT_TYPE), CBOR);
    }

    /// Reads and validates the wire-format headers. Every required header must
    /// appear exactly once. `Nats-Msg-Id` is JetStream's transport key and is
    /// not read: `ce-id` is the event's identity (a dead-letter copy, for one,
    /// carries its own `Nats-Msg-Id`).
    ///
    /// # Errors
    /// The first missing or malformed header, with its name and value.
    pub fn from_headers(h: &HeaderMap) -> Result<Self, HeaderError> {
        let spec = required(h, CE_SPECVERSION)?;
        if spec != SPEC_VERSION {
            return Err(malformed(CE_SPECVERSION, spec, "\"1.0\""));
        }
        let content_type = required(h, CONTENT_TYPE)?;
        if content_type != CBOR {
            return Err(malformed(
                CONTENT_TYPE,
                content_type,
                "\"application/cbor\"",
            ));
        }
        let id = parse_id(CE_ID, required(h, CE_ID)?)?;
        let event_type = required(h, CE_TYPE)?;
        check_text(CE_TYPE, event_type)?;
        let source = required(h, CE_SOURCE)?;
        check_text(CE_SOURCE, source)?;
        let time_s = required(h, CE_TIME)?;
        let time = OffsetDateTime::parse(time_s, &Rfc3339)
            .map_err(|_| malformed(CE_TIME, time_s, "an RFC 3339 timestamp"))?;
        let version_s = required(h, CE_EVENTVERSION)?;
        let version = version_s
            .parse::<u32>()
            .ok()
            .filter(|v| *v > 0 && version_s.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| malformed(CE_EVENTVERSION, version_s, "a positive integer"))?;
        let correlation_id = parse_id(CE_CORRELATIONID, required(h, CE_CORRELATIONID)?)?;
        let causation_id = optional(h, CE_CAUSATIONID)?
            .map(|c| parse_id(CE_CAUSATIONID, c))
            .transpose()?;
        let traceparent = optional(h, TRACEPARENT)?
            .map(|t| check_traceparent(t).map(|()| t.to_owned()))
            .transpose()?;
        Ok(Self {
            id,
            event_type: event_type.to_owned(),
            source: source.to_owned(),
            time,
            version,
            correlation_id,
            causation_id,
            traceparent,
        })
    }
}

/// Checks a service name for use as `ce-source`: 1 to 256 characters, no
/// whitespace or control characters.
///
/// # Errors
/// [`HeaderError::Malformed`] naming `ce-source`.
pub fn check_source(source: &str) -> Result<(), HeaderError> {
    if source.is_empty() || source.len() > 256 {
        return Err(malformed(CE_SOURCE, source, "1 to 256 characters"));
    }
    check_text(CE_SOURCE, source)
}

fn check_text(header: &'static str, value: &str) -> Result<(), HeaderError> {
    if value.is_empty() || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(malformed(
            header,
            value,
            "a non-empty value without whitespace or control characters",
        ));
    }
    Ok(())
}

fn check_traceparent(t: &str) -> Result<(), HeaderError> {
    let parts: Vec<&str> = t.split('-').collect();
    let ok = parts.len() == 4
        && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| {
            p.len() == *n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(malformed(
            TRACEPARENT,
            t,
            "W3C trace context `<2 hex>-<32 hex trace id>-<16 hex span id>-<2 hex flags>`",
        ))
    }
}

fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

fn parse_id(header: &'static str, value: &str) -> Result<EventId, HeaderError> {
    value
        .parse()
        .map_err(|_| malformed(header, value, "a UUID"))
}

fn malformed(header: &'static str, value: &str, expected: &'static str) -> HeaderError {
    HeaderError::Malformed {
        header,
        value: value.to_owned(),
        expected,
    }
}

fn optional<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, HeaderError> {
    // A static name: looking up by `&str` would allocate one per lookup.
    let mut all = h.get_all(HeaderName::from_static(name));
    let Some(first) = all.next() else {
        return Ok(None);
    };
    let Some(second) = all.next() else {
        return Ok(Some(first.as_str()));
    };
    let values: Vec<&str> = [first, second]
        .into_iter()
        .chain(all)
        .map(|v| v.as_str())
        .collect();
    Err(HeaderError::Malformed {
        header: name,
        value: values.join(", "),
        expected: "exactly one value",
    })
}

fn required<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, HeaderError> {
    optional(h, name)?.ok_or(HeaderError::Missing { header: name })
}

/// The size of a message with these headers and a payload of `payload`
/// bytes, as NATS counts it against `max_payload`.
pub(crate) fn wire_size(headers: &HeaderMap, payload: usize) -> usize {
    let headers: usize = headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    payload + headers + "NATS/1.0\r\n\r\n".len()
}
