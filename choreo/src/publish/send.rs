//! Sending encoded events: the hand-off to the connection, the PubAck, the
//! retries with the same id, and [`Publisher::publish_all`], which sends a
//! batch in order and awaits its acks apart.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind as NatsPublishErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use super::{Outgoing, PublishError, Publisher, Receipt, Sent};
use crate::event::Event;
use crate::wire::headers::Metadata;

/// How many of [`Publisher::publish_all`]'s events wait for their PubAck
/// at once: as many as the benchmark's hand-written loop keeps in flight.
pub const PUBLISH_ALL_IN_FLIGHT: usize = 256;

impl Publisher {
    /// Publishes `events` as roots of new flows, in their order: each is
    /// handed to the connection as soon as the one before it is, and up to
    /// [`PUBLISH_ALL_IN_FLIGHT`] PubAcks are awaited at once. Returns one
    /// [`Receipt`] per event, in the same order.
    ///
    /// This is the fast way to publish many events from one task (an
    /// import, a backfill, a test's load): on a busy machine it is several
    /// percent faster than as many [`publish`](Self::publish) futures
    /// polled together (`docs/benchmarks.md`), and over one connection the
    /// events are stored in the order given, unless a transient failure
    /// makes one of them be sent again (then it is stored after the ones
    /// already sent).
    ///
    /// # Errors
    /// The first [`PublishError`], after the events already handed to the
    /// connection have been answered: those before it (and some after) may
    /// be stored. Every event keeps its id, so calling again with the same
    /// events stores only the missing ones; the others come back as
    /// duplicates.
    ///
    /// ```no_run
    /// # use choreo::{event, Publisher};
    /// # #[event(subject = "orders.{order_id}.placed", key = order_id)]
    /// # pub struct OrderPlaced { pub order_id: String }
    /// # async fn t(publisher: Publisher) -> Result<(), choreo::PublishError> {
    /// let orders: Vec<OrderPlaced> = (0..10_000)
    ///     .map(|i| OrderPlaced { order_id: format!("o-{i}") })
    ///     .collect();
    /// let receipts = publisher.publish_all(&orders).await?;
    /// assert_eq!(receipts.len(), orders.len());
    /// # Ok(()) }
    /// ```
    pub async fn publish_all<'e, E: Event + 'e>(
        &self,
        events: impl IntoIterator<Item = &'e E>,
    ) -> Result<Vec<Receipt>, PublishError> {
        use futures::future::{Either, ready};
        self.record::<E>();
        self.ensure(E::STREAM, E::STREAM_SUBJECTS, E::SUBJECT_FILTER)
            .await?;
        let events = events.into_iter();
        let mut receipts = Vec::with_capacity(events.size_hint().0);
        // Only the PubAck futures are queued, as small as a hand-written
        // loop's; what an answer needs waits beside them in the same order.
        let mut acks = FuturesOrdered::new();
        let mut waiting = VecDeque::with_capacity(PUBLISH_ALL_IN_FLIGHT);
        // Duplicates' checks, which read the stream, run side by side.
        let mut checks = futures::stream::FuturesUnordered::new();
        let mut failed = None;
        let mut events = events.peekable();
        while events.peek().is_some() || !acks.is_empty() {
            let next = if acks.len() < PUBLISH_ALL_IN_FLIGHT && failed.is_none() {
                events.next()
            } else {
                None
            };
            if let Some(event) = next {
                let key = event.key();
                let out = Metadata::root_with_key::<E>(key.as_ref(), &self.inner.source)
                    .map_err(PublishError::from)
                    .and_then(|meta| Outgoing::new(event, meta))
                    .and_then(|out| self.check_size(&out).map(|()| out));
                match out {
                    Ok(mut out) => {
                        let started = Instant::now();
                        let (subject, sent) = self.send_first(&mut out).await;
                        acks.push_back(match sent {
                            Ok(ack) => Either::Left(ack.into_future()),
                            Err(e) => Either::Right(ready(Err(e))),
                        });
                        waiting.push_back((out, subject, started, key));
                    }
                    // What was handed off is still answered, nothing more
                    // is sent.
                    Err(e) => failed = Some(e),
                }
                continue;
            }
            let (Some(first), Some((out, subject, started, key))) =
                (acks.next().await, waiting.pop_front())
            else {
                break;
            };
            let sent = Sent {
                event: out.event,
                payload: out.payload.clone(),
                version: out.meta.version(),
                key,
            };
            match self.finish(first, out, subject, started).await {
                Ok(r) => {
                    if r.duplicate {
                        let r = r.clone();
                        checks.push(async move { self.check_duplicate(&r, &sent).await });
                    }
                    receipts.push(r);
                    if checks.len() >= PUBLISH_ALL_IN_FLIGHT
                        && let Some(Err(e)) = checks.next().await
                    {
                        failed.get_or_insert(e);
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        while let Some(checked) = checks.next().await {
            if let Err(e) = checked {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(receipts),
        }
    }

    /// Sends every message, pipelined in their order, and awaits every
    /// PubAck; transient failures are retried with the same ids until
    /// `retry_for` runs out.
    pub(crate) async fn send_all(
        &self,
        mut outs: Vec<Outgoing>,
    ) -> Result<Vec<Receipt>, PublishError> {
        for out in &outs {
            self.check_size(out)?;
            self.ensure(out.stream.name, out.stream.subjects, out.stream.filter)
                .await?;
        }
        // One event (the common emission) needs no queue.
        if outs.len() == 1
            && let Some(out) = outs.pop()
        {
            return Ok(vec![self.send_one(out).await?]);
        }
        let mut acks = Vec::with_capacity(outs.len());
        for out in outs {
            acks.push(self.hand_off(out).await);
        }
        futures::future::try_join_all(acks).await
    }

    /// Sends one encoded event and awaits its PubAck (see
    /// [`hand_off`](Self::hand_off)).
    pub(super) async fn send_one(&self, out: Outgoing) -> Result<Receipt, PublishError> {
        self.hand_off(out).await.await
    }

    /// Hands one encoded event to the connection (the first attempt's
    /// send, which waits only for room in the client's queue), and returns
    /// what then awaits its PubAck: on a transient failure it sends again
    /// with the same id until `retry_for` runs out, and it counts the
    /// publish in the stream's metrics.
    pub(super) async fn hand_off(
        &self,
        mut out: Outgoing,
    ) -> impl Future<Output = Result<Receipt, PublishError>> + Send + '_ {
        let started = Instant::now();
        let (subject, sent) = self.send_first(&mut out).await;
        async move {
            let first = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            self.finish(first, out, subject, started).await
        }
    }

    /// The first attempt's send of `out` (its subject and headers taken):
    /// the subject, for a retry, and the PubAck to come.
    async fn send_first(
        &self,
        out: &mut Outgoing,
    ) -> (
        async_nats::Subject,
        Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
    ) {
        let subject = async_nats::Subject::from(std::mem::take(&mut out.subject));
        let headers = std::mem::take(&mut out.headers);
        // Boxed: async-nats' publish future is close to a kilobyte.
        let sent = Box::pin(self.inner.js.publish_with_headers(
            subject.clone(),
            headers,
            out.payload.clone(),
        ))
        .await;
        (subject, sent)
    }

    /// After the first attempt's answer: on a transient failure, sends
    /// again with the same id until `retry_for` runs out; counts the
    /// publish in the stream's metrics; the receipt.
    async fn finish(
        &self,
        first: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        mut out: Outgoing,
        subject: async_nats::Subject,
        started: Instant,
    ) -> Result<Receipt, PublishError> {
        let stream = out.stream.name;
        let ack = match first {
            Ok(ack) => ack,
            // The slow path, boxed so it does not enlarge every publish.
            Err(e) => {
                // The one header not rebuilt from the metadata on a retry.
                let replay = out.replay.take();
                let sent = (&*out.meta, replay.as_deref(), &out.payload);
                match Box::pin(self.retry(e, out.event, &subject, sent)).await {
                    Ok(ack) => ack,
                    Err(e) => {
                        self.with_metrics(stream, |m| m.failures.increment(1));
                        return Err(e);
                    }
                }
            }
        };
        self.with_metrics(stream, |m| {
            m.duration.record(started.elapsed());
            m.sent.increment(1);
        });
        Ok(Receipt {
            event_id: out.id,
            correlation_id: out.correlation_id,
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// One publish, its PubAck awaited.
    async fn attempt(
        &self,
        subject: async_nats::Subject,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        // Boxed: async-nats' publish future is close to a kilobyte.
        Box::pin(
            self.inner
                .js
                .publish_with_headers(subject, headers, payload),
        )
        .await?
        .await
    }

    /// After a failed first attempt: transient failures are retried with the
    /// same id (and headers rebuilt from the same metadata) until `retry_for`
    /// runs out.
    async fn retry(
        &self,
        first: jetstream::context::PublishError,
        event: &'static str,
        subject: &async_nats::Subject,
        (meta, replay, payload): (&Metadata, Option<&str>, &Bytes),
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        let headers = || {
            let mut h = meta.to_headers();
            if let Some(r) = replay {
                h.insert(crate::wire::headers::CHOREO_REPLAY, r);
            }
            h
        };
        let deadline = tokio::time::Instant::now() + self.inner.retry_for;
        let mut delay = Duration::from_millis(50);
        let mut error = first;
        loop {
            if error.kind() == NatsPublishErrorKind::MaxPayloadExceeded {
                // The server's limit changed (a reconnect to another server).
                let max = self.inner.client.server_info().max_payload;
                self.inner.max_payload.store(max, Ordering::Relaxed);
                let size = payload.len() + meta.to_headers().iter().count() * 48;
                return Err(PublishError::TooLarge { event, size, max });
            }
            let transient = matches!(
                error.kind(),
                NatsPublishErrorKind::TimedOut
                    | NatsPublishErrorKind::StreamNotFound
                    | NatsPublishErrorKind::BrokenPipe
                    | NatsPublishErrorKind::MaxAckPending
            );
            if !transient || tokio::time::Instant::now() + delay > deadline {
                return Err(PublishError::from_nats(
                    &self.inner.client,
                    event,
                    subject.as_str(),
                    error,
                ));
            }
            tracing::debug!(event, id = %meta.id(), error = %error, "publish failed, retrying with the same id");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            match self
                .attempt(subject.clone(), headers(), payload.clone())
                .await
            {
                Ok(ack) => return Ok(ack),
                Err(e) => error = e,
            }
        }
    }
}
