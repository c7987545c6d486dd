//! The console's actions: replay or purge dead letters (one, or a group),
//! and replay a handler from a time or a sequence. Each is off unless the
//! console started with `--allow-actions`, shows its dry run first, needs
//! a second post to confirm, carries the console's form key, and is
//! logged (on stderr, and on `/actions`) with who and what.

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use choreo::admin;
use choreo::dlq::{self, DeadLetter, Filter, Reason};

use super::Shared;
use super::html::{esc, page, url};
use super::pages::error_page;

/// One action taken.
#[derive(Clone, Debug)]
pub(crate) struct Logged {
    at_ms: u64,
    who: String,
    what: String,
}

/// Which letters: one by sequence, or a group by handler and reason.
#[derive(serde::Deserialize, Default, Debug)]
pub(crate) struct Pick {
    sequence: Option<u64>,
    service: Option<String>,
    handler: Option<String>,
    reason: Option<String>,
}

impl Pick {
    /// The dead-letter filter of a group.
    pub(crate) fn filter(&self) -> Filter {
        let mut f = Filter::all();
        f.service.clone_from(&self.service);
        f.handler.clone_from(&self.handler);
        f.reason = self
            .reason
            .as_deref()
            .and_then(|r| r.parse::<Reason>().ok());
        f
    }

    /// ` of billing.bill, permanent-error`, for a heading.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(s) = self.sequence {
            let _ = write!(out, " #{s}");
        }
        if let Some(s) = &self.service {
            let _ = write!(out, " of {s}");
            if let Some(h) = &self.handler {
                let _ = write!(out, ".{h}");
            }
        }
        if let Some(r) = &self.reason {
            let _ = write!(out, ", {r}");
        }
        out
    }

    fn hidden(&self) -> String {
        let mut out = String::new();
        if let Some(s) = self.sequence {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"sequence\" value=\"{s}\">"
            );
        }
        for (k, v) in [
            ("service", &self.service),
            ("handler", &self.handler),
            ("reason", &self.reason),
        ] {
            if let Some(v) = v {
                let _ = write!(
                    out,
                    "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                    esc(v)
                );
            }
        }
        out
    }
}

/// A posted action: the key, whether it is the confirmation, and which
/// letters.
#[derive(serde::Deserialize, Debug)]
pub(crate) struct LetterAction {
    form_key: String,
    confirm: Option<String>,
    // The pick's fields, spelled out: a form body cannot fill a flattened
    // number.
    sequence: Option<u64>,
    service: Option<String>,
    handler: Option<String>,
    reason: Option<String>,
}

