//! A flow as text: its causation tree (what `choreo trace` prints) and a
//! Mermaid sequence diagram.

use std::collections::BTreeMap;

use super::{Flow, Step, TracedEvent};

impl Flow {
    /// The flow as a causation tree, each event with its handlers' states.
    /// With `times`, each line says when.
    pub fn tree(&self, times: bool) -> String {
        let by_id: BTreeMap<&str, &TracedEvent> =
            self.events.iter().map(|e| (e.id.as_str(), e)).collect();
        let mut children: BTreeMap<&str, Vec<&TracedEvent>> = BTreeMap::new();
        let mut roots = Vec::new();
        for e in &self.events {
            match e.causation_id.as_deref().filter(|c| by_id.contains_key(c)) {
                Some(c) => children.entry(c).or_default().push(e),
                None => roots.push(e),
            }
        }
        let mut out = format!("flow {}\n", self.correlation_id);
        for r in roots {
            node(&mut out, r, &children, "", true, times);
        }
        out
    }

    /// The flow as a Mermaid sequence diagram: each event an arrow from
    /// its source to each handler that consumes it.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("sequenceDiagram\n");
        for e in &self.events {
            if e.handlers.is_empty() {
                out.push_str(&format!(
                    "    {}->>{}: {}\n",
                    e.source, e.source, e.event_type
                ));
            }
            for hs in &e.handlers {
                let service = hs.handler.split('.').next().unwrap_or_default();
                out.push_str(&format!(
                    "    {}->>{}: {} ({})\n",
                    e.source,
                    service,
                    e.event_type,
                    step_text(&hs.step, false)
                ));
            }
        }
        out
    }
}

/// A Unix ms time as RFC 3339.
fn at(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// One handler's state as a line says it; with `times`, when.
fn step_text(s: &Step, times: bool) -> String {
    match s {
        Step::Handled { at_ms } if times => format!("handled at {}", at(*at_ms)),
        Step::Running {
            attempt,
            max_deliver,
            at_ms,
        } if times => format!(
            "running (attempt {attempt} of {max_deliver}), claim refreshed at {}",
            at(*at_ms)
        ),
        Step::Running {
            attempt,
            max_deliver,
            ..
        } => format!("running (attempt {attempt} of {max_deliver})"),
        Step::Retrying {
            attempt,
            max_deliver,
            retry_at_ms,
            error,
        } => {
            let next = if times {
                format!(", next at {}", at(*retry_at_ms))
            } else {
                String::new()
            };
            format!("retrying (attempt {attempt} of {max_deliver} failed: {error}{next})")
        }
        Step::Handled { .. } => "handled".into(),
        Step::Acknowledged => "acknowledged".into(),
        Step::Duplicate => "skipped as a duplicate".into(),
        Step::NotDelivered => "not yet delivered".into(),
        Step::InFlight => "in flight or retrying".into(),
        Step::DeadLettered { reason } => format!("dead-lettered: {reason}"),
    }
}

fn node(
    out: &mut String,
    e: &TracedEvent,
    children: &BTreeMap<&str, Vec<&TracedEvent>>,
    prefix: &str,
    last: bool,
    times: bool,
) {
    let (branch, more) = if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    };
    let when = if times {
        format!(" {}", e.time)
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{prefix}{branch}{} [{}]{when} {}\n",
        e.event_type, e.source, e.subject
    ));
    let inner = format!("{prefix}{more}");
    let kids = children.get(e.id.as_str()).cloned().unwrap_or_default();
    for (i, hs) in e.handlers.iter().enumerate() {
        let last_line = kids.is_empty() && i + 1 == e.handlers.len();
        let mark = if last_line { "└· " } else { "├· " };
        out.push_str(&format!(
            "{inner}{mark}{}: {}\n",
            hs.handler,
            step_text(&hs.step, times)
        ));
    }
    for (i, k) in kids.iter().enumerate() {
        node(out, k, children, &inner, i + 1 == kids.len(), times);
    }
}
