//! Effects exactly once on at-least-once delivery: both dedup layers, a crash
//! at every step of handle → emit → record → ack (one of them a real child
//! process killed with SIGKILL), and two instances racing for one event.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use choreo::__private::FaultPoint;
use choreo::async_nats::{self, jetstream};
use choreo::{
    Context, EventId, HandlerError, Publisher, Service, ServiceHandle, State, StreamSettings,
    event, event_handler,
};
use choreo_testkit::NatsServer;
use common::{eventually, header, stream_messages};
use futures::StreamExt;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "payments.{order_id}.captured")]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.receipt")]
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptIssued {
    pub order_id: String,
}

/// The handler's user-visible effect, done the way the README tells users:
/// keyed by `ctx.idempotency_key()` in a store that refuses a second write
/// (here a JetStream KV bucket, so it survives a killed process).
#[derive(Clone)]
struct Effects {
    store: jetstream::kv::Store,
    invocations: Arc<AtomicU32>,
    block_first_for: Option<Duration>,
    /// With `block_first_for`: await a short timer first, so the blocking
    /// poll is one woken by the runtime's driver.
    await_before_blocking: bool,
    sleep_first_for: Option<Duration>,
}

impl Effects {
    async fn new(client: &async_nats::Client) -> Self {
        let js = jetstream::new(client.clone());
        let store = match js.get_key_value("effects").await {
            Ok(s) => s,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: "effects".into(),
                    history: 10,
                    ..Default::default()
                })
                .await
                .unwrap(),
        };
        Self {
            store,
            invocations: Arc::new(AtomicU32::new(0)),
            block_first_for: None,
            await_before_blocking: false,
            sleep_first_for: None,
        }
    }
}

