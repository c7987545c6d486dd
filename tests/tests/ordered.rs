//! Ordered handlers (`#[event_handler(ordered_by = account)]`) against a real server:
//! each key's events run one at a time and in publish order across several
//! instances, through an instance killed and a new one started mid-run; a
//! failing event holds back its own key only; a slow key does not hold up
//! the others, not even those of its own partition.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::{Context, HandlerError, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "ledger.{account}.stepped", key = (account, n))]
pub struct Stepped {
    pub account: String,
    pub n: u32,
}

/// What the handlers did, in the order they did it.
#[derive(Clone, Default)]
struct Log {
    /// (account, n, idempotency key), in the order the handlers ran.
    ran: Arc<Mutex<Vec<(String, u32, String)>>>,
    /// Accounts with a handler running now.
    running: Arc<Mutex<HashSet<String>>>,
    /// Two events of one account ran at once.
    overlaps: Arc<Mutex<Vec<String>>>,
    /// How many events each instance ran (by its tag).
    per_instance: Arc<Mutex<HashMap<u32, usize>>>,
    /// When each account's last event ran, and the longest wait between
    /// two events of one account.
    last: Arc<Mutex<(HashMap<String, std::time::Instant>, Duration)>>,
}

/// Which instance of the ledger this is.
#[derive(Clone, Copy)]
struct Tag(u32);

/// An account's handler running; dropped when it ends, or when the
/// killed instance drops its future.
struct Running(Arc<Mutex<HashSet<String>>>, String);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

impl Log {
    fn enter(&self, account: &str) -> Running {
        if !self.running.lock().unwrap().insert(account.to_owned()) {
            self.overlaps.lock().unwrap().push(account.to_owned());
        }
        Running(self.running.clone(), account.to_owned())
    }
    fn leave(&self, account: &str, n: u32, key: String) {
        self.ran.lock().unwrap().push((account.to_owned(), n, key));
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap();
        if let Some(before) = last.0.insert(account.to_owned(), now) {
            last.1 = last.1.max(now - before);
        }
    }
    fn distinct(&self) -> usize {
        self.ran
            .lock()
            .unwrap()
            .iter()
            .map(|r| &r.2)
            .collect::<HashSet<_>>()
            .len()
    }
    /// Each account's `n`s in the order they ran.
    fn by_account(&self) -> HashMap<String, Vec<u32>> {
        let mut out: HashMap<String, Vec<u32>> = HashMap::new();
        for (a, n, _) in self.ran.lock().unwrap().iter() {
            out.entry(a.clone()).or_default().push(*n);
        }
        out
    }
}

#[event_handler(ordered_by = account, emits = [], ack_wait = "2s", backoff = ["100ms"])]
async fn apply(s: Stepped, State(log): State<Log>, State(tag): State<Tag>, ctx: Context) {
    let _running = log.enter(&s.account);
    *log.per_instance.lock().unwrap().entry(tag.0).or_default() += 1;
    // Long enough for events to pile up behind each other.
    if s.n.is_multiple_of(7) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    } else {
        tokio::task::yield_now().await;
    }
    log.leave(&s.account, s.n, ctx.idempotency_key());
}

fn ledger(log: &Log, tag: u32) -> Service {
    Service::new("ledger")
        .state(log.clone())
        .state(Tag(tag))
        .registry_heartbeat(Duration::from_millis(200))
        .handler(apply)
}

