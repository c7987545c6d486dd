//! Text tables for people; `--json` is for scripts.

use choreo::admin::Status;

/// Columns padded to their widest cell, two spaces apart.
pub(crate) fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A duration in milliseconds as `850ms`, `12s` or `3m`.
/// A handler's name; a deadline handler's with its rule, and a part of one
/// (its schedule step, a B watcher) as a branch under it (rows sort by
/// durable, so parts follow their handler).
pub(crate) fn handler_cell(h: &choreo::admin::HandlerStatus) -> String {
    if let Some(parent) = &h.part_of {
        let part = h
            .handler
            .strip_prefix(parent.as_str())
            .and_then(|p| p.strip_prefix("__"))
            .unwrap_or(&h.handler);
        return match part.strip_prefix("met_") {
            Some(b) => format!("└ watches {b}"),
            None => format!("└ {part}"),
        };
    }
    match &h.rule {
        Some(d) => format!(
            "{} (within {}, unless {})",
            h.handler,
            age(d.within_ms),
            d.unless.join(" or ")
        ),
        None => h.handler.clone(),
    }
}

/// A reading's time, `at 2026-12-06T10:41:03Z` (RFC 3339, UTC, to the
/// second).
pub(crate) fn time_of(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    format!("at {}", t.unwrap_or_else(|| ms.to_string()))
}

pub(crate) fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..120_000 => format!("{}s", ms / 1000),
        _ => format!("{}m", ms / 60_000),
    }
}

/// The instances, then the handlers, then pending deadlines, then what
/// could not be read.
pub(crate) fn status(s: &Status) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "INSTANCE",
            "HOST",
            "VERSION",
            "UP",
            "HEARTBEAT",
            "STATE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for i in &s.instances {
        rows.push(vec![
            i.service.clone(),
            i.instance.clone(),
            i.host.clone(),
            i.choreo_version.clone(),
            age(s.taken_at_ms.saturating_sub(i.started_at_ms)),
            format!("{} ago", age(i.heartbeat_age_ms)),
            if i.live { "live" } else { "stale" }.to_owned(),
        ]);
    }
    let mut out = render(&rows);
    out.push('\n');
    let mut rows = vec![
        [
            "SERVICE",
            "HANDLER",
            "STATE",
            "PENDING",
            "UNACKED",
            "REDELIVERED",
            "LAG",
            "LAG(s)",
            "DEAD",
            "INBOX",
            "WHY",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for h in &s.handlers {
        rows.push(vec![
            h.service.clone(),
            handler_cell(h),
            h.state.to_string(),
            or_dash(h.pending),
            or_dash(h.unacked),
            or_dash(h.redelivered),
            or_dash(h.lag_messages),
            or_dash(h.lag_seconds.map(|s| format!("{s:.1}"))),
            h.dead_letters.to_string(),
            or_dash(h.inbox_keys),
            h.reason.clone(),
        ]);
    }
    out.push_str(&render(&rows));
    let deadlines: Vec<_> = s
        .handlers
        .iter()
        .filter_map(|h| h.deadlines.as_ref().map(|d| (h, d)))
        .collect();
    if !deadlines.is_empty() {
        let mut rows = vec![
            [
                "SERVICE",
                "DEADLINE",
                "PENDING",
                "NEXT FIRES",
                "FOR EVENT",
                "WATCHERS BEHIND",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for (h, d) in deadlines {
            let (at, event) = d.next.as_ref().map_or_else(
                || ("-".to_owned(), "-".to_owned()),
                |n| {
                    let at = if n.at_ms >= s.taken_at_ms {
                        format!("in {}", age(n.at_ms - s.taken_at_ms))
                    } else {
                        format!("{} overdue", age(s.taken_at_ms - n.at_ms))
                    };
                    (at, n.subject.clone().unwrap_or_else(|| n.event.to_string()))
                },
            );
            let behind = if d.watchers_waiting == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{} {}, {}",
                    d.watchers_waiting,
                    if d.watchers_waiting == 1 {
                        "event"
                    } else {
                        "events"
                    },
                    age(d.watchers_behind_ms)
                )
            };
            rows.push(vec![
                h.service.clone(),
                h.handler.clone(),
                d.pending.to_string(),
                at,
                event,
                behind,
            ]);
        }
        out.push('\n');
        out.push_str(&render(&rows));
    }
    if !s.outboxes.is_empty() {
        let mut rows = vec![
            [
                "SERVICE",
                "OUTBOX",
                "OLDEST",
                "FAILING",
                "RELAY",
                "REPORTED",
                "LAST ERROR",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for o in &s.outboxes {
            rows.push(vec![
                o.service.clone(),
                o.pending.to_string(),
                if o.pending == 0 {
                    "-".to_owned()
                } else {
                    age(o.oldest_age_ms)
                },
                o.failing.to_string(),
                format!(
                    "after {}, every {}",
                    age(o.relay_delay_ms),
                    age(o.relay_every_ms)
                ),
                format!(
                    "{} ago",
                    age(s.taken_at_ms.saturating_sub(o.reported_at_ms))
                ),
                o.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        out.push('\n');
        out.push_str(&render(&rows));
    }
    for p in &s.problems {
        out.push_str(&format!("warning: {p}\n"));
    }
    out
}