#[event_handler(ack_wait = "1s", backoff = ["100ms"])]
async fn charge(
    order: OrderPlaced,
    ctx: Context,
    State(fx): State<Effects>,
) -> Result<(), HandlerError> {
    let n = fx.invocations.fetch_add(1, Ordering::SeqCst);
    if n == 0
        && let Some(d) = fx.block_first_for
    {
        if fx.await_before_blocking {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A handler that blocks its thread.
        std::thread::sleep(d);
    }
    if n == 0
        && let Some(d) = fx.sleep_first_for
    {
        tokio::time::sleep(d).await;
    }
    // The charge itself: once per idempotency key, however often we run.
    let key = ctx.idempotency_key().replace(':', "_");
    match fx.store.create(&key, "charged".into()).await {
        Ok(_) => {}
        Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(HandlerError::retryable(e)),
    }
    ctx.emit(PaymentCaptured {
        order_id: order.order_id.clone(),
    });
    ctx.emit(ReceiptIssued {
        order_id: order.order_id,
    });
    Ok(())
}

#[event_handler(idempotent = false)]
async fn count_without_inbox(_order: OrderPlaced, State(fx): State<Effects>) {
    fx.invocations.fetch_add(1, Ordering::SeqCst);
}

async fn effect_count(fx: &Effects) -> usize {
    let mut keys = fx.store.keys().await.unwrap();
    let mut n = 0;
    while let Some(k) = keys.next().await {
        k.unwrap();
        n += 1;
    }
    n
}

async fn settled(client: &async_nats::Client) -> bool {
    let js = jetstream::new(client.clone());
    let Ok(stream) = js.get_stream("ORDERS").await else {
        return false;
    };
    let Ok(mut c) = stream
        .get_consumer::<jetstream::consumer::pull::Config>("payments--charge")
        .await
    else {
        return false;
    };
    let info = c.info().await.unwrap();
    info.num_pending == 0 && info.num_ack_pending == 0
}

/// Downstream events: each exists exactly once per id, and there are `n` ids.
async fn assert_downstream_once(client: &async_nats::Client, n: usize) {
    let msgs = stream_messages(client, "PAYMENTS").await;
    let ids: Vec<String> = msgs.iter().map(|m| header(m, "ce-id").unwrap()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "a downstream event id was stored twice: {ids:?}"
    );
    assert_eq!(ids.len(), n, "downstream events: {ids:?}");
}

/// `n` orders, each handled once: `n` invocations, `n` charges, and the two
/// downstream events of each stored once.
async fn assert_each_handled_once(fx: &Effects, client: &async_nats::Client, n: usize) {
    assert_eq!(
        fx.invocations.load(Ordering::SeqCst) as usize,
        n,
        "handler invocations for {n} orders"
    );
    assert_eq!(effect_count(fx).await, n, "charges for {n} orders");
    assert_downstream_once(client, 2 * n).await;
}

async fn wait_settled(client: &async_nats::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !settled(client).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the order was never acked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn inbox_says_done(client: &async_nats::Client, event: EventId) -> bool {
    let js = jetstream::new(client.clone());
    choreo::__private::inbox_handled_at(&js, "payments", "charge", event)
        .await
        .is_some()
}

/// A server whose streams keep a 500 ms duplicate window, so a test can
/// publish a copy of an event that is stored again.
struct ShortWindow {
    server: NatsServer,
    client: async_nats::Client,
    settings: StreamSettings,
    publisher: Publisher,
}

impl ShortWindow {
    async fn start() -> Self {
        let server = NatsServer::start().await.unwrap();
        let client = server.connect().await.unwrap();
        let settings = StreamSettings::default().duplicate_window(Duration::from_millis(500));
        let publisher = Publisher::new(client.clone(), "checkout")
            .unwrap()
            .stream_settings(settings.clone());
        Self {
            server,
            client,
            settings,
            publisher,
        }
    }

    /// An instance of the payments service, on a connection of its own.
    async fn payments(&self, fx: &Effects) -> ServiceHandle {
        Service::new("payments")
            .stream_settings(self.settings.clone())
            .state(fx.clone())
            .handler(charge)
            .start(self.server.connect().await.unwrap())
            .await
            .unwrap()
    }

    async fn publish(&self, order_id: &str) -> choreo::Receipt {
        self.publisher
            .publish(&OrderPlaced {
                order_id: order_id.into(),
                total_cents: 5,
            })
            .await
            .unwrap()
    }
}

fn total(handles: &[&ServiceHandle], f: fn(&choreo::HandlerStats) -> u64) -> u64 {
    handles.iter().map(|h| f(h.stats("charge").unwrap())).sum()
}

/// Waits until `svc`'s `charge` has handled `handled` events and skipped
/// `skipped` copies.
async fn until_counted(svc: &ServiceHandle, handled: u64, skipped: u64) {
    let stats = || svc.stats("charge").unwrap();
    eventually(
        Duration::from_secs(10),
        &format!("{handled} handled and {skipped} skipped"),
        || stats().handled() == handled && stats().skipped() == skipped,
    )
    .await;
}

// ---- both dedup layers ------------------------------------------------------

#[tokio::test]
async fn twice_inside_the_window_is_stored_once_outside_it_twice_and_still_handled_once() {
    let w = ShortWindow::start().await;
    let fx = Effects::new(&w.client).await;
    let raw = Effects {
        invocations: Arc::new(AtomicU32::new(0)),
        ..fx.clone()
    };
    let payments = w.payments(&fx).await;
    let audit = Service::new("audit")
        .stream_settings(w.settings.clone())
        .state(raw.clone())
        .handler(count_without_inbox)
        .start(w.client.clone())
        .await
        .unwrap();

    let first = w.publish("o-1").await;
    let second = w.publish("o-1").await;
    assert!(
        second.duplicate && second.sequence == first.sequence,
        "inside the window: stored once"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let third = w.publish("o-1").await;
    assert!(
        !third.duplicate && third.sequence != first.sequence,
        "outside the window: stored again"
    );
    assert_eq!(third.event_id, first.event_id);
    assert_eq!(stream_messages(&w.client, "ORDERS").await.len(), 2);

    let stats = || payments.stats("charge").unwrap();
    eventually(Duration::from_secs(10), "both copies delivered", || {
        stats().handled() + stats().skipped() == 2
    })
    .await;
    assert_eq!(stats().handled(), 1);
    assert_eq!(
        stats().skipped(),
        1,
        "the inbox skipped the re-published copy"
    );
    assert_eq!(fx.invocations.load(Ordering::SeqCst), 1);
    eventually(
        Duration::from_secs(10),
        "the handler without inbox to see both",
        || raw.invocations.load(Ordering::SeqCst) == 2,
    )
    .await;
    assert_downstream_once(&w.client, 2).await;
    payments.shutdown().await;
    audit.shutdown().await;
}

#[tokio::test]
async fn a_batch_of_copies_and_new_events_is_read_at_once_and_only_the_new_ones_run() {
    let w = ShortWindow::start().await;
    let fx = Effects::new(&w.client).await;
    let first = w.payments(&fx).await;
    for i in 0..10 {
        w.publish(&format!("o-{i}")).await;
    }
    eventually(Duration::from_secs(10), "the first ten handled", || {
        first.stats("charge").unwrap().handled() == 10
    })
    .await;
    first.shutdown().await;

    // While no instance runs: the same ten again, outside the duplicate
    // window (stored again), and ten new ones. The next instance pulls all
    // twenty at once and reads their inbox keys in one request.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 0..20 {
        assert!(!w.publish(&format!("o-{i}")).await.duplicate);
    }
    let second = w.payments(&fx).await;
    until_counted(&second, 10, 10).await;
    assert!(
        second.stats("charge").unwrap().inbox_batch_reads() >= 1,
        "the batch was read key by key, so this test proved nothing"
    );
    assert_each_handled_once(&fx, &w.client, 20).await;
    second.shutdown().await;
}

#[tokio::test]
async fn two_copies_of_an_unhandled_event_pulled_together_run_the_handler_once() {
    // The instance was down longer than the duplicate window: the event and
    // its re-published copy wait together, neither handled, and arrive in one
    // pull. The second waits for the first's outcome.
    let w = ShortWindow::start().await;
    let mut fx = Effects::new(&w.client).await;
    fx.sleep_first_for = Some(Duration::from_millis(300));
    w.payments(&fx).await.shutdown().await;
    w.publish("o-1").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!w.publish("o-1").await.duplicate);
    let payments = w.payments(&fx).await;
    until_counted(&payments, 1, 1).await;
    assert!(
        payments.stats("charge").unwrap().waited() >= 1,
        "the copies did not overlap, so this test proved nothing"
    );
    assert_each_handled_once(&fx, &w.client, 1).await;
    payments.shutdown().await;
}

#[tokio::test]
async fn an_inbox_bucket_without_direct_gets_is_read_key_by_key() {
    // A bucket made before choreo (or by hand) may not allow direct gets,
    // which the batched read uses: choreo reads it key by key instead.
    let w = ShortWindow::start().await;
    let js = jetstream::new(w.client.clone());
    js.create_key_value(jetstream::kv::Config {
        bucket: "choreo_inbox_payments".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = js.get_stream("KV_choreo_inbox_payments").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.allow_direct = false;
    js.update_stream(config).await.unwrap();
    let fx = Effects::new(&w.client).await;
    for i in 0..20 {
        w.publish(&format!("o-{i}")).await;
    }
    let payments = w.payments(&fx).await;
    until_counted(&payments, 20, 0).await;
    assert_eq!(fx.invocations.load(Ordering::SeqCst), 20);
    payments.shutdown().await;
}

// ---- a crash at every step ----------------------------------------------------

async fn crash_at(point: FaultPoint) -> (u32, Arc<AtomicU32>) {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let fx = Effects::new(&client).await;
    let fired = Arc::new(AtomicBool::new(false));
    let hook_fired = fired.clone();
    let hook: choreo::__private::FaultHook =
        Arc::new(move |p, _| p == point && !hook_fired.swap(true, Ordering::SeqCst));
    let first: ServiceHandle = Service::new("payments")
        .state(fx.clone())
        .handler(charge)
        .fault_hook(hook)
        .start(client.clone())
        .await
        .unwrap();
    let receipt = Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 5,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the fault point", || {
        fired.load(Ordering::SeqCst)
    })
    .await;
    first.abort(); // the crash: no verdict, no flush

    let second = Service::new("payments")
        .state(fx.clone())
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    wait_settled(&client).await;
    assert_eq!(
        effect_count(&fx).await,
        1,
        "{point:?}: the charge happened more or less than once"
    );
    assert_downstream_once(&client, 2).await;
    assert!(
        inbox_says_done(&client, receipt.event_id).await,
        "{point:?}: no inbox record"
    );
    let skipped = second.stats("charge").unwrap().skipped();
    second.shutdown().await;
    (u32::try_from(skipped).unwrap(), fx.invocations)
}

#[tokio::test]
async fn a_crash_before_emitting_reruns_the_handler_once_more() {
    let (skipped, invocations) = crash_at(FaultPoint::BeforeEmit).await;
    assert_eq!((skipped, invocations.load(Ordering::SeqCst)), (0, 2));
}

#[tokio::test]
async fn a_crash_between_two_emissions_reemits_the_same_ids() {
    let (skipped, invocations) = crash_at(FaultPoint::BetweenEmits).await;
    assert_eq!((skipped, invocations.load(Ordering::SeqCst)), (0, 2));
}

#[tokio::test]
async fn a_crash_after_emitting_before_the_record_reemits_the_same_ids() {
    let (skipped, invocations) = crash_at(FaultPoint::AfterEmit).await;
    assert_eq!((skipped, invocations.load(Ordering::SeqCst)), (0, 2));
}

#[tokio::test]
async fn a_crash_after_the_record_before_the_ack_is_skipped() {
    let (skipped, invocations) = crash_at(FaultPoint::AfterRecord).await;
    assert_eq!(
        (skipped, invocations.load(Ordering::SeqCst)),
        (1, 1),
        "the redelivery is skipped, not handled"
    );
}

// ---- a real process killed with SIGKILL ---------------------------------------

const CHILD_URL: &str = "CHOREO_TEST_CHILD_URL";

#[test]
#[ignore = "the child process of a_killed_process_leaves_one_effect; run by that test"]
fn child_service_that_stops_after_emitting() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = async_nats::connect(url).await.unwrap();
        let fx = Effects::new(&client).await;
        let marker = client.clone();
        let hook: choreo::__private::FaultHook = Arc::new(move |p, id| {
            if p == FaultPoint::AfterEmit {
                // Tell the parent where we are, then hang until killed.
                let marker = marker.clone();
                tokio::spawn(async move {
                    marker
                        .publish("crashtest.reached", id.to_string().into())
                        .await
                        .unwrap();
                    marker.flush().await.unwrap();
                });
                return true;
            }
            false
        });
        let _svc = Service::new("payments")
            .state(fx)
            .handler(charge)
            .fault_hook(hook)
            .start(client)
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn a_killed_process_leaves_one_effect_and_one_event_per_id() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let mut reached = client.subscribe("crashtest.reached").await.unwrap();
    client.flush().await.unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_service_that_stops_after_emitting",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_URL, server.url())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Publish once the child's consumer exists, then wait for the crash point.
    eventually_async(Duration::from_secs(30), || async {
        let js = jetstream::new(client.clone());
        match js.get_stream("ORDERS").await {
            Ok(s) => s
                .get_consumer::<jetstream::consumer::pull::Config>("payments--charge")
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let receipt = Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 5,
        })
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), reached.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::str::from_utf8(&msg.payload).unwrap(),
        receipt.event_id.to_string()
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let fx = Effects::new(&client).await;
    let svc = Service::new("payments")
        .state(fx.clone())
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    wait_settled(&client).await;
    assert_eq!(effect_count(&fx).await, 1);
    assert_downstream_once(&client, 2).await;
    assert!(inbox_says_done(&client, receipt.event_id).await);
    assert_eq!(
        fx.invocations.load(Ordering::SeqCst),
        1,
        "the new process re-ran the handler once"
    );
    svc.shutdown().await;
}

