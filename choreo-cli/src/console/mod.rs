//! `choreo console`: a web console over `choreo::admin` and `choreo::dlq`,
//! served by this binary with the same connection flags.
//!
//! One task reads the system (a [`Snapshot`] every `--interval`, judged
//! against the one before, and the registry's manifests) and publishes the
//! reading on a watch channel; every page and every live stream renders
//! from the latest reading, so a hundred open tabs cost the server no more
//! NATS requests than one. Pages are rendered on the server as plain HTML
//! (readable without JavaScript); the page's script only swaps in the
//! parts each server-sent event carries, and filters rows as one types.
//! Everything served is compiled into the binary.
//!
//! Security: it listens on loopback unless told otherwise, and refuses to
//! listen elsewhere without a token. Actions (replays and purges) are off
//! unless `--allow-actions`; each shows its dry run and asks to confirm,
//! carries a per-start form key (no cross-site posts), and is logged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use choreo::admin::{self, Graph, Snapshot, Status};
use choreo::async_nats::jetstream;
use choreo::registry::AggregateManifest;
use choreo::{JetStreamApi, async_nats};
use clap::Args;
use tokio::sync::watch;

use crate::BoxError;

mod actions;
mod html;
mod pages;
mod views;

/// `choreo console`'s flags (the connection flags are the tool's own).
#[derive(Args, Debug)]
pub(crate) struct ConsoleArgs {
    /// Where to listen. Loopback by default; any other address needs
    /// --token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A secret every request must carry (a bearer token, or the cookie
    /// the sign-in form sets). Required to listen beyond loopback. Prefer
    /// the environment variable: a flag's value shows in the process list.
    #[arg(long, env = "CHOREO_CONSOLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Offer replays and purges (each shows its dry run and asks to
    /// confirm). Off by default: the console only reads.
    #[arg(long)]
    allow_actions: bool,
    /// How often the system is read; states are judged over it.
    #[arg(long, default_value = "1s", value_parser = crate::duration)]
    interval: Duration,
}

/// One reading of the system, shared by every page.
#[derive(Default)]
pub(crate) struct Reading {
    /// The judged status (none until two snapshots were taken).
    pub(crate) status: Option<Status>,
    /// Who emits what to whom, from the registry.
    pub(crate) graph: Graph,
    /// The aggregates services answer state requests for: (service, it).
    pub(crate) aggregates: Vec<(String, AggregateManifest)>,
    /// Why the last reading failed, if it did (the status shown is then
    /// the last good one).
    pub(crate) error: Option<String>,
}

/// What every request handler shares.
pub(crate) struct Console {
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) api: JetStreamApi,
    pub(crate) reading: watch::Receiver<Arc<Reading>>,
    pub(crate) token: Option<String>,
    pub(crate) allow_actions: bool,
    /// A key each action's form carries: a page of another site cannot
    /// know it, so it cannot post an action.
    pub(crate) form_key: String,
    /// The actions taken, newest last (the last 500).
    pub(crate) log: Mutex<Vec<actions::Logged>>,
}

pub(crate) type Shared = Arc<Console>;

