//! `choreo replay` against a real server while the handlers keep running:
//! after a bug dead-lettered ten events and was fixed, a replay from the
//! start brings each of them through once and re-runs nothing else; with
//! `--rerun` the handler runs again for every event while its emissions keep
//! their ids, so nothing downstream runs twice; bad input changes nothing.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Context, HandlerError, Publisher, State, event_handler};
use choreo_testkit::NatsServer;
use common::{Billed, InvoiceRequested, World, choreo, request, start, until};

#[event_handler(emits = [Billed], max_deliver = 1, ack_wait = "1s")]
async fn bill(
    r: InvoiceRequested,
    State(w): State<World>,
    ctx: Context,
) -> Result<(), HandlerError> {
    if w.bug.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("bug: the tax table is empty"));
    }
    if ctx.is_replay() {
        w.replays_seen.fetch_add(1, Ordering::SeqCst);
    }
    *w.billed
        .lock()
        .unwrap()
        .entry(r.order_id.clone())
        .or_default() += 1;
    w.ledger
        .lock()
        .unwrap()
        .insert(r.order_id.clone(), r.amount);
    ctx.emit(Billed {
        order_id: r.order_id,
        amount: r.amount,
    });
    Ok(())
}

#[event_handler(emits = [])]
async fn mail(b: Billed, State(w): State<World>) {
    w.mailed.lock().unwrap().entry(b.order_id).or_default().0 += 1;
}

async fn ack_floor(js: &jetstream::Context) -> u64 {
    let mut c: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("billing--bill", "INVOICES")
        .await
        .unwrap();
    c.info().await.unwrap().ack_floor.stream_sequence
}

