//! One span per handled event, with the fields a trace needs, and trace
//! context carried from event to event in `traceparent`.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;
#[path = "common/round_trip.rs"]
mod round_trip;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::{Envelope, Metadata, Publisher, Service};
use choreo_testkit::NatsServer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

use round_trip::{OrderPlaced, PaymentCaptured, charge};

type Spans = Arc<Mutex<HashMap<u64, (String, HashMap<String, String>)>>>;

#[derive(Clone, Default)]
struct Capture(Spans);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: LayerContext<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_owned(), fields));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
        if let Some((_, fields)) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_handled_event_has_a_span_with_its_ids_and_traceparent_travels() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));

    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let svc = Service::new("payments")
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    let order = OrderPlaced {
        order_id: "o-1".into(),
    };
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let meta = Metadata::root(&order, "checkout")
        .unwrap()
        .with_traceparent(trace)
        .unwrap();
    Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish_with(&order, &meta)
        .await
        .unwrap();

    let mut emitted = Vec::new();
    for _ in 0..200 {
        emitted = common::stream_messages(&client, "PAYMENTS").await;
        if !emitted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(emitted.len(), 1);
    let e = Envelope::<PaymentCaptured>::decode(
        &emitted[0].subject,
        &emitted[0].headers,
        &emitted[0].payload,
    )
    .unwrap();
    assert_eq!(
        e.meta().traceparent(),
        Some(trace),
        "trace context travels to emitted events"
    );
    svc.shutdown().await;

    let spans = capture.0.lock().unwrap();
    let handle: Vec<_> = spans
        .values()
        .filter(|(name, _)| name == "choreo.handle")
        .collect();
    assert_eq!(handle.len(), 1, "one span per handled event");
    let f = &handle[0].1;
    let want = [
        ("service", "payments".to_owned()),
        ("handler", "charge".to_owned()),
        ("event_type", "OrderPlaced".to_owned()),
        ("event_id", meta.id().to_string()),
        ("correlation_id", meta.id().to_string()),
        ("attempt", "1".to_owned()),
        ("traceparent", trace.to_owned()),
        ("subject", "orders.o-1.placed".to_owned()),
    ];
    for (k, v) in want {
        assert_eq!(f.get(k), Some(&v), "span field {k}: {f:?}");
    }
    assert!(f.contains_key("stream_sequence"));
}