/// Runs the console until the process is stopped.
pub(crate) async fn run(
    client: async_nats::Client,
    api: JetStreamApi,
    args: &ConsoleArgs,
) -> Result<(), BoxError> {
    if !args.listen.ip().is_loopback() && args.token.as_deref().is_none_or(str::is_empty) {
        return Err(format!(
            "the console would listen on {} (beyond this machine) without a token: give --token \
             (or CHOREO_CONSOLE_TOKEN), and put TLS in front of it (a reverse proxy), or listen \
             on 127.0.0.1",
            args.listen
        )
        .into());
    }
    let js = api.context(client.clone());
    // The first reading fails fast on a wrong server or missing rights; a
    // server where no service has started yet is shown as such until one
    // does.
    let first = match Snapshot::take(&js).await {
        Ok(s) => Some(s),
        Err(e) if e.kind() == admin::AdminErrorKind::NoRegistry => None,
        Err(e) => return Err(e.into()),
    };
    let (tx, rx) = watch::channel(Arc::new(Reading::default()));
    tokio::spawn(read_continuously(js.clone(), first, args.interval, tx));
    let console = Arc::new(Console {
        js,
        client,
        api,
        reading: rx,
        token: args.token.clone().filter(|t| !t.is_empty()),
        allow_actions: args.allow_actions,
        form_key: format!(
            "{}{}",
            choreo::EventId::new_random().to_string().replace('-', ""),
            choreo::EventId::new_random().to_string().replace('-', "")
        ),
        log: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr()?;
    // The one line a script (or a test) reads to find the console.
    eprintln!(
        "choreo console on http://{local}/ (actions {})",
        if args.allow_actions { "on" } else { "off" }
    );
    axum::serve(
        listener,
        router(console).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

fn router(console: Shared) -> Router {
    Router::new()
        .route("/", get(pages::system))
        .route("/live/system", get(pages::live_system))
        .route("/graph", get(pages::graph))
        .route("/live/graph", get(pages::live_graph))
        .route("/flow", get(pages::flow))
        .route("/live/flow", get(pages::live_flow))
        .route("/dlq", get(pages::dlq))
        .route("/live/dlq", get(pages::live_dlq))
        .route("/dlq/letters", get(pages::letters))
        .route("/dlq/letter/{sequence}", get(pages::letter))
        .route("/events", get(pages::events))
        .route("/actions", get(actions::log_page))
        .route("/api/status", get(pages::api_status))
        .route("/dlq/replay", post(actions::dlq_replay))
        .route("/dlq/purge", post(actions::dlq_purge))
        .route(
            "/replay/{service}/{handler}",
            get(actions::replay_form).post(actions::replay),
        )
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/login", get(sign_in).post(login))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .layer(middleware::from_fn(server_timing))
        .with_state(console)
}

/// Reads the system every `interval`, judging each snapshot against the
/// one before, and publishes the reading.
async fn read_continuously(
    js: jetstream::Context,
    mut before: Option<Snapshot>,
    interval: Duration,
    tx: watch::Sender<Arc<Reading>>,
) {
    loop {
        tokio::time::sleep(interval).await;
        let reading = match Snapshot::take(&js).await {
            Ok(after) => {
                let Some(earlier) = before.take() else {
                    // The first reading: judged against the next.
                    before = Some(after);
                    continue;
                };
                let status = Status::judge(&earlier, &after);
                before = Some(after);
                let (graph, aggregates) = match admin::manifests(&js).await {
                    Ok((m, p)) => (
                        Graph::new(&m, &p),
                        m.iter()
                            .flat_map(|m| {
                                m.aggregates.iter().map(|a| (m.service.clone(), a.clone()))
                            })
                            .collect(),
                    ),
                    Err(_) => {
                        let last = tx.borrow();
                        (last.graph.clone(), last.aggregates.clone())
                    }
                };
                Reading {
                    status: Some(status),
                    graph,
                    aggregates,
                    error: None,
                }
            }
            Err(e) => {
                let last = tx.borrow();
                Reading {
                    status: last.status.clone(),
                    graph: last.graph.clone(),
                    aggregates: last.aggregates.clone(),
                    error: Some(e.to_string()),
                }
            }
        };
        if tx.send(Arc::new(reading)).is_err() {
            return;
        }
    }
}

/// Adds `Server-Timing: app;dur=<ms>` to every answer: how long the server
/// took to make it (the benchmark reads it; so do the browser's tools).
async fn server_timing(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let mut res = next.run(req).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={ms:.3}")) {
        res.headers_mut().insert("server-timing", v);
    }
    res
}

const COOKIE: &str = "choreo_console";

/// With a token, every request but `/login` and the assets must carry it.
async fn guard(State(c): State<Shared>, req: Request, next: Next) -> Response {
    let Some(token) = &c.token else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/login" || path.starts_with("/assets/") {
        return next.run(req).await;
    }
    if carries(req.headers(), token) {
        return next.run(req).await;
    }
    (StatusCode::UNAUTHORIZED, sign_in().await).into_response()
}

/// The sign-in form. It posts the token (a query string would leave it in
/// the browser's history and in proxies' logs).
async fn sign_in() -> Html<String> {
    Html(html::page(
        "Sign in",
        "",
        None,
        "<h1>Sign in</h1><p>This console needs its token.</p>\
         <form method=\"post\" action=\"/login\"><label>Token \
         <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label> \
         <button>Sign in</button></form>",
    ))
}

/// Whether the request carries `token`, as a bearer token or the cookie.
fn carries(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .next();
    [bearer, cookie]
        .into_iter()
        .flatten()
        .any(|given| same(given.as_bytes(), token.as_bytes()))
}

/// Compares in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// `POST /login` (`token=...`): sets the cookie (HttpOnly,
/// SameSite=Strict) when the token is right.
async fn login(State(c): State<Shared>, q: axum::extract::Form<Login>) -> Response {
    match &c.token {
        Some(t) if same(q.token.as_bytes(), t.as_bytes()) => {
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", q.token);
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/".to_owned()),
                ],
            )
                .into_response()
        }
        Some(_) => (StatusCode::UNAUTHORIZED, "wrong token").into_response(),
        None => (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response(),
    }
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}
