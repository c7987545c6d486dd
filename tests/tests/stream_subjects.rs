//! `#[event(stream_subjects = ...)]`: an event type in a stream of its own,
//! beside another type of the same first token, against a real nats-server.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Context, PublishError, Publisher, Service, StreamError, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;

/// The busy type, alone in its stream.
#[event(
    subject = "steps.{account}.taken",
    key = (account, n),
    stream = "STEPS_TAKEN",
    stream_subjects = "steps.*.taken"
)]
pub struct StepTaken {
    pub account: String,
    pub n: u64,
}

/// Another type of the same first token, in the first token's stream, whose
/// subjects leave room for `STEPS_TAKEN`.
#[event(subject = "steps.{account}.undone", key = (account, n), stream_subjects = "steps.*.undone")]
pub struct StepUndone {
    pub account: String,
    pub n: u64,
}

/// A third type that asks for the whole first token, which the other two
/// streams already store part of.
#[event(subject = "steps.{account}.audited", key = account)]
pub struct StepAudited {
    pub account: String,
}

#[event_handler]
async fn undo_each_step(e: StepTaken, ctx: Context) {
    ctx.emit(StepUndone {
        account: e.account,
        n: e.n,
    });
}

async fn info(js: &jetstream::Context, stream: &str) -> jetstream::stream::Info {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

#[tokio::test]
async fn an_event_type_gets_a_stream_of_its_own_beside_others_of_its_first_token() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(client.clone(), "steps").unwrap();
    let handle = Service::new("undo")
        .handler(undo_each_step)
        .start(client.clone())
        .await
        .unwrap();
    for n in 0..20 {
        let receipt = publisher
            .publish(&StepTaken {
                account: format!("a-{}", n % 4),
                n,
            })
            .await
            .unwrap();
        assert_eq!(receipt.stream, "STEPS_TAKEN");
    }
    eventually(Duration::from_secs(10), "every step handled", || {
        handle.stats("undo_each_step").map_or(0, |s| s.handled()) == 20
    })
    .await;
    handle.shutdown().await;
    // Each stream holds its own type only, with the subjects the types say.
    let (taken, undone) = (info(&js, "STEPS_TAKEN").await, info(&js, "STEPS").await);
    assert_eq!(taken.config.subjects, ["steps.*.taken"]);
    assert_eq!(undone.config.subjects, ["steps.*.undone"]);
    assert_eq!((taken.state.messages, undone.state.messages), (20, 20));

    // A type of the same first token with the default `steps.>` would
    // overlap them: STEPS exists and does not store it, which says what to do.
    let err = publisher
        .publish(&StepAudited {
            account: "a-1".into(),
        })
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PublishError::Stream(StreamError::DoesNotCover { .. })),
        "{msg}"
    );
    assert!(
        msg.contains("STEPS") && msg.contains("stream_subjects = \"steps.*.audited\""),
        "{msg}"
    );
}
