//! The publisher against a real nats-server.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use choreo::async_nats::jetstream;
use choreo::headers as h;
use choreo::{PublishError, Publisher, StreamError, StreamSettings, event};
use choreo_testkit::NatsServer;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "notes.added")]
#[derive(Debug, Clone, PartialEq)]
pub struct NoteAdded {
    pub text: String,
}

#[tokio::test]
async fn publishing_creates_the_stream_sets_every_header_and_returns_a_receipt() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "checkout").unwrap();
    let e = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 4250,
    };
    let receipt = publisher.publish(&e).await.unwrap();
    assert_eq!(receipt.stream, "ORDERS");
    assert_eq!(receipt.sequence, 1);
    assert!(!receipt.duplicate);
    assert_eq!(
        receipt.event_id.to_string(),
        "82d82778-956f-568c-a96a-672fe4793154"
    );
    assert_eq!(receipt.correlation_id, receipt.event_id);

    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, vec!["orders.>".to_string()]);
    assert_eq!(
        info.config.retention,
        jetstream::stream::RetentionPolicy::Limits
    );
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "orders.o-1.placed");
    for (name, want) in [
        (h::NATS_MSG_ID, receipt.event_id.to_string()),
        (h::CE_ID, receipt.event_id.to_string()),
        (h::CE_SPECVERSION, "1.0".into()),
        (h::CE_TYPE, "OrderPlaced".into()),
        (h::CE_SOURCE, "checkout".into()),
        (h::CE_EVENTVERSION, "1".into()),
        (h::CE_CORRELATIONID, receipt.event_id.to_string()),
        (h::CONTENT_TYPE, "application/cbor".into()),
    ] {
        assert_eq!(
            common::header(&msg, name).as_deref(),
            Some(want.as_str()),
            "{name}"
        );
    }
    assert!(msg.headers.get(h::CE_CAUSATIONID).is_none());
    assert!(msg.headers.get(h::CE_TIME).is_some());
    let back =
        choreo::Envelope::<OrderPlaced>::decode(&msg.subject, &msg.headers, &msg.payload).unwrap();
    assert_eq!(back.into_event(), e);
}

#[tokio::test]
async fn the_same_fact_twice_is_stored_once_and_the_receipt_says_duplicate() {
    let server = NatsServer::start().await.unwrap();
    let publisher = Publisher::new(server.connect().await.unwrap(), "checkout").unwrap();
    let e = OrderPlaced {
        order_id: "o-7".into(),
        total_cents: 1,
    };
    let first = publisher.publish(&e).await.unwrap();
    let second = publisher.publish(&e).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.sequence, first.sequence);
    assert_eq!(second.event_id, first.event_id);
    // Without a key, every publish is a new event.
    let a = publisher
        .publish(&NoteAdded { text: "x".into() })
        .await
        .unwrap();
    let b = publisher
        .publish(&NoteAdded { text: "x".into() })
        .await
        .unwrap();
    assert_ne!(a.event_id, b.event_id);
    assert!(!b.duplicate);
}

#[tokio::test]
async fn an_existing_stream_is_used_as_it_is_and_a_mismatch_is_a_clear_error() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    // A stream the operator made, with more subjects and a custom limit: used as is.
    js.create_stream(jetstream::stream::Config {
        name: "NOTES".into(),
        subjects: vec!["notes.*".into(), "other.>".into()],
        max_messages: 1000,
        ..Default::default()
    })
    .await
    .unwrap();
    // A stream named ORDERS that does not store orders.*.placed.
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.*.cancelled".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let publisher = Publisher::new(client.clone(), "svc").unwrap();
    publisher
        .publish(&NoteAdded { text: "hi".into() })
        .await
        .unwrap();
    let info = js
        .get_stream("NOTES")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.max_messages, 1000);
    assert_eq!(
        info.config.subjects,
        vec!["notes.*".to_string(), "other.>".to_string()]
    );

    let err = publisher
        .publish(&OrderPlaced {
            order_id: "o".into(),
            total_cents: 1,
        })
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PublishError::Stream(StreamError::DoesNotCover { .. })),
        "{msg}"
    );
    assert!(
        msg.contains("ORDERS") && msg.contains("orders.*.placed"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_payload_above_max_payload_is_refused_before_sending() {
    let server = NatsServer::builder()
        .config("max_payload: 2048")
        .start()
        .await
        .unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "svc").unwrap();
    publisher
        .publish(&NoteAdded {
            text: "small".into(),
        })
        .await
        .unwrap();
    let err = publisher
        .publish(&NoteAdded {
            text: "x".repeat(4000),
        })
        .await
        .unwrap_err();
    let PublishError::TooLarge { event, size, max } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((*event, *max), ("NoteAdded", 2048));
    assert!(*size > 4000);
    assert!(err.to_string().contains("max_payload"), "{err}");
    assert_eq!(
        common::stream_messages(&client, "NOTES").await.len(),
        1,
        "nothing more was stored"
    );
}

#[tokio::test]
async fn an_illegal_subject_value_publishes_nothing() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "svc").unwrap();
    let err = publisher
        .publish(&OrderPlaced {
            order_id: "a.b".into(),
            total_cents: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Subject(_)), "{err:?}");
    assert!(common::stream_messages(&client, "ORDERS").await.is_empty());
}

