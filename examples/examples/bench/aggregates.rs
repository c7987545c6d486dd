//! The aggregate cases: deciding (a load, then an append guarded by the
//! last sequence; or, on a state in memory, the guarded append alone)
//! against the same by hand with async-nats, decisions on a
//! hot aggregate with several writers, and loading a long history with and
//! without a snapshot against a hand-written batched read.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo::aggregate::SnapshotPolicy;
use choreo::{Aggregate, AggregateEvent, Aggregates, Publisher, event};
use choreo_testkit::NatsServer;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{BoxError, IN_FLIGHT, cpu_seconds, raw_headers, report_rate, v5};

#[event(subject = "acct.{id}.deposited")]
pub(crate) struct Deposited {
    pub(crate) id: String,
    pub(crate) amount: u64,
}

#[derive(AggregateEvent)]
pub(crate) enum AccountEvent {
    Deposited(Deposited),
}

#[derive(Default, Clone, Serialize, Deserialize)]
pub(crate) struct Account {
    balance: u64,
}

impl Aggregate for Account {
    const NAME: &'static str = "Account";
    type Event = AccountEvent;
    fn filter(id: &str) -> String {
        format!("acct.{id}.*")
    }
    fn apply(&mut self, event: &AccountEvent) {
        let AccountEvent::Deposited(d) = event;
        self.balance += d.amount;
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        choreo::aggregate::snapshot::to_cbor(self)
    }
    fn restore(bytes: &[u8]) -> Option<Self> {
        choreo::aggregate::snapshot::from_cbor(bytes)
    }
}

fn deposit(id: &str, amount: u64) -> AccountEvent {
    AccountEvent::Deposited(Deposited {
        id: id.to_owned(),
        amount,
    })
}

async fn store(server: &NatsServer) -> Result<Aggregates, BoxError> {
    let store = Aggregates::new(Publisher::new(server.connect().await?, "bench")?);
    // The stream made and set up before the clock starts.
    store
        .decide::<Account, _, Infallible>("warm", |_| Ok(vec![deposit("warm", 1)]))
        .await
        .map_err(|e| e.to_string())?;
    Ok(store)
}

/// One deposit decided on each of accounts `a0..a{n}`, 256 at once.
async fn deposit_each(store: &Aggregates, n: u64) -> Result<(), BoxError> {
    futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let id = format!("a{i}");
                store
                    .decide::<Account, _, Infallible>(&id, |_| Ok(vec![deposit(&id, 5)]))
                    .await
                    .map_err(|e| BoxError::from(e.to_string()))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// `n` decisions on `n` accounts, 256 at once: each a load (its history,
/// empty) and a guarded append.
pub(super) async fn choreo_decide(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let store = store(&server).await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    deposit_each(&store, n).await?;
    Ok(report_rate("choreo decide", n, start, cpu0))
}

/// `n` accounts created first (not timed), then one decision on each, 256
/// at once, on the state this process keeps: the guarded append alone.
pub(super) async fn choreo_append(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    // Room for every account's state (the default holds 10,000).
    let store = store(&server).await?.cache(n as usize + 1);
    deposit_each(&store, n).await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    deposit_each(&store, n).await?;
    Ok(report_rate("choreo append", n, start, cpu0))
}

/// The same by hand: `n` accounts' first events published (not timed),
/// then a second event each with the same headers as choreo's and
/// `Nats-Expected-Last-Subject-Sequence` (the first's sequence) against
/// the account's filter, awaiting the PubAck.
pub(super) async fn raw_append(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let (_client, js) = raw_stream(&server).await?;
    let round = |round: u64, last: Vec<u64>| {
        let js = js.clone();
        futures::stream::iter(0..n)
            .map(move |i| {
                let js = js.clone();
                let expected = last.get(i as usize).copied().unwrap_or(0);
                async move {
                    let id = v5(&[
                        &b"bench"[..],
                        &i.to_be_bytes()[..],
                        &round.to_be_bytes()[..],
                    ]);
                    raw_deposit(&js, i, &id.to_string(), expected).await
                }
            })
            .buffered(IN_FLIGHT)
            .try_collect::<Vec<u64>>()
    };
    let first = round(0, Vec::new()).await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    round(1, first).await?;
    Ok(report_rate("raw append", n, start, cpu0))
}

/// The same by hand: a batched direct get of the account's subjects on a
/// subscription of its own (answered with "no messages"), then a publish
/// with the same headers, `Nats-Expected-Last-Subject-Sequence` and its
/// filter among them, awaiting the PubAck.
pub(super) async fn raw_decide(n: u64) -> Result<f64, BoxError> {
    let server = NatsServer::start().await?;
    let (client, js) = raw_stream(&server).await?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (client, js) = (client.clone(), js.clone());
            async move {
                let (last, _) = raw_read(&client, "RAWACCT", &format!("rawacct.a{i}.*"), 0).await?;
                let id = v5(&[&b"bench"[..], &i.to_be_bytes()[..]]).to_string();
                raw_deposit(&js, i, &id, last).await?;
                Ok::<(), BoxError>(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    Ok(report_rate("raw decide", n, start, cpu0))
}

/// A server's stream for the raw accounts, as choreo sets up an aggregate's.
async fn raw_stream(
    server: &NatsServer,
) -> Result<(async_nats::Client, jetstream::Context), BoxError> {
    let client = server.connect().await?;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "RAWACCT".into(),
        subjects: vec!["rawacct.>".into()],
        allow_direct: true,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await?;
    Ok((client, js))
}

/// A deposit to raw account `i` with id `id`, with choreo's headers and
/// `Nats-Expected-Last-Subject-Sequence` `expected` against the account's
/// filter, its PubAck awaited: its sequence.
async fn raw_deposit(
    js: &jetstream::Context,
    i: u64,
    id: &str,
    expected: u64,
) -> Result<u64, BoxError> {
    let mut h = raw_headers(id, "Deposited", "bench", id, None);
    h.insert("Nats-Expected-Last-Subject-Sequence", expected.to_string());
    h.insert(
        "Nats-Expected-Last-Subject-Sequence-Subject",
        format!("rawacct.a{i}.*"),
    );
    let mut payload = Vec::new();
    ciborium::into_writer(
        &Deposited {
            id: format!("a{i}"),
            amount: 5,
        },
        &mut payload,
    )?;
    let ack = js
        .publish_with_headers(format!("rawacct.a{i}.deposited"), h, payload.into())
        .await?
        .await?;
    Ok(ack.sequence)
}

/// Reads `filter`'s events after `after` with batched direct gets on a
/// subscription of its own, summing their `amount`s: (last sequence, sum).
async fn raw_read(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    after: u64,
) -> Result<(u64, u64), BoxError> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    let (mut from, mut last, mut sum) = (after + 1, after, 0);
    loop {
        let request = serde_json::json!({"seq": from, "next_by_subj": filter, "batch": 256});
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                inbox.clone(),
                request.to_string().into(),
            )
            .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), answers.next())
                .await?
                .ok_or("the subscription closed")?;
            if let Some(status) = m.status {
                let pending = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Num-Pending"))
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap_or(0);
                if status.as_u16() == 204 && pending > 0 {
                    from = last + 1;
                    break;
                }
                return Ok((last, sum));
            }
            let h = m.headers.as_ref().ok_or("no headers")?;
            last = h
                .get("Nats-Sequence")
                .ok_or("no sequence")?
                .as_str()
                .parse()?;
            let d: Deposited = ciborium::from_reader(&m.payload[..])?;
            sum += d.amount;
        }
    }
}