#[tokio::test]
async fn each_keys_events_run_in_order_across_instances_through_a_kill_and_a_new_instance() {
    const KEYS: u32 = 1_000;
    const STEPS: u32 = 20;
    let server = NatsServer::start().await.unwrap();
    let log = Log::default();
    let mut instances = Vec::new();
    for tag in 0..3 {
        let client = server.connect().await.unwrap();
        instances.push(ledger(&log, tag).start(client).await.unwrap());
    }
    let publisher = Publisher::new(server.connect().await.unwrap(), "teller").unwrap();
    // Interleaved: step 0 of every account, then step 1, ...
    let feeding = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let events: Vec<(u32, u32)> = (0..STEPS)
                .flat_map(|n| (0..KEYS).map(move |k| (k, n)))
                .collect();
            // About 2,500 a second, so the run lasts through the sharing
            // out, the kill and the new instance.
            for chunk in events.chunks(250) {
                futures::stream::iter(chunk.iter().copied())
                    .map(|(k, n)| {
                        let p = publisher.clone();
                        async move {
                            p.publish(&Stepped {
                                account: format!("acct-{k}"),
                                n,
                            })
                            .await
                            .unwrap()
                        }
                    })
                    .buffered(64)
                    .collect::<Vec<_>>()
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let total = (KEYS * STEPS) as usize;
    common::eventually(Duration::from_secs(120), "a quarter handled", || {
        log.distinct() >= total / 4
    })
    .await;
    // The partitions are shared out: every instance runs events (the first
    // one started took them all, and lets the extra ones go once the
    // registry shows the others).
    let started = std::time::Instant::now();
    common::eventually(
        Duration::from_secs(30),
        "every instance runs a share",
        || {
            let per = log.per_instance.lock().unwrap();
            (0..3).all(|t| per.get(&t).copied().unwrap_or(0) > 0)
        },
    )
    .await;
    println!(
        "shared out {:.1} s after a quarter was handled: {:?}",
        started.elapsed().as_secs_f64(),
        log.per_instance.lock().unwrap()
    );
    // kill -9 of one instance: its tasks stop where they are, nothing is
    // acknowledged or handed back.
    instances.remove(0).abort();
    let killed_at = std::time::Instant::now();
    instances.push(
        ledger(&log, 3)
            .start(server.connect().await.unwrap())
            .await
            .unwrap(),
    );
    feeding.await.unwrap();
    let fed_at = std::time::Instant::now();
    common::eventually(Duration::from_secs(180), "every event handled", || {
        log.distinct() >= total
    })
    .await;
    let per_instance = log.per_instance.lock().unwrap().clone();
    let after_feed = fed_at.elapsed();
    println!(
        "all handled {:.1} s after the kill, {:.1} s after the last publish; events run per instance: {per_instance:?}",
        killed_at.elapsed().as_secs_f64(),
        after_feed.as_secs_f64()
    );
    // The killed instance's partitions moved within the documented bound:
    // the pin timeout (ack_wait, 2 s) plus an ack_wait for the events it
    // held to come back. An account's events come 0.4 s apart; the longest
    // wait between two of one account is the move. A wide margin for a
    // slow machine.
    let gap = log.last.lock().unwrap().1;
    println!("longest wait between two events of one account: {gap:?}");
    assert!(gap < Duration::from_secs(15), "an account waited {gap:?}");
    assert!(
        after_feed < Duration::from_secs(30),
        "the last events took {after_feed:?}"
    );
    assert!(
        per_instance.get(&3).copied().unwrap_or(0) > 0,
        "the new instance takes a share: {per_instance:?}"
    );

    assert_eq!(
        log.overlaps.lock().unwrap().clone(),
        Vec::<String>::new(),
        "two events of one account ran at once"
    );
    let by_account = log.by_account();
    assert_eq!(by_account.len(), KEYS as usize);
    let mut reruns = 0;
    for (account, ns) in &by_account {
        // In publish order; an event the killed instance was running may
        // run again, right after itself, never after a later one.
        assert!(
            ns.windows(2).all(|w| w[0] <= w[1]),
            "{account} ran out of order: {ns:?}"
        );
        let distinct: Vec<u32> = {
            let mut d = ns.clone();
            d.dedup();
            d
        };
        assert_eq!(
            distinct,
            (0..STEPS).collect::<Vec<_>>(),
            "{account}: every step once"
        );
        reruns += ns.len() - distinct.len();
    }
    // `choreo status` reads the 16 partitions as one handler.
    let js = choreo::async_nats::jetstream::new(server.connect().await.unwrap());
    let mut seen = None;
    for _ in 0..50 {
        let s = choreo::admin::status(&js, Duration::from_millis(200))
            .await
            .unwrap();
        if let Some(h) = s.handlers.iter().find(|h| h.durable == "ledger--apply")
            && h.lag_messages == Some(0)
            // Keys on the server: record groups, not one per event.
            && h.inbox_keys.is_some_and(|k| k > 0 && k <= u64::from(choreo::DEFAULT_INBOX_GROUPS))
            && choreo::__private::inbox_records(&js, "ledger", "apply").await.ok()
                == Some(u64::from(KEYS * STEPS))
        {
            seen = Some((h.state, h.stream.clone(), s.handlers.len()));
            break;
        }
    }
    assert_eq!(
        seen,
        Some((choreo::admin::State::Ok, "LEDGER".to_owned(), 1)),
        "status shows the ordered handler once, done"
    );
    // At most the events in flight on the killed instance (a window per
    // partition it held).
    assert!(
        reruns <= choreo::PARTITION_WINDOW * usize::from(choreo::DEFAULT_PARTITIONS),
        "{reruns} re-runs"
    );
    for i in instances {
        i.shutdown().await;
    }
}

static FAILS_LEFT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(2);

/// `acct-bad` step 3 fails twice, then succeeds; step 6 always fails and is
/// dead-lettered; `acct-slow` step 0 takes 3 s.
#[event_handler(ordered_by = account, name = "apply", emits = [], max_deliver = 3, ack_wait = "5s", backoff = ["200ms"])]
async fn picky(s: Stepped, State(log): State<Log>, ctx: Context) -> Result<(), HandlerError> {
    let _running = log.enter(&s.account);
    if s.account == "acct-slow" && s.n == 0 {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if s.account == "acct-bad"
        && ((s.n == 3
            && FAILS_LEFT
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |f| f.checked_sub(1),
                )
                .is_ok())
            || s.n == 6)
    {
        return Err(HandlerError::retryable(format!(
            "step {} is not ready",
            s.n
        )));
    }
    log.leave(&s.account, s.n, ctx.idempotency_key());
    Ok(())
}

#[tokio::test]
async fn a_failure_holds_back_its_own_key_and_a_slow_key_holds_up_no_other_key() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let log = Log::default();
    let svc = Service::new("picky")
        .state(log.clone())
        .handler(picky)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "teller").unwrap();
    for n in 0..10 {
        for account in ["acct-bad", "acct-slow"] {
            publisher
                .publish(&Stepped {
                    account: account.into(),
                    n,
                })
                .await
                .unwrap();
        }
    }
    for k in 0..64 {
        publisher
            .publish(&Stepped {
                account: format!("acct-{k}"),
                n: 0,
            })
            .await
            .unwrap();
    }
    // While acct-slow sleeps, the accounts in other partitions go through.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let done_early = log
        .by_account()
        .keys()
        .filter(|a| a.starts_with("acct-") && a[5..].parse::<u32>().is_ok())
        .count();
    assert!(
        !log.by_account().contains_key("acct-slow"),
        "acct-slow's first step is still sleeping"
    );
    // Every one: keys run in parallel within a partition too, so even the
    // accounts that share acct-slow's partition went on.
    assert_eq!(
        done_early, 64,
        "only {done_early} of 64 other accounts went through while acct-slow slept"
    );

    // acct-bad: 3 waited for its retries, 6 was dead-lettered, the rest ran
    // in order after them.
    common::eventually(
        Duration::from_secs(30),
        "acct-bad and acct-slow done",
        || {
            let b = log.by_account();
            b.get("acct-bad").is_some_and(|v| v.len() == 9)
                && b.get("acct-slow").is_some_and(|v| v.len() == 10)
        },
    )
    .await;
    let b = log.by_account();
    assert_eq!(b["acct-bad"], vec![0, 1, 2, 3, 4, 5, 7, 8, 9]);
    assert_eq!(b["acct-slow"], (0..10).collect::<Vec<_>>());
    let letters = common::dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        common::header(&letters[0], "choreo-dlq-subject").as_deref(),
        Some("ledger.acct-bad.stepped")
    );
    // It names the event where it is stored, in LEDGER (acct-bad's step 6
    // was the 13th event published), not in the partition stream's copy.
    assert_eq!(
        common::header(&letters[0], "choreo-dlq-stream").as_deref(),
        Some("LEDGER")
    );
    assert_eq!(
        common::header(&letters[0], "choreo-dlq-sequence").as_deref(),
        Some("13")
    );
    assert!(log.overlaps.lock().unwrap().is_empty());
    svc.shutdown().await;
}

