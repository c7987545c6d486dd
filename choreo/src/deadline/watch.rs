//! How far a deadline's B watchers are behind.
//!
//! "B within T of A" is judged by when B was stored, so a fired copy may
//! decide "fired" only once every watcher (`<handler>__met_<B>`) has
//! handled every B stored up to the deadline: until then, a B stored in
//! time may still be on its way to "met". A watcher's progress is its
//! consumer's ack floor; the oldest B it has not handled is the first
//! message on B's subject filter above that floor, and its stream
//! timestamp says how far behind the watcher is. Two reads per B type,
//! shared by every fired copy checked at about the same time.

use std::sync::Mutex;
use std::time::Instant;

use async_nats::jetstream;

use crate::event::EventType;
use crate::nats::{Source, source};
use crate::topology::consumer_name;

/// One B watcher's consumer.
#[derive(Debug)]
struct Watched {
    event: &'static str,
    stream: &'static str,
    durable: String,
    filter: &'static str,
}

/// What the watchers had not handled, read at one moment.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    taken: Instant,
    /// Per watcher, in `unless` order: the B it names, and the stored time
    /// of the oldest B it has not handled (`None`: it has handled all).
    pub(crate) oldest: Vec<(&'static str, Option<time::OffsetDateTime>)>,
}

impl Reading {
    /// The first watcher with a B stored at or before `due` that it has
    /// not handled: its B's name and that B's stored time.
    pub(crate) fn behind(
        &self,
        due: time::OffsetDateTime,
    ) -> Option<(&'static str, time::OffsetDateTime)> {
        self.oldest
            .iter()
            .find_map(|&(event, oldest)| oldest.filter(|t| *t <= due).map(|t| (event, t)))
    }
}

/// The B watchers of one deadline handler in one service.
#[derive(Debug)]
pub(crate) struct Watchers {
    watched: Vec<Watched>,
    last: Mutex<Option<Reading>>,
    /// Held while reading, so that checks made together share one read.
    reading: tokio::sync::Mutex<()>,
}

impl Watchers {
    /// The watchers of a deadline waiting for `unless`, named `met`.
    pub(crate) fn new(service: &str, unless: &[EventType], met: &[&'static str]) -> Self {
        let watched = unless
            .iter()
            .zip(met)
            .map(|(b, met)| Watched {
                event: b.name,
                stream: b.stream,
                durable: consumer_name(service, met),
                filter: b.subject_filter,
            })
            .collect();
        Self {
            watched,
            last: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, since: Instant) -> Option<Reading> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.as_ref().filter(|r| r.taken >= since).cloned()
    }

    /// A reading taken at or after `since` (a fired copy's arrival): a
    /// cached one if it is recent enough, else a new one.
    pub(crate) async fn read_since(
        &self,
        js: &jetstream::Context,
        since: Instant,
    ) -> Result<Reading, Source> {
        if let Some(r) = self.cached(since) {
            return Ok(r);
        }
        let _reading = self.reading.lock().await;
        if let Some(r) = self.cached(since) {
            return Ok(r);
        }
        let taken = Instant::now();
        let mut oldest = Vec::with_capacity(self.watched.len());
        for w in &self.watched {
            oldest.push((
                w.event,
                oldest_unhandled(js, w.stream, &w.durable, w.filter).await?,
            ));
        }
        let r = Reading { taken, oldest };
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r.clone());
        Ok(r)
    }
}

/// The stored time of the oldest event on `filter` in `stream` that the
/// durable `durable` has not acknowledged: the first above its ack floor
/// (read from the stream's leader). `None` when it has acknowledged all.
pub(crate) async fn oldest_unhandled(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
) -> Result<Option<time::OffsetDateTime>, Source> {
    let s = js.get_stream_no_info(stream).await.map_err(source)?;
    let info = s.consumer_info(durable).await.map_err(source)?;
    let floor = info.ack_floor.stream_sequence;
    match s.get_first_raw_message_by_subject(filter, floor + 1).await {
        Ok(m) => Ok(Some(m.time)),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(e) => Err(source(e)),
    }
}
