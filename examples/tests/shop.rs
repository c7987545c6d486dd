//! The shop against a real server: every order ends as its data says, once.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use choreo::{Publisher, StreamSettings};
use choreo_examples::shop::{self, Ledger, SERVICES, Summary};
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_postgres::sqlx::{self, PgPool};
use choreo_testkit::{NatsServer, PostgresServer, Recorder};

/// A pool on `pg`.
async fn pool(pg: &PostgresServer) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg.url())
        .await
        .unwrap()
}

/// A server and a Postgres with the four services running, a recorder and
/// a storefront.
struct Shop {
    _server: NatsServer,
    _pg: PostgresServer,
    client: choreo::async_nats::Client,
    ledger: Ledger,
    handles: Vec<choreo::ServiceHandle>,
    recorder: Recorder,
    publisher: Publisher,
}

impl Shop {
    async fn start() -> Self {
        let server = NatsServer::start().await.unwrap();
        let pg = PostgresServer::start().await.unwrap();
        let client = server.connect().await.unwrap();
        let ledger = Ledger::open(&client, pool(&pg).await).await.unwrap();
        let mut handles = Vec::new();
        for name in SERVICES {
            handles.push(
                shop::service(name, ledger.clone(), StreamSettings::default())
                    .await
                    .unwrap()
                    .start(client.clone())
                    .await
                    .unwrap(),
            );
        }
        let recorder = Recorder::start(&client).await.unwrap();
        let publisher = Publisher::new(client.clone(), "storefront").unwrap();
        Self {
            _server: server,
            _pg: pg,
            client,
            ledger,
            handles,
            recorder,
            publisher,
        }
    }
}