/// Decisions per second on one account, `writers` deciding at once, and
/// the share of attempts that conflicted. Each writer is its own instance
/// (its own connection and memory of states, so they conflict), or, with
/// `shared`, all share one `Aggregates` (they take turns instead).
pub(super) async fn hot(
    decisions: u64,
    writers: u64,
    shared: bool,
) -> Result<(f64, f64), BoxError> {
    let server = NatsServer::start().await?;
    let mut stores = Vec::new();
    let one = store(&server).await?.attempts(1000);
    for _ in 0..writers {
        stores.push(if shared {
            one.clone()
        } else {
            store(&server).await?.attempts(1000)
        });
    }
    let done = Arc::new(AtomicU64::new(0));
    let tries = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for store in stores {
        let (done, tries) = (done.clone(), tries.clone());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::SeqCst) < decisions {
                let decided = store
                    .decide::<Account, _, Infallible>("hot", |_| Ok(vec![deposit("hot", 1)]))
                    .await
                    .map_err(|e| e.to_string())?;
                tries.fetch_add(decided.attempts, Ordering::SeqCst);
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = decisions as f64 / start.elapsed().as_secs_f64();
    let tries = f64::from(tries.load(Ordering::SeqCst));
    let conflicts = (tries - decisions as f64) / tries;
    let how = if shared {
        " sharing one Aggregates"
    } else {
        ""
    };
    eprintln!(
        "  hot aggregate, {writers} writers{how}: {rate:.0} decisions/s, {:.0}% of attempts conflicted",
        conflicts * 100.0
    );
    Ok((rate, conflicts))
}

/// An account with `events` deposits, appended 1,000 per decision.
async fn long_account(store: &Aggregates, events: u64) -> Result<(), BoxError> {
    let mut left = events;
    while left > 0 {
        let batch = left.min(1000);
        store
            .decide::<Account, _, Infallible>("long", |_| {
                Ok((0..batch).map(|_| deposit("long", 1)).collect())
            })
            .await
            .map_err(|e| e.to_string())?;
        left -= batch;
    }
    Ok(())
}

/// Loading an account of `events` events: choreo's load against the
/// hand-written batched read of the same events (decoded and summed), in
/// events per second, and the load from a snapshot in ms.
pub(super) async fn load(events: u64) -> Result<(f64, f64, f64), BoxError> {
    let server = NatsServer::start().await?;
    // No states kept in memory: each load reads the stream (or the
    // snapshot).
    let plain = store(&server).await?.cache(0);
    long_account(&plain, events).await?;
    let client = server.connect().await?;
    let mut choreo = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let loaded = plain
            .load::<Account>("long")
            .await
            .map_err(|e| e.to_string())?;
        choreo.push(t.elapsed().as_secs_f64());
        assert_eq!(loaded.state.balance, events);
        let t = Instant::now();
        let (_, sum) = raw_read(&client, "ACCT", "acct.long.*", 0).await?;
        raw.push(t.elapsed().as_secs_f64());
        assert_eq!(sum, events);
    }
    // No memory either, so each load reads the snapshot.
    let snapshotting = Aggregates::new(Publisher::new(client.clone(), "bench")?)
        .cache(0)
        .snapshots(SnapshotPolicy::every(1).lag(Duration::ZERO));
    snapshotting
        .load::<Account>("long")
        .await
        .map_err(|e| e.to_string())?;
    // The snapshot is written in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut from_snapshot = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let loaded = snapshotting
            .load::<Account>("long")
            .await
            .map_err(|e| e.to_string())?;
        from_snapshot.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!((loaded.state.balance, loaded.read), (events, 0));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, r) = (median(choreo), median(raw));
    let snap = median(from_snapshot);
    eprintln!(
        "  load of {events} events: choreo {:.1} ms, raw {:.1} ms, from a snapshot {snap:.2} ms",
        c * 1000.0,
        r * 1000.0
    );
    Ok((events as f64 / c, events as f64 / r, snap))
}
