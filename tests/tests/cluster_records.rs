//! Inbox records written at once into the same groups on a 3-node cluster.
//! A compare-and-set that reaches a stream's leader while another write of
//! the same key is still being replicated is refused with 10164 ("wrong
//! last sequence", without a number) rather than 10071. choreo once took
//! the first for a failure: the event was nakked after its handler had
//! run, came back a second later and ran again (its emissions deduplicated,
//! its other effects not), which also left a benchmark's R3 run waiting a
//! second for its last events. Both codes are conflicts now: the group is
//! read again and the record written on top.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{HandlerError, Publisher, Service, State, StreamSettings, event, event_handler};
use choreo_testkit::NatsCluster;
use common::eventually;

#[event(subject = "tallies.{n}.counted", key = n)]
#[derive(Debug, Clone)]
pub struct Counted {
    pub n: u64,
}

/// How often the handler ran for each event.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<u64, u32>>>);

impl Runs {
    fn counts(&self) -> HashMap<u64, u32> {
        self.0.lock().unwrap().clone()
    }
}

#[event_handler]
async fn tally(e: Counted, State(runs): State<Runs>) -> Result<(), HandlerError> {
    *runs.0.lock().unwrap().entry(e.n).or_default() += 1;
    Ok(())
}

#[tokio::test]
async fn records_written_at_once_into_one_group_on_a_cluster_are_each_written_once() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    let r3 = StreamSettings::default().replicas(3);
    // A backlog first, so the handler starts with 256 events at once.
    let n = 600_u64;
    let events: Vec<Counted> = (0..n).map(|n| Counted { n }).collect();
    Publisher::new(client.clone(), "counter")
        .unwrap()
        .stream_settings(r3.clone())
        .publish_all(&events)
        .await
        .unwrap();
    let runs = Runs::default();
    // 64 groups: about 9 records each, a few of them written at once.
    let handle = Service::new("tallies")
        .inbox_groups(64)
        .stream_settings(r3)
        .state(runs.clone())
        .handler(tally)
        .start(client.clone())
        .await
        .unwrap();
    let stats = handle.stats("tally").unwrap();
    eventually(Duration::from_secs(60), "every event run", || {
        runs.counts().len() as u64 == n
    })
    .await;
    // What a refused record would bring: a retry, after a pause.
    let settled = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.handled() < n && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stats.retried(),
        0,
        "events were retried after their handler ran: a record's write was taken for a failure"
    );
    assert_eq!(stats.handled(), n);
    // Records of one group did meet: each conflict was written again on top.
    assert!(stats.inbox_conflicts() > 0, "no two records of a group met");
    let twice: Vec<_> = runs.counts().into_iter().filter(|(_, c)| *c > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    let js = jetstream::new(client);
    let recorded = choreo::__private::inbox_records(&js, "tallies", "tally")
        .await
        .unwrap();
    assert_eq!(recorded, n, "one record per event");
    handle.shutdown().await;
}