#[event_handler(name = "apply", emits = [])]
async fn unordered(s: Stepped, State(log): State<Log>, ctx: Context) {
    let _running = log.enter(&s.account);
    tokio::time::sleep(Duration::from_millis(u64::from(s.n % 3))).await;
    log.leave(&s.account, s.n, ctx.idempotency_key());
}

/// The check above can fail: the same flow through an unordered handler
/// runs one account's events at once and out of order.
#[tokio::test]
async fn without_ordering_the_same_flow_overlaps_and_reorders() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let log = Log::default();
    // All stored before the service starts, so it pulls them as one backlog
    // and runs many at once. (Published one by one to a running service,
    // each could be done before the next arrived: a CI run once saw no
    // overlap and no reordering that way.)
    let publisher = Publisher::new(client.clone(), "teller").unwrap();
    for n in 0..50 {
        for k in 0..4 {
            publisher
                .publish(&Stepped {
                    account: format!("acct-{k}"),
                    n,
                })
                .await
                .unwrap();
        }
    }
    let svc = Service::new("loose")
        .state(log.clone())
        .handler(unordered)
        .start(client.clone())
        .await
        .unwrap();
    common::eventually(Duration::from_secs(30), "all handled", || {
        log.distinct() >= 200
    })
    .await;
    let out_of_order = log
        .by_account()
        .values()
        .filter(|ns| ns.windows(2).any(|w| w[0] > w[1]))
        .count();
    let overlaps = log.overlaps.lock().unwrap().len();
    assert!(
        overlaps > 0 || out_of_order > 0,
        "overlaps {overlaps}, accounts out of order {out_of_order}"
    );
    svc.shutdown().await;
}

