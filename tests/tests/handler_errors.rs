//! What a handler may fail with: `?` on any `std::error::Error`, on
//! `anyhow::Error`, on `Box<dyn Error + Send + Sync>` and on a message, each
//! retryable; `HandlerError::permanent` dead-letters at once; and
//! `HandlerError::retry_after` overrides the backoff for one retry.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use choreo::{HandlerError, HandlerErrorKind, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;

#[event(subject = "jobs.{id}.queued", key = id)]
#[derive(Debug, Clone)]
pub struct JobQueued {
    pub id: String,
    /// How the first attempt fails: "io", "anyhow", "boxed", "message" or "later".
    pub failure: String,
}

#[derive(Clone, Default)]
struct Calls(Arc<std::sync::Mutex<Vec<(String, u32, Instant)>>>);

fn first_failure(failure: &str) -> Result<(), HandlerError> {
    match failure {
        "io" => Err(std::io::Error::other("disk on fire"))?,
        "anyhow" => Err(anyhow::anyhow!("upstream said no"))?,
        "boxed" => {
            let e: Box<dyn std::error::Error + Send + Sync> = "boxed failure".into();
            Err(e)?
        }
        "message" => Err(String::from("a plain message"))?,
        "later" => {
            return Err(
                HandlerError::retryable("rate limited").retry_after(Duration::from_millis(200))
            );
        }
        _ => {}
    }
    Ok(())
}

// A 30 s backoff: a retry that comes sooner came from `retry_after`.
#[event_handler(max_deliver = 3, backoff = ["30s"], ack_wait = "2s")]
async fn run_job(
    job: JobQueued,
    ctx: choreo::Context,
    State(calls): State<Calls>,
) -> Result<(), HandlerError> {
    calls
        .0
        .lock()
        .unwrap()
        .push((job.id.clone(), ctx.attempt(), Instant::now()));
    if ctx.attempt() == 1 {
        first_failure(&job.failure)?;
    }
    Ok(())
}

#[test]
fn every_error_kind_converts_into_a_retryable_handler_error() {
    for failure in ["io", "anyhow", "boxed", "message", "later"] {
        let e = first_failure(failure).unwrap_err();
        assert_eq!(e.kind(), HandlerErrorKind::Retryable, "{failure}");
        assert!(!e.is_permanent());
    }
    let e = first_failure("anyhow").unwrap_err();
    assert_eq!(e.to_string(), "retryable error: upstream said no");
    // `{:?}` is the message, as a test returning the error prints it.
    assert_eq!(format!("{e:?}"), "retryable error: upstream said no");
    assert_eq!(
        first_failure("later").unwrap_err().retry_delay(),
        Some(Duration::from_millis(200))
    );
    assert!(HandlerError::permanent(std::io::Error::other("bad data")).is_permanent());
}

#[tokio::test]
async fn retry_after_overrides_the_backoff_once() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let calls = Calls::default();
    let _svc = Service::new("jobs")
        .state(calls.clone())
        .handler(run_job)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "queue").unwrap();
    publisher
        .publish(&JobQueued {
            id: "j-1".into(),
            failure: "later".into(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the retry", || {
        calls.0.lock().unwrap().len() >= 2
    })
    .await;
    let seen = calls.0.lock().unwrap().clone();
    let gap = seen[1].2 - seen[0].2;
    assert_eq!((seen[0].1, seen[1].1), (1, 2));
    assert!(
        gap < Duration::from_secs(5),
        "the retry came after {gap:?}: retry_after(200ms) did not override the 30 s backoff"
    );
    assert!(
        gap >= Duration::from_millis(150),
        "retried after {gap:?}, before the 200 ms asked for"
    );
}
