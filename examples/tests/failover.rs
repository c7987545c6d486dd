//! The shop on a 3-node cluster with R3 streams, under load, through node
//! crashes (the stream leader among them) and a crashed service process:
//! every order ends, nothing is lost or done twice.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use choreo::{Publisher, StreamSettings};
use choreo_examples::shop::{self, Ledger, Summary};
use choreo_testkit::{NatsCluster, Recorder};

const ORDERS: u64 = 2000;
const CHILD_URL: &str = "CHOREO_FAILOVER_CHILD_URL";

/// The payments service in its own process (this test binary, re-run).
#[test]
#[ignore = "the payments process of the failover test; run by it"]
fn payments_process() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = choreo::connect(
            &url,
            choreo::async_nats::ConnectOptions::new().retry_on_initial_connect(),
        )
        .await
        .unwrap();
        let ledger = Ledger::open(&client, 3).await.unwrap();
        let handle = shop::service("payments", ledger, StreamSettings::default().replicas(3))
            .start(client)
            .await
            .unwrap();
        println!("payments ready");
        std::future::pending::<()>().await;
        drop(handle);
    });
}

fn spawn_payments(urls: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "payments_process", "--ignored", "--nocapture"])
        .env(CHILD_URL, urls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn ended(recorder: &Recorder, run: &str) -> u64 {
    let s = shop::summarize_endings(recorder, run, ORDERS);
    s.shipped + s.cancelled + s.rejected
}

async fn wait_ended(recorder: &Recorder, run: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended(recorder, run).await < at_least {
        assert!(
            Instant::now() < deadline,
            "stuck below {at_least} ended orders"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shop_survives_node_and_process_crashes_under_load() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await.unwrap();
    let urls = cluster.urls();
    let client = cluster.connect().await.unwrap();
    let settings = StreamSettings::default().replicas(3);
    let ledger = Ledger::open(&client, 3).await.unwrap();
    let mut handles = Vec::new();
    for name in ["orders", "inventory", "shipping"] {
        handles.push(
            shop::service(name, ledger.clone(), settings.clone())
                .start(client.clone())
                .await
                .unwrap(),
        );
    }
    let mut payments = spawn_payments(&urls);
    let recorder = Recorder::start(&client).await.unwrap();
    let run = "fo";
    let publisher = Publisher::new(client.clone(), "storefront")
        .unwrap()
        .with_stream_settings(settings);
    let placing = tokio::spawn({
        let publisher = publisher.clone();
        async move { shop::place_orders(&publisher, run, ORDERS).await }
    });
    let mut faults = Vec::new();

    // 1. SIGKILL the ORDERS stream leader, then bring it back.
    wait_ended(&recorder, run, 200).await;
    let leader = cluster
        .wait_for_stream_leader(&client, "ORDERS", Duration::from_secs(20))
        .await
        .unwrap();
    let i = cluster.index_of(&leader).unwrap();
    cluster.kill(i);
    faults.push(format!("kill -9 {leader} (ORDERS leader)"));
    cluster
        .wait_for_stream_leader(&client, "ORDERS", Duration::from_secs(30))
        .await
        .unwrap();
    cluster.restart(i).await.unwrap();

    // 2. SIGKILL the payments process mid-flow, start a new one.
    let before = ended(&recorder, run).await;
    wait_ended(&recorder, run, before + 200).await;
    payments.kill().unwrap();
    payments.wait().unwrap();
    faults.push("kill -9 the payments process".into());
    tokio::time::sleep(Duration::from_millis(500)).await;
    payments = spawn_payments(&urls);

    // 3. SIGKILL another node (the PAYMENTS leader this time), restart it.
    let before = ended(&recorder, run).await;
    wait_ended(&recorder, run, (before + 200).min(ORDERS)).await;
    let leader = cluster
        .wait_for_stream_leader(&client, "PAYMENTS", Duration::from_secs(20))
        .await
        .unwrap();
    let i = cluster.index_of(&leader).unwrap();
    cluster.kill(i);
    faults.push(format!("kill -9 {leader} (PAYMENTS leader)"));
    cluster
        .wait_for_stream_leader(&client, "PAYMENTS", Duration::from_secs(30))
        .await
        .unwrap();
    cluster.restart(i).await.unwrap();

    placing.await.unwrap().unwrap();
    let summary = shop::wait_for_endings(
        &recorder,
        &client,
        run,
        ORDERS,
        Duration::from_secs(90),
        |_| {},
    )
    .await;
    eprintln!(
        "failover: {summary} faults=[{}] time={:.1}s",
        faults.join("; "),
        started.elapsed().as_secs_f64()
    );
    payments.kill().unwrap();
    let _ = payments.wait();
    assert_eq!(summary, Summary::expected(ORDERS), "{summary}");
    assert!(summary.is_clean());
    for h in handles {
        h.abort();
    }
}