#[tokio::test]
async fn every_order_ends_as_its_data_says_and_nothing_happens_twice() {
    let Shop {
        _server,
        _pg,
        client: _,
        ledger,
        handles,
        recorder,
        publisher,
    } = Shop::start().await;
    let roots = shop::place_orders(&publisher, "t1", 200).await.unwrap();
    let summary = shop::wait_for_endings(
        &recorder,
        &ledger,
        "t1",
        200,
        Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary, Summary::expected(200), "{summary}");
    assert!(summary.is_clean());
    assert_eq!(
        summary.to_string(),
        "orders=200 shipped=140 cancelled=20 rejected=20 expired=20 notices=280 late_refunds=0 duplicates=0 misordered=0 lost=0 ended_twice=0 unrefunded=0 view_wrong=0"
    );

    // The paths, by the order's data.
    let shipped = recorder.flow(roots[0]);
    shipped
        .assert_path(&[
            "OrderPlaced",
            "PaymentCaptured",
            "OrderPaid",
            "StockReserved",
            "OrderShipped",
        ])
        .unwrap();
    let cancelled = recorder.flow(roots[3]);
    cancelled
        .assert_path(&[
            "OrderPlaced",
            "PaymentCaptured",
            "OrderPaid",
            "StockUnavailable",
            "PaymentRefunded",
            "OrderCancelled",
        ])
        .unwrap();
    let rejected = recorder.flow(roots[7]);
    rejected
        .assert_path(&["OrderPlaced", "PaymentDeclined", "OrderRejected"])
        .unwrap();

    // The summary cannot pass what it did not check: a second ending
    // planted on a shipped order fails the run.
    publisher
        .publish(&shop::OrderCancelled {
            order_id: "t1-0".into(),
        })
        .await
        .unwrap();
    let planted = shop::OrderCancelled {
        order_id: "t1-0".into(),
    };
    recorder
        .expect::<shop::OrderCancelled>()
        .matching(move |e| *e == planted)
        .within(Duration::from_secs(5))
        .await
        .unwrap();
    let twice = shop::summarize(&recorder, &ledger, "t1", 200)
        .await
        .unwrap();
    assert_eq!(twice.ended_twice, 1, "{twice}");
    assert_eq!(
        twice.shipped, 139,
        "an order that ended twice is no shipment: {twice}"
    );
    assert!(twice.to_string().contains("ended_twice=1"), "{twice}");
    assert!(!twice.is_clean(), "{twice}");
    assert!(!twice.is_expected_with_late_payments(), "{twice}");

    // Nor what the database shows: a charge applied twice is a duplicate,
    // a read model row that disagrees with its order's events is wrong.
    sqlx::query("INSERT INTO charges (order_id, cents) VALUES ('t1-1', 1)")
        .execute(ledger.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE order_view SET events = events + 1 WHERE order_id = 't1-2'")
        .execute(ledger.pool())
        .await
        .unwrap();
    let wrong = shop::summarize(&recorder, &ledger, "t1", 200)
        .await
        .unwrap();
    assert_eq!((wrong.duplicates, wrong.view_wrong), (1, 1), "{wrong}");
    assert!(!wrong.is_clean(), "{wrong}");
    for h in handles {
        h.shutdown().await;
    }
}

/// Payments held back past the orders' payment deadline (its consumer
/// paused, as a payments process killed under load would be): every order
/// expires, each payment that comes after is refused by orders and paid
/// back by payments, a late decline changes nothing, and nothing ships.
#[tokio::test]
async fn a_payment_after_its_order_expired_is_refunded_and_never_shipped() {
    const N: u64 = 10;
    let Shop {
        _server,
        _pg,
        client,
        ledger,
        handles,
        recorder,
        publisher,
    } = Shop::start().await;
    let js = choreo::async_nats::jetstream::new(client.clone());
    let until = time::OffsetDateTime::now_utc() + shop::PAYMENT_DEADLINE + Duration::from_secs(2);
    js.get_stream("ORDERS")
        .await
        .unwrap()
        .pause_consumer(
            &choreo::__private::consumer_name("payments", "charge_payment"),
            until,
        )
        .await
        .unwrap();
    shop::place_orders(&publisher, "late", N).await.unwrap();
    // Every order expires; then the payments come, and are refunded.
    let waited = std::time::Instant::now();
    while shop::summarize_endings(&recorder, "late", N).late_refunds < 8
        && waited.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = shop::wait_for_endings(
        &recorder,
        &ledger,
        "late",
        N,
        Duration::from_secs(20),
        |_| {},
    )
    .await
    .unwrap();
    // Orders 5 (bank offline) and 7 (declined) get no refund; the other
    // eight were charged late.
    assert_eq!(
        summary.to_string(),
        "orders=10 shipped=0 cancelled=0 rejected=0 expired=10 notices=0 late_refunds=8 duplicates=0 misordered=0 lost=0 ended_twice=0 unrefunded=0 view_wrong=0"
    );
    assert!(summary.is_clean(), "{summary}");
    assert!(summary.is_expected_with_late_payments(), "{summary}");
    assert_ne!(summary, Summary::expected(N));
    let types: Vec<String> = recorder
        .snapshot()
        .iter()
        .map(|r| r.meta.event_type().to_owned())
        .collect();
    for never in [
        "OrderPaid",
        "StockReserved",
        "OrderShipped",
        "OrderRejected",
    ] {
        assert!(!types.iter().any(|t| t == never), "{never} in {types:?}");
    }
    assert_eq!(types.iter().filter(|t| *t == "PaymentCaptured").count(), 8);
    for h in handles {
        h.shutdown().await;
    }
}

#[tokio::test]
async fn placing_the_same_orders_again_changes_nothing() {
    let Shop {
        _server,
        _pg,
        client: _,
        ledger,
        handles,
        recorder,
        publisher,
    } = Shop::start().await;
    shop::place_orders(&publisher, "t2", 50).await.unwrap();
    shop::place_orders(&publisher, "t2", 50).await.unwrap();
    let summary = shop::wait_for_endings(
        &recorder,
        &ledger,
        "t2",
        50,
        Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary, Summary::expected(50), "{summary}");
    for h in handles {
        h.shutdown().await;
    }
}

/// A shop process this test started: killed if the test fails before it
/// stops it, so a failing run leaves no process behind.
struct Started(Option<std::process::Child>);

impl Started {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("the process is still ours")
    }
    /// Hands the process over (to wait for it).
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("the process is still ours")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Prometheus's `promtool`: `$PROMTOOL`, else on `PATH` (`scripts/test`
/// installs Debian's `prometheus` package, which brings it).
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return p.into();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found (set PROMTOOL or put it on PATH): scripts/test installs it \
             with `apt-get install prometheus` as root; elsewhere install Prometheus's promtool"
        )
    })
}

