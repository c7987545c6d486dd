//! Whether a direct get answered by a follower can miss a fresh inbox record
//! on a 3-node cluster with an R3 bucket (direct gets allowed, as the inbox
//! makes it): right after a write, and through a node back from an outage.
//! On nats-server 2.15.1 a direct get right after a write missed it 5 times
//! in 600 in one CI run (a follower answered before applying the write) and
//! never in others; every miss was seen a moment later, and a read from the
//! leader never missed. The inbox reads with direct gets (the batched read
//! has no other form): a copy of an event arriving within those
//! milliseconds of its record may run again, the case of two copies at once
//! that docs/guarantee.md covers.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo::async_nats::jetstream::{self, kv};
use choreo_testkit::NatsCluster;

/// An R3 bucket written through node 0, as the inbox makes one.
async fn r3_bucket(cluster: &NatsCluster) -> kv::Store {
    let writer = cluster.node(0).connect().await.unwrap();
    jetstream::new(writer)
        .create_key_value(kv::Config {
            bucket: "reads".into(),
            history: 1,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// A put that waits out a leader election: when the killed node led the
/// bucket's stream, writes have no responder until the others elect a new
/// leader (a second or two).
async fn put_through_election(bucket: &kv::Store, key: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match bucket.put(key, "done 1".into()).await {
            Ok(revision) => return revision,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("put {key} during the election: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put {key}: no leader within 20 s: {e}"),
        }
    }
}

#[tokio::test]
async fn a_record_written_on_the_leader_is_read_back_from_every_node_within_a_moment() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let bucket = r3_bucket(&cluster).await;
    // Readers on every node: direct gets go to whichever replica answers.
    let mut readers = Vec::new();
    for i in 0..3 {
        let c = cluster.node(i).connect().await.unwrap();
        readers.push(jetstream::new(c).get_key_value("reads").await.unwrap());
    }
    let mut stale = 0;
    let n = 600;
    for i in 0..n {
        let key = format!("h.k{i}");
        let revision = bucket.put(&key, "done 1".into()).await.unwrap();
        let reader = &readers[i % 3];
        let seen = |e: Option<kv::Entry>| e.is_some_and(|e| e.revision == revision);
        if !seen(reader.entry(&key).await.unwrap()) {
            stale += 1;
            // A follower behind by a moment: it must catch up.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                if seen(reader.entry(&key).await.unwrap()) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{key} (revision {revision}) still missing from a direct get after 2 s"
                );
            }
        }
    }
    eprintln!(
        "{stale} of {n} direct gets right after a write missed it (each seen a moment later)"
    );
    // What the inbox relies on: a write acknowledged by the leader is
    // visible to an immediate leader read from any node.
    let mut leader_stale = 0;
    for i in 0..n / 3 {
        let key = format!("h.l{i}");
        let revision = bucket.put(&key, "done 1".into()).await.unwrap();
        let stream = jetstream::new(cluster.node(i % 3).connect().await.unwrap())
            .get_stream_no_info("KV_reads")
            .await
            .unwrap();
        match stream
            .get_last_raw_message_by_subject(&format!("$KV.reads.{key}"))
            .await
        {
            Ok(m) if m.sequence == revision => {}
            _ => leader_stale += 1,
        }
    }
    assert_eq!(leader_stale, 0, "a leader read missed a fresh write");
}

#[tokio::test]
async fn a_node_back_from_an_outage_answers_no_direct_get_with_a_stale_record() {
    let mut cluster = NatsCluster::start(3).await.unwrap();
    let bucket = r3_bucket(&cluster).await;
    bucket.put("h.warm", "done 1".into()).await.unwrap();
    cluster.kill(2);
    let n = 400;
    let mut revisions = Vec::new();
    for i in 0..n {
        revisions.push(put_through_election(&bucket, &format!("h.k{i}")).await);
    }
    cluster.restart(2).await.unwrap();
    // At once, through the node that missed every write.
    let reader = jetstream::new(cluster.node(2).connect().await.unwrap())
        .get_key_value("reads")
        .await
        .unwrap();
    let mut missed = 0;
    let mut failed = 0;
    for (i, revision) in revisions.iter().enumerate() {
        match reader.entry(&format!("h.k{i}")).await {
            Ok(Some(e)) if e.revision == *revision => {}
            Ok(_) => missed += 1,
            Err(_) => failed += 1,
        }
    }
    eprintln!("after a restart: {missed} of {n} direct gets missed a record, {failed} failed");
    assert_eq!(
        missed, 0,
        "a follower answered a direct get before catching up"
    );
}
