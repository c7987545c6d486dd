//! `choreo dlq` against a real server: a handler dead-letters ten events
//! because of a bug; the letters are listed, summed up and shown; bad input
//! changes nothing; the bug is fixed and `choreo dlq replay` brings each of
//! them through once, re-running nothing else and duplicating nothing
//! downstream; a corrected payload replays one letter; purge asks for --yes.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use choreo::{Context, HandlerError, Publisher, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::{Billed, InvoiceRequested, World, choreo, request, start, until};

#[event_handler(emits = [Billed], max_deliver = 1)]
async fn bill(
    r: InvoiceRequested,
    State(w): State<World>,
    ctx: Context,
) -> Result<(), HandlerError> {
    if r.amount == 0 {
        return Err(HandlerError::permanent("amount must be positive"));
    }
    if w.bug.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("bug: the tax table is empty"));
    }
    *w.billed
        .lock()
        .unwrap()
        .entry(r.order_id.clone())
        .or_default() += 1;
    ctx.emit(Billed {
        order_id: r.order_id,
        amount: r.amount,
    });
    Ok(())
}

#[event_handler(emits = [])]
async fn mail(b: Billed, State(w): State<World>) {
    let mut m = w.mailed.lock().unwrap();
    let e = m.entry(b.order_id).or_default();
    e.0 += 1;
    e.1 = b.amount;
}

