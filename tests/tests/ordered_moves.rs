//! An ordered handler's partitions moving between instances, against a real
//! server: a partition given up to a new instance while its last holder
//! still runs that partition's events (the new holder waits for them), and
//! a graceful stop that hands its partitions on at once rather than after
//! the pin timeout.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use choreo::__private::FaultPoint;
use choreo::{Context, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "moves.{account}.stepped", key = (account, n))]
pub struct Moved {
    pub account: String,
    pub n: u32,
}

#[derive(Clone, Copy)]
struct Tag(u32);

#[derive(Clone, Default)]
struct Log {
    /// (account, n, instance), in the order the handlers finished.
    ran: Arc<Mutex<Vec<(String, u32, u32)>>>,
    running: Arc<Mutex<HashSet<String>>>,
    overlaps: Arc<Mutex<Vec<String>>>,
    /// When the last event finished.
    last: Arc<Mutex<Option<Instant>>>,
}

impl Log {
    fn by_account(&self) -> HashMap<String, Vec<u32>> {
        let mut out: HashMap<String, Vec<u32>> = HashMap::new();
        for (a, n, _) in self.ran.lock().unwrap().iter() {
            out.entry(a.clone()).or_default().push(*n);
        }
        out
    }
    fn ran_by(&self, tag: u32) -> usize {
        self.ran
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.2 == tag)
            .count()
    }
    fn count(&self) -> usize {
        self.ran.lock().unwrap().len()
    }
    /// Every account's steps once, in order, none of one account at once.
    fn check(&self, accounts: u32, steps: u32) {
        assert_eq!(self.overlaps.lock().unwrap().clone(), Vec::<String>::new());
        let by = self.by_account();
        assert_eq!(by.len(), accounts as usize);
        for (a, ns) in by {
            assert_eq!(
                ns,
                (0..steps).collect::<Vec<_>>(),
                "{a} in order, once each"
            );
        }
    }
}