fn shop_binary() -> std::path::PathBuf {
    // target/<profile>/deps/shop-<hash> → target/<profile>/examples/shop
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("shop")
}

#[test]
fn the_shop_command_runs_end_to_end_and_reports() {
    let out = Command::new(shop_binary())
        .args(["--orders", "40"])
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l
                == "orders=40 shipped=28 cancelled=4 rejected=4 expired=4 notices=56 late_refunds=0 duplicates=0 misordered=0 lost=0 ended_twice=0 unrefunded=0 view_wrong=0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("└─ OrderCancelled [orders]"),
        "one flow is printed as a tree: {stdout}"
    );
}

#[test]
fn one_service_per_process_needs_a_shared_server() {
    let out = Command::new(shop_binary())
        .args(["--service", "payments"])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set NATS_URL"));
    let out = Command::new(shop_binary())
        .args(["--place"])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set NATS_URL"));
    // A shared server, but no shared database.
    let out = Command::new(shop_binary())
        .args(["--service", "payments"])
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set DATABASE_URL"));
    let out = Command::new(shop_binary())
        .args(["--service", "billing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("possible values: orders, payments, inventory, shipping"),
        "{err}"
    );
}

/// Every service as processes of its own, two of orders, and the orders
/// placed by a third kind of process (`--place`): one orders instance is
/// SIGKILLed while the orders flow, and every order still ends once, the
/// notices in order and the deadlines exact.
#[tokio::test]
async fn each_service_runs_as_its_own_processes_and_an_orders_instance_may_die() {
    let server = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let spawn = |args: &[&str]| {
        Started(Some(
            Command::new(shop_binary())
                .args(args)
                .env("NATS_URL", server.url())
                .env("DATABASE_URL", pg.url())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ))
    };
    let mut services: Vec<Started> = ["orders", "orders", "payments", "inventory", "shipping"]
        .iter()
        .map(|name| spawn(&["--service", name]))
        .collect();
    // Every service's consumers exist before the orders come.
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (stream, durable) in [
        ("ORDERS", "payments--charge_payment"),
        ("ORDERS", "orders--expire_unpaid__schedule"),
        ("ORDERS", "inventory--reserve_stock"),
        ("PAYMENTS", "orders--confirm_payment"),
        ("INVENTORY", "shipping--ship_order"),
    ] {
        loop {
            if let Ok(s) = js.get_stream(stream).await
                && s.get_consumer::<choreo::async_nats::jetstream::consumer::pull::Config>(durable)
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{durable} never came");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut place = spawn(&["--place", "--orders", "1000"]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    services[0].get().kill().unwrap();
    services[0].get().wait().unwrap();
    let out = place.take().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.lines().any(|l| l
            == "orders=1000 shipped=700 cancelled=100 rejected=100 expired=100 notices=1400 late_refunds=0 duplicates=0 misordered=0 lost=0 ended_twice=0 unrefunded=0 view_wrong=0"),
        "{stdout}"
    );
    drop(services);
}

#[tokio::test]
async fn a_service_process_stops_gracefully_on_sigterm() {
    let server = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let child = Command::new(shop_binary())
        .args(["--service", "payments"])
        .env("NATS_URL", server.url())
        .env("DATABASE_URL", pg.url())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Started(Some(child));
    // Wait until its consumers exist, then ask it to stop.
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = js.get_stream("ORDERS").await
            && s.get_consumer::<choreo::async_nats::jetstream::consumer::pull::Config>(
                "payments--charge_payment",
            )
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the payments process never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.get().id().to_string()])
        .status()
        .unwrap();
    let mut child = child.take();
    let out = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (status, err)
    })
    .await
    .unwrap();
    assert!(out.0.success(), "exit status {:?}\n{}", out.0, out.1);
    assert!(
        out.1.contains("shutdown requested") && out.1.contains("service stopped"),
        "{}",
        out.1
    );
}

