//! Every bad input and every exhausted handler ends in the dead-letter stream,
//! with its reason, while the service keeps handling good events.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::async_nats::{HeaderMap, jetstream};
use choreo::dlq;
use choreo::{Context, HandlerError, Metadata, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::{dead_letters, eventually, header};

#[event(subject = "jobs.{id}.queued", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct JobQueued {
    pub id: String,
    /// What the handler should do: "ok", "permanent", "fail", "panic", "hang".
    pub mode: String,
}

#[derive(Clone, Default)]
struct Counters {
    ok: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

#[event_handler(max_deliver = 3, backoff = ["100ms"], ack_wait = "1s")]
async fn run_job(job: JobQueued, State(c): State<Counters>) -> Result<(), HandlerError> {
    c.calls.fetch_add(1, Ordering::SeqCst);
    match job.mode.as_str() {
        "permanent" => Err(HandlerError::permanent(std::io::Error::other(
            "job is malformed",
        ))),
        "fail" => Err(std::io::Error::other("database unavailable").into()),
        "panic" => panic!("boom in job {}", job.id),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        _ => {
            c.ok.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

async fn setup() -> (
    NatsServer,
    choreo::async_nats::Client,
    Counters,
    choreo::ServiceHandle,
    Publisher,
) {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counters = Counters::default();
    let svc = Service::new("jobs")
        .state(counters.clone())
        .handler(run_job)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "queue").unwrap();
    (server, client, counters, svc, publisher)
}

fn job(id: &str, mode: &str) -> JobQueued {
    JobQueued {
        id: id.into(),
        mode: mode.into(),
    }
}

/// Every message gets its verdict: the handler's counters move before
/// its event is recorded and acked, so this waits up to 5 s for it.
async fn assert_settled(client: &choreo::async_nats::Client) {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("JOBS").await.unwrap();
    let mut c: jetstream::consumer::PullConsumer =
        stream.get_consumer("jobs--run_job").await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = c.info().await.unwrap();
        let left = (info.num_pending, info.num_ack_pending);
        if left == (0, 0) || tokio::time::Instant::now() > until {
            assert_eq!(left, (0, 0), "every message has a verdict");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_permanent_error_is_dead_lettered_at_once_with_the_original_message() {
    let (_server, client, counters, svc, publisher) = setup().await;
    let receipt = publisher.publish(&job("j1", "permanent")).await.unwrap();
    publisher.publish(&job("j2", "ok")).await.unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    let l = &letters[0];
    assert_eq!(l.subject.as_str(), "choreo.dlq.jobs.run_job");
    assert_eq!(header(l, dlq::REASON).as_deref(), Some("permanent-error"));
    assert!(header(l, dlq::DETAIL).unwrap().contains("job is malformed"));
    assert_eq!(header(l, dlq::SERVICE).as_deref(), Some("jobs"));
    assert_eq!(header(l, dlq::HANDLER).as_deref(), Some("run_job"));
    assert_eq!(header(l, dlq::DELIVERIES).as_deref(), Some("1"));
    assert_eq!(header(l, dlq::STREAM).as_deref(), Some("JOBS"));
    assert_eq!(header(l, dlq::SEQUENCE), Some(receipt.sequence.to_string()));
    assert_eq!(header(l, dlq::SUBJECT).as_deref(), Some("jobs.j1.queued"));
    // The original headers and payload travel unchanged.
    assert_eq!(header(l, "ce-id"), Some(receipt.event_id.to_string()));
    let original =
        choreo::Envelope::<JobQueued>::decode("jobs.j1.queued", &l.headers, &l.payload).unwrap();
    assert_eq!(original.into_event(), job("j1", "permanent"));
    eventually(Duration::from_secs(5), "the good job", || {
        counters.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        counters.calls.load(Ordering::SeqCst),
        2,
        "the permanent failure was not retried"
    );
    assert_settled(&client).await;
    let info = jetstream::new(client.clone())
        .get_stream(dlq::DLQ_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.retention,
        jetstream::stream::RetentionPolicy::Limits
    );
    assert_eq!(svc.stats("run_job").unwrap().dead_lettered(), 1);
    svc.shutdown().await;
}

#[tokio::test]
async fn a_retryable_error_is_retried_with_backoff_then_dead_lettered_after_max_deliver() {
    let (_server, client, counters, svc, publisher) = setup().await;
    publisher.publish(&job("j1", "fail")).await.unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        header(&letters[0], dlq::REASON).as_deref(),
        Some("max-deliver-exceeded")
    );
    assert_eq!(header(&letters[0], dlq::DELIVERIES).as_deref(), Some("3"));
    assert!(
        header(&letters[0], dlq::DETAIL)
            .unwrap()
            .contains("database unavailable")
    );
    assert_eq!(counters.calls.load(Ordering::SeqCst), 3);
    assert_eq!(svc.stats("run_job").unwrap().retried(), 2);
    publisher.publish(&job("j2", "ok")).await.unwrap();
    eventually(Duration::from_secs(5), "the good job", || {
        counters.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_settled(&client).await;
    svc.shutdown().await;
}

#[tokio::test]
async fn a_panic_is_caught_retried_and_the_service_keeps_running() {
    let (_server, client, counters, svc, publisher) = setup().await;
    publisher.publish(&job("j1", "panic")).await.unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        header(&letters[0], dlq::REASON).as_deref(),
        Some("max-deliver-exceeded")
    );
    assert!(
        header(&letters[0], dlq::DETAIL)
            .unwrap()
            .contains("panicked: boom in job j1")
    );
    assert_eq!(svc.stats("run_job").unwrap().panicked(), 3);
    for i in 0..5 {
        publisher
            .publish(&job(&format!("g{i}"), "ok"))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(5), "good jobs after the panics", || {
        counters.ok.load(Ordering::SeqCst) == 5
    })
    .await;
    svc.shutdown().await;
}

async fn publish_raw(
    client: &choreo::async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    payload: Vec<u8>,
) {
    jetstream::new(client.clone())
        .publish_with_headers(subject.to_owned(), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn valid_headers(e: &JobQueued) -> HeaderMap {
    Metadata::root(e, "raw").unwrap().to_headers()
}

#[tokio::test]
async fn undecodable_payloads_unknown_versions_and_bad_headers_are_dead_lettered_with_their_reason()
{
    let (_server, client, counters, svc, publisher) = setup().await;
    // Make sure the stream exists before raw publishes.
    publisher.ensure_stream::<JobQueued>().await.unwrap();

    let garbage = job("bad1", "ok");
    publish_raw(
        &client,
        "jobs.bad1.queued",
        valid_headers(&garbage),
        vec![0xff, 0x00, 0x13],
    )
    .await;

    let future = job("bad2", "ok");
    let mut h = valid_headers(&future);
    h.insert("ce-eventversion", "9");
    publish_raw(
        &client,
        "jobs.bad2.queued",
        h,
        choreo::codec::encode(&future).unwrap(),
    )
    .await;

    publish_raw(
        &client,
        "jobs.bad3.queued",
        HeaderMap::new(),
        b"hello".to_vec(),
    )
    .await;

    let mut h = valid_headers(&job("bad4", "ok"));
    h.insert("ce-type", "SomethingElse");
    publish_raw(
        &client,
        "jobs.bad4.queued",
        h,
        choreo::codec::encode(&job("bad4", "ok")).unwrap(),
    )
    .await;

    let mut h = valid_headers(&job("bad5", "ok"));
    h.insert("ce-correlationid", "not-a-uuid");
    publish_raw(
        &client,
        "jobs.bad5.queued",
        h,
        choreo::codec::encode(&job("bad5", "ok")).unwrap(),
    )
    .await;

    publisher.publish(&job("good", "ok")).await.unwrap();

    let letters = dead_letters(&client, 5, Duration::from_secs(10)).await;
    let by_subject = |s: &str| {
        letters
            .iter()
            .find(|l| header(l, dlq::SUBJECT).as_deref() == Some(s))
            .unwrap()
    };
    let reason = |s: &str| header(by_subject(s), dlq::REASON).unwrap();
    let detail = |s: &str| header(by_subject(s), dlq::DETAIL).unwrap();
    assert_eq!(reason("jobs.bad1.queued"), "undecodable-payload");
    assert_eq!(reason("jobs.bad2.queued"), "unknown-version");
    assert!(
        detail("jobs.bad2.queued").contains("version 9"),
        "{}",
        detail("jobs.bad2.queued")
    );
    assert_eq!(reason("jobs.bad3.queued"), "bad-header");
    assert!(
        detail("jobs.bad3.queued").contains("is missing"),
        "{}",
        detail("jobs.bad3.queued")
    );
    assert_eq!(reason("jobs.bad4.queued"), "wrong-type");
    assert_eq!(reason("jobs.bad5.queued"), "bad-header");
    assert!(detail("jobs.bad5.queued").contains("ce-correlationid"));
    // The raw payload is kept byte for byte.
    assert_eq!(
        by_subject("jobs.bad1.queued").payload.as_ref(),
        &[0xff, 0x00, 0x13]
    );
    assert_eq!(by_subject("jobs.bad3.queued").payload.as_ref(), b"hello");
    eventually(Duration::from_secs(5), "the good job", || {
        counters.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        counters.calls.load(Ordering::SeqCst),
        1,
        "no bad message reached the handler"
    );
    assert_settled(&client).await;
    svc.shutdown().await;
}

#[event_handler(max_deliver = 1, ack_wait = "1s")]
async fn hang_once(
    job: JobQueued,
    ctx: Context,
    State(c): State<Counters>,
) -> Result<(), HandlerError> {
    c.calls.fetch_add(1, Ordering::SeqCst);
    if job.mode == "hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let _ = ctx;
    Ok(())
}

#[tokio::test]
async fn a_last_delivery_lost_to_a_crash_reaches_the_dead_letter_stream() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counters = Counters::default();
    let svc = Service::new("jobs")
        .state(counters.clone())
        .handler(hang_once)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "queue").unwrap();
    let receipt = publisher.publish(&job("j1", "hang")).await.unwrap();
    eventually(Duration::from_secs(5), "the handler to start", || {
        counters.calls.load(Ordering::SeqCst) == 1
    })
    .await;
    // Crash: no verdict, no more in-progress acks. ack_wait (1 s) lapses on
    // the only allowed delivery, and JetStream raises MAX_DELIVERIES while no
    // instance runs; the advisory stream keeps it for the next one.
    svc.abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counters2 = Counters::default();
    let svc2 = Service::new("jobs")
        .state(counters2.clone())
        .handler(hang_once)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(15)).await;
    assert_eq!(
        header(&letters[0], dlq::REASON).as_deref(),
        Some("delivery-lost")
    );
    assert_eq!(
        header(&letters[0], dlq::SEQUENCE),
        Some(receipt.sequence.to_string())
    );
    assert_eq!(
        header(&letters[0], "ce-id"),
        Some(receipt.event_id.to_string())
    );
    assert_eq!(
        header(&letters[0], dlq::HANDLER).as_deref(),
        Some("hang_once")
    );
    assert_eq!(
        counters2.calls.load(Ordering::SeqCst),
        0,
        "max_deliver = 1: not delivered again"
    );
    svc2.shutdown().await;
}

/// Publishes a MAX_DELIVERIES advisory as any client allowed to publish on
/// `$JS.EVENT.ADVISORY.>` could.
async fn forge_advisory(
    client: &choreo::async_nats::Client,
    subject_consumer: &str,
    stream: &str,
    consumer: &str,
    seq: u64,
) {
    let body = serde_json::json!({
        "type": "io.nats.jetstream.advisory.v1.max_deliver",
        "id": format!("forged-{seq}-{consumer}"),
        "timestamp": "2026-01-01T00:00:00Z",
        "stream": stream,
        "consumer": consumer,
        "stream_seq": seq,
        "deliveries": 3,
    });
    client
        .publish(
            format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.JOBS.{subject_consumer}"),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

#[tokio::test]
async fn forged_max_deliveries_advisories_copy_nothing_into_the_dead_letter_stream() {
    let (_server, client, counters, svc, publisher) = setup().await;
    let handled = publisher.publish(&job("h1", "ok")).await.unwrap();
    eventually(Duration::from_secs(5), "the job to be handled", || {
        counters.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    // A handled event, a sequence past the end, another stream or consumer
    // in the payload than in the subject.
    let durable = "jobs--run_job";
    forge_advisory(&client, durable, "JOBS", durable, handled.sequence).await;
    forge_advisory(&client, durable, "JOBS", durable, handled.sequence + 50).await;
    forge_advisory(&client, durable, "ORDERS", durable, handled.sequence).await;
    forge_advisory(&client, durable, "JOBS", "jobs--other", handled.sequence).await;
    // An event not yet delivered: stop the service, publish, forge.
    svc.shutdown().await;
    let waiting = publisher.publish(&job("w1", "ok")).await.unwrap();
    forge_advisory(&client, durable, "JOBS", durable, waiting.sequence).await;
    let svc = Service::new("jobs")
        .state(counters.clone())
        .handler(run_job)
        .start(client.clone())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the waiting job to be handled",
        || counters.ok.load(Ordering::SeqCst) == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let letters = common::stream_messages(&client, dlq::DLQ_STREAM).await;
    assert!(
        letters.is_empty(),
        "forged advisories made dead letters: {:?}",
        letters
            .iter()
            .map(|m| header(m, dlq::SEQUENCE))
            .collect::<Vec<_>>()
    );
    assert_eq!(svc.stats("run_job").unwrap().dead_lettered(), 0);
    svc.shutdown().await;
}

#[tokio::test]
async fn a_message_carrying_jetstream_control_headers_still_becomes_a_letter() {
    let (_server, client, counters, svc, _publisher) = setup().await;
    let js = jetstream::new(client.clone());
    let last = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    // Stored because it holds for JOBS; copied as is, the dead-letter
    // stream would refuse it forever.
    let e = job("ctl", "permanent");
    let mut headers = valid_headers(&e);
    headers.insert("Nats-Expected-Last-Sequence", last.to_string());
    headers.insert("Nats-Expected-Stream", "JOBS");
    let payload = choreo::codec::encode(&e).unwrap();
    publish_raw(&client, "jobs.ctl.queued", headers, payload).await;
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    let l = &letters[0];
    assert_eq!(header(l, dlq::REASON).as_deref(), Some("permanent-error"));
    assert_eq!(header(l, "Nats-Expected-Last-Sequence"), None);
    assert_eq!(header(l, "Nats-Expected-Stream"), None);
    assert_eq!(header(l, "ce-type").as_deref(), Some("JobQueued"));
    assert_eq!(counters.calls.load(Ordering::SeqCst), 1);
    assert_settled(&client).await;
    svc.shutdown().await;
}

#[tokio::test]
async fn a_payload_just_below_max_payload_becomes_a_letter_with_a_reference() {
    let (_server, client, counters, svc, _publisher) = setup().await;
    let max = client.server_info().max_payload;
    let headers = valid_headers(&job("big", "ok"));
    let header_bytes: usize = headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    let room = max - header_bytes - "NATS/1.0\r\n\r\n".len();
    // Not CBOR: undecodable, and 64 bytes below the limit, so the copy
    // with its reason headers would not fit.
    let payload = vec![0xff_u8; room - 64];
    let receipt_seq = {
        publish_raw(&client, "jobs.big.queued", headers, payload).await;
        jetstream::new(client.clone())
            .get_stream("JOBS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence
    };
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    let l = &letters[0];
    assert_eq!(
        header(l, dlq::REASON).as_deref(),
        Some("undecodable-payload")
    );
    assert!(l.payload.is_empty());
    let omitted = header(l, dlq::OMITTED).unwrap();
    assert!(
        omitted.contains(&format!("stream JOBS at sequence {receipt_seq}")),
        "{omitted}"
    );
    assert_eq!(header(l, dlq::SEQUENCE), Some(receipt_seq.to_string()));
    let listed = dlq::list(&jetstream::new(client.clone()), "jobs", "run_job")
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].omitted.is_some());
    assert_eq!(listed[0].original_stream, "JOBS");
    assert_eq!(listed[0].original_sequence, receipt_seq);
    // Replay reads the event from its stream: the full payload goes back on
    // its subject (and, still undecodable, comes back as a new letter).
    dlq::replay(&jetstream::new(client.clone()), &listed[0])
        .await
        .unwrap();
    let replayed = common::stream_messages(&client, "JOBS").await;
    let last = replayed.last().unwrap();
    assert_eq!(last.subject.as_str(), "jobs.big.queued");
    assert_eq!(last.payload.len(), room - 64);
    dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(counters.calls.load(Ordering::SeqCst), 0);
    assert_settled(&client).await;
    svc.shutdown().await;
}

// ---- reading and replaying dead letters ------------------------------------------

#[derive(Clone, Default)]
struct Fixed(Arc<std::sync::atomic::AtomicBool>);

#[event_handler]
async fn picky(
    job: JobQueued,
    State(fixed): State<Fixed>,
    State(c): State<Counters>,
) -> Result<(), HandlerError> {
    c.calls.fetch_add(1, Ordering::SeqCst);
    if !fixed.0.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent(std::io::Error::other(format!(
            "cannot run {} yet",
            job.id
        ))));
    }
    c.ok.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[event_handler]
async fn audit_jobs(_job: JobQueued, State(c): State<Counters>) {
    c.ok.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn dead_letters_can_be_listed_and_replayed_once_fixed() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let (fixed, picky_counts, audit_counts) =
        (Fixed::default(), Counters::default(), Counters::default());
    let worker = Service::new("worker")
        .state(fixed.clone())
        .state(picky_counts.clone())
        .handler(picky)
        .start(client.clone())
        .await
        .unwrap();
    let audit = Service::new("audit")
        .state(audit_counts.clone())
        .handler(audit_jobs)
        .start(client.clone())
        .await
        .unwrap();
    let receipt = Publisher::new(client.clone(), "queue")
        .unwrap()
        .publish(&job("j1", "ok"))
        .await
        .unwrap();
    dead_letters(&client, 1, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(5), "the audit", || {
        audit_counts.ok.load(Ordering::SeqCst) == 1
    })
    .await;

    let letters = dlq::list(&jetstream::new(client.clone()), "worker", "picky")
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(
        (l.reason.as_str(), l.service.as_str(), l.handler.as_str()),
        ("permanent-error", "worker", "picky")
    );
    assert!(l.detail.contains("cannot run j1 yet"), "{}", l.detail);
    assert_eq!(l.original_subject, "jobs.j1.queued");
    assert!(
        l.headers.get("choreo-dlq-reason").is_none(),
        "reason headers are not part of the original"
    );
    let unknown = dlq::list(&jetstream::new(client.clone()), "worker", "other")
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, dlq::DlqError::UnknownHandler { handler, .. } if handler == "other"),
        "{unknown:?}"
    );
    assert!(
        unknown.to_string().contains("has no handler other"),
        "{unknown}"
    );

    fixed.0.store(true, Ordering::SeqCst);
    dlq::replay(&jetstream::new(client.clone()), l)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the replayed job handled", || {
        picky_counts.ok.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        dlq::list(&jetstream::new(client.clone()), "worker", "picky")
            .await
            .unwrap()
            .is_empty(),
        "a replayed letter leaves the stream"
    );
    // The replay carries the same event id: the audit service's inbox skips it.
    eventually(
        Duration::from_secs(10),
        "the audit to see the replay",
        || audit.stats("audit_jobs").unwrap().skipped() == 1,
    )
    .await;
    assert_eq!(audit_counts.ok.load(Ordering::SeqCst), 1);
    let stored = common::stream_messages(&client, "JOBS").await;
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|m| header(m, "ce-id") == Some(receipt.event_id.to_string()))
    );
    worker.shutdown().await;
    audit.shutdown().await;
}

#[tokio::test]
async fn listing_dead_letters_where_no_service_ever_started_says_so() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let err = dlq::list(&jetstream::new(client.clone()), "jobs", "run_job")
        .await
        .unwrap_err();
    assert!(matches!(err, dlq::DlqError::NoStream), "{err:?}");
    assert!(
        err.to_string()
            .contains("no choreo service has started here"),
        "{err}"
    );
}

#[tokio::test]
async fn listing_does_not_hang_when_letters_vanish_while_it_reads() {
    let (_server, client, _counters, svc, publisher) = setup().await;
    for i in 0..40 {
        publisher
            .publish(&job(&format!("p{i}"), "permanent"))
            .await
            .unwrap();
    }
    dead_letters(&client, 40, Duration::from_secs(20)).await;
    let lister = client.clone();
    let listing =
        tokio::spawn(
            async move { dlq::list(&jetstream::new(lister.clone()), "jobs", "run_job").await },
        );
    jetstream::new(client.clone())
        .get_stream(dlq::DLQ_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let listed = tokio::time::timeout(Duration::from_secs(15), listing)
        .await
        .expect("dlq::list returned")
        .unwrap()
        .unwrap();
    assert!(listed.len() <= 40);
    assert!(
        dlq::list(&jetstream::new(client.clone()), "jobs", "run_job")
            .await
            .unwrap()
            .is_empty()
    );
    svc.shutdown().await;
}
