//! `choreo console` in a real headless Chromium, against real servers: the
//! shop's system, graph and a compensated order's flow; a stalled handler
//! shown within 2 s of `choreo::admin::status` saying so; a dead-letter
//! group replayed through the confirm page, emptied, and its events
//! handled; and what the console refuses (actions off, a form from
//! elsewhere, a token missing, listening beyond loopback without one).
//!
//! With `CHOREO_BLESS=1` the screenshots are written to `docs/console/`
//! too (always to `target/console-screenshots/`).
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use choreo::admin::State as HandlerState;
use choreo::{HandlerError, Publisher, Service, State, event, event_handler};
use choreo_testkit::{Browser, NatsServer, Page};
use common::{InvoiceRequested, World, request, run_shop, until};
use tokio::io::AsyncBufReadExt as _;

/// A running `choreo console` and its address.
struct Console {
    child: tokio::process::Child,
    base: String,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn console(server: &NatsServer, extra: &[&str]) -> Console {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["-s", &server.url(), "console", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the console printed its address")
        .unwrap()
        .unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_owned();
    // Keep reading its stderr (the action log) so it never blocks.
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            eprintln!("[console] {l}");
        }
    });
    Console { child, base }
}

/// Saves a screenshot to target/console-screenshots, and with
/// CHOREO_BLESS=1 to docs/console.
async fn screenshot(page: &Page, name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(name);
    page.screenshot(&path).await.unwrap();
    let png = std::fs::read(&path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{name} is a real picture"
    );
    if std::env::var_os("CHOREO_BLESS").is_some() {
        let docs = root.join("docs/console");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&path, docs.join(name)).unwrap();
    }
}

/// Clicks `selector`, then waits up to 20 s until `until` is true.
async fn click_then(page: &Page, selector: &str, until: &str) {
    page.click(selector).await.unwrap();
    page.wait_for(until, Duration::from_secs(20)).await.unwrap();
}

