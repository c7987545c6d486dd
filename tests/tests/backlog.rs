//! A handler says at start how many stored events it has ahead of it: a new
//! consumer what its `deliver` policy takes from the stream's history, an
//! existing one its backlog.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::{Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;

#[event(subject = "signups.{user}.made", key = user)]
#[derive(Debug, Clone)]
pub struct SignupMade {
    pub user: String,
}

/// A read model: sees all history (the default, `deliver = all`).
#[event_handler]
async fn count_signups(_s: SignupMade) {}

/// A notifier: must not mail every past customer.
#[event_handler(deliver = new)]
async fn welcome(_s: SignupMade) {}

async fn sign_up(publisher: &Publisher, from: usize, n: usize) {
    for i in from..from + n {
        publisher
            .publish(&SignupMade {
                user: format!("u-{i}"),
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_new_handler_says_how_much_history_its_deliver_policy_takes() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "web").unwrap();
    sign_up(&publisher, 0, 5).await;

    let model = Service::new("model")
        .handler(count_signups)
        .start(client.clone())
        .await
        .unwrap();
    let notifier = Service::new("notifier")
        .handler(welcome)
        .start(client.clone())
        .await
        .unwrap();
    let counted = model.stats("count_signups").unwrap();
    let welcomed = notifier.stats("welcome").unwrap();
    assert_eq!(
        counted.backlog_at_start(),
        5,
        "deliver = all takes the history"
    );
    assert_eq!(
        welcomed.backlog_at_start(),
        0,
        "deliver = new takes none of it"
    );
    eventually(Duration::from_secs(10), "the history counted", || {
        counted.handled() == 5
    })
    .await;
    sign_up(&publisher, 5, 1).await;
    eventually(Duration::from_secs(10), "the new signup welcomed", || {
        welcomed.handled() == 1 && counted.handled() == 6
    })
    .await;
    model.shutdown().await;

    // An existing consumer reports its backlog.
    sign_up(&publisher, 6, 3).await;
    let model = Service::new("model")
        .handler(count_signups)
        .start(client.clone())
        .await
        .unwrap();
    assert_eq!(model.stats("count_signups").unwrap().backlog_at_start(), 3);
    model.shutdown().await;
    notifier.shutdown().await;
}
