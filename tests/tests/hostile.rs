//! Hostile input ends in a clear error or in the dead-letter stream, and the
//! service keeps handling good events.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::MAX_SUBJECT_LEN;
use choreo::async_nats::{HeaderMap, jetstream};
use choreo::headers as h;
use choreo::{
    Context, Envelope, Metadata, PublishError, Publisher, Service, State, SubjectError, dlq, event,
    event_handler,
};
use choreo_testkit::NatsServer;
use common::{dead_letters, eventually, header, stream_messages};

#[event(subject = "notes.{author}.written", key = (author, seq))]
#[derive(Debug, Clone, PartialEq)]
pub struct NoteWritten {
    pub author: String,
    pub seq: u64,
    pub body: String,
    /// What the handler should emit: "echo", "long-subject", "huge".
    pub mode: String,
}

#[event(subject = "echoes.{author}.made")]
#[derive(Debug, Clone, PartialEq)]
pub struct EchoMade {
    pub author: String,
    pub body: String,
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicU32>);

#[event_handler(max_deliver = 2, backoff = ["100ms"])]
async fn echo(note: NoteWritten, ctx: Context, State(n): State<Count>) {
    n.0.fetch_add(1, Ordering::SeqCst);
    let (author, body) = match note.mode.as_str() {
        "long-subject" => ("a".repeat(MAX_SUBJECT_LEN + 10), note.body),
        "huge" => (note.author, "x".repeat(8000)),
        _ => (note.author, note.body),
    };
    ctx.emit(EchoMade { author, body });
}

type HeaderEdit = Box<dyn Fn(&mut HeaderMap)>;

/// The echo service on `server`, its call count, and a publisher.
async fn start_echo(
    server: &NatsServer,
) -> (
    choreo::async_nats::Client,
    Count,
    choreo::ServiceHandle,
    Publisher,
) {
    let client = server.connect().await.unwrap();
    let count = Count::default();
    let svc = Service::new("echo")
        .state(count.clone())
        .handler(echo)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "desk").unwrap();
    (client, count, svc, publisher)
}

fn note(author: &str, seq: u64, body: &str, mode: &str) -> NoteWritten {
    NoteWritten {
        author: author.into(),
        seq,
        body: body.into(),
        mode: mode.into(),
    }
}

#[tokio::test]
async fn long_and_non_ascii_subject_values() {
    let server = NatsServer::start().await.unwrap();
    let (client, _count, svc, publisher) = start_echo(&server).await;
    let err = publisher
        .publish(&note(&"x".repeat(5000), 1, "b", "echo"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PublishError::Subject(SubjectError::TooLong { .. })),
        "{msg}"
    );
    assert!(
        msg.contains("`author`") && msg.contains("5000 bytes"),
        "{msg}"
    );
    // The connection is intact: the server never saw the line.
    publisher
        .publish(&note("zürich-東京", 2, "grüße", "echo"))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the non-ASCII note echoed", || {
        svc.stats("echo").unwrap().handled() == 1
    })
    .await;
    let echoes = stream_messages(&client, "ECHOES").await;
    assert_eq!(echoes[0].subject.as_str(), "echoes.zürich-東京.made");
    svc.shutdown().await;
}

#[tokio::test]
async fn header_injection_is_refused_and_body_text_stays_data() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let n = note("eve", 1, "hi", "echo");
    for bad in ["svc\r\nce-type: Evil", "svc\nx", "svc\r"] {
        assert!(Publisher::new(client.clone(), bad).is_err(), "{bad:?}");
        assert!(Metadata::root(&n, bad).is_err());
    }
    let meta = Metadata::root(&n, "svc").unwrap();
    assert!(
        meta.clone()
            .with_traceparent(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nce-type: Evil"
            )
            .is_err()
    );
    assert!(
        Publisher::new(client.clone(), "eve")
            .unwrap()
            .publish(&note("eve\r\nce-type: Evil", 2, "b", "echo"))
            .await
            .is_err()
    );

    // Newlines in a payload field are data: the headers are untouched.
    let publisher = Publisher::new(client.clone(), "desk").unwrap();
    let sneaky = note("eve", 3, "line\r\nce-type: Evil\r\n\r\nPUB x 1", "echo");
    publisher.publish(&sneaky).await.unwrap();
    let stored = stream_messages(&client, "NOTES").await;
    assert_eq!(
        header(&stored[0], h::CE_TYPE).as_deref(),
        Some("NoteWritten")
    );
    assert_eq!(stored[0].headers.get_all(h::CE_TYPE).count(), 1);
    let back =
        Envelope::<NoteWritten>::decode(&stored[0].subject, &stored[0].headers, &stored[0].payload)
            .unwrap();
    assert_eq!(back.into_event(), sneaky);
}

