//! What each view shows, as HTML, from what `choreo::admin` read: pure
//! functions, so the page and its live updates render the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use choreo::admin::{Flow, Graph, HandlerStatus, State, Status, StoredEvent};
use choreo::aggregate::inspect::StateAnswer;
use choreo::dlq::{DeadLetter, SummaryLine};
use choreo::registry::AggregateManifest;

use super::Reading;
use super::html::{esc, json, rows_html, state, table_around, time_ms, url};
use crate::table::{age, handler_cell, or_dash};

/// How the handler table is sorted and filtered (the page's query).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct SystemQuery {
    /// The column: service, handler, state, pending, lag, lag_s, dead,
    /// inbox.
    pub(crate) sort: Option<String>,
    /// Descending.
    #[serde(default)]
    pub(crate) desc: Option<u8>,
    /// Only rows whose service, handler, state or reason contain this.
    pub(crate) q: Option<String>,
}

impl SystemQuery {
    fn column(&self) -> &str {
        self.sort.as_deref().unwrap_or("state")
    }

    /// Problems first unless told otherwise.
    fn descending(&self) -> bool {
        self.desc.map_or(self.sort.is_none(), |d| d == 1)
    }

    /// The query string of this view (for the live stream's URL).
    pub(crate) fn query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.sort {
            parts.push(format!("sort={}", url(s)));
        }
        if let Some(d) = self.desc {
            parts.push(format!("desc={d}"));
        }
        if let Some(q) = &self.q {
            parts.push(format!("q={}", url(q)));
        }
        parts.join("&")
    }
}

const COLUMNS: [(&str, &str); 13] = [
    ("service", "Service"),
    ("handler", "Handler"),
    ("state", "State"),
    ("", "Why"),
    ("pending", "Pending"),
    ("", "Unacked"),
    ("", "Redelivered"),
    ("lag", "Lag (events)"),
    ("lag_s", "Lag (s)"),
    ("dead", "Dead letters"),
    ("inbox", "Inbox records"),
    ("", "Instances"),
    ("", "Actions"),
];

fn sort_key(h: &HandlerStatus, column: &str) -> (u64, String) {
    let name = format!("{}.{}", h.service, h.durable);
    let n = match column {
        "state" => h.state as u64,
        "pending" => h.pending.unwrap_or(0),
        "lag" => h.lag_messages.unwrap_or(0),
        "lag_s" => h.lag_seconds.map_or(0, |s| (s * 1000.0) as u64),
        "dead" => h.dead_letters,
        "inbox" => h.inbox_keys.unwrap_or(0),
        "handler" => return (0, format!("{}.{}", h.handler, h.service)),
        _ => 0,
    };
    (n, name)
}

/// The handler table's header: each sortable column a link that sorts by
/// it (again: the other way).
pub(crate) fn handler_head(q: &SystemQuery) -> String {
    let mut out = String::from("<tr>");
    for (key, name) in COLUMNS {
        if key.is_empty() {
            let _ = write!(out, "<th scope=\"col\">{name}</th>");
            continue;
        }
        let current = q.column() == key;
        let desc = current && q.descending();
        let aria = match (current, desc) {
            (true, true) => " aria-sort=\"descending\"",
            (true, false) => " aria-sort=\"ascending\"",
            _ => "",
        };
        let mark = match (current, desc) {
            (true, true) => " ▼",
            (true, false) => " ▲",
            _ => "",
        };
        let filter =
            q.q.as_deref()
                .map_or_else(String::new, |f| format!("&q={}", url(f)));
        let _ = write!(
            out,
            "<th scope=\"col\"{aria}><a href=\"/?sort={key}&desc={}{filter}\">{name}{mark}</a></th>",
            u8::from(!desc && current || !current && key == "state")
        );
    }
    out.push_str("</tr>");
    out
}