#[tokio::test]
async fn a_database_that_cannot_be_read_fails_the_count_instead_of_passing_it() {
    let server = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let pool = pool(&pg).await;
    let ledger = Ledger::open(&client, pool.clone()).await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    assert!(shop::summarize(&recorder, &ledger, "r", 0).await.is_ok());
    // An effect table gone: the duplicate count cannot be made.
    sqlx::query("DROP TABLE charges")
        .execute(&pool)
        .await
        .unwrap();
    let err = shop::summarize(&recorder, &ledger, "r", 0)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot read the shop's database"),
        "{err}"
    );
}

/// Sums the samples of `name` whose labels include every `k="v"` of `with`.
fn sample(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    // The body: what follows the response's headers.
    match out.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_owned(),
        None => out,
    }
}

#[tokio::test]
async fn the_shop_serves_prometheus_metrics_that_match_what_it_did() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(shop_binary())
        .args(["--orders", "40", "--metrics", &addr.to_string()])
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Started(Some(child));
    let stdout = child.get().stdout.take().unwrap();
    // Read until the run is over and the endpoint stays up for us.
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("metrics: serving");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l
                == "orders=40 shipped=28 cancelled=4 rejected=4 expired=4 notices=56 late_refunds=0 duplicates=0 misordered=0 lost=0 ended_twice=0 unrefunded=0 view_wrong=0"),
        "{lines:?}"
    );
    let text = scrape(addr);
    let handled = |handler: &str| {
        sample(
            &text,
            "choreo_handler_outcomes_total",
            &[("choreo_handler", handler), ("choreo_outcome", "handled")],
        )
    };
    // 40 orders: 4 declined, 4 out of stock (refunded, cancelled), 4 never
    // answered (expired by their deadline), 28 shipped.
    assert_eq!(handled("charge_payment"), 40.0, "{text}");
    assert_eq!(handled("reserve_stock"), 32.0, "{text}");
    assert_eq!(handled("ship_order"), 28.0, "{text}");
    // Every order's deadline is scheduled and every fired copy handled;
    // the handler ran for the 4 expired ones only (the summary line).
    assert_eq!(handled("expire_unpaid__schedule"), 40.0, "{text}");
    assert_eq!(handled("expire_unpaid"), 4.0, "{text}");
    assert_eq!(handled("refund_payment"), 4.0, "{text}");
    assert_eq!(handled("reject_order"), 4.0, "{text}");
    assert_eq!(handled("cancel_order"), 4.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "choreo_handler_outcomes_total",
            &[("choreo_outcome", "dead_lettered")]
        ),
        0.0
    );
    // The orders come through the storefront's outbox.
    assert_eq!(
        sample(
            &text,
            "choreo_outbox_published_total",
            &[("service", "storefront")]
        ),
        40.0,
        "every order placed is counted as published: {text}"
    );
    assert_eq!(
        sample(
            &text,
            "messaging_client_consumed_messages_total",
            &[("choreo_handler", "charge_payment")]
        ),
        40.0
    );
    // Histograms with buckets, in seconds, and every metric described.
    for histogram in [
        "messaging_process_duration_seconds",
        "choreo_event_age_seconds",
        "messaging_client_operation_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {histogram} histogram"))
                && text.contains(&format!("{histogram}_bucket{{")),
            "{histogram}: {text}"
        );
    }
    // What Prometheus's own linter says of the scrape: nothing.
    let promtool = promtool();
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    {
        use std::io::Write;
        // promtool may stop reading at its first problem; what it says
        // then is the failure to show.
        let _ = check.stdin.take().unwrap().write_all(text.as_bytes());
    }
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics found problems:\n{}{}\n--- the scrape ---\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    Command::new("kill")
        .args(["-TERM", &child.get().id().to_string()])
        .status()
        .unwrap();
    let mut child = child.take();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Inventory keeps each product's stock as an aggregate: two inventory
