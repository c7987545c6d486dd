//! `choreo replay` of an ordered handler, against a real server while the
//! handler runs: its events are copied into its partitions in stream order.
//! Without `--rerun` the inbox skips every copy; with it, a thrown-away
//! read model is rebuilt identical, each key's events in order, and every
//! run knows it is a replay.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::{Context, HandlerError, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::{choreo, until};

#[event(subject = "steps.{account}.stepped", key = (account, n))]
pub struct Stepped {
    pub account: String,
    pub n: u32,
}

#[derive(Clone, Default)]
struct Ledger {
    /// The read model: each account's steps, in the order applied.
    log: Arc<Mutex<BTreeMap<String, Vec<u32>>>>,
    runs: Arc<AtomicU32>,
    replays: Arc<AtomicU32>,
    /// A step that fails for good when replayed.
    fail: Arc<Mutex<Option<(String, u32)>>>,
}

#[event_handler(ordered_by = account, partitions = 4, emits = [])]
async fn apply(s: Stepped, State(l): State<Ledger>, ctx: Context) -> Result<(), HandlerError> {
    l.runs.fetch_add(1, Ordering::SeqCst);
    if ctx.is_replay() {
        l.replays.fetch_add(1, Ordering::SeqCst);
        if *l.fail.lock().unwrap() == Some((s.account.clone(), s.n)) {
            return Err(HandlerError::permanent("a bad step"));
        }
    }
    l.log
        .lock()
        .unwrap()
        .entry(s.account)
        .or_default()
        .push(s.n);
    Ok(())
}

fn in_order(log: &BTreeMap<String, Vec<u32>>) -> bool {
    log.len() == 3 && log.values().all(|v| *v == [0, 1, 2, 3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_handler_is_replayed_in_order_through_its_partitions() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let l = Ledger::default();
    let ledger = Service::new("ledger")
        .state(l.clone())
        .handler(apply)
        .start(client.clone())
        .await
        .unwrap();
    let shop = Publisher::new(client.clone(), "bank").unwrap();
    for n in 0..4 {
        for a in ["a", "b", "c"] {
            shop.publish(&Stepped {
                account: a.into(),
                n,
            })
            .await
            .unwrap();
        }
    }
    until("12 steps applied in order", || {
        in_order(&l.log.lock().unwrap())
    })
    .await;

    let (code, out, err) = choreo(
        &server,
        &["replay", "ledger", "apply", "--from", "1", "--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "would replay 12 events of ledger.apply in STEPS 1..=12: 12 already handled (skipped by the inbox), 0 to run\n"
    );
    let (code, _, err) = choreo(
        &server,
        &["replay", "ledger", "apply", "--from", "1", "--recreate"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("--recreate does not apply"), "{err}");

    // Recovery: every copy goes through the partitions and is skipped.
    let skipped = || ledger.stats("apply").map_or(0, |s| s.skipped());
    let (code, out, err) = choreo(&server, &["replay", "ledger", "apply", "--from", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("12 events copied into the partitions of ledger--apply"),
        "{out}"
    );
    until("12 copies skipped", || skipped() == 12).await;
    assert_eq!(l.runs.load(Ordering::SeqCst), 12, "nothing ran again");

    // Rebuild: the read model is thrown away, and the rerun makes it again,
    // identical, each account in order, every run a replay.
    let first_build = std::mem::take(&mut *l.log.lock().unwrap());
    let (code, out, err) = choreo(
        &server,
        &["replay", "ledger", "apply", "--from", "1", "--rerun"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("12 events copied"), "{out}");
    until("rebuilt", || in_order(&l.log.lock().unwrap())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*l.log.lock().unwrap(), first_build, "rebuilt identical");
    assert_eq!(l.runs.load(Ordering::SeqCst), 24);
    assert_eq!(l.replays.load(Ordering::SeqCst), 12);

    // A copy that fails for good is dead-lettered under the original's
    // stream, sequence and subject (account b's step 2 was stored 8th).
    *l.fail.lock().unwrap() = Some(("b".into(), 2));
    let (code, _, err) = choreo(
        &server,
        &["replay", "ledger", "apply", "--from", "1", "--rerun"],
    );
    assert_eq!(code, Some(0), "{err}");
    let mut letters = Vec::new();
    for _ in 0..100 {
        let (_, out, _) = choreo(&server, &["dlq", "list", "--json"]);
        letters = serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_default();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["stream"], "STEPS", "{:#}", letters[0]);
    assert_eq!(letters[0]["stream_sequence"], 8, "{:#}", letters[0]);
    assert_eq!(letters[0]["subject"], "steps.b.stepped");
    ledger.shutdown().await;
}