async fn eventually_async<F, Fut>(within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- slow handlers: the watchdog and the claim ------------------------------------

/// Blocks its thread 1.6 s under a 1 s ack_wait (after awaiting a timer, if
/// `after_an_await`): without in-progress acks JetStream would redeliver the
/// event to the other instance. The watchdog, a task of its own, sends them
/// from another worker thread, which must be driving the runtime's I/O.
async fn blocking_handler_runs_once(after_an_await: bool) {
    let w = ShortWindow::start().await;
    let mut fx = Effects::new(&w.client).await;
    fx.block_first_for = Some(Duration::from_millis(1600));
    fx.await_before_blocking = after_an_await;
    let (a, b) = (w.payments(&fx).await, w.payments(&fx).await);
    w.publish("o-1").await;
    wait_settled(&w.client).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        total(&[&a, &b], choreo::HandlerStats::in_progress_acks) >= 1,
        "no in-progress ack was sent, so this test proved nothing"
    );
    assert_each_handled_once(&fx, &w.client, 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_blocks_its_thread_past_ack_wait_is_kept_alive_and_runs_once() {
    blocking_handler_runs_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_blocks_its_thread_after_an_await_is_kept_alive_and_runs_once() {
    blocking_handler_runs_once(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_that_another_instance_pulls_while_the_first_runs_waits_for_it_through_the_claim() {
    let w = ShortWindow::start().await;
    let mut fx = Effects::new(&w.client).await;
    // The first invocation runs 2.5 s on instance A; its watchdog writes the
    // claim after a third of the 1 s ack_wait.
    fx.sleep_first_for = Some(Duration::from_millis(2500));
    let a = w.payments(&fx).await;
    let first = w.publish("o-1").await;
    eventually(Duration::from_secs(5), "A to start the handler", || {
        fx.invocations.load(Ordering::SeqCst) == 1
    })
    .await;
    // A stops pulling but finishes what it runs; B is the only one to pull
    // the copy, so only the claim can make it wait.
    let a_stopping = tokio::spawn(a.shutdown());
    let b = w.payments(&fx).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Outside the 500 ms duplicate window: stored a second time, delivered
    // while the first copy's handler still runs.
    let second = w.publish("o-1").await;
    assert!(!second.duplicate && second.sequence != first.sequence);
    let stats = || b.stats("charge").unwrap();
    eventually(Duration::from_secs(15), "B to skip the copy", || {
        stats().skipped() == 1
    })
    .await;
    assert!(
        stats().waited() >= 1,
        "the copy did not find the claim, so this test proved nothing"
    );
    a_stopping.await.unwrap();
    assert_each_handled_once(&fx, &w.client, 1).await;
    b.shutdown().await;
}

// ---- an unavailable inbox ------------------------------------------------------

#[event_handler(max_deliver = 20, backoff = ["300ms"])]
async fn charge_patiently(_order: OrderPlaced, State(fx): State<Effects>) {
    fx.invocations.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn without_a_readable_inbox_nothing_is_handled_or_acked_until_it_returns() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let fx = Effects::new(&client).await;
    let svc = Service::new("payments")
        .state(fx.clone())
        .handler(charge_patiently)
        .start(client.clone())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    js.delete_key_value("choreo_inbox_payments").await.unwrap();
    Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 5,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        fx.invocations.load(Ordering::SeqCst),
        0,
        "handled without an inbox claim"
    );
    let stream = js.get_stream("ORDERS").await.unwrap();
    let mut c: jetstream::consumer::PullConsumer = stream
        .get_consumer("payments--charge_patiently")
        .await
        .unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(
        info.num_pending + info.num_ack_pending as u64,
        1,
        "the event was acked without being handled"
    );
    assert!(info.delivered.stream_sequence >= 1);

    js.create_key_value(jetstream::kv::Config {
        bucket: "choreo_inbox_payments".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the event handled once the inbox is back",
        || fx.invocations.load(Ordering::SeqCst) == 1,
    )
    .await;
    eventually(Duration::from_secs(5), "the handled count", || {
        svc.stats("charge_patiently").unwrap().handled() == 1
    })
    .await;
    svc.shutdown().await;
}

// ---- claims: recovery after a crash, and no client clock -------------------------

/// When each invocation started.
#[derive(Clone, Default)]
struct Starts(Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>);

impl Starts {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

#[event_handler(ack_wait = "3s", backoff = ["100ms"])]
async fn long_charge(_order: OrderPlaced, State(starts): State<Starts>) {
    let first = {
        let mut s = starts.0.lock().unwrap();
        s.push(tokio::time::Instant::now());
        s.len() == 1
    };
    if first {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

async fn long_payments(w: &ShortWindow, starts: &Starts) -> ServiceHandle {
    Service::new("payments")
        .stream_settings(w.settings.clone())
        .state(starts.clone())
        .handler(long_charge)
        .start(w.server.connect().await.unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instances_claimed_event_resumes_elsewhere_within_about_one_ack_wait() {
    let w = ShortWindow::start().await;
    let starts = Starts::default();
    let a = long_payments(&w, &starts).await;
    w.publish("o-1").await;
    eventually(Duration::from_secs(5), "A to start", || starts.count() == 1).await;
    let b = long_payments(&w, &starts).await;
    // Long enough for A's watchdog to write its claim and refresh it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let crashed = tokio::time::Instant::now();
    a.abort();
    eventually(Duration::from_secs(15), "B to take the event over", || {
        starts.count() == 2
    })
    .await;
    let resumed = starts.0.lock().unwrap()[1].duration_since(crashed);
    eprintln!("resumed {resumed:?} after the crash (ack_wait 3s)");
    // JetStream redelivers ack_wait after A's last in-progress ack, and the
    // redelivery of the very message A claimed takes its claim over at once
    // (before: the claim blocked for twice ack_wait after its last refresh).
    assert!(
        resumed < Duration::from_millis(4500),
        "resumed {resumed:?} after the crash, more than about one ack_wait (3 s)"
    );
    b.shutdown().await;
}

/// Writes the inbox key of `event` for handler `charge` as a claim of
/// another instance with the given wall-clock time, at `revision` (0: new).
async fn forge_claim(
    client: &async_nats::Client,
    event: EventId,
    at_ms: u64,
    revision: u64,
) -> u64 {
    let kv = jetstream::new(client.clone())
        .get_key_value("choreo_inbox_payments")
        .await
        .unwrap();
    let key = choreo::__private::inbox_key("charge", event);
    let value = format!("run 00000000deadbeef {at_ms} 0");
    if revision == 0 {
        kv.put(&key, value.into()).await.unwrap()
    } else {
        kv.update(&key, value.into(), revision).await.unwrap()
    }
}

/// The service's bucket and consumer exist, the service is stopped, and
/// one event waits: its id.
async fn one_waiting_event(w: &ShortWindow, fx: &Effects) -> EventId {
    w.payments(fx).await.shutdown().await;
    w.publish("o-1").await.event_id
}

fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_claim_from_a_clock_an_hour_ahead_is_taken_over_after_one_lease() {
    let w = ShortWindow::start().await;
    let fx = Effects::new(&w.client).await;
    let id = one_waiting_event(&w, &fx).await;
    forge_claim(&w.client, id, unix_ms() + 3_600_000, 0).await;
    let started = tokio::time::Instant::now();
    let svc = w.payments(&fx).await;
    eventually(Duration::from_secs(10), "the event handled", || {
        fx.invocations.load(Ordering::SeqCst) == 1
    })
    .await;
    let took = started.elapsed();
    // The claim never moved for a lease (ack_wait, 1 s): stale, whatever
    // time it carries.
    assert!(
        took >= Duration::from_millis(900),
        "took {took:?}: the claim was ignored"
    );
    assert!(svc.stats("charge").unwrap().waited() >= 1);
    svc.shutdown().await;
}

#[tokio::test]
async fn a_live_claim_from_a_clock_far_behind_keeps_excluding_until_it_stops() {
    let w = ShortWindow::start().await;
    let fx = Effects::new(&w.client).await;
    let id = one_waiting_event(&w, &fx).await;
    // Another instance, alive, whose clock reads 1970: it refreshes its
    // claim every 300 ms.
    let mut revision = forge_claim(&w.client, id, 0, 0).await;
    let svc = w.payments(&fx).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        revision = forge_claim(&w.client, id, 0, revision).await;
        assert_eq!(
            fx.invocations.load(Ordering::SeqCst),
            0,
            "ran while another instance's claim was being refreshed"
        );
    }
    // It stops (crashes): the claim is taken over.
    eventually(Duration::from_secs(10), "the event handled", || {
        fx.invocations.load(Ordering::SeqCst) == 1
    })
    .await;
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_acks_keep_their_period_when_inbox_writes_are_slow() {
    let w = ShortWindow::start().await;
    let mut fx = Effects::new(&w.client).await;
    fx.sleep_first_for = Some(Duration::from_secs(3));
    // Every claim write takes 2.5 s, far past the 1 s ack_wait.
    let svc = Service::new("payments")
        .stream_settings(w.settings.clone())
        .state(fx.clone())
        .handler(charge)
        .slow_inbox_claims(Duration::from_millis(2500))
        .start(w.server.connect().await.unwrap())
        .await
        .unwrap();
    w.publish("o-1").await;
    wait_settled(&w.client).await;
    let stats = svc.stats("charge").unwrap();
    assert!(
        stats.in_progress_acks() >= 6,
        "{} in-progress acks in 3 s at a period of 333 ms",
        stats.in_progress_acks()
    );
    let mut c: jetstream::consumer::PullConsumer = jetstream::new(w.client.clone())
        .get_consumer_from_stream("payments--charge", "ORDERS")
        .await
        .unwrap();
    assert_eq!(
        c.info().await.unwrap().num_redelivered,
        0,
        "ack_wait lapsed while a claim was being written"
    );
    assert_each_handled_once(&fx, &w.client, 1).await;
    svc.shutdown().await;
}

/// Hangs on its first invocation (until its 3 s timeout), then succeeds.
#[event_handler(name = "charge", ack_wait = "2s", timeout = "3s", backoff = ["100ms"])]
async fn charge_or_hang(_order: OrderPlaced, State(starts): State<Starts>) {
    let first = {
        let mut s = starts.0.lock().unwrap();
        s.push(tokio::time::Instant::now());
        s.len() == 1
    };
    if first {
        std::future::pending::<()>().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_waiting_on_a_timed_out_invocation_runs_once_it_is_abandoned() {
    let w = ShortWindow::start().await;
    let starts = Starts::default();
    let start = |client| {
        Service::new("payments")
            .stream_settings(w.settings.clone())
            .state(starts.clone())
            .handler(charge_or_hang)
            .start(client)
    };
    let a = start(w.server.connect().await.unwrap()).await.unwrap();
    let first = w.publish("o-1").await;
    eventually(Duration::from_secs(5), "A to start", || starts.count() == 1).await;
    // A stops pulling; its invocation hangs on. B pulls only the copy,
    // published outside the 500 ms duplicate window, and finds A's claim.
    let a_stopping = tokio::spawn(a.shutdown());
    let b = start(w.server.connect().await.unwrap()).await.unwrap();
    // Past the claim (written at the watchdog's first tick after a third of
    // ack_wait, about 1 s) and the duplicate window.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = w.publish("o-1").await;
    assert_ne!(second.sequence, first.sequence);
    eventually(Duration::from_secs(10), "the copy to run on B", || {
        starts.count() == 2
    })
    .await;
    let after = {
        let s = starts.0.lock().unwrap();
        s[1].duration_since(s[0])
    };
    assert!(
        b.stats("charge").unwrap().waited() >= 1,
        "the copy never waited"
    );
    // At A's timeout (3 s) its invocation is abandoned: the claim is
    // released and the delivery nak'd (and redelivered to B, which takes the
    // claim of that very message over). Either way B runs the event then,
    // not after the copy has waited out a lease (2 s) of unrefreshed claim.
    assert!(
        after < Duration::from_millis(4200),
        "the copy ran {after:?} after the first invocation started"
    );
    a_stopping.await.unwrap();
    b.shutdown().await;
}