#[tokio::test]
async fn stream_settings_apply_to_streams_choreo_creates() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "svc")
        .unwrap()
        .stream_settings(
            StreamSettings::default().duplicate_window(std::time::Duration::from_secs(5)),
        );
    publisher
        .publish(&NoteAdded { text: "x".into() })
        .await
        .unwrap();
    let js = jetstream::new(client);
    let info = js
        .get_stream("NOTES")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.duplicate_window,
        std::time::Duration::from_secs(5)
    );
}

#[tokio::test]
async fn a_bad_source_name_is_refused() {
    let server = NatsServer::start().await.unwrap();
    let err = Publisher::new(server.connect().await.unwrap(), "bad name\r\n").unwrap_err();
    assert!(err.to_string().contains("ce-source"), "{err}");
}

#[tokio::test]
async fn the_same_key_with_different_content_is_a_conflict_not_a_silent_drop() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "checkout").unwrap();
    let first = OrderPlaced {
        order_id: "o-7".into(),
        total_cents: 100,
    };
    let stored = publisher.publish(&first).await.unwrap();
    // The same fact again: a duplicate, and fine.
    assert!(publisher.publish(&first).await.unwrap().duplicate);
    // The same key with another total: refused with a typed error.
    let corrected = OrderPlaced {
        order_id: "o-7".into(),
        total_cents: 250,
    };
    let err = publisher.publish(&corrected).await.unwrap_err();
    match &err {
        PublishError::Conflict {
            event,
            key,
            id,
            stream,
            sequence,
        } => {
            assert_eq!(*event, "OrderPlaced");
            assert_eq!(key, "o-7");
            assert_eq!(*id, stored.event_id);
            assert_eq!(stream, "ORDERS");
            assert_eq!(*sequence, stored.sequence);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(err.to_string().contains("with key (o-7)"), "{err}");
    let msgs = common::stream_messages(&client, "ORDERS").await;
    assert_eq!(msgs.len(), 1, "the stored event is the first one");
}

/// `publish_all` stores a batch in its order with the ids `publish` gives,
/// answers every event, is safe to call again, and stops at a bad event
/// with its error after answering what it had sent.
#[tokio::test]
async fn publish_all_stores_a_batch_in_order_with_the_same_ids_and_is_safe_to_repeat() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "import").unwrap();
    // More than PUBLISH_ALL_IN_FLIGHT, so acks are awaited while sending.
    let n = choreo::PUBLISH_ALL_IN_FLIGHT * 3 + 17;
    let orders: Vec<OrderPlaced> = (0..n)
        .map(|i| OrderPlaced {
            order_id: format!("o-{i}"),
            total_cents: i as u64,
        })
        .collect();
    let receipts = publisher.publish_all(&orders).await.unwrap();
    assert_eq!(receipts.len(), n);
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(r.sequence, i as u64 + 1, "stored in the order given");
        assert!(!r.duplicate);
        assert_eq!(r.correlation_id, r.event_id, "each is the root of its flow");
    }
    // The id `publish` gives the same fact: a duplicate of the batch's.
    let again = publisher.publish(&orders[5]).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.event_id, receipts[5].event_id);
    let msgs = common::stream_messages(&client, "ORDERS").await;
    assert_eq!(msgs.len(), n);
    assert!(
        msgs.iter()
            .enumerate()
            .all(|(i, m)| m.subject.as_str() == format!("orders.o-{i}.placed")),
        "the stream holds the batch in its order"
    );

    // The whole batch again: every event a duplicate, nothing stored.
    let repeat = publisher.publish_all(&orders).await.unwrap();
    assert!(repeat.iter().all(|r| r.duplicate));
    assert_eq!(common::stream_messages(&client, "ORDERS").await.len(), n);

    // A conflict in the middle: the error is the typed one, and the events
    // sent before it are stored.
    let mut mixed: Vec<OrderPlaced> = (n..n + 10)
        .map(|i| OrderPlaced {
            order_id: format!("o-{i}"),
            total_cents: 1,
        })
        .collect();
    mixed.insert(
        3,
        OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 999,
        },
    );
    let err = publisher.publish_all(&mixed).await.unwrap_err();
    assert!(
        matches!(&err, PublishError::Conflict { key, .. } if key == "o-1"),
        "{err:?}"
    );
    let stored = common::stream_messages(&client, "ORDERS").await;
    assert!(
        stored
            .iter()
            .any(|m| m.subject.as_str() == format!("orders.o-{}.placed", n + 2)),
        "the events before the conflict are stored"
    );
}

/// An event over the server's `max_payload` stops `publish_all` before it
/// is sent; the ones before it are stored, none after.
#[tokio::test]
async fn publish_all_refuses_an_event_too_large_and_sends_nothing_after_it() {
    let server = NatsServer::builder()
        .config("max_payload: 2048")
        .start()
        .await
        .unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "svc").unwrap();
    let notes: Vec<NoteAdded> = ["a", &"x".repeat(4000), "c"]
        .iter()
        .map(|t| NoteAdded {
            text: (*t).to_owned(),
        })
        .collect();
    let err = publisher.publish_all(&notes).await.unwrap_err();
    assert!(matches!(err, PublishError::TooLarge { .. }), "{err:?}");
    let stored = common::stream_messages(&client, "NOTES").await;
    assert_eq!(stored.len(), 1, "the first note only");
}
