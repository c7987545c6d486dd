//! Checking a whole choreography from its manifests, with no server: who
//! emits what to whom ([`Graph`]), and what would go wrong ([`lint`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::registry::{Manifest, PublishedEvent};

/// How bad a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Severity {
    /// Worth a look; a deploy may go on.
    Warning,
    /// Events would be dead-lettered or loop: a deploy should stop.
    Error,
}

/// What a [`Finding`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FindingKind {
    /// An event is emitted or published, and no handler consumes it.
    Unhandled,
    /// A handler consumes an event that nothing declares it emits or publishes.
    NoProducer,
    /// A producer writes a version a consumer does not accept: its events
    /// would be dead-lettered as `unknown-version`.
    VersionNotAccepted,
    /// Events cause each other in a loop.
    Cycle,
    /// A service's outbox relay could publish a row after the duplicate
    /// window of a stream it writes to (`lint_outboxes`).
    RelayOutsideDuplicateWindow,
    /// Rows of a service's outbox fail to publish (`lint_outboxes`).
    OutboxFailing,
}

/// One problem [`lint`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// What it is about.
    pub kind: FindingKind,
    /// What is wrong, naming the events, services and handlers.
    pub message: String,
}

/// Who produces an event: a handler (`service.handler`) or a publisher.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Producer {
    name: String,
    service: String,
    version: u32,
}

/// The edges of a choreography: for each event, who produces it and which
/// handlers consume it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    /// Per event name: the producers (`service.handler`, or a publisher's
    /// source) with the version each writes.
    pub producers: BTreeMap<String, BTreeMap<String, u32>>,
    /// Per event name: the consuming handlers (`service.handler`) with the
    /// versions each accepts.
    pub consumers: BTreeMap<String, BTreeMap<String, Vec<u32>>>,
    /// Handlers whose emissions are undeclared (`service.handler`).
    pub undeclared: BTreeSet<String>,
}

impl Graph {
    /// The graph of these services and publishers.
    pub fn new(manifests: &[Manifest], publishers: &[PublishedEvent]) -> Self {
        let mut g = Self::default();
        for m in manifests {
            for h in &m.handlers {
                // A deadline's helpers (its schedule step, its B watchers)
                // are drawn as their deadline handler: it reads A and
                // watches each B.
                if let Some(parent) = &h.part_of {
                    g.consumers
                        .entry(h.consumes.event.clone())
                        .or_default()
                        .entry(format!("{}.{parent}", m.service))
                        .or_insert_with(|| h.consumes.accepts_versions.clone());
                    continue;
                }
                let id = format!("{}.{}", m.service, h.name);
                g.consumers
                    .entry(h.consumes.event.clone())
                    .or_default()
                    .insert(id.clone(), h.consumes.accepts_versions.clone());
                match &h.emits {
                    Some(emits) => {
                        for e in emits {
                            g.producers
                                .entry(e.event.clone())
                                .or_default()
                                .insert(id.clone(), e.version);
                        }
                    }
                    None => {
                        g.undeclared.insert(id);
                    }
                }
            }
        }
        for p in publishers {
            g.producers
                .entry(p.event.event.clone())
                .or_default()
                .insert(p.source.clone(), p.event.version);
        }
        g
    }

    fn producers_of(&self, event: &str) -> Vec<Producer> {
        self.producers
            .get(event)
            .into_iter()
            .flatten()
            .map(|(name, version)| Producer {
                service: name.split('.').next().unwrap_or(name).to_owned(),
                name: name.clone(),
                version: *version,
            })
            .collect()
    }

    /// A Mermaid flowchart: an arrow per event from each producer to each
    /// consuming handler.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for (event, consumers) in &self.consumers {
            for p in self.producers_of(event) {
                for c in consumers.keys() {
                    out.push_str(&format!("    {:?} -->|{event}| {:?}\n", p.name, c));
                }
            }
        }
        out.replace('"', "")
    }

    /// A Graphviz digraph, with the same edges as [`mermaid`](Self::mermaid).
    pub fn dot(&self) -> String {
        let mut out = String::from("digraph choreography {\n    rankdir=LR;\n");
        for (event, consumers) in &self.consumers {
            for p in self.producers_of(event) {
                for c in consumers.keys() {
                    out.push_str(&format!(
                        "    {:?} -> {:?} [label={:?}];\n",
                        p.name, c, event
                    ));
                }
            }
        }
        out.push_str("}\n");
        out
    }
}

/// Checks a choreography: events nobody handles, handlers nobody feeds,
/// versions a consumer would dead-letter, and loops. Sorted errors first.
pub fn lint(manifests: &[Manifest], publishers: &[PublishedEvent]) -> Vec<Finding> {
    let g = Graph::new(manifests, publishers);
    let mut out = Vec::new();
    for (event, producers) in &g.producers {
        if !g.consumers.contains_key(event) {
            let names: Vec<&str> = producers.keys().map(String::as_str).collect();
            out.push(Finding {
                severity: Severity::Warning,
                kind: FindingKind::Unhandled,
                message: format!(
                    "{event} is produced by {} but no handler consumes it",
                    names.join(", ")
                ),
            });
        }
    }
    for (event, consumers) in &g.consumers {
        let producers = g.producers_of(event);
        if producers.is_empty() {
            let undeclared = if g.undeclared.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} may, but their emissions are undeclared: {})",
                    g.undeclared.len(),
                    g.undeclared.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            for c in consumers.keys() {
                out.push(Finding {
                    severity: Severity::Warning,
                    kind: FindingKind::NoProducer,
                    message: format!(
                        "{c} consumes {event}, which nothing declares it emits or publishes{undeclared}"
                    ),
                });
            }
        }
        for p in &producers {
            for (c, accepts) in consumers {
                if !accepts.contains(&p.version) {
                    out.push(Finding {
                        severity: Severity::Error,
                        kind: FindingKind::VersionNotAccepted,
                        message: format!(
                            "{} produces {event} version {}, but {c} accepts versions {accepts:?}: \
                             those events would be dead-lettered as unknown-version",
                            p.name, p.version
                        ),
                    });
                }
            }
        }
    }
    for cycle in cycles(&g) {
        out.push(Finding {
            severity: Severity::Error,
            kind: FindingKind::Cycle,
            message: format!("events cause each other in a loop: {}", cycle.join(" → ")),
        });
    }
    out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.message.cmp(&b.message)));
    out
}

/// Loops of events: an event consumed by a handler that emits an event
/// that leads back to it. Each loop once, starting at its smallest event.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    // event → the events its consumers emit.
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (event, consumers) in &g.consumers {
        for c in consumers.keys() {
            for (emitted, producers) in &g.producers {
                if producers.contains_key(c) {
                    next.entry(event.as_str())
                        .or_default()
                        .insert(emitted.as_str());
                }
            }
        }
    }
    let mut found = BTreeSet::new();
    fn walk<'a>(
        at: &'a str,
        path: &mut Vec<&'a str>,
        next: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        if let Some(i) = path.iter().position(|e| *e == at) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| (*s).to_owned()).collect();
            // Start at the smallest event so each loop is found once.
            let min = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| *e)
                .map_or(0, |(i, _)| i);
            cycle.rotate_left(min);
            cycle.push(cycle[0].clone());
            found.insert(cycle);
            return;
        }
        path.push(at);
        for n in next.get(at).into_iter().flatten() {
            walk(n, path, next, found);
        }
        path.pop();
    }
    for start in next.keys() {
        walk(start, &mut Vec::new(), &next, &mut found);
    }
    found.into_iter().collect()
}