/// The handler rows, sorted and filtered as `q` says.
pub(crate) fn handler_rows(s: &Status, q: &SystemQuery, actions: bool) -> String {
    let needle = q.q.as_deref().unwrap_or("").to_lowercase();
    let mut rows: Vec<&HandlerStatus> = s
        .handlers
        .iter()
        .filter(|h| {
            needle.is_empty()
                || [
                    h.service.as_str(),
                    h.handler.as_str(),
                    h.state.as_str(),
                    h.reason.as_str(),
                ]
                .iter()
                .any(|f| f.to_lowercase().contains(&needle))
        })
        .collect();
    let column = q.column();
    // By the column (descending when asked), names ascending within it.
    let descending = q.descending();
    rows.sort_by(|a, b| {
        let (x, y) = (sort_key(a, column), sort_key(b, column));
        let by = if descending {
            y.0.cmp(&x.0)
        } else {
            x.0.cmp(&y.0)
        };
        by.then(x.1.cmp(&y.1))
    });
    let mut out = String::new();
    for h in rows {
        let dead = if h.dead_letters > 0 {
            format!(
                "<a href=\"/dlq/letters?service={}&handler={}\">{}</a>",
                url(&h.service),
                url(&h.handler),
                h.dead_letters
            )
        } else {
            "0".into()
        };
        let action = if actions && h.part_of.is_none() {
            format!(
                "<a href=\"/replay/{}/{}\">Replay…</a>",
                url(&h.service),
                url(&h.handler)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr data-state=\"{st}\"><td>{svc}</td><td>{name}</td><td>{word}</td><td>{why}</td>\
             <td class=\"n\">{pending}</td><td class=\"n\">{unacked}</td><td class=\"n\">{redelivered}</td>\
             <td class=\"n\">{lag}</td><td class=\"n\">{lag_s}</td><td class=\"n\">{dead}</td>\
             <td class=\"n\">{inbox}</td><td class=\"n\">{live}</td><td>{action}</td></tr>",
            st = h.state.as_str(),
            svc = esc(&h.service),
            name = esc(&handler_cell(h)),
            word = state(h.state.as_str()),
            why = esc(&h.reason),
            pending = or_dash(h.pending),
            unacked = or_dash(h.unacked),
            redelivered = or_dash(h.redelivered),
            lag = or_dash(h.lag_messages),
            lag_s = or_dash(h.lag_seconds.map(|s| format!("{s:.1}"))),
            inbox = or_dash(h.inbox_keys),
            live = h.live_instances,
        );
    }
    out
}

/// The parts of the system view that live updates replace, by element id.
pub(crate) fn system_parts(
    r: &Reading,
    q: &SystemQuery,
    actions: bool,
) -> Vec<(&'static str, String)> {
    let Some(s) = &r.status else {
        let why = r.error.as_deref().map_or_else(
            || "Reading the system… (the first reading is judged against the next)".to_owned(),
            |e| {
                format!(
                    "<strong class=\"warn\">{}</strong> The console keeps reading.",
                    esc(e)
                )
            },
        );
        return vec![("taken", why)];
    };
    let mut taken = format!(
        "Read {}, states judged over {}.",
        time_ms(s.taken_at_ms),
        age(s.window_ms)
    );
    if let Some(e) = &r.error {
        let _ = write!(
            taken,
            " <strong class=\"warn\">The last reading failed ({}); this is the one before.</strong>",
            esc(e)
        );
    }
    let counts: BTreeMap<State, usize> = s.handlers.iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(h.state).or_default() += 1;
        m
    });
    let summary = counts
        .iter()
        .map(|(st, n)| format!("{n} {}", state(st.as_str())))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(taken, " {} handlers: {summary}.", s.handlers.len());
    let instances: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|i| {
            vec![
                esc(&i.service),
                esc(&i.instance),
                esc(&i.host),
                esc(&i.choreo_version),
                age(s.taken_at_ms.saturating_sub(i.started_at_ms)),
                format!("{} ago", age(i.heartbeat_age_ms)),
                if i.live { "live" } else { "stale" }.to_owned(),
            ]
        })
        .collect();
    let deadlines: Vec<Vec<String>> = s
        .handlers
        .iter()
        .filter_map(|h| h.deadlines.as_ref().map(|d| (h, d)))
        .map(|(h, d)| {
            let next = d.next.as_ref().map_or_else(
                || "-".to_owned(),
                |n| {
                    if n.at_ms >= s.taken_at_ms {
                        format!("in {}", age(n.at_ms - s.taken_at_ms))
                    } else {
                        format!("{} overdue", age(s.taken_at_ms - n.at_ms))
                    }
                },
            );
            vec![
                esc(&h.service),
                esc(&h.handler),
                d.pending.to_string(),
                next,
                d.watchers_waiting.to_string(),
            ]
        })
        .collect();
    let outboxes: Vec<Vec<String>> = s
        .outboxes
        .iter()
        .map(|o| {
            vec![
                esc(&o.service),
                o.pending.to_string(),
                if o.pending == 0 {
                    "-".into()
                } else {
                    age(o.oldest_age_ms)
                },
                o.failing.to_string(),
                esc(o.last_error.as_deref().unwrap_or("-")),
            ]
        })
        .collect();
    let problems = s
        .problems
        .iter()
        .map(|p| format!("<li>{}</li>", esc(p)))
        .collect::<String>();
    vec![
        ("taken", taken),
        ("instances", rows_html(&instances)),
        ("handlers", handler_rows(s, q, actions)),
        ("deadlines", rows_html(&deadlines)),
        ("outboxes", rows_html(&outboxes)),
        ("problems", problems),
    ]
}