impl LetterAction {
    fn pick(&self) -> Pick {
        Pick {
            sequence: self.sequence,
            service: self.service.clone(),
            handler: self.handler.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// Who asked: the user a proxy in front names (`X-Forwarded-User`,
/// `Remote-User`), else the token's holder or the local user, and from
/// where.
fn who(c: &Shared, headers: &HeaderMap, from: SocketAddr) -> String {
    let named = ["x-forwarded-user", "remote-user"]
        .iter()
        .find_map(|h| headers.get(*h)?.to_str().ok().map(str::to_owned));
    let user = named.unwrap_or_else(|| {
        if c.token.is_some() {
            "the token's holder".into()
        } else {
            "a local user".into()
        }
    });
    format!("{user} from {}", from.ip())
}

fn log(c: &Shared, who: String, what: String) {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    eprintln!("choreo console: action by {who}: {what}");
    let mut l = c
        .log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    l.push(Logged { at_ms, who, what });
    let over = l.len().saturating_sub(500);
    l.drain(..over);
}

/// The refusal when actions are off or the key is wrong.
fn refused(c: &Shared, key: &str) -> Option<Response> {
    if !c.allow_actions {
        return Some(error_page(
            StatusCode::FORBIDDEN,
            "actions are off: start the console with --allow-actions to replay or purge",
        ));
    }
    if key != c.form_key {
        return Some(error_page(
            StatusCode::FORBIDDEN,
            "this form is not from this console (or the console restarted): reload the page and try again",
        ));
    }
    None
}

/// The letters an action names, unless it is refused.
async fn letters_for(
    c: &Shared,
    a: &LetterAction,
) -> Result<(Pick, Vec<DeadLetter>), Box<Response>> {
    if let Some(r) = refused(c, &a.form_key) {
        return Err(Box::new(r));
    }
    let pick = a.pick();
    let letters = chosen(c, &pick).await?;
    Ok((pick, letters))
}

async fn chosen(c: &Shared, pick: &Pick) -> Result<Vec<DeadLetter>, Box<Response>> {
    let r = match pick.sequence {
        Some(s) => dlq::letter(&c.js, s).await.map(|l| vec![l]),
        None if pick.service.is_none() && pick.reason.is_none() => {
            return Err(Box::new(error_page(
                StatusCode::BAD_REQUEST,
                "say which letters: a sequence, or a group",
            )));
        }
        None => dlq::letters(&c.js, &pick.filter()).await,
    };
    r.map_err(|e| Box::new(error_page(StatusCode::BAD_GATEWAY, &e.to_string())))
}

/// The dry run: what the action will do, and a form to confirm it.
fn confirm_page(
    c: &Shared,
    verb: &str,
    action: &str,
    pick: &Pick,
    letters: &[DeadLetter],
    warning: &str,
) -> Response {
    let mut list = String::new();
    for l in letters.iter().take(200) {
        let _ = write!(
            list,
            "<li>#{} {} <code>{}</code> to {}</li>",
            l.sequence,
            esc(l.event_type()),
            esc(l.event_id()),
            esc(&l.original_subject)
        );
    }
    if letters.len() > 200 {
        let _ = write!(list, "<li>and {} more</li>", letters.len() - 200);
    }
    let body = format!(
        "<h1>{verb} {n}{d}?</h1><p>{warning}</p><ol>{list}</ol>\
         <form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"form_key\" value=\"{key}\">\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">{hidden}\
         <button class=\"danger\" id=\"confirm\">{verb} {n}</button> <a href=\"/dlq\">Cancel</a></form>",
        n = counted(letters.len(), "letter"),
        d = esc(&pick.describe()),
        key = esc(&c.form_key),
        hidden = pick.hidden(),
    );
    Html(page(&format!("{verb}?"), "/dlq", None, &body)).into_response()
}

fn counted(n: usize, noun: &str) -> String {
    choreo::__private::counted(n as u64, noun)
}

fn done(message: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("/dlq?done={}", url(message)))],
    )
        .into_response()
}

/// `POST /dlq/replay`: the dry run, then (confirmed) the replay.
pub(crate) async fn dlq_replay(
    State(c): State<Shared>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(a): Form<LetterAction>,
) -> Response {
    let (pick, letters) = match letters_for(&c, &a).await {
        Ok(chosen) => chosen,
        Err(r) => return *r,
    };
    if a.confirm.as_deref() != Some("yes") {
        return confirm_page(
            &c,
            "Replay",
            "/dlq/replay",
            &pick,
            &letters,
            "Each is published again on its subject with its own id (a handler that already handled one \
             skips it), then deleted from the dead-letter stream.",
        );
    }
    let mut replayed = 0;
    for l in &letters {
        if let Err(e) = dlq::replay(&c.js, l).await {
            let what = format!(
                "replayed {replayed} of {} letters{}, then failed: {e}",
                letters.len(),
                pick.describe()
            );
            log(&c, who(&c, &headers, from), what.clone());
            return error_page(StatusCode::BAD_GATEWAY, &what);
        }
        replayed += 1;
    }
    let what = format!(
        "replayed {}{}",
        counted(replayed, "letter"),
        pick.describe()
    );
    log(&c, who(&c, &headers, from), what.clone());
    done(&what)
}

