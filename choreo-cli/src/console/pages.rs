//! The console's read-only pages and their live streams.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use axum::response::{Html, IntoResponse, Response};
use choreo::admin;
use choreo::dlq::{self, Filter};
use futures::Stream;

use super::html::{esc, page};
use super::views::{self, SystemQuery};
use super::{Shared, actions};

/// A stream of server-sent events, each a JSON object of element id to
/// HTML.
type Live = Sse<KeepAliveStream<futures::stream::BoxStream<'static, Result<Event, Infallible>>>>;

fn parts_event(parts: &[(&str, String)]) -> Event {
    let map: serde_json::Map<String, serde_json::Value> = parts
        .iter()
        .map(|(id, html)| ((*id).to_owned(), html.clone().into()))
        .collect();
    Event::default().data(serde_json::Value::Object(map).to_string())
}

fn live(stream: impl Stream<Item = Event> + Send + 'static) -> Live {
    use futures::StreamExt as _;
    Sse::new(stream.map(Ok).boxed()).keep_alive(KeepAlive::default())
}

/// A view that reads NATS itself (a flow, the dead letters): rendered now,
/// then again every two seconds while the page is open, sent only when it
/// changed.
fn polled<F, Fut>(every: Duration, render: F) -> Live
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<(&'static str, String)>> + Send,
{
    let s = futures::stream::unfold(
        (render, None::<String>, true),
        move |(render, last, first)| async move {
            if !first {
                tokio::time::sleep(every).await;
            }
            let parts = render().await;
            let text = format!("{parts:?}");
            if last.as_deref() == Some(text.as_str()) {
                // Unchanged: a comment keeps the connection, the page stays.
                return Some((Event::default().comment("unchanged"), (render, last, false)));
            }
            Some((parts_event(&parts), (render, Some(text), false)))
        },
    );
    live(s)
}

/// `/`: services, instances, handlers, deadlines, outboxes.
pub(crate) async fn system(State(c): State<Shared>, Query(q): Query<SystemQuery>) -> Html<String> {
    let reading = c.reading.borrow().clone();
    let body = views::system(&reading, &q, c.allow_actions);
    let qs = q.query_string();
    let live = if qs.is_empty() {
        "/live/system".to_owned()
    } else {
        format!("/live/system?{qs}")
    };
    Html(page("System", "/", Some(&live), &body))
}

/// The system view's parts, each time the reading changes.
pub(crate) async fn live_system(State(c): State<Shared>, Query(q): Query<SystemQuery>) -> Live {
    let rx = c.reading.clone();
    let actions = c.allow_actions;
    let s = futures::stream::unfold((rx, true), move |(mut rx, first)| {
        let q = q.clone();
        async move {
            if !first {
                rx.changed().await.ok()?;
            }
            let reading = rx.borrow_and_update().clone();
            Some((
                parts_event(&views::system_parts(&reading, &q, actions)),
                (rx, false),
            ))
        }
    });
    live(s)
}

/// `/api/status`: the latest judged status as JSON (what `choreo status
/// --json` prints).
pub(crate) async fn api_status(State(c): State<Shared>) -> Response {
    let reading = c.reading.borrow().clone();
    match &reading.status {
        Some(s) => Json(s.clone()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no reading yet").into_response(),
    }
}

/// `/graph`.
pub(crate) async fn graph(State(c): State<Shared>) -> Html<String> {
    let reading = c.reading.borrow().clone();
    let body = format!(
        "<h1>Graph</h1><p>Who emits what to whom, from the registry; each edge in the state of the handler it feeds.</p>\
         <div id=\"graph\">{}</div>",
        views::graph(&reading.graph, reading.status.as_ref())
    );
    Html(page("Graph", "/graph", Some("/live/graph"), &body))
}

/// The graph, each time the reading changes.
pub(crate) async fn live_graph(State(c): State<Shared>) -> Live {
    let rx = c.reading.clone();
    let s = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        let r = rx.borrow_and_update().clone();
        Some((
            parts_event(&[("graph", views::graph(&r.graph, r.status.as_ref()))]),
            (rx, false),
        ))
    });
    live(s)
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct FlowQuery {
    q: Option<String>,
}

async fn flow_parts(c: &Shared, q: &str) -> Vec<(&'static str, String)> {
    let html = match q.parse::<admin::Query>() {
        Err(e) => format!("<p class=\"warn\">{}</p>", esc(&e)),
        Ok(query) => match admin::trace(&c.js, &query, None, Duration::from_secs(3600)).await {
            Ok(t) if t.flows.is_empty() => "<p>No flow found in the last hour.</p>".into(),
            Ok(t) => t.flows.iter().map(views::flow).collect(),
            Err(e) => format!("<p class=\"warn\">{}</p>", esc(&e.to_string())),
        },
    };
    vec![("flows", html)]
}

/// `/flow?q=<event id | correlation id | subject>`.
pub(crate) async fn flow(State(c): State<Shared>, Query(q): Query<FlowQuery>) -> Html<String> {
    let needle = q.q.unwrap_or_default();
    let flows = if needle.is_empty() {
        "<p>Search by an event id, a correlation id, or a subject filter such as <code>orders.o-42.&gt;</code>.</p>".to_owned()
    } else {
        flow_parts(&c, &needle).await.remove(0).1
    };
    let body = format!(
        "<h1>Flows</h1><form method=\"get\" action=\"/flow\"><label for=\"q\">Event id, correlation id or subject</label> \
         <input id=\"q\" name=\"q\" value=\"{v}\" size=\"48\" required> <button>Trace</button></form>\
         <div id=\"flows\">{flows}</div>",
        v = esc(&needle)
    );
    let live = (!needle.is_empty()).then(|| format!("/live/flow?q={}", super::html::url(&needle)));
    Html(page("Flows", "/flow", live.as_deref(), &body))
}

/// A flow, again every two seconds while it changes.
pub(crate) async fn live_flow(State(c): State<Shared>, Query(q): Query<FlowQuery>) -> Live {
    let needle = q.q.unwrap_or_default();
    polled(Duration::from_secs(2), move || {
        let c = c.clone();
        let needle = needle.clone();
        async move { flow_parts(&c, &needle).await }
    })
}

async fn dlq_parts(c: &Shared) -> Vec<(&'static str, String)> {
    let html = match dlq::letters(&c.js, &Filter::all()).await {
        Ok(letters) => views::dlq_groups(
            &dlq::summary(&letters),
            letters.len(),
            c.allow_actions.then_some(c.form_key.as_str()),
        ),
        Err(e) => format!("<p class=\"warn\">{}</p>", esc(&e.to_string())),
    };
    vec![("groups", html)]
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct Done {
    done: Option<String>,
}

/// `/dlq`: letters grouped by handler and reason.
pub(crate) async fn dlq(State(c): State<Shared>, Query(d): Query<Done>) -> Html<String> {
    let groups = dlq_parts(&c).await.remove(0).1;
    let done = d.done.map_or_else(String::new, |d| {
        format!("<p role=\"status\" class=\"done\">{}</p>", esc(&d))
    });
    let off = if c.allow_actions {
        ""
    } else {
        "<p class=\"note\">Read only: start the console with <code>--allow-actions</code> to replay or purge.</p>"
    };
    let body = format!("<h1>Dead letters</h1>{done}{off}<div id=\"groups\">{groups}</div>");
    Html(page("Dead letters", "/dlq", Some("/live/dlq"), &body))
}

/// The groups, again every two seconds while they change.
pub(crate) async fn live_dlq(State(c): State<Shared>) -> Live {
    polled(Duration::from_secs(2), move || {
        let c = c.clone();
        async move { dlq_parts(&c).await }
    })
}

/// `/dlq/letters?service=&handler=&reason=`.
pub(crate) async fn letters(
    State(c): State<Shared>,
    Query(pick): Query<actions::Pick>,
) -> Response {
    match dlq::letters(&c.js, &pick.filter()).await {
        Ok(list) => Html(page(
            "Dead letters",
            "/dlq",
            None,
            &format!(
                "<h1>Dead letters{}</h1>{}",
                esc(&pick.describe()),
                views::letters(&list)
            ),
        ))
        .into_response(),
        Err(e) => error_page(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

/// `/dlq/letter/{sequence}`.
pub(crate) async fn letter(State(c): State<Shared>, Path(sequence): Path<u64>) -> Response {
    match dlq::letter(&c.js, sequence).await {
        Ok(l) => Html(page(
            &format!("Dead letter #{sequence}"),
            "/dlq",
            None,
            &views::letter(&l, c.allow_actions.then_some(c.form_key.as_str())),
        ))
        .into_response(),
        Err(e) => error_page(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct EventsQuery {
    /// A registered aggregate: its service and name, and the instance.
    service: Option<String>,
    aggregate: Option<String>,
    id: Option<String>,
    /// Or any stream and subject filter.
    stream: Option<String>,
    filter: Option<String>,
    until: Option<String>,
}

/// `/events`: the aggregates services answer for, and one instance's
/// state and events up to a point (`?service=&aggregate=&id=&until=`), or
/// any subject filter's events (`?stream=&filter=&until=`).
pub(crate) async fn events(State(c): State<Shared>, Query(q): Query<EventsQuery>) -> Response {
    let reading = c.reading.borrow().clone();
    let until_text = q.until.clone().unwrap_or_default();
    let until = match until_text.trim() {
        "" => None,
        t => match crate::point(t) {
            Ok(p) => Some(p),
            Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
        },
    };
    let mut body = String::from("<h1>Aggregates</h1>");
    body.push_str(&views::aggregates(
        &reading.aggregates,
        &q.id.clone().unwrap_or_default(),
        &until_text,
    ));
    // One registered aggregate's instance: its state (folded by its
    // service) and its events.
    let registered = match (&q.service, &q.aggregate, &q.id) {
        (Some(svc), Some(name), Some(id)) if !id.is_empty() => reading
            .aggregates
            .iter()
            .find(|(s, a)| s == svc && &a.name == name)
            .map(|(s, a)| (s.clone(), a.clone(), id.clone())),
        _ => None,
    };
    let (stream, filter) = match (&registered, &q.stream, &q.filter) {
        (Some((svc, a, id)), _, _) => {
            let mut request = choreo::aggregate::inspect::StateRequest::new(&a.name, id);
            request = match until {
                Some(admin::Point::Sequence(n)) => request.until_sequence(n),
                Some(admin::Point::Time(t)) => request.until_time(t),
                _ => request,
            };
            let state =
                match admin::aggregate_state(&c.js, svc, &request, Duration::from_secs(5)).await {
                    Ok(answer) => views::aggregate_state(a, id, &answer, &until_text),
                    Err(e) => format!("<p class=\"warn\">{}</p>", esc(&e.to_string())),
                };
            body.push_str(&state);
            (a.stream.clone(), a.filter_of(id))
        }
        (None, Some(stream), Some(filter)) if !stream.is_empty() && !filter.is_empty() => {
            (stream.clone(), filter.clone())
        }
        _ => {
            body.push_str(&views::any_filter_form(
                &q.stream.clone().unwrap_or_default(),
                &q.filter.clone().unwrap_or_default(),
                &until_text,
            ));
            return Html(page("Aggregates", "/events", None, &body)).into_response();
        }
    };
    match admin::events(&c.client, &c.api, (&stream, &filter), until).await {
        Ok(list) => body.push_str(&views::events(&list)),
        Err(e) => {
            let _ = std::fmt::Write::write_fmt(
                &mut body,
                format_args!("<p class=\"warn\">{}</p>", esc(&e.to_string())),
            );
        }
    }
    body.push_str(&views::any_filter_form(&stream, &filter, &until_text));
    Html(page("Aggregates", "/events", None, &body)).into_response()
}

/// A page that says what went wrong.
pub(crate) fn error_page(code: StatusCode, why: &str) -> Response {
    (
        code,
        Html(page(
            "Error",
            "",
            None,
            &format!(
                "<h1>Cannot show this</h1><p class=\"warn\">{}</p>",
                esc(why)
            ),
        )),
    )
        .into_response()
}
