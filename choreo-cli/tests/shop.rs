//! Every `choreo` command against the shop running on a real server:
//! `status` (text and JSON, exit codes), `graph` and `lint` (golden
//! files), and `asyncapi` (a golden file, and valid by the AsyncAPI
//! project's own parser). `CHOREO_BLESS=1` rewrites the golden files.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;

use choreo_examples::shop::SERVICES;
use choreo_testkit::{NatsServer, PostgresServer};
use common::run_shop;

fn choreo(server: &NatsServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["-s", &server.url()])
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Compares `actual` with `tests/golden/<name>`, or writes it there with
/// `CHOREO_BLESS=1`.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("CHOREO_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; CHOREO_BLESS=1 writes it", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs; CHOREO_BLESS=1 rewrites it",
        path.display()
    );
}

/// The validation script of the pinned AsyncAPI parser, installed by
/// `scripts/asyncapi.sh` (which `scripts/test` runs first).
fn asyncapi_validator() -> PathBuf {
    if let Some(p) = std::env::var_os("ASYNCAPI_VALIDATE") {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/asyncapi.sh");
    let out = Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        text(&out.stderr)
    );
    PathBuf::from(text(&out.stdout).trim())
}

struct RunningShop {
    server: NatsServer,
    handles: Vec<(&'static str, choreo::ServiceHandle)>,
    _pg: PostgresServer,
}

async fn shop_with_orders(n: u64) -> RunningShop {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let (handles, pg) = run_shop(&client, "cli", n).await;
    RunningShop {
        server,
        handles,
        _pg: pg,
    }
}

/// The shop's handlers: nine, the order read model's six projections, and
/// the payment deadline's handler with its three helpers (its schedule and
/// a watcher per `unless` event).
const SHOP_HANDLERS: usize = 19;

/// The first `n` lines `keep` accepts of `choreo status --watch <args>`
/// (every 200 ms) against `url`; the command is then stopped.
async fn watch(url: &str, args: &[&str], keep: fn(&str) -> bool, n: usize) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["-s", url, "status", "--watch", "--interval", "200ms"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map(Result::unwrap)
            .filter(|l| keep(l))
            .take(n)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    lines
}

/// Whether every payment deadline of the shop is decided (the unpaid
/// orders expire a few seconds after the others end).
fn expired(status: &serde_json::Value) -> bool {
    handler(status, "orders--expire_unpaid")["deadlines"]["pending"] == 0
}

/// `choreo status --json` until `done` holds (the registry and the flows
/// settle in the background).
async fn status_until(
    server: &NatsServer,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = String::new();
    for _ in 0..100 {
        let out = choreo(server, &["status", "--json", "--interval", "200ms"]);
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && done(&v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {last}");
}

fn handler<'a>(status: &'a serde_json::Value, durable: &str) -> &'a serde_json::Value {
    status["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["durable"] == durable)
        .unwrap_or_else(|| panic!("{durable} missing: {status:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_shop_handler_and_exits_1_once_a_service_stops() {
    let mut shop = shop_with_orders(40).await;
    let all_done = |v: &serde_json::Value| {
        let hs = v["handlers"].as_array().unwrap();
        hs.len() == SHOP_HANDLERS
            && hs
                .iter()
                .all(|h| h["lag_messages"] == 0 && h["state"] == "OK")
            && expired(v)
    };
    // A handler's inbox record is written once it has returned, a moment
    // after the deadline it decided reads as met or expired: wait for a key
    // in each inbox read below.
    let v = status_until(&shop.server, "the shop's 40 orders handled", |v| {
        all_done(v)
            && [
                "confirm_payment",
                "reject_order",
                "cancel_order",
                "expire_unpaid",
            ]
            .iter()
            .all(|h| handler(v, &format!("orders--{h}"))["inbox_keys"].as_u64() > Some(0))
            && v["outboxes"].as_array().is_some_and(|o| o.len() == 4)
    })
    .await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 4);
    // 40 orders: 4 declined, 4 refunded, 4 expired (see shop::order).
    // Records share keys, so a handler holds at most one key per record.
    let js = choreo::async_nats::jetstream::new(shop.server.connect().await.unwrap());
    for (service, h, records) in [
        ("orders", "confirm_payment", 32),
        ("orders", "reject_order", 4),
        ("orders", "cancel_order", 4),
        // The deadline handler records the fired copies it handled.
        ("orders", "expire_unpaid", 4),
    ] {
        let keys = handler(&v, &format!("{service}--{h}"))["inbox_keys"]
            .as_u64()
            .unwrap();
        assert!((1..=records).contains(&keys), "{h}: {keys} keys");
        // The last records may follow the status reading by a moment.
        let mut recorded = 0;
        for _ in 0..100 {
            recorded = choreo::__private::inbox_records(&js, service, h)
                .await
                .unwrap();
            if recorded == records {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(recorded, records, "{h}'s inbox records");
    }
    // Postgres handlers keep their inbox in the shop's database, not in
    // JetStream; each service's outbox is reported, empty once settled.
    for durable in ["payments--charge_payment", "shipping--ship_order"] {
        assert_eq!(handler(&v, durable)["inbox_keys"], serde_json::Value::Null);
    }
    // The orders service has a JetStream inbox for its other handlers.
    assert_eq!(handler(&v, "orders--view_placed")["inbox_keys"], 0);
    let outboxes: Vec<(&str, u64)> = v["outboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["service"].as_str().unwrap(),
                o["failing"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outboxes,
        [
            ("inventory", 0),
            ("orders", 0),
            ("payments", 0),
            ("shipping", 0)
        ]
    );
    assert_eq!(handler(&v, "inventory--reserve_stock")["dead_letters"], 0);
    // The deadline: none pending once every unpaid order expired.
    assert_eq!(
        handler(&v, "orders--expire_unpaid")["deadlines"],
        serde_json::json!({"pending": 0, "next": null, "watchers_waiting": 0, "watchers_behind_ms": 0})
    );

    // The table, and exit 0 while every handler is OK.
    let out = choreo(&shop.server, &["status", "--interval", "200ms"]);
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    let header = table
        .lines()
        .find(|l| l.starts_with("SERVICE    HANDLER"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(header.split_whitespace().eq([
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
        "WHY"
    ]));
    let row = table
        .lines()
        .find(|l| l.starts_with("payments   charge_payment"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.split_whitespace().take(10).eq([
            "payments",
            "charge_payment",
            "OK",
            "0",
            "0",
            "0",
            "0",
            "0.0",
            "0",
            // A Postgres handler: its inbox is in the shop's database.
            "-"
        ]),
        "{row}"
    );

    // The deadline handler with its rule, its helpers as branches under it.
    let lines: Vec<&str> = table.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            l.contains("expire_unpaid (within 5s, unless PaymentCaptured or PaymentDeclined)")
        })
        .unwrap_or_else(|| panic!("{table}"));
    for (offset, part) in [
        "└ watches PaymentCaptured",
        "└ watches PaymentDeclined",
        "└ schedule",
    ]
    .iter()
    .enumerate()
    {
        assert!(lines[at + 1 + offset].contains(part), "{part}:\n{table}");
    }
    assert!(
        !table.contains("__met_") && !table.contains("__schedule"),
        "{table}"
    );
    let deadlines = table
        .lines()
        .skip_while(|l| !l.split_whitespace().take(2).eq(["SERVICE", "DEADLINE"]))
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>();
    assert!(
        deadlines.len() == 2
            && deadlines[1]
                .split_whitespace()
                .eq(["orders", "expire_unpaid", "0", "-", "-", "-"]),
        "{table}"
    );

    // Each service's outbox, as its relay last reported it.
    let outbox = table
        .lines()
        .skip_while(|l| !l.split_whitespace().take(2).eq(["SERVICE", "OUTBOX"]))
        .collect::<Vec<_>>();
    assert_eq!(outbox.len(), 5, "{table}");
    assert!(
        outbox[3].starts_with("payments")
            && outbox[3]
                .split_whitespace()
                .take(4)
                .eq(["payments", "0", "-", "0"])
            && outbox[3].contains("after 5s, every 1s"),
        "{table}"
    );

    // --watch: one judged reading per interval, each a line of JSON.
    let url = shop.server.url();
    let lines = watch(&url, &["--json"], |l| !l.is_empty(), 3).await;
    let readings: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(readings.len(), 3);
    assert!(
        readings
            .iter()
            .all(|r| r["handlers"].as_array().unwrap().len() == SHOP_HANDLERS
                && r["window_ms"].as_u64().unwrap() >= 200)
    );
    assert!(readings[0]["taken_at_ms"].as_u64() < readings[2]["taken_at_ms"].as_u64());
    // As text, each reading starts with the time it was taken.
    let stamps = watch(&url, &[], |l| l.starts_with("at "), 2).await;
    assert_eq!(stamps.len(), 2, "{stamps:?}");
    for s in &stamps {
        let t = s.trim_start_matches("at ");
        assert!(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok(),
            "{s}"
        );
    }

    // Shipping stops: STOPPED, and exit 1 for scripts.
    let (_, shipping) = shop.handles.pop().unwrap();
    shipping.shutdown().await;
    let out = choreo(&shop.server, &["status", "--interval", "200ms"]);
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("shipping")
            && l.contains("STOPPED")
            && l.contains("no live instance runs it")),
        "{table}"
    );
    for (_, h) in shop.handles {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_lint_and_asyncapi_of_the_running_shop_match_their_golden_files() {
    let shop = shop_with_orders(10).await;
    // Wait until every service and the storefront's record are in.
    let mut graph = String::new();
    for _ in 0..100 {
        graph = text(&choreo(&shop.server, &["graph"]).stdout);
        if SERVICES.iter().all(|s| graph.contains(&format!("{s}."))) && graph.contains("storefront")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    golden("shop-graph.mmd", &graph);
    golden(
        "shop-graph.dot",
        &text(&choreo(&shop.server, &["graph", "--dot"]).stdout),
    );

    // What a service publishes is recorded in the registry in the
    // background after its first publish (inventory's `StockAllocated`
    // with the first reservation): read lint until it matches, for a while.
    let lint = || {
        let out = choreo(&shop.server, &["lint"]);
        assert_eq!(out.status.code(), Some(0), "the shop has no lint errors");
        text(&out.stdout)
    };
    let mut linted = lint();
    if std::env::var_os("CHOREO_BLESS").is_some() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        linted = lint();
    } else {
        let expected = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/shop-lint.txt"),
        )
        .unwrap_or_default();
        for _ in 0..100 {
            if linted == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            linted = lint();
        }
    }
    golden("shop-lint.txt", &linted);

    let out = choreo(&shop.server, &["asyncapi"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = text(&out.stdout).replace(&shop.server.url()["nats://".len()..], "127.0.0.1:PORT");
    golden("shop-asyncapi.json", &doc);
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let placed = &v["components"]["messages"]["OrderPlaced.v1"];
    assert_eq!(
        placed["payload"]["properties"]["lines"]["items"]["properties"]["sku"]["type"],
        "string"
    );
    assert_eq!(
        placed["headers"]["properties"]["ce-type"]["const"],
        "OrderPlaced"
    );
    assert_eq!(
        v["channels"]["OrderPlaced"]["address"],
        "orders.{order_id}.placed"
    );
    assert_eq!(
        v["operations"]["payments.charge_payment"]["action"],
        "receive"
    );
    assert_eq!(
        v["operations"]["storefront.publishes.OrderPlaced"]["action"],
        "send"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &doc).unwrap();
    let out = Command::new("node")
        .arg(asyncapi_validator())
        .arg(file.path())
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "the AsyncAPI parser rejects the document:\n{report}{}",
        text(&out.stderr)
    );
    assert!(
        report.contains("valid: AsyncAPI 3.0.0, 15 channels"),
        "{report}"
    );
    // The parser does catch a broken document: an operation on a channel
    // that does not exist.
    let mut broken = v.clone();
    broken["operations"]["payments.charge_payment"]["channel"]["$ref"] =
        "#/channels/Nowhere".into();
    std::fs::write(file.path(), broken.to_string()).unwrap();
    let out = Command::new("node")
        .arg(asyncapi_validator())
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    for (_, h) in shop.handles {
        h.shutdown().await;
    }
}

/// A server with three users: `shop` may do anything, `viewer` has
/// `Permissions::observer`, `nobody` may only connect.
async fn guarded_shop() -> RunningShop {
    let config = format!(
        "authorization {{ users = [ \
           {{ user: shop, password: pw }}, \
           {{ user: viewer, password: pw, permissions: {} }}, \
           {{ user: nobody, password: pw, permissions: {{ publish: {{ allow: [\"_INBOX.>\"] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }} ] }}",
        choreo::Permissions::observer(&Default::default()).to_config()
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let client = choreo::connect(
        &server.url(),
        choreo::async_nats::ConnectOptions::new().user_and_password("shop".into(), "pw".into()),
    )
    .await
    .unwrap();
    let (handles, pg) = run_shop(&client, "guarded", 10).await;
    RunningShop {
        server,
        handles,
        _pg: pg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_reads_everything_and_a_refusal_or_a_denial_is_one_clear_line() {
    let shop = guarded_shop().await;
    let as_user = |user: &str, args: &[&str]| {
        let mut all = vec!["--user", user, "--password", "pw"];
        all.extend_from_slice(args);
        choreo(&shop.server, &all)
    };
    // The observer's permissions are enough for every command.
    let mut last = String::new();
    let mut settled = false;
    for _ in 0..100 {
        let out = as_user("viewer", &["status", "--json", "--interval", "200ms"]);
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && v["handlers"].as_array().unwrap().len() == SHOP_HANDLERS
            && expired(&v)
            && v["handlers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["lag_messages"] == 0)
        {
            assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
            let keys = handler(&v, "orders--confirm_payment")["inbox_keys"]
                .as_u64()
                .unwrap();
            assert!((1..=10).contains(&keys), "{keys} inbox keys");
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "the viewer never saw the shop settle: {last}");
    for args in [&["graph"][..], &["lint"], &["asyncapi"]] {
        let out = as_user("viewer", args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }

    // A wrong password.
    let out = choreo(
        &shop.server,
        &["--user", "viewer", "--password", "wrong", "status"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("authorization"), "{stderr}");

    // A user who may not read the registry is told which subject and what to grant.
    let out = as_user("nobody", &["status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot read the registry (bucket choreo_registry)")
            && stderr.contains("$JS.API.STREAM.INFO.KV_choreo_registry")
            && stderr.contains("choreo::Permissions::observer"),
        "{stderr}"
    );
    for (_, h) in shop.handles {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_draws_a_compensated_order_as_its_causation_tree() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    // Order 3 of a run has a sold-out item: paid, refunded, cancelled.
    let (handles, _pg) = run_shop(&client, "golden", 5).await;
    let mut tree = String::new();
    for _ in 0..100 {
        let out = choreo(&server, &["trace", "*.golden-3.*", "--no-times"]);
        tree = text(&out.stdout);
        if tree.contains("OrderCancelled")
            && !tree.contains("not yet delivered")
            && !tree.contains("in flight")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    golden("trace-compensated-order.txt", &tree);
    // By its root's id, the same flow; as JSON, every handler's state.
    let root = tree
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("flow ")
        .to_owned();
    let out = choreo(&server, &["trace", &root, "--no-times"]);
    assert_eq!(text(&out.stdout), tree);
    // By a subject that names only some of its events (the order's, not
    // the payment's or the stock's): the whole flow, once.
    let out = choreo(&server, &["trace", "orders.golden-3.>", "--no-times"]);
    assert_eq!(text(&out.stdout), tree, "by orders.golden-3.>");
    let out = choreo(&server, &["trace", &root, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = v["flows"][0]["events"].as_array().unwrap();
    // By the id of an event in the middle (keyed, so placed through the
    // inbox records): the whole flow, its ancestors too.
    let middle = events[2]["id"].as_str().unwrap();
    let out = choreo(&server, &["trace", middle, "--no-times"]);
    assert_eq!(text(&out.stdout), tree, "by {middle}");
    assert_eq!(
        events.len(),
        6,
        "placed, captured, paid, unavailable, refunded, cancelled: {v:#}"
    );
    assert!(
        events
            .iter()
            .flat_map(|e| e["handlers"].as_array().unwrap())
            .all(|h| h["step"]["state"] == "handled"
                // A Postgres handler keeps its inbox in its database:
                // trace sees its durable's acknowledgement.
                || (h["step"]["state"] == "acknowledged"
                    && h["handler"] != "orders.confirm_payment")
                || (h["handler"] == "orders.expire_unpaid"
                    && h["step"]["state"] == "deadline-met"))
    );
    // The testkit's diagram, with each handler's state on its arrow.
    let out = choreo(&server, &["trace", &root, "--mermaid"]);
    let diagram = text(&out.stdout);
    assert!(
        diagram
            .starts_with("sequenceDiagram\n    participant storefront\n    participant payments\n"),
        "{diagram}"
    );
    for line in [
        "    storefront->>payments: OrderPlaced (acknowledged)\n",
        "    payments->>orders: PaymentCaptured (handled)\n",
        "    orders->>inventory: OrderPaid (acknowledged)\n",
        // The read model's projection takes the ending.
        "    orders->>orders: OrderCancelled (acknowledged)\n",
    ] {
        assert!(diagram.contains(line), "{line:?} missing from\n{diagram}");
    }
    // Nothing there, and not a query: one line, exit 2.
    let out = choreo(&server, &["trace", "*.nobody.*"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no event matches"),
        "{}",
        text(&out.stderr)
    );
    let out = choreo(&server, &["trace", "hello"]);
    assert_eq!(out.status.code(), Some(2));
    for (_, h) in handles {
        h.shutdown().await;
    }
}
