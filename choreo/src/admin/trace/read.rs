//! Reading stored events' headers for a trace: one ordered consumer per
//! stream, headers only, from a start time to an end time.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use super::Seen;

/// Headers of `stream`'s events on `filter` stored between `start` and `end`.
pub(in crate::admin) async fn read(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start: time::OffsetDateTime,
    end: time::OffsetDateTime,
    out: &mut Vec<Seen>,
) {
    read_where(js, stream, filter, (start, end), |_| true, out).await;
}

/// [`read`], keeping only the events whose headers `keep` accepts (the
/// others are dropped as they arrive, never copied).
pub(in crate::admin) async fn read_where(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    (start, end): (time::OffsetDateTime, time::OffsetDateTime),
    keep: impl Fn(&async_nats::HeaderMap) -> bool,
    out: &mut Vec<Seen>,
) {
    let Ok(s) = js.get_stream(stream).await else {
        return;
    };
    // Nothing stored in the window: no need to wait for it.
    let state = &s.cached_info().state;
    if state.messages == 0 || state.last_timestamp < start {
        return;
    }
    let Ok(c) = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            headers_only: true,
            ..Default::default()
        })
        .await
    else {
        return;
    };
    let Ok(mut msgs) = c.messages().await else {
        return;
    };
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        let Ok(info) = m.info() else { break };
        if info.published > end {
            break;
        }
        let (sequence, pending, published) = (info.stream_sequence, info.pending, info.published);
        let message = m.split().0;
        if let Some(headers) = message.headers.filter(|hd| keep(hd)) {
            out.push(Seen {
                headers,
                subject: message.subject.to_string(),
                stream: stream.to_owned(),
                sequence,
                published,
            });
        }
        if pending == 0 {
            break;
        }
    }
}