/// An ordered service runs with exactly `Service::permissions()`: its
/// partition stream and durables are in it.
#[tokio::test]
async fn an_ordered_service_runs_with_its_documented_permissions() {
    let api = Default::default();
    let log = Log::default();
    let needs = ledger(&log, 0).permissions();
    let teller = choreo::Permissions::publisher("teller", &api).publishes::<Stepped>(&api);
    let config = format!(
        "authorization {{ users = [ \
           {{ user: ledger, password: pw, permissions: {} }}, \
           {{ user: teller, password: pw, permissions: {} }} ] }}",
        needs.to_config(),
        teller.to_config()
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let as_user = |name: &'static str| {
        let url = server.url();
        async move {
            let opts = choreo::async_nats::ConnectOptions::with_user_and_password(
                name.into(),
                "pw".into(),
            )
            .request_timeout(Some(Duration::from_secs(2)));
            choreo::connect(&url, opts).await.unwrap()
        }
    };
    let svc = ledger(&log, 0)
        .start_timeout(Duration::from_secs(5))
        .start(as_user("ledger").await)
        .await
        .unwrap();
    let publisher = Publisher::new(as_user("teller").await, "teller").unwrap();
    for n in 0..10 {
        for k in 0..5 {
            publisher
                .publish(&Stepped {
                    account: format!("acct-{k}"),
                    n,
                })
                .await
                .unwrap();
        }
    }
    common::eventually(Duration::from_secs(20), "50 handled", || {
        log.distinct() >= 50
    })
    .await;
    for ns in log.by_account().values() {
        assert_eq!(ns, &(0..10).collect::<Vec<_>>());
    }
    svc.shutdown().await;
}