/// Each step takes 100 ms, so a key's events wait behind each other.
#[event_handler(ordered_by = account, partitions = 2, emits = [])]
async fn slow_step(m: Moved, State(log): State<Log>, State(tag): State<Tag>, ctx: Context) {
    let _ = ctx;
    if !log.running.lock().unwrap().insert(m.account.clone()) {
        log.overlaps.lock().unwrap().push(m.account.clone());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    log.running.lock().unwrap().remove(&m.account);
    log.ran
        .lock()
        .unwrap()
        .push((m.account.clone(), m.n, tag.0));
    *log.last.lock().unwrap() = Some(Instant::now());
}

fn service(log: &Log, tag: u32) -> Service {
    Service::new("moves")
        .state(log.clone())
        .state(Tag(tag))
        .registry_heartbeat(Duration::from_millis(200))
        .handler(slow_step)
}

async fn publish_steps(client: &choreo::async_nats::Client, accounts: u32, steps: u32) {
    let publisher = Publisher::new(client.clone(), "teller").unwrap();
    for n in 0..steps {
        for k in 0..accounts {
            publisher
                .publish(&Moved {
                    account: format!("acct-{k}"),
                    n,
                })
                .await
                .unwrap();
        }
    }
}

/// The first instance takes both partitions and the window of 64 events of
/// each; a second instance makes it give one up while it still runs (and
/// holds) that partition's earlier steps. The new holder gets the later
/// steps at once, and must wait for the earlier ones to finish there: no
/// account runs out of order or two steps at once.
#[tokio::test]
async fn a_partition_given_up_waits_for_the_events_its_last_holder_still_runs() {
    let (_server, _log, first, second) = second_takes_over(|s| s).await;
    second.shutdown().await;
    first.shutdown().await;
}

/// 8 accounts × 80 steps of 100 ms, 8 s per account (far more than the two
/// partitions' windows, 2 × 64, at once): the first instance takes both
/// partitions, then a second instance (made by `second`) starts and takes
/// one while the first still runs its steps. Returns (the server, the log
/// and both instances) once every step ran, each account's in order and
/// none two at once.
async fn second_takes_over(
    second: impl FnOnce(Service) -> Service,
) -> (
    NatsServer,
    Log,
    choreo::ServiceHandle,
    choreo::ServiceHandle,
) {
    const ACCOUNTS: u32 = 8;
    const STEPS: u32 = 80;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let log = Log::default();
    publish_steps(&client, ACCOUNTS, STEPS).await;
    let first = service(&log, 0).start(client.clone()).await.unwrap();
    common::eventually(Duration::from_secs(10), "the first instance runs", || {
        log.count() >= 8
    })
    .await;
    let second = second(service(&log, 1))
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    common::eventually(Duration::from_secs(60), "every step handled", || {
        log.count() >= (ACCOUNTS * STEPS) as usize
    })
    .await;
    log.check(ACCOUNTS, STEPS);
    assert!(log.ran_by(1) > 0, "the second instance took a partition");
    (server, log, first, second)
}

/// As above, but the new holder's reads of what the last holder left fail
/// (a fault hook fails the first five): it must not go on without them. It
/// waits, tries again, says so with the partition, and runs every account
/// in order once a read succeeds.
#[tokio::test]
async fn a_take_over_that_cannot_read_what_was_left_waits_and_tries_again() {
    const FAILURES: u32 = 5;
    let (logs, _guard) = common::capture_logs("choreo=info");
    let reads = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = reads.clone();
    let (_server, _log, first, second) = second_takes_over(|s| {
        s.fault_hook(Arc::new(move |point, _| {
            point == FaultPoint::TakeOverRead
                && counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < FAILURES
        }))
    })
    .await;
    let tried = reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        tried > FAILURES,
        "read {tried} times: failed reads are tried again"
    );
    assert_eq!(
        second.stats("slow_step").unwrap().take_over_retries(),
        u64::from(FAILURES)
    );
    let text = logs.text();
    let warning = text
        .lines()
        .find(|l| l.contains("cannot read what the last holder left"))
        .unwrap_or_else(|| panic!("no warning in:\n{text}"));
    assert!(
        warning.contains("WARN")
            && warning.contains("partition=")
            && warning.contains("tries again"),
        "{warning}"
    );
    assert!(
        text.contains("read what the last holder left; the partition goes on"),
        "{text}"
    );
    second.shutdown().await;
    first.shutdown().await;
}

/// A graceful stop finishes its events and unpins its partitions: the
/// other instance goes on at once, not after the pin timeout (the
/// consumer's `ack_wait`, 30 s here).
#[tokio::test]
async fn a_graceful_stop_hands_its_partitions_on_at_once() {
    const ACCOUNTS: u32 = 8;
    const STEPS: u32 = 100;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let log = Log::default();
    let first = service(&log, 0).start(client.clone()).await.unwrap();
    let second = service(&log, 1)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    // 10 s of steps per account.
    publish_steps(&client, ACCOUNTS, STEPS).await;
    // Both run a partition each once the first gave one up.
    common::eventually(Duration::from_secs(20), "both instances run", || {
        log.ran_by(0) > 0 && log.ran_by(1) > 0
    })
    .await;
    let stopping = Instant::now();
    first.shutdown().await;
    let stopped = stopping.elapsed();
    let at_stop = log.count();
    assert!(
        at_stop < (ACCOUNTS * STEPS) as usize,
        "steps were left when the first instance stopped"
    );
    common::eventually(Duration::from_secs(60), "every step handled", || {
        log.count() >= (ACCOUNTS * STEPS) as usize
    })
    .await;
    let last = log.last.lock().unwrap().unwrap();
    let after_stop = last.saturating_duration_since(stopping + stopped);
    println!(
        "stop took {stopped:?}; {} steps left, run within {after_stop:?} of it",
        (ACCOUNTS * STEPS) as usize - at_stop
    );
    log.check(ACCOUNTS, STEPS);
    // What was left: under 100 steps of 100 ms per account, in parallel
    // over the accounts: under 10 s. A pin left to time out would add 30 s.
    assert!(
        after_stop < Duration::from_secs(20),
        "the rest took {after_stop:?} after the stop"
    );
    second.shutdown().await;
}