/// The text of every element matching `selector`, as a JSON array.
fn texts(selector: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll({})).map(e => e.textContent.trim())",
        serde_json::to_string(selector).unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_its_graph_and_a_compensated_order_in_a_browser() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let (handles, _pg) = run_shop(&client, "console", 5).await;
    let c = console(&server, &[]).await;
    let browser = Browser::start().await.unwrap();

    // The system: every handler of the shop, each with its state as a word.
    let page = browser.open(&format!("{}/", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelectorAll('#handlers tr').length === 19 && \
         Array.from(document.querySelectorAll('#handlers tr')).every(r => r.textContent.includes('OK'))",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let services = page
        .eval(&texts("#handlers tr td:first-child"))
        .await
        .unwrap();
    for s in ["orders", "payments", "inventory", "shipping"] {
        assert!(
            services.as_array().unwrap().iter().any(|v| v == s),
            "{s} in {services}"
        );
    }
    // Live: a new reading replaces the table without a reload.
    let before = page
        .eval("document.body.dataset.updated || ''")
        .await
        .unwrap();
    page.wait_for(
        &format!("(document.body.dataset.updated || '') !== {before}"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // Keyboard: the sort links and the filter are reachable, and sorting
    // by handler puts them in order.
    page.goto(&format!("{}/?sort=handler", c.base))
        .await
        .unwrap();
    let names = page
        .wait_for(
            &format!(
                "(() => {{ const n = {}; return n.length === 19 ? n : null; }})()",
                texts("#handlers tr td:nth-child(2)")
            ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // A deadline's parts (its schedule step, its watchers) follow it.
    let names: Vec<String> = serde_json::from_value(names).unwrap();
    let at = names
        .iter()
        .position(|n| n.starts_with("expire_unpaid"))
        .unwrap();
    assert!(
        names[at + 1..at + 4].iter().all(|n| n.starts_with('└')),
        "{names:?}"
    );
    let handlers: Vec<&String> = names.iter().filter(|n| !n.starts_with('└')).collect();
    let mut sorted = handlers.clone();
    sorted.sort();
    assert_eq!(handlers, sorted, "sorted by handler");
    page.eval("document.getElementById('filter').value = 'payments'; document.getElementById('filter').dispatchEvent(new Event('input'))")
        .await
        .unwrap();
    let shown = page
        .eval("Array.from(document.querySelectorAll('#handlers tr')).filter(r => !r.hidden).map(r => r.cells[0].textContent)")
        .await
        .unwrap();
    assert!(
        !shown.as_array().unwrap().is_empty()
            && shown.as_array().unwrap().iter().all(|s| s == "payments"),
        "{shown}"
    );
    page.goto(&format!("{}/", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelectorAll('#handlers tr').length === 19",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    screenshot(&page, "system.png").await;

    // The graph: the storefront feeds the orders service, every edge in
    // its handler's state.
    page.goto(&format!("{}/graph", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelectorAll('svg.graph g.node').length > 5 && \
         document.querySelector('svg.graph').textContent.includes('payments.charge_payment')",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let edges = page.eval(&texts("table tbody tr")).await.unwrap();
    assert!(
        edges.as_array().unwrap().iter().any(|e| {
            let e = e.as_str().unwrap();
            e.starts_with("storefront")
                && e.contains("OrderPlaced")
                && e.contains("payments.charge_payment")
                && e.contains("OK")
        }),
        "{edges}"
    );
    screenshot(&page, "graph.png").await;

    // A flow: order 3 is compensated (paid, out of stock, refunded,
    // cancelled), its tree in causation order.
    page.goto(&format!("{}/flow?q=orders.console-3.%3E", c.base))
        .await
        .unwrap();
    let order = page
        .wait_for(
            "(() => { const t = document.getElementById('flows').textContent; \
               if (!t.includes('OrderCancelled') || t.includes('not yet delivered') || t.includes('in flight')) return null; \
               return Array.from(document.querySelectorAll('li.event')).map(e => e.dataset.type + '@' + e.dataset.depth); })()",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        order,
        serde_json::json!([
            "OrderPlaced@0",
            "PaymentCaptured@1",
            "OrderPaid@2",
            "StockUnavailable@3",
            "PaymentRefunded@4",
            "OrderCancelled@5"
        ])
    );
    let steps = page.eval(&texts("li.event ul.steps li")).await.unwrap();
    assert!(
        steps
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("payments.refund_payment:")),
        "{steps}"
    );
    screenshot(&page, "flow.png").await;

    // An aggregate: the teapot's stock, folded by the inventory service
    // itself, now and up to its first event.
    page.goto(&format!("{}/events", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelector('form[aria-label=\"Stock of inventory\"]')",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    page.eval("const f = document.querySelector('form[aria-label=\"Stock of inventory\"]'); f.id.value = 'teapot'; f.submit()")
        .await
        .unwrap();
    // Every event's quantity, and the state: on hand = received - allocated.
    let rows_js = "Array.from(document.querySelectorAll('main table tbody tr')).map(r => [Number(r.cells[0].textContent), r.cells[2].textContent, JSON.parse(r.cells[5].textContent).quantity])";
    let now = page
        .wait_for(
            &format!(
                "(() => {{ const s = document.querySelector('#state pre'); if (!s) return null; \
                   const rows = {rows_js}; const onHand = JSON.parse(s.textContent).on_hand; \
                   const want = rows.reduce((n, r) => r[1] === 'StockReceived' ? n + r[2] : n - r[2], 0); \
                   return onHand === want && rows.length > 1 ? [onHand, rows] : null; }})()"
            ),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let rows = now[1].as_array().unwrap();
    assert_eq!(rows[0][1], "StockReceived", "{rows:?}");
    assert!(
        rows[1..].iter().all(|r| r[1] == "StockAllocated"),
        "{rows:?}"
    );
    screenshot(&page, "aggregate.png").await;
    let first = rows[0][0].as_u64().unwrap();
    page.goto(&format!(
        "{}/events?service=inventory&aggregate=Stock&id=teapot&until={first}",
        c.base
    ))
    .await
    .unwrap();
    let then = page
        .wait_for("document.querySelector('#state pre') && JSON.parse(document.querySelector('#state pre').textContent)", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        then["on_hand"], rows[0][2],
        "the state after the first event only"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('main table tbody tr').length")
            .await
            .unwrap(),
        1
    );

    // Reading works without JavaScript: the page as served has the rows.
    let html = page.eval("fetch('/').then(r => r.text())").await.unwrap();
    assert_eq!(
        html.as_str().unwrap().matches("<tr data-state=").count(),
        19
    );
    for (_, h) in handles {
        h.shutdown().await;
    }
}

static RELEASE: AtomicBool = AtomicBool::new(false);

#[event(subject = "ticks.{n}", key = n)]
pub struct Ticked {
    pub n: u64,
}

/// Stuck until `RELEASE`, with an ack_wait of 1 s.
#[event_handler(emits = [], ack_wait = "1s", timeout = "120s", concurrency = 2)]
async fn stuck(_t: Ticked) {
    while !RELEASE.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Dead-letters while the bug is on.
#[event_handler(emits = [], max_deliver = 1)]
async fn bill(r: InvoiceRequested, State(w): State<World>) -> Result<(), HandlerError> {
    if w.bug.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("bug: the tax table is empty"));
    }
    *w.billed.lock().unwrap().entry(r.order_id).or_default() += 1;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_within_2s_and_a_dead_letter_group_is_replayed_from_the_browser() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let w = World::default();
    let billing = Service::new("billing")
        .state(w.clone())
        .handler(bill)
        .start(client.clone())
        .await
        .unwrap();
    let ticker = Service::new("ticker")
        .handler(stuck)
        .start(client.clone())
        .await
        .unwrap();
    let c = console(&server, &["--allow-actions"]).await;
    let browser = Browser::start().await.unwrap();
    let page = browser.open(&format!("{}/", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelectorAll('#handlers tr').length === 2",
        Duration::from_secs(20),
    )
    .await
    .unwrap();

    // A stall: the console's table says so within 2 s of the library.
    let p = Publisher::new(client.clone(), "clock").unwrap();
    for n in 0..5 {
        p.publish(&Ticked { n }).await.unwrap();
    }
    let stalled_at = loop {
        let s = choreo::admin::status(&js, Duration::from_millis(300))
            .await
            .unwrap();
        if s.handlers
            .iter()
            .any(|h| h.service == "ticker" && h.state == HandlerState::Stalled)
        {
            break Instant::now();
        }
    };
    page.wait_for(
        "Array.from(document.querySelectorAll('#handlers tr[data-state=STALLED]')).some(r => r.textContent.includes('ticker'))",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let shown_after = stalled_at.elapsed();
    assert!(
        shown_after <= Duration::from_secs(2),
        "the console showed STALLED {shown_after:?} after admin::status did"
    );
    screenshot(&page, "stalled.png").await;
    RELEASE.store(true, Ordering::Relaxed);

    // Dead letters: six from a bug, grouped; actions show a dry run first.
    w.bug.store(true, Ordering::SeqCst);
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    request(&shop, "bug", 6, 10).await;
    page.goto(&format!("{}/dlq", c.base)).await.unwrap();
    page.wait_for(
        "(() => { const r = document.querySelector('#groups tr[data-group]'); return r && r.textContent.includes('permanent-error') && r.cells[3].textContent === '6'; })()",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    screenshot(&page, "dead-letters.png").await;
    w.bug.store(false, Ordering::SeqCst);
    click_then(&page, "#groups form[action='/dlq/replay'] button", "document.getElementById('confirm') && document.querySelectorAll('main ol li').length === 6").await;
    assert!(
        w.billed.lock().unwrap().is_empty(),
        "the dry run replays nothing"
    );
    click_then(
        &page,
        "#confirm",
        "location.pathname === '/dlq' && document.body.textContent.includes('replayed 6 letters')",
    )
    .await;
    until("6 billed after the replay", || {
        w.billed.lock().unwrap().len() == 6
    })
    .await;
    page.wait_for(
        "document.getElementById('groups').textContent.includes('No dead letters')",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(
        w.billed.lock().unwrap().values().all(|n| *n == 1),
        "each once"
    );
    // The action is logged with who and what.
    page.goto(&format!("{}/actions", c.base)).await.unwrap();
    let log = page
        .eval("document.querySelector('main table').textContent")
        .await
        .unwrap();
    assert!(
        log.as_str()
            .unwrap()
            .contains("a local user from 127.0.0.1")
            && log
                .as_str()
                .unwrap()
                .contains("replayed 6 letters of billing.bill, permanent-error"),
        "{log}"
    );

    // One more letter, purged from its own page.
    w.bug.store(true, Ordering::SeqCst);
    request(&shop, "doomed", 1, 10).await;
    page.goto(&format!("{}/dlq", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelector('#groups a[href^=\"/dlq/letters\"]')",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    w.bug.store(false, Ordering::SeqCst);
    click_then(
        &page,
        "#groups a[href^='/dlq/letters']",
        "document.querySelector('a[href^=\"/dlq/letter/\"]')",
    )
    .await;
    click_then(&page, "a[href^='/dlq/letter/']", "document.querySelector('pre.json') && document.querySelector('pre.json').textContent.includes('doomed-0')").await;
    click_then(
        &page,
        "form[action='/dlq/purge'] button",
        "document.querySelector('h1').textContent.startsWith('Purge 1 letter #')",
    )
    .await;
    click_then(&page, "#confirm", "location.pathname === '/dlq' && document.body.textContent.includes('purged 1 letter #') && document.getElementById('groups').textContent.includes('No dead letters')").await;
    assert!(
        !w.billed.lock().unwrap().contains_key("doomed-0"),
        "purged, not replayed"
    );

    // Replay the handler from sequence 1: the plan first (its inbox skips
    // what it handled), then the rewind, logged.
    page.goto(&format!("{}/", c.base)).await.unwrap();
    page.wait_for(
        "document.querySelector('a[href=\"/replay/billing/bill\"]')",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    click_then(&page, "a[href='/replay/billing/bill']", "location.pathname === '/replay/billing/bill' && document.querySelector('input[name=from]')").await;
    page.eval("document.querySelector('input[name=from]').value = '1'; document.querySelector('main form').submit()")
        .await
        .unwrap();
    let plan = page
        .wait_for(
            "document.getElementById('confirm') && document.querySelector('main p').textContent",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let plan = plan.as_str().unwrap();
    // The six events and the six copies the letters' replay stored, all
    // handled once, and the purged one, which runs now.
    assert_eq!(
        plan,
        "It would replay 13 events of billing.bill in INVOICES 1..=13: 12 already handled (skipped by the inbox), 1 to run."
    );
    click_then(&page, "#confirm", "location.pathname === '/actions' && document.querySelector('main table').textContent.includes('replaying ')").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    until("the purged event handled by the replay", || {
        w.billed.lock().unwrap().contains_key("doomed-0")
    })
    .await;
    assert!(
        w.billed.lock().unwrap().values().all(|n| *n == 1),
        "the inbox skipped what was handled: {:?}",
        w.billed.lock().unwrap()
    );

    // A form from elsewhere (no form key) is refused; so is every action
    // of a console without --allow-actions.
    let refused = page
        .eval("fetch('/dlq/purge', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'form_key=x&service=billing&confirm=yes'}).then(r => r.status)")
        .await
        .unwrap();
    assert_eq!(refused, 403);
    let read_only = console(&server, &[]).await;
    let ro = browser
        .open(&format!("{}/dlq", read_only.base))
        .await
        .unwrap();
    assert_eq!(
        ro.eval("document.querySelectorAll('form[action^=\"/dlq/\"]').length")
            .await
            .unwrap(),
        0
    );
    let refused = ro
        .eval("fetch('/dlq/replay', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'form_key=x&service=billing'}).then(r => r.status)")
        .await
        .unwrap();
    assert_eq!(refused, 403);
    billing.shutdown().await;
    ticker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_page_and_beyond_loopback_one_is_required() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let w = World::default();
    let billing = Service::new("billing")
        .state(w.clone())
        .handler(bill)
        .start(client.clone())
        .await
        .unwrap();
    let c = console(&server, &["--token", "s3cret"]).await;
    let browser = Browser::start().await.unwrap();
    let page = browser.open(&format!("{}/", c.base)).await.unwrap();
    assert!(
        page.eval("document.body.textContent")
            .await
            .unwrap()
            .as_str()
            .unwrap()
            .contains("This console needs its token"),
    );
    let status = page
        .eval("fetch('/api/status').then(r => r.status)")
        .await
        .unwrap();
    assert_eq!(status, 401);
    // The sign-in form posts the token (never in a URL).
    let sign_in = |token: &str| {
        format!(
            "(() => {{ const f = document.querySelector('form[action=\"/login\"]'); \
               f.token.value = {}; f.submit(); return true; }})()",
            serde_json::to_string(token).unwrap()
        )
    };
    page.eval(&sign_in("wrong")).await.unwrap();
    page.wait_for(
        "document.body.textContent === 'wrong token'",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    page.goto(&format!("{}/", c.base)).await.unwrap();
    page.eval(&sign_in("s3cret")).await.unwrap();
    page.wait_for(
        "location.pathname === '/' && document.querySelectorAll('#handlers tr').length === 1",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let status = page
        .eval("fetch('/api/status').then(r => r.status)")
        .await
        .unwrap();
    assert_eq!(status, 200, "the cookie carries the token");

    // Beyond loopback without a token: refused, saying what to do.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["-s", &server.url(), "console", "--listen", "0.0.0.0:0"])
        .env_remove("CHOREO_CONSOLE_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("without a token: give --token") && err.contains("127.0.0.1"),
        "{err}"
    );
    // A server that is not there: one line, exit 2, before listening.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args([
            "-s",
            "nats://127.0.0.1:1",
            "console",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("choreo: ") && !err.contains("choreo console on"),
        "{err}"
    );
    billing.shutdown().await;
}
