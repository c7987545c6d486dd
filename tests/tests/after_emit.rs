//! `Context::emissions` shows a handler's emissions as they will be
//! published, and `Context::after_emit` runs once they are stored, before
//! the ack; not when the handler fails.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Context, HandlerError, Publisher, Service, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;

#[event(subject = "jobs.{id}.asked")]
pub struct JobAsked {
    pub id: String,
}

#[event(subject = "work.{id}.done")]
pub struct JobDone {
    pub id: String,
}

/// What the hooks saw: (job, emission ids seen by `emissions`, how many
/// `JobDone` the stream held when the hook ran).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Sighting>>>);

type Sighting = (String, Vec<String>, u64);

#[event_handler(emits = JobDone)]
async fn work(
    job: JobAsked,
    ctx: Context,
    State(seen): State<Seen>,
    State(js): State<jetstream::Context>,
) -> Result<(), HandlerError> {
    ctx.emit(JobDone { id: job.id.clone() });
    let emissions = ctx.emissions()?;
    let ids: Vec<String> = emissions.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(emissions[0].subject, format!("work.{}.done", job.id));
    assert_eq!(emissions[0].event_type, "JobDone");
    let failing = job.id == "fails";
    ctx.after_emit(move || {
        Box::pin(async move {
            let stored = js
                .get_stream("WORK")
                .await
                .map(|s| s.cached_info().state.messages)
                .unwrap_or(0);
            seen.0.lock().unwrap().push((job.id, ids, stored));
        })
    });
    if failing {
        return Err(HandlerError::permanent("fails after registering its hook"));
    }
    Ok(())
}

#[tokio::test]
async fn the_hook_runs_once_the_emissions_are_stored_and_not_when_the_handler_fails() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let seen = Seen::default();
    let svc = Service::new("worker")
        .state(seen.clone())
        .state(jetstream::new(client.clone()))
        .handler(work)
        .start(client.clone())
        .await
        .unwrap();
    let p = Publisher::new(client.clone(), "boss").unwrap();
    p.publish(&JobAsked { id: "fails".into() }).await.unwrap();
    p.publish(&JobAsked { id: "j1".into() }).await.unwrap();
    eventually(Duration::from_secs(10), "the hook ran", || {
        !seen.0.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the handler that succeeded: {seen:?}");
    let (job, ids, stored) = &seen[0];
    assert_eq!(job, "j1");
    assert_eq!(*stored, 1, "the emission was stored before the hook ran");
    let stream = jetstream::new(client.clone())
        .get_stream("WORK")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(
        stream.headers.get("ce-id").unwrap().as_str(),
        ids[0],
        "emissions() showed the id that was published"
    );
    svc.shutdown().await;
}