/// The system view's body around its parts.
pub(crate) fn system(r: &Reading, q: &SystemQuery, actions: bool) -> String {
    let parts: BTreeMap<&str, String> = system_parts(r, q, actions).into_iter().collect();
    let part = |id: &str| parts.get(id).cloned().unwrap_or_default();
    let filter = esc(q.q.as_deref().unwrap_or(""));
    let keep = [
        ("sort", q.sort.clone()),
        ("desc", q.desc.map(|d| d.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| {
        v.map(|v| format!("<input type=\"hidden\" name=\"{k}\" value=\"{}\">", esc(&v)))
    })
    .collect::<String>();
    format!(
        "<h1>System</h1><p id=\"taken\" role=\"status\">{taken}</p>\
         <form class=\"filter\" method=\"get\" action=\"/\">{keep}<label for=\"filter\">Filter handlers</label> \
         <input id=\"filter\" name=\"q\" value=\"{filter}\" data-filters=\"handlers\" \
         placeholder=\"service, handler, state or reason\"> <button>Filter</button></form>\
         <table class=\"handlers\"><caption>Handlers</caption><thead>{head}</thead>\
         <tbody id=\"handlers\">{handlers}</tbody></table>\
         {instances}{deadlines}{outboxes}\
         <h2>Warnings</h2><ul id=\"problems\">{problems}</ul>",
        taken = part("taken"),
        head = handler_head(q),
        handlers = part("handlers"),
        instances = table_around(
            "Instances",
            &[
                "Service",
                "Instance",
                "Host",
                "choreo",
                "Up",
                "Heartbeat",
                "State"
            ],
            Some("instances"),
            &part("instances")
        ),
        deadlines = table_around(
            "Deadlines",
            &[
                "Service",
                "Deadline",
                "Pending",
                "Next fires",
                "Watchers behind (events)"
            ],
            Some("deadlines"),
            &part("deadlines")
        ),
        outboxes = table_around(
            "Outboxes",
            &["Service", "Pending rows", "Oldest", "Failing", "Last error"],
            Some("outboxes"),
            &part("outboxes")
        ),
        problems = part("problems"),
    )
}

/// A node of the graph: a handler (`service.handler`) or a publisher.
struct Node {
    name: String,
    column: usize,
    row: usize,
}

/// The graph as an SVG (producers left, their consumers to the right,
/// each edge labelled with its event and drawn in the state of the
/// handler it feeds), then the same edges as a table.
pub(crate) fn graph(g: &Graph, s: Option<&Status>) -> String {
    let state_of = |name: &str| -> Option<State> {
        s?.handlers
            .iter()
            .find(|h| format!("{}.{}", h.service, h.handler) == name)
            .map(|h| h.state)
    };
    // Edges: (producer, events, consumer), one per pair of nodes; an event
    // nobody handles goes to "(no handler)".
    let mut pairs: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (event, consumers) in &g.consumers {
        let producers: Vec<&String> = g
            .producers
            .get(event)
            .into_iter()
            .flatten()
            .map(|(p, _)| p)
            .collect();
        for c in consumers.keys() {
            if producers.is_empty() {
                pairs
                    .entry(("(no producer)".into(), c.clone()))
                    .or_default()
                    .push(event.clone());
            }
            for p in &producers {
                pairs
                    .entry(((*p).clone(), c.clone()))
                    .or_default()
                    .push(event.clone());
            }
        }
    }
    for (event, producers) in &g.producers {
        if g.consumers.get(event).is_none_or(BTreeMap::is_empty) {
            for p in producers.keys() {
                pairs
                    .entry((p.clone(), "(no handler)".into()))
                    .or_default()
                    .push(event.clone());
            }
        }
    }
    let edges: Vec<(String, String, String)> = pairs
        .into_iter()
        .map(|((p, c), events)| (p, events.join(", "), c))
        .collect();
    let names: BTreeSet<String> = edges
        .iter()
        .flat_map(|(p, _, c)| [p.clone(), c.clone()])
        .chain(g.producers.values().flat_map(|m| m.keys().cloned()))
        .collect();
    // Column: the longest path from a node nothing feeds (bounded, so a
    // loop does not run away).
    let mut column: BTreeMap<&str, usize> = names.iter().map(|n| (n.as_str(), 0)).collect();
    for _ in 0..names.len() {
        let mut changed = false;
        for (p, _, c) in &edges {
            let next = column[p.as_str()] + 1;
            if next > column[c.as_str()] && next < names.len() {
                column.insert(c.as_str(), next);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut rows_in: BTreeMap<usize, usize> = BTreeMap::new();
    let nodes: BTreeMap<&str, Node> = names
        .iter()
        .map(|n| {
            let col = column[n.as_str()];
            let row = rows_in.entry(col).or_default();
            let node = Node {
                name: n.clone(),
                column: col,
                row: *row,
            };
            *row += 1;
            (n.as_str(), node)
        })
        .collect();
    const W: usize = 200;
    const GAP: usize = 96;
    const H: usize = 44;
    let width = (rows_in.len().max(1)) * (W + GAP) + 20;
    let height = rows_in.values().max().copied().unwrap_or(1) * (H + 16) + 40;
    let mut svg = format!(
        "<svg class=\"graph\" role=\"img\" aria-labelledby=\"graph-title\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" style=\"max-width:100%;height:auto\"><title id=\"graph-title\">Who emits what to whom</title>\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" \
         orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\"/></marker></defs>"
    );
    let at = |n: &Node| (10 + n.column * (W + GAP), 20 + n.row * (H + 16));
    for (p, event, c) in &edges {
        let (a, b) = (&nodes[p.as_str()], &nodes[c.as_str()]);
        let ((x1, y1), (x2, y2)) = (at(a), at(b));
        let (x1, y1, x2, y2) = (x1 + W, y1 + H / 2, x2, y2 + H / 2);
        let st = state_of(c)
            .map_or("unknown", |s| s.as_str())
            .to_ascii_lowercase();
        let mid = (x1 + x2) / 2;
        let _ = write!(
            svg,
            "<g class=\"edge st-{st}\"><path d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\" marker-end=\"url(#arrow)\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{e}</text></g>",
            tx = mid,
            ty = (y1 + y2) / 2 - 4,
            e = esc(event)
        );
    }
    for n in nodes.values() {
        let (x, y) = at(n);
        let st = state_of(&n.name);
        let word = st.map_or_else(String::new, |s| format!(" · {}", s.as_str()));
        let class = st.map_or("producer".to_owned(), |s| {
            format!("st-{}", s.as_str().to_ascii_lowercase())
        });
        let _ = write!(
            svg,
            "<g class=\"node {class}\"><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{H}\" rx=\"6\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{name}</text><text class=\"word\" x=\"{tx}\" y=\"{ty2}\">{word}</text></g>",
            tx = x + 8,
            ty = y + 18,
            ty2 = y + 36,
            name = esc(&n.name),
            word = esc(word.trim_start_matches(" · "))
        );
    }
    svg.push_str("</svg>");
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|(p, e, c)| {
            vec![
                esc(p),
                esc(e),
                esc(c),
                state_of(c).map_or_else(|| "-".into(), |s| state(s.as_str())),
            ]
        })
        .collect();
    let undeclared = if g.undeclared.is_empty() {
        String::new()
    } else {
        format!(
            "<p>Handlers that do not declare what they emit (their edges are unknown): {}.</p>",
            esc(&g.undeclared.iter().cloned().collect::<Vec<_>>().join(", "))
        )
    };
    format!(
        "<div class=\"scroll\">{svg}</div>{undeclared}{}",
        super::html::table(
            "Edges",
            &["From", "Event", "To (handler)", "Its state"],
            &rows,
            None
        )
    )
}

/// A flow: its causation tree as a timeline, every handler's state for
/// every event.
pub(crate) fn flow(f: &Flow) -> String {
    let order = f.in_tree_order();
    let t0 = f.events.iter().map(|e| e.stored_ms).min().unwrap_or(0);
    let span = f
        .events
        .iter()
        .map(|e| e.stored_ms.saturating_sub(t0))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = format!(
        "<section class=\"flow\"><h2>Flow <code>{}</code>: {} events</h2><ol class=\"tree\">",
        esc(&f.correlation_id),
        f.events.len()
    );
    for (depth, e) in order {
        let offset = e.stored_ms.saturating_sub(t0);
        let left = offset * 100 / span;
        let copy = e.copy_of().map_or_else(String::new, |c| {
            format!(" <span class=\"copy\">({})</span>", esc(&c))
        });
        let _ = write!(
            out,
            "<li class=\"event\" style=\"--depth:{depth}\" data-type=\"{ty}\" data-depth=\"{depth}\">\
             <div class=\"line\"><span class=\"what\"><strong>{ty}</strong> from {src}{copy}</span>\
             <span class=\"subject\">{subject}</span> <span class=\"at\">+{offset} ms</span>\
             <span class=\"bar\" aria-hidden=\"true\"><span style=\"left:{left}%\"></span></span></div>\
             <div class=\"meta\">id <code>{id}</code> · {stream} #{seq}</div><ul class=\"steps\">",
            ty = esc(&e.event_type),
            src = esc(&e.source),
            subject = esc(&e.subject),
            id = esc(&e.id),
            stream = esc(&e.stream),
            seq = e.sequence,
        );
        for hs in &e.handlers {
            let text = hs.step.describe(true);
            let word = text.split([' ', ':', ',', '(']).next().unwrap_or_default();
            let _ = write!(
                out,
                "<li><span class=\"handler\">{}</span>: <span class=\"step step-{}\">{}</span></li>",
                esc(&hs.handler),
                esc(word),
                esc(&text)
            );
        }
        out.push_str("</ul></li>");
    }
    out.push_str("</ol></section>");
    out
}

/// Dead letters grouped by handler and reason.
pub(crate) fn dlq_groups(lines: &[SummaryLine], total: usize, actions: Option<&str>) -> String {
    if lines.is_empty() {
        return "<p>No dead letters.</p>".into();
    }
    let mut out = String::new();
    for l in lines {
        let pick = format!(
            "service={}&handler={}&reason={}",
            url(&l.service),
            url(&l.handler),
            url(&l.reason)
        );
        let forms = actions.map_or_else(String::new, |key| {
            let hidden = format!(
                "<input type=\"hidden\" name=\"form_key\" value=\"{}\"><input type=\"hidden\" name=\"service\" value=\"{}\">\
                 <input type=\"hidden\" name=\"handler\" value=\"{}\"><input type=\"hidden\" name=\"reason\" value=\"{}\">",
                esc(key),
                esc(&l.service),
                esc(&l.handler),
                esc(&l.reason)
            );
            format!(
                "<form method=\"post\" action=\"/dlq/replay\" class=\"inline\">{hidden}<button>Replay…</button></form> \
                 <form method=\"post\" action=\"/dlq/purge\" class=\"inline\">{hidden}<button class=\"danger\">Purge…</button></form>"
            )
        });
        let _ = write!(
            out,
            "<tr data-group=\"{svc}.{h} {reason}\"><td>{svc}</td><td>{h}</td><td>{reason}</td>\
             <td class=\"n\"><a href=\"/dlq/letters?{pick}\">{n}</a></td><td>{first}</td><td>{last}</td><td>{forms}</td></tr>",
            svc = esc(&l.service),
            h = esc(&l.handler),
            reason = esc(&l.reason),
            n = l.count,
            first = time_ms(l.first_at_ms),
            last = time_ms(l.last_at_ms),
        );
    }
    format!(
        "<p>{} in {}.</p>{}",
        choreo::__private::counted(total as u64, "letter"),
        choreo::__private::counted(lines.len() as u64, "group"),
        table_around(
            "By handler and reason",
            &[
                "Service", "Handler", "Reason", "Letters", "First", "Last", "Actions"
            ],
            None,
            &out
        )
    )
}

/// Letters, one row each, linking to each letter.
pub(crate) fn letters(list: &[DeadLetter]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|l| {
            vec![
                format!("<a href=\"/dlq/letter/{0}\">#{0}</a>", l.sequence),
                esc(&format!("{}.{}", l.service, l.handler)),
                esc(&l.reason),
                esc(l.event_type()),
                esc(&l.original_subject),
                format!("<code>{}</code>", esc(l.event_id())),
                l.deliveries.to_string(),
                esc(&l.detail),
            ]
        })
        .collect();
    super::html::table(
        &format!("{} letters", list.len()),
        &[
            "Letter",
            "Handler",
            "Reason",
            "Event",
            "Subject",
            "Event id",
            "Deliveries",
            "Detail",
        ],
        &rows,
        None,
    )
}

/// One letter: why, every header, the payload as JSON.
pub(crate) fn letter(l: &DeadLetter, actions: Option<&str>) -> String {
    let mut headers: Vec<Vec<String>> = l
        .headers
        .iter()
        .map(|(k, v)| {
            let k: &str = k.as_ref();
            vec![
                esc(k),
                esc(&v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(", ")),
            ]
        })
        .collect();
    headers.sort();
    let payload = match choreo::dlq::payload_to_json(&l.payload) {
        Ok(v) => json(&v),
        Err(e) => format!("<p>{} bytes: {}</p>", l.payload.len(), esc(&e)),
    };
    let forms = actions.map_or_else(String::new, |key| {
        let hidden = format!(
            "<input type=\"hidden\" name=\"form_key\" value=\"{}\"><input type=\"hidden\" name=\"sequence\" value=\"{}\">",
            esc(key),
            l.sequence
        );
        format!(
            "<p><form method=\"post\" action=\"/dlq/replay\" class=\"inline\">{hidden}<button>Replay…</button></form> \
             <form method=\"post\" action=\"/dlq/purge\" class=\"inline\">{hidden}<button class=\"danger\">Purge…</button></form></p>"
        )
    });
    let facts: Vec<Vec<String>> = [
        ("Handler", format!("{}.{}", l.service, l.handler)),
        ("Reason", l.reason.clone()),
        ("Detail", l.detail.clone()),
        ("Deliveries", l.deliveries.to_string()),
        ("Event", l.event_type().to_owned()),
        ("Event id", l.event_id().to_owned()),
        ("Subject", l.original_subject.clone()),
        (
            "Stored at",
            format!("{} #{}", l.original_stream, l.original_sequence),
        ),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_owned(), esc(&v)])
    .collect();
    format!(
        "<h1>Dead letter #{}</h1>{forms}{}{}<h2>Payload</h2>{payload}",
        l.sequence,
        super::html::table("Why", &["", ""], &facts, None),
        super::html::table("Headers", &["Header", "Value"], &headers, None),
    )
}

/// The aggregates services answer for, each with a form for an
/// instance's state at a point.
pub(crate) fn aggregates(list: &[(String, AggregateManifest)], id: &str, until: &str) -> String {
    if list.is_empty() {
        return "<p>No running service answers state requests (a service registers an aggregate with \
                <code>Service::aggregate::&lt;A&gt;()</code>). Any stream's events can still be read below.</p>"
            .into();
    }
    let mut out = String::from(
        "<p>The state of an instance at a point is folded by its own service (its \
         <code>Aggregate::apply</code>), from its events up to a stream sequence or a time.</p>",
    );
    for (service, a) in list {
        let _ = write!(
            out,
            "<form method=\"get\" action=\"/events\" class=\"grid\" aria-label=\"{name} of {svc}\">\
             <input type=\"hidden\" name=\"service\" value=\"{svc}\"><input type=\"hidden\" name=\"aggregate\" value=\"{name}\">\
             <strong>{name}</strong> <span class=\"note\">({svc}, {stream}: <code>{filter}</code>)</span>\
             <label>Id <input name=\"id\" value=\"{id}\" required></label>\
             <label>Up to (sequence or RFC 3339 time) <input name=\"until\" value=\"{until}\"></label>\
             <button>Show</button></form>",
            name = esc(&a.name),
            svc = esc(service),
            stream = esc(&a.stream),
            filter = esc(&a.filter),
            id = esc(id),
            until = esc(until),
        );
    }
    out
}

/// One instance's state as its service folded it.
pub(crate) fn aggregate_state(
    a: &AggregateManifest,
    id: &str,
    answer: &StateAnswer,
    until: &str,
) -> String {
    let at = if until.is_empty() {
        "now".to_owned()
    } else {
        format!("up to {}", esc(until))
    };
    format!(
        "<section class=\"state-at\"><h2>{name} {id}, {at}</h2><p>{n} folded, the last at stream sequence {v}.</p>\
         <div id=\"state\">{json}</div></section>",
        name = esc(&a.name),
        id = esc(id),
        n = choreo::__private::counted(answer.events, "event"),
        v = answer.version,
        json = answer.state.as_ref().map_or_else(String::new, json),
    )
}

/// The form for any stream's events.
pub(crate) fn any_filter_form(stream: &str, filter: &str, until: &str) -> String {
    format!(
        "<h2>Any subject filter</h2><form method=\"get\" action=\"/events\" class=\"grid\">\
         <label>Stream <input name=\"stream\" value=\"{}\" required></label>\
         <label>Subject filter <input name=\"filter\" value=\"{}\" placeholder=\"stock.sku-1.*\" required></label>\
         <label>Up to (sequence or RFC 3339 time) <input name=\"until\" value=\"{}\"></label> <button>Show</button></form>",
        esc(stream),
        esc(filter),
        esc(until)
    )
}

/// An aggregate's events (a subject filter of a stream) up to a point.
pub(crate) fn events(list: &[StoredEvent]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.sequence.to_string(),
                esc(&e.stored_at),
                esc(e.event_type.as_deref().unwrap_or("(not a choreo event)")),
                e.version.map_or_else(|| "-".into(), |v| v.to_string()),
                esc(&e.subject),
                json(&e.payload),
            ]
        })
        .collect();
    super::html::table(
        &format!("{} events, oldest first", list.len()),
        &[
            "Sequence", "Stored", "Event", "Version", "Subject", "Payload",
        ],
        &rows,
        None,
    )
}
