//! A flow as text: its causation tree (what `choreo trace` prints) and a
//! Mermaid sequence diagram.

use std::collections::BTreeMap;

use super::{Flow, Step, TracedEvent};

impl Flow {
    /// Which events hang under which stored copy of their cause, and the
    /// roots: an event goes under the last copy of its cause stored before
    /// it (a replayed copy's emissions go under the copy, the original's
    /// under the original), so no subtree shows twice.
    #[allow(clippy::type_complexity)]
    fn children(&self) -> (Vec<&TracedEvent>, BTreeMap<(&str, u64), Vec<&TracedEvent>>) {
        let mut by_id: BTreeMap<&str, Vec<&TracedEvent>> = BTreeMap::new();
        for e in &self.events {
            by_id.entry(e.id.as_str()).or_default().push(e);
        }
        let mut children: BTreeMap<(&str, u64), Vec<&TracedEvent>> = BTreeMap::new();
        let mut roots = Vec::new();
        for e in &self.events {
            let parent = e
                .causation_id
                .as_deref()
                .and_then(|c| by_id.get(c))
                .and_then(|copies| {
                    copies
                        .iter()
                        .rev()
                        .find(|p| p.stored_ms <= e.stored_ms)
                        .or_else(|| copies.first())
                });
            match parent {
                Some(p) => children
                    .entry((p.stream.as_str(), p.sequence))
                    .or_default()
                    .push(e),
                None => roots.push(e),
            }
        }
        (roots, children)
    }

    /// The events in the order [`tree`](Self::tree) draws them, each with
    /// its depth in the causation tree (0 for a root): depth first, an
    /// event's effects in the order they were stored.
    pub fn in_tree_order(&self) -> Vec<(usize, &TracedEvent)> {
        fn walk<'a>(
            e: &'a TracedEvent,
            depth: usize,
            children: &BTreeMap<(&str, u64), Vec<&'a TracedEvent>>,
            out: &mut Vec<(usize, &'a TracedEvent)>,
        ) {
            out.push((depth, e));
            for k in children
                .get(&(e.stream.as_str(), e.sequence))
                .into_iter()
                .flatten()
            {
                walk(k, depth + 1, children, out);
            }
        }
        let (roots, children) = self.children();
        let mut out = Vec::with_capacity(self.events.len());
        for r in roots {
            walk(r, 0, &children, &mut out);
        }
        out
    }

    /// The flow as a causation tree, each event with its handlers' states.
    /// With `times`, each line says when.
    pub fn tree(&self, times: bool) -> String {
        let (roots, children) = self.children();
        let mut out = format!("flow {}\n", self.correlation_id);
        for r in roots {
            node(&mut out, r, &children, "", true, times);
        }
        out
    }

    /// The flow as a Mermaid sequence diagram, in the testkit's grammar
    /// (see [`sequence_diagram`]): an arrow from each event's source to the
    /// service of each handler that consumes it, labelled with its state.
    pub fn mermaid(&self) -> String {
        let arrows: Vec<Arrow<'_>> = self
            .events
            .iter()
            .map(|e| Arrow {
                source: &e.source,
                event_type: &e.event_type,
                to: e
                    .handlers
                    .iter()
                    .map(|hs| {
                        let service = hs.handler.split('.').next().unwrap_or_default();
                        (service, Some(step_text(&hs.step, false)))
                    })
                    .collect(),
            })
            .collect();
        sequence_diagram(&arrows)
    }
}

/// One event in a [`sequence_diagram`]: its source, its type, and who took
/// it, each with an optional label.
#[derive(Debug)]
pub struct Arrow<'a> {
    /// The emitting service.
    pub source: &'a str,
    /// The event's name.
    pub event_type: &'a str,
    /// The services that took it, each with a label (a handler's state).
    pub to: Vec<(&'a str, Option<String>)>,
}