/// instances handling many paid orders for a few hot products at once
/// never allocate a unit twice or below zero, and every order is reserved
/// or refused, once.
#[tokio::test]
async fn two_inventory_instances_never_oversell_hot_products() {
    use shop::{Line, OrderPaid, Stock, StockEvent, StockReceived};
    const HOT: [&str; 3] = ["hot-kettle", "hot-mug", "hot-tray"];
    const UNITS: u32 = 60;
    const ORDERS: usize = 300;
    let server = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let ledger = Ledger::open(&client, pool(&pg).await).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let own = server.connect().await.unwrap();
        handles.push(
            shop::service("inventory", ledger.clone(), StreamSettings::default())
                .await
                .unwrap()
                .start(own)
                .await
                .unwrap(),
        );
    }
    let recorder = Recorder::start(&client).await.unwrap();
    let publisher = Publisher::new(client.clone(), "orders").unwrap();
    let warehouse = choreo::Aggregates::new(publisher.clone());
    for sku in HOT {
        warehouse
            .decide::<Stock, _, std::convert::Infallible>(sku, |_| {
                Ok(vec![StockEvent::Received(StockReceived {
                    sku: sku.into(),
                    quantity: UNITS,
                    note: "test".into(),
                })])
            })
            .await
            .unwrap();
    }
    // One or two hot products per order, 1–3 units each: about three times
    // the units there are.
    let orders: Vec<OrderPaid> = (0..ORDERS)
        .map(|i| {
            let mut lines = vec![Line {
                sku: HOT[i % 3].into(),
                quantity: 1 + (i % 3) as u32,
            }];
            if i % 2 == 0 {
                lines.push(Line {
                    sku: HOT[(i + 1) % 3].into(),
                    quantity: 1,
                });
            }
            OrderPaid {
                order_id: format!("hot-{i}"),
                lines,
                amount_cents: 100,
            }
        })
        .collect();
    publisher.publish_all(&orders).await.unwrap();

    // Every order gets its answer.
    let answers = || {
        recorder
            .snapshot()
            .into_iter()
            .filter(|r| r.subject.starts_with("inventory."))
            .collect::<Vec<_>>()
    };
    let started = std::time::Instant::now();
    while answers().len() < ORDERS {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} of {ORDERS} orders answered",
            answers().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    recorder
        .settled(&client, Duration::from_secs(30))
        .await
        .unwrap();
    let mut reserved = std::collections::HashSet::new();
    let mut refused = std::collections::HashSet::new();
    for r in answers() {
        let mut parts = r.subject.split('.');
        let (order, outcome) = (parts.nth(1).unwrap().to_owned(), parts.next().unwrap());
        let fresh = match outcome {
            "reserved" => reserved.insert(order.clone()),
            "unavailable" => refused.insert(order.clone()),
            other => panic!("{other}"),
        };
        assert!(fresh, "{order} answered twice");
    }
    assert!(
        reserved.is_disjoint(&refused),
        "an order reserved and refused"
    );
    assert_eq!(reserved.len() + refused.len(), ORDERS);
    assert!(
        reserved.len() > 30 && refused.len() > 30,
        "the stock runs out midway: {} reserved, {} refused",
        reserved.len(),
        refused.len()
    );

    // Each product's history: never below zero, and exactly the reserved
    // orders' units allocated, once each.
    let by_id: std::collections::HashMap<&str, &OrderPaid> =
        orders.iter().map(|o| (o.order_id.as_str(), o)).collect();
    let mut allocated = std::collections::HashMap::new();
    for sku in HOT {
        let mut on_hand: i64 = 0;
        for r in warehouse.history::<Stock>(sku, None).await.unwrap() {
            match r.event {
                StockEvent::Received(e) => on_hand += i64::from(e.quantity),
                StockEvent::Allocated(e) => {
                    on_hand -= i64::from(e.quantity);
                    assert!(on_hand >= 0, "{sku} oversold at #{}", r.sequence);
                    let line = shop::wanted(&by_id[e.order_id.as_str()].lines)[sku];
                    assert_eq!(e.quantity, line, "{}: {sku}", e.order_id);
                    let before = allocated.insert((sku, e.order_id.clone()), r.sequence);
                    assert!(before.is_none(), "{} allocated {sku} twice", e.order_id);
                }
            }
        }
    }
    for o in &orders {
        for sku in shop::wanted(&o.lines).keys() {
            let has = allocated.contains_key(&(*sku, o.order_id.clone()));
            assert_eq!(
                has,
                reserved.contains(&o.order_id),
                "{}: {sku} allocated = {has}, reserved = {}",
                o.order_id,
                reserved.contains(&o.order_id)
            );
        }
    }
    for h in handles {
        h.shutdown().await;
    }
}
