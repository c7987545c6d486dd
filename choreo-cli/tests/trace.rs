//! `choreo trace` says which attempt an unfinished event is on: a handler
//! running it long enough to claim it ("running (attempt 1 of 4)"), and a
//! failed attempt waiting for its retry ("retrying (attempt 2 of 4 failed:
//! …)", with when the next is due), against a real server.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use choreo::{Context, HandlerError, Publisher, Service, State, event_handler};
use choreo_testkit::NatsServer;
use common::{InvoiceRequested, choreo, request};

#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
}

/// `slow-*` runs until the gate opens; `down-*` fails, the first time with
/// a retry after 200 ms, then with one after a minute.
#[event_handler(emits = [], max_deliver = 4, ack_wait = "3s")]
async fn bill(
    r: InvoiceRequested,
    State(g): State<Gate>,
    ctx: Context,
) -> Result<(), HandlerError> {
    if r.order_id.starts_with("slow") {
        while !g.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if r.order_id.starts_with("down") {
        let wait = if ctx.attempt() == 1 { 0 } else { 60 };
        return Err(HandlerError::retryable("the ledger answered 503\nbusy")
            .retry_after(Duration::from_millis(200).max(Duration::from_secs(wait))));
    }
    Ok(())
}

/// The handler's state for the first event `subject` finds, as JSON,
/// once `ready` says it is there (10 s at most).
fn step_of(
    server: &NatsServer,
    subject: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, out, _) = choreo(server, &["trace", subject, "--json"]);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) {
            last = v["flows"][0]["events"][0]["handlers"][0]["step"].clone();
            if ready(&last) {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{subject}: the step never got there; last {last:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_says_which_attempt_a_running_or_retrying_event_is_on() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let gate = Gate::default();
    let billing = Service::new("billing")
        .state(gate.clone())
        .handler(bill)
        .start(client.clone())
        .await
        .unwrap();
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    request(&shop, "slow", 1, 10).await;
    request(&shop, "down", 1, 10).await;

    // Claimed after a second of running: the claim says the attempt.
    let running = step_of(&server, "invoices.slow-0.>", |s| s["state"] == "running");
    assert_eq!(running["attempt"], 1, "{running:#}");
    assert_eq!(running["max_deliver"], 4, "{running:#}");
    let (code, out, err) = choreo(&server, &["trace", "invoices.slow-0.>", "--no-times"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("└· billing.bill: running (attempt 1 of 4)\n"),
        "{out}"
    );

    // The second attempt failed and waits a minute: its note says so, with
    // the error on one line.
    let retrying = step_of(&server, "invoices.down-0.>", |s| {
        s["state"] == "retrying" && s["attempt"] == 2
    });
    assert_eq!(retrying["max_deliver"], 4);
    assert_eq!(
        retrying["error"],
        "retryable error: the ledger answered 503 busy"
    );
    let due = retrying["retry_at_ms"].as_u64().unwrap();
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    assert!(
        (now + 45_000..now + 61_000).contains(&due),
        "due in {} ms",
        due.saturating_sub(now)
    );
    let (_, out, _) = choreo(&server, &["trace", "invoices.down-0.>", "--no-times"]);
    assert!(
        out.contains(
            "└· billing.bill: retrying (attempt 2 of 4 failed: retryable error: the ledger answered 503 busy)\n"
        ),
        "{out}"
    );
    let (_, out, _) = choreo(&server, &["trace", "invoices.down-0.>"]);
    assert!(out.contains("503 busy, next at 20"), "{out}");

    // `--follow` prints the tree again when it changes: running, then
    // handled once the slow one is released.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args([
            "-s",
            &server.url(),
            "trace",
            "invoices.slow-0.>",
            "--no-times",
            "--follow",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let next_state = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Ok(line) = seen.recv_timeout(deadline - std::time::Instant::now()) {
            if line.contains("billing.bill: ") {
                return line;
            }
        }
        panic!("--follow printed no {want} line");
    };
    assert!(next_state("first").ends_with("running (attempt 1 of 4)"));
    // Released, the slow one is handled: its claim no longer speaks.
    gate.open.store(true, Ordering::SeqCst);
    assert!(next_state("second").ends_with("handled"));
    follow.kill().unwrap();
    follow.wait().unwrap();
    let handled = step_of(&server, "invoices.slow-0.>", |s| s["state"] == "handled");
    assert!(handled["at_ms"].as_u64().unwrap() > 0);
    billing.shutdown().await;
}