/// A Mermaid sequence diagram of a flow, as both `choreo trace --mermaid`
/// and the testkit's `Flow::mermaid` draw it: the participants in order of
/// appearance (the sources first), then per event an arrow `source->>to:
/// Event (label)` to each service that took it, or `Note over source:
/// Event` when none did.
pub fn sequence_diagram(events: &[Arrow<'_>]) -> String {
    let mut participants: Vec<&str> = Vec::new();
    let sources = events.iter().map(|e| e.source);
    let targets = events.iter().flat_map(|e| e.to.iter().map(|t| t.0));
    for p in sources.chain(targets) {
        if !participants.contains(&p) {
            participants.push(p);
        }
    }
    let mut out = String::from("sequenceDiagram\n");
    for p in participants {
        out.push_str(&format!("    participant {p}\n"));
    }
    for e in events {
        if e.to.is_empty() {
            out.push_str(&format!("    Note over {}: {}\n", e.source, e.event_type));
        }
        for (to, label) in &e.to {
            let label = label
                .as_ref()
                .map_or_else(String::new, |l| format!(" ({l})"));
            out.push_str(&format!(
                "    {}->>{to}: {}{label}\n",
                e.source, e.event_type
            ));
        }
    }
    out
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

impl TracedEvent {
    /// On a copy a replay stored again, what it is a copy of: `replay of
    /// dead letter #7`, or `stored again by a replay of <what>`.
    pub fn copy_of(&self) -> Option<String> {
        let r = self.replay.as_deref()?;
        Some(match r.split_whitespace().collect::<Vec<_>>()[..] {
            ["dlq", letter, ..] => format!("replay of dead letter #{letter}"),
            _ => format!("stored again by a replay of {r}"),
        })
    }
}

impl Step {
    /// The state as `choreo trace` says it (`handled`, `retrying (attempt
    /// 2 of 5 failed: ...)`); with `times`, when (RFC 3339).
    pub fn describe(&self, times: bool) -> String {
        step_text(self, times)
    }
}

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
        Step::DeadLetteredThenReplayed { letter } => {
            format!("dead-lettered, then replayed (letter #{letter})")
        }
        Step::DeadlinePending { fires_at_ms } if times => {
            format!("deadline pending, fires at {}", at(*fires_at_ms))
        }
        Step::DeadlinePending { .. } => "deadline pending".into(),
        Step::DeadlineDue { due_ms } if times => format!(
            "deadline due at {}, deciding (waits for its watchers to handle what was stored in time)",
            at(*due_ms)
        ),
        Step::DeadlineDue { .. } => {
            "deadline due, deciding (waits for its watchers to handle what was stored in time)"
                .into()
        }
        Step::DeadlineMet { by } => format!("deadline met by {by}"),
        Step::DeadlineFired {
            at_ms,
            handled_at_ms: Some(h),
        } if times => format!("deadline fired at {}, handled at {}", at(*at_ms), at(*h)),
        Step::DeadlineFired {
            handled_at_ms: Some(_),
            ..
        } => "deadline fired, handled".into(),
        Step::DeadlineFired { at_ms, .. } if times => {
            format!("deadline fired at {}, running", at(*at_ms))
        }
        Step::DeadlineFired { .. } => "deadline fired, running".into(),
    }
}

fn node(
    out: &mut String,
    e: &TracedEvent,
    children: &BTreeMap<(&str, u64), Vec<&TracedEvent>>,
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
    let copy = e.copy_of().map_or_else(String::new, |c| format!(" ({c})"));
    out.push_str(&format!(
        "{prefix}{branch}{} [{}]{when} {}{copy}\n",
        e.event_type, e.source, e.subject
    ));
    let inner = format!("{prefix}{more}");
    let kids = children
        .get(&(e.stream.as_str(), e.sequence))
        .cloned()
        .unwrap_or_default();
    for (i, hs) in e.handlers.iter().enumerate() {
        let last_line = kids.is_empty() && i + 1 == e.handlers.len();
        let mark = if last_line { "└· " } else { "├· " };
        out.push_str(&format!(
            "{inner}{mark}{}: {}\n",
            hs.handler,
            hs.step.describe(times)
        ));
    }
    for (i, k) in kids.iter().enumerate() {
        node(out, k, children, &inner, i + 1 == kids.len(), times);
    }
}