// Several threads: the `choreo` commands block the test's thread while
// the services they act on keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_recovers_what_a_bug_dead_lettered_and_a_rerun_duplicates_nothing_downstream() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let w = World::default();
    let billing = start(&client, "billing", &w, bill).await;
    let mailer = start(&client, "mailer", &w, mail).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    request(&shop, "ok", 5, 10).await;
    until("5 mailed", || w.mailed.lock().unwrap().len() == 5).await;
    w.bug.store(true, Ordering::SeqCst);
    request(&shop, "bug", 10, 20).await;
    for _ in 0..100 {
        if ack_floor(&js).await == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ack_floor(&js).await, 15, "the ten were dead-lettered");

    // Bad input: one line, exit 2, the durable untouched.
    for (args, says) in [
        (
            vec!["replay", "billing", "nope", "--from", "1"],
            "service billing has no handler nope",
        ),
        (
            vec!["replay", "shipping", "bill", "--from", "1"],
            "no service shipping",
        ),
        (
            vec![
                "replay",
                "billing",
                "bill",
                "--from",
                "2099-01-01T00:00:00Z",
            ],
            "is in the future",
        ),
        (
            vec!["replay", "billing", "bill", "--from", "99999"],
            "ends at sequence 15; 99999 is past its end",
        ),
        (
            vec!["replay", "billing", "bill", "--from", "soon"],
            "neither a stream sequence nor an RFC 3339 time",
        ),
        (
            vec!["replay", "billing", "bill", "--from", "1", "--recreate"],
            "stop them before --recreate",
        ),
    ] {
        let (code, _, err) = choreo(&server, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(ack_floor(&js).await, 15, "nothing changed");

    // The bug is fixed; the dry run says exactly what will happen.
    w.bug.store(false, Ordering::SeqCst);
    let (code, out, err) = choreo(
        &server,
        &["replay", "billing", "bill", "--from", "1", "--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "would replay 15 events of billing.bill in INVOICES 1..=15: 5 already handled (skipped by the inbox), 10 to run\n"
    );
    let (code, out, err) = choreo(&server, &["replay", "billing", "bill", "--from", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("durable billing--bill reset by the server"),
        "{out}"
    );
    until("15 mailed", || w.mailed.lock().unwrap().len() == 15).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.billed.lock().unwrap().values().all(|n| *n == 1),
        "{:?}",
        w.billed.lock().unwrap()
    );
    assert!(
        w.mailed.lock().unwrap().values().all(|n| n.0 == 1),
        "{:?}",
        w.mailed.lock().unwrap()
    );
    assert_eq!(
        w.replays_seen.load(Ordering::SeqCst),
        10,
        "the ten knew they were replays"
    );

    // --rerun: the handler runs again for all 15, its emissions keep their
    // ids, and the mailer skips them.
    let (code, out, err) = choreo(
        &server,
        &["replay", "billing", "bill", "--from", "1", "--rerun"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("15 already handled (they run again: --rerun), 15 to run"),
        "{out}"
    );
    until("15 billed twice", || {
        w.billed.lock().unwrap().values().all(|n| *n == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.mailed.lock().unwrap().values().all(|n| n.0 == 1),
        "mailed again: {:?}",
        w.mailed.lock().unwrap()
    );
    assert_eq!(w.replays_seen.load(Ordering::SeqCst), 25);

    // The fallback for servers before 2.14: with the service stopped, the
    // durable is made again at the start, with its settings.
    billing.shutdown().await;
    let (code, out, err) = choreo(
        &server,
        &["replay", "billing", "bill", "--from", "1", "--recreate"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("durable billing--bill recreated at the start"),
        "{out}"
    );
    let mut c: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("billing--bill", "INVOICES")
        .await
        .unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(1),
        "its settings kept"
    );
    assert_eq!(info.num_pending, 15, "all 15 to deliver again");
    let billing = start(&client, "billing", &w, bill).await;
    for _ in 0..100 {
        if ack_floor(&js).await == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ack_floor(&js).await, 15);
    assert!(
        w.billed.lock().unwrap().values().all(|n| *n == 2),
        "the inbox skipped all 15"
    );
    billing.shutdown().await;
    mailer.shutdown().await;
}

/// An inbox written before records were grouped keeps `done <ms>` under
/// each event's own key: the plan counts those records with the grouped
/// ones, and `--rerun` forgets both kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_counts_and_forgets_records_from_before_groups() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let w = World::default();
    let mut billing = Some(start(&client, "billing", &w, bill).await);
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = shop
            .publish(&InvoiceRequested {
                order_id: format!("o-{i}"),
                amount: 10,
            })
            .await
            .unwrap();
        ids.push(r.event_id);
        if i == 2 {
            until("3 billed", || w.billed.lock().unwrap().len() == 3).await;
            if let Some(b) = billing.take() {
                b.shutdown().await;
            }
        }
    }
    // The last two were handled by a choreo from before groups.
    let inbox = js.get_key_value("choreo_inbox_billing").await.unwrap();
    for id in &ids[3..] {
        inbox
            .put(format!("bill.{id}"), "done 1700000000000".into())
            .await
            .unwrap();
    }
    let (code, out, err) = choreo(
        &server,
        &["replay", "billing", "bill", "--from", "1", "--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("5 events of billing.bill in INVOICES 1..=5: 5 already handled"),
        "{out}"
    );
    let (code, out, err) = choreo(
        &server,
        &[
            "replay",
            "billing",
            "bill",
            "--from",
            "1",
            "--rerun",
            "--recreate",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("recreated at the start"), "{out}");
    for id in &ids {
        assert_eq!(
            choreo::__private::inbox_handled_at(&js, "billing", "bill", *id).await,
            None,
            "{id} forgotten"
        );
    }
    let billing = start(&client, "billing", &w, bill).await;
    until("5 billed, the first 3 twice", || {
        let b = w.billed.lock().unwrap();
        b.len() == 5 && b.values().sum::<u32>() == 8
    })
    .await;
    billing.shutdown().await;
}

/// A rerun rebuilds a thrown-away read model identical to the first
/// build. Past the stream's duplicate window, its emissions are stored
/// again. Each copy says so (`choreo-replay: billing.bill`): the testkit
/// counts it as a replayed copy, not a duplicate, and the mailer's inbox
/// skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_rebuilds_the_read_model_and_past_the_duplicate_window_stores_marked_copies() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let w = World::default();
    let settings = choreo::StreamSettings::default().duplicate_window(Duration::from_millis(500));
    let billing = choreo::Service::new("billing")
        .state(w.clone())
        .handler(bill)
        .stream_settings(settings.clone())
        .start(client.clone())
        .await
        .unwrap();
    let mailer = choreo::Service::new("mailer")
        .state(w.clone())
        .handler(mail)
        .stream_settings(settings.clone())
        .start(client.clone())
        .await
        .unwrap();
    let shop = Publisher::new(client.clone(), "shop")
        .unwrap()
        .stream_settings(settings);
    let recorder = choreo_testkit::Recorder::streams(
        &client,
        &[
            <InvoiceRequested as choreo::Event>::STREAM,
            <common::Billed as choreo::Event>::STREAM,
        ],
    )
    .await
    .unwrap();
    request(&shop, "p", 3, 10).await;
    until("3 mailed", || w.mailed.lock().unwrap().len() == 3).await;
    // The read model is thrown away, to be rebuilt by the rerun.
    let first_build = std::mem::take(&mut *w.ledger.lock().unwrap());
    assert_eq!(first_build.len(), 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, out, err) = choreo(
        &server,
        &["replay", "billing", "bill", "--from", "1", "--rerun"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 already handled"), "{out}");
    until("3 billed twice", || {
        w.billed.lock().unwrap().values().all(|n| *n == 2)
    })
    .await;
    let marked = || {
        recorder
            .snapshot()
            .into_iter()
            .filter(|r| r.replay.as_deref() == Some("billing.bill"))
            .collect::<Vec<_>>()
    };
    assert_eq!(*w.ledger.lock().unwrap(), first_build, "rebuilt identical");
    until("3 marked copies", || marked().len() == 3).await;
    for r in marked() {
        assert_eq!(r.meta.event_type(), "Billed");
        let flow = recorder.flow(r.meta.correlation_id());
        assert_eq!(flow.replayed_copies(), &[r.meta.id()], "{}", flow.tree());
        flow.assert_no_duplicates().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.mailed.lock().unwrap().values().all(|m| m.0 == 1),
        "mailed again: {:?}",
        w.mailed.lock().unwrap()
    );
    billing.shutdown().await;
    mailer.shutdown().await;
}