#[tokio::test]
async fn emissions_that_cannot_be_published_dead_letter_the_event_and_the_service_goes_on() {
    let server = NatsServer::builder()
        .config("max_payload: 4096")
        .start()
        .await
        .unwrap();
    let (client, _count, svc, publisher) = start_echo(&server).await;
    publisher
        .publish(&note("bob", 1, "b", "long-subject"))
        .await
        .unwrap();
    publisher
        .publish(&note("bob", 2, "b", "huge"))
        .await
        .unwrap();
    publisher
        .publish(&note("bob", 3, "fine", "echo"))
        .await
        .unwrap();
    let letters = dead_letters(&client, 2, Duration::from_secs(10)).await;
    for l in &letters {
        assert_eq!(header(l, dlq::REASON).as_deref(), Some("emit-failed"));
    }
    let details: Vec<String> = letters
        .iter()
        .map(|l| header(l, dlq::DETAIL).unwrap())
        .collect();
    assert!(
        details.iter().any(|d| d.contains("1024-byte limit")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("max_payload")),
        "{details:?}"
    );
    eventually(Duration::from_secs(10), "the good note", || {
        svc.stats("echo").unwrap().handled() == 1
    })
    .await;
    let echoes = stream_messages(&client, "ECHOES").await;
    assert_eq!(
        echoes.len(),
        1,
        "nothing of the failed emissions was published"
    );
    svc.shutdown().await;
}

#[tokio::test]
async fn oversized_and_odd_headers_from_other_clients_are_dead_lettered() {
    let server = NatsServer::start().await.unwrap();
    let (client, count, svc, publisher) = start_echo(&server).await;
    publisher.ensure_stream::<NoteWritten>().await.unwrap();
    let js = jetstream::new(client.clone());
    let good = note("mallory", 1, "b", "echo");
    let payload = choreo::codec::encode(&good).unwrap();
    let cases: Vec<(&str, HeaderEdit)> = vec![
        (
            "a 20 KiB ce-type",
            Box::new(|h: &mut HeaderMap| h.insert(h::CE_TYPE, "T".repeat(20_000))),
        ),
        (
            "a 20 KiB id",
            Box::new(|h: &mut HeaderMap| h.insert(h::CE_ID, "1".repeat(20_000))),
        ),
        (
            "a version beyond u32",
            Box::new(|h: &mut HeaderMap| h.insert(h::CE_EVENTVERSION, "99999999999")),
        ),
        (
            "a tab in ce-source",
            Box::new(|h: &mut HeaderMap| h.insert(h::CE_SOURCE, "a\tb")),
        ),
    ];
    for (i, (_, edit)) in cases.iter().enumerate() {
        let mut headers = Metadata::root(&note("mallory", 10 + i as u64, "b", "echo"), "raw")
            .unwrap()
            .to_headers();
        edit(&mut headers);
        js.publish_with_headers(
            format!("notes.mallory{i}.written"),
            headers,
            payload.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    publisher.publish(&good).await.unwrap();
    let letters = dead_letters(&client, cases.len(), Duration::from_secs(10)).await;
    assert_eq!(letters.len(), cases.len());
    eventually(Duration::from_secs(10), "the good note", || {
        svc.stats("echo").unwrap().handled() == 1
    })
    .await;
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        1,
        "no hostile message reached the handler"
    );
    svc.shutdown().await;
}