fn letters(server: &NatsServer) -> Vec<serde_json::Value> {
    let (code, out, err) = choreo(server, &["dlq", "list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

// Several threads: the `choreo` commands block the test's thread while
// the services they act on keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_letters_from_a_bug_are_listed_shown_and_replayed_once_each_after_the_fix() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let w = World::default();
    let billing = start(&client, "billing", &w, bill).await;
    let mailer = start(&client, "mailer", &w, mail).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    request(&shop, "ok", 5, 10).await;
    until("5 billed", || w.billed.lock().unwrap().len() == 5).await;
    let recorder = choreo_testkit::Recorder::streams(
        &client,
        &[
            <InvoiceRequested as choreo::Event>::STREAM,
            <Billed as choreo::Event>::STREAM,
        ],
    )
    .await
    .unwrap();
    w.bug.store(true, Ordering::SeqCst);
    request(&shop, "bug", 10, 20).await;
    let mut list = Vec::new();
    for _ in 0..100 {
        list = letters(&server);
        if list.len() == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(list.len(), 10);
    assert!(
        list.iter()
            .all(|l| l["reason"] == "permanent-error" && l["handler"] == "bill")
    );
    // Letters come in the order the handler gave up, which its concurrency
    // decides.
    let bug0 = list
        .iter()
        .find(|l| l["payload"]["order_id"] == "bug-0")
        .unwrap_or_else(|| panic!("{list:?}"));

    // The summary, and one letter shown.
    let (code, out, _) = choreo(&server, &["dlq", "summary"]);
    assert_eq!(code, Some(0));
    let row = out
        .lines()
        .find(|l| l.starts_with("billing"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.split_whitespace()
            .take(4)
            .eq(["billing", "bill", "permanent-error", "10"]),
        "{row}"
    );
    let first = bug0["sequence"].as_u64().unwrap().to_string();
    let (code, out, _) = choreo(&server, &["dlq", "show", &first]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("detail: permanent error: bug: the tax table is empty"),
        "{out}"
    );
    assert!(out.contains("ce-type: InvoiceRequested"), "{out}");
    assert!(out.contains("\"order_id\": \"bug-0\""), "{out}");

    // Bad input: a clear line, exit 2, nothing changed.
    for (args, says) in [
        (
            vec!["dlq", "show", "9999"],
            "no dead letter at sequence 9999",
        ),
        (
            vec!["dlq", "replay", first.as_str(), "--payload", "{oops"],
            "the payload is not JSON",
        ),
        (vec!["dlq", "replay"], "say which letters"),
        (
            vec!["dlq", "replay", "--service", "nope", first.as_str()],
            "not both",
        ),
        (
            vec!["dlq", "list", "--reason", "sad"],
            "not a dead-letter reason",
        ),
        (vec!["dlq", "purge", "--all"], "run it again with --yes"),
    ] {
        let (code, _, err) = choreo(&server, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, out, _) = choreo(&server, &["dlq", "replay", "--all", "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("would replay 10 letters:"), "{out}");
    assert_eq!(out.lines().count(), 11, "{out}");
    assert_eq!(letters(&server).len(), 10, "nothing changed");

    // Fixed and replayed: each of the ten once, nothing else again.
    w.bug.store(false, Ordering::SeqCst);
    let (code, out, err) = choreo(&server, &["dlq", "replay", "--service", "billing"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.ends_with("replayed 10 letters\n"), "{out}");
    until("15 mailed", || w.mailed.lock().unwrap().len() == 15).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.billed.lock().unwrap().values().all(|n| *n == 1),
        "billed twice: {:?}",
        w.billed.lock().unwrap()
    );
    assert!(
        w.mailed.lock().unwrap().values().all(|m| m.0 == 1),
        "mailed twice: {:?}",
        w.mailed.lock().unwrap()
    );
    assert!(letters(&server).is_empty());
    // The testkit tells the ten replayed copies from duplicates: each flow
    // has its one replayed copy, marked with its letter, and no duplicate.
    let replayed: Vec<choreo_testkit::Recorded> = recorder
        .snapshot()
        .into_iter()
        .filter(|r| r.replay.is_some())
        .collect();
    assert_eq!(replayed.len(), 10, "{replayed:?}");
    for r in &replayed {
        assert!(r.replay.as_deref().unwrap().starts_with("dlq "), "{r:?}");
        let flow = recorder.flow(r.meta.correlation_id());
        assert_eq!(flow.replayed_copies(), &[r.meta.id()]);
        flow.assert_no_duplicates().unwrap();
        assert_eq!(flow.count::<Billed>(), 1, "{}", flow.tree());
    }
    // `choreo trace` tells the copy from its original: the original is
    // dead-lettered then replayed, the copy (marked with its letter) is
    // handled, and what the replay emitted shows once, under the copy.
    let copy = &replayed[0];
    let letter = copy
        .replay
        .as_deref()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(
        copy.replay.as_deref(),
        Some(format!("dlq {letter} billing.bill").as_str())
    );
    let correlation = copy.meta.correlation_id().to_string();
    let (code, tree, err) = choreo(&server, &["trace", &correlation, "--no-times"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = tree.lines().collect();
    let original = lines
        .iter()
        .position(|l| l.contains("InvoiceRequested") && !l.contains("replay"))
        .unwrap_or_else(|| panic!("{tree}"));
    assert!(
        lines[original + 1].contains(&format!(
            "billing.bill: dead-lettered, then replayed (letter #{letter})"
        )),
        "{tree}"
    );
    let marked = lines
        .iter()
        .position(|l| l.contains(&format!("(replay of dead letter #{letter})")))
        .unwrap_or_else(|| panic!("{tree}"));
    assert!(
        lines[marked + 1].contains("billing.bill: handled"),
        "{tree}"
    );
    assert_eq!(tree.matches("InvoiceRequested").count(), 2, "{tree}");
    assert_eq!(tree.matches("Billed").count(), 1, "{tree}");
    assert!(!tree.contains("duplicate"), "{tree}");
    let (_, json, _) = choreo(&server, &["trace", &correlation, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let replays: Vec<&serde_json::Value> = v["flows"][0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["replay"].is_null())
        .collect();
    assert_eq!(replays.len(), 1, "{json}");
    assert_eq!(replays[0]["replay"], format!("dlq {letter} billing.bill"));

    // A corrected payload: the handler decides, and takes it.
    shop.publish(&InvoiceRequested {
        order_id: "zero".into(),
        amount: 0,
    })
    .await
    .unwrap();
    let mut seq = String::new();
    until("the zero letter", || {
        let l = letters(&server);
        if let Some(first) = l.first() {
            seq = first["sequence"].to_string();
        }
        l.len() == 1
    })
    .await;
    let (code, _, err) = choreo(
        &server,
        &[
            "dlq",
            "replay",
            &seq,
            "--payload",
            r#"{"order_id": "zero", "amount": 5}"#,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    until("zero mailed", || {
        w.mailed.lock().unwrap().get("zero") == Some(&(1, 5))
    })
    .await;

    // Purge asks first, then deletes.
    w.bug.store(true, Ordering::SeqCst);
    request(&shop, "late", 2, 1).await;
    until("2 letters", || letters(&server).len() == 2).await;
    let (code, out, err) = choreo(
        &server,
        &["dlq", "purge", "--reason", "permanent-error", "--yes"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "purged 2 letters\n");
    assert!(letters(&server).is_empty());
    billing.shutdown().await;
    mailer.shutdown().await;
}

/// A refund whose event carries its JSON Schema (`#[event(schema)]`).
#[event(subject = "refunds.{order_id}.requested", key = order_id, schema)]
#[derive(schemars::JsonSchema)]
pub struct RefundRequested {
    pub order_id: String,
    pub amount: u64,
}

/// Refunds, refusing a zero amount for good.
#[event_handler(emits = [], max_deliver = 1)]
async fn refund(r: RefundRequested, State(w): State<World>) -> Result<(), HandlerError> {
    if r.amount == 0 {
        return Err(HandlerError::permanent("amount must be positive"));
    }
    *w.billed.lock().unwrap().entry(r.order_id).or_default() += 1;
    Ok(())
}

/// A corrected payload is checked against the event's schema before
/// anything is replayed, `--dry-run` included: a payload that does not fit
/// is refused with where it does not; one that fits is replayed. A letter
/// whose event has no schema says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_payload_is_checked_against_the_event_schema() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let w = World::default();
    let refunds = start(&client, "refunds", &w, refund).await;
    let billing = start(&client, "billing", &w, bill).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    shop.publish(&RefundRequested {
        order_id: "r-1".into(),
        amount: 0,
    })
    .await
    .unwrap();
    request(&shop, "zero", 1, 0).await;
    until("two letters", || letters(&server).len() == 2).await;
    let seq_of = |event: &str| {
        letters(&server)
            .iter()
            .find(|l| l["event_type"] == event)
            .unwrap_or_else(|| panic!("no {event} letter"))["sequence"]
            .to_string()
    };
    let refund_letter = seq_of("RefundRequested");
    for (payload, says) in [
        (r#"{"order_id": "r-1", "amount": "five"}"#, "at /amount"),
        (r#"{"order_id": "r-1"}"#, "amount"),
    ] {
        for dry in [true, false] {
            let mut args = vec![
                "dlq",
                "replay",
                refund_letter.as_str(),
                "--payload",
                payload,
            ];
            if dry {
                args.push("--dry-run");
            }
            let (code, _, err) = choreo(&server, &args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(
                err.contains("does not match the schema of RefundRequested v1")
                    && err.contains(says),
                "{args:?}: {err}"
            );
        }
    }
    assert_eq!(letters(&server).len(), 2, "nothing replayed");
    let (code, out, err) = choreo(
        &server,
        &[
            "dlq",
            "replay",
            &refund_letter,
            "--payload",
            r#"{"order_id": "r-1", "amount": 7}"#,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("the corrected payload matches the schema of RefundRequested v1"),
        "{out}"
    );
    until("refunded", || {
        w.billed.lock().unwrap().get("r-1") == Some(&1)
    })
    .await;
    // No schema for InvoiceRequested: said, and the handler decides.
    let invoice_letter = seq_of("InvoiceRequested");
    let (code, _, err) = choreo(
        &server,
        &[
            "dlq",
            "replay",
            &invoice_letter,
            "--payload",
            r#"{"order_id": "zero-0", "amount": 3}"#,
            "--dry-run",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("no schema is known for InvoiceRequested v1"),
        "{err}"
    );
    refunds.shutdown().await;
    billing.shutdown().await;
}