/// `POST /dlq/purge`: the dry run, then (confirmed) the purge.
pub(crate) async fn dlq_purge(
    State(c): State<Shared>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(a): Form<LetterAction>,
) -> Response {
    let (pick, letters) = match letters_for(&c, &a).await {
        Ok(chosen) => chosen,
        Err(r) => return *r,
    };
    if a.confirm.as_deref() != Some("yes") {
        return confirm_page(
            &c,
            "Purge",
            "/dlq/purge",
            &pick,
            &letters,
            "They are deleted for good: their events are not handled by this handler.",
        );
    }
    match dlq::purge(&c.js, &letters).await {
        Ok(n) => {
            let what = format!("purged {}{}", counted(n, "letter"), pick.describe());
            log(&c, who(&c, &headers, from), what.clone());
            done(&what)
        }
        Err(e) => error_page(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

/// `GET /replay/{service}/{handler}`: the form.
pub(crate) async fn replay_form(
    State(c): State<Shared>,
    Path((service, handler)): Path<(String, String)>,
) -> Response {
    if let Some(r) = refused(&c, &c.form_key) {
        return r;
    }
    let body = format!(
        "<h1>Replay {s}.{h}</h1><p>Rewinds the handler over a stretch of its stream while its instances run. \
         By default its inbox skips what it already handled (recovery); a rerun runs those again (rebuilding a \
         read model).</p><form method=\"post\" action=\"/replay/{us}/{uh}\" class=\"grid\">\
         <input type=\"hidden\" name=\"form_key\" value=\"{key}\">\
         <label>From (stream sequence or RFC 3339 time) <input name=\"from\" required></label>\
         <label>Until (optional) <input name=\"until\"></label>\
         <label><input type=\"checkbox\" name=\"rerun\" value=\"yes\"> Run already handled events again</label>\
         <button>Show what it will do</button></form>",
        s = esc(&service),
        h = esc(&handler),
        us = url(&service),
        uh = url(&handler),
        key = esc(&c.form_key),
    );
    Html(page("Replay", "/", None, &body)).into_response()
}

/// A posted handler replay.
#[derive(serde::Deserialize, Debug)]
pub(crate) struct HandlerReplay {
    form_key: String,
    confirm: Option<String>,
    from: String,
    until: Option<String>,
    rerun: Option<String>,
}

/// `POST /replay/{service}/{handler}`: the plan (a dry run), then
/// (confirmed) the replay.
pub(crate) async fn replay(
    State(c): State<Shared>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((service, handler)): Path<(String, String)>,
    Form(a): Form<HandlerReplay>,
) -> Response {
    if let Some(r) = refused(&c, &a.form_key) {
        return r;
    }
    let start = match crate::point(a.from.trim()) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let until = match a.until.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => match crate::point(u) {
            Ok(p) => Some(p),
            Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
        },
    };
    let rerun = a.rerun.as_deref() == Some("yes");
    let plan = match admin::plan(&c.js, &service, &handler, start, until, rerun).await {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let what = plan.summary();
    if a.confirm.as_deref() != Some("yes") {
        let body = format!(
            "<h1>Replay {s}.{h}?</h1><p>It would replay {w}.</p>\
             <form method=\"post\" action=\"/replay/{us}/{uh}\"><input type=\"hidden\" name=\"form_key\" value=\"{key}\">\
             <input type=\"hidden\" name=\"confirm\" value=\"yes\"><input type=\"hidden\" name=\"from\" value=\"{f}\">\
             <input type=\"hidden\" name=\"until\" value=\"{u}\">{r}\
             <button class=\"danger\" id=\"confirm\">Replay</button> <a href=\"/\">Cancel</a></form>",
            s = esc(&service),
            h = esc(&handler),
            w = esc(&what),
            us = url(&service),
            uh = url(&handler),
            key = esc(&c.form_key),
            f = esc(&a.from),
            u = esc(a.until.as_deref().unwrap_or("")),
            r = if rerun {
                "<input type=\"hidden\" name=\"rerun\" value=\"yes\">"
            } else {
                ""
            },
        );
        return Html(page("Replay?", "/", None, &body)).into_response();
    }
    match admin::replay(&c.js, &plan, false).await {
        Ok(_) => {
            let what = format!("replaying {what}");
            log(&c, who(&c, &headers, from), what.clone());
            (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, "/actions".to_owned())],
            )
                .into_response()
        }
        Err(e) => error_page(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

/// `/actions`: what was done, newest first.
pub(crate) async fn log_page(State(c): State<Shared>) -> Html<String> {
    let rows: Vec<Vec<String>> = c
        .log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .rev()
        .map(|l| vec![super::html::time_ms(l.at_ms), esc(&l.who), esc(&l.what)])
        .collect();
    let state = if c.allow_actions {
        "Actions are on (<code>--allow-actions</code>); each is logged here and on the console's stderr."
    } else {
        "Actions are off: the console only reads. Start it with <code>--allow-actions</code> to replay or purge."
    };
    let body = format!(
        "<h1>Actions</h1><p>{state}</p>{}",
        super::html::table(
            "Taken since the console started, newest first",
            &["When", "Who", "What"],
            &rows,
            None
        )
    );
    Html(page("Actions", "/actions", None, &body))
}
