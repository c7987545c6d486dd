//! Checking a choreography from its manifests alone: the graph of who emits
//! what to whom, and the lint's findings, each kind from manifests built for
//! it.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo::admin::{self, FindingKind, Graph, Severity};
use choreo::registry::{Manifest, PublishedEvent};
use choreo::{Context, Service, event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "shipments.{order_id}.sent", key = order_id)]
pub struct OrderShipped {
    pub order_id: String,
}

#[event(subject = "receipts.{order_id}.issued", key = order_id)]
pub struct ReceiptIssued {
    pub order_id: String,
}

#[event(subject = "refunds.{order_id}.requested", key = order_id)]
pub struct RefundRequested {
    pub order_id: String,
}

#[event_handler(emits = [PaymentCaptured])]
async fn charge(o: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: o.order_id,
    });
}

#[event_handler(emits = [OrderShipped])]
async fn ship(p: PaymentCaptured, ctx: Context) {
    ctx.emit(OrderShipped {
        order_id: p.order_id,
    });
}

#[event_handler(emits = [])]
async fn close(_s: OrderShipped) {}

#[event_handler(emits = [ReceiptIssued])]
async fn receipt(p: PaymentCaptured, ctx: Context) {
    ctx.emit(ReceiptIssued {
        order_id: p.order_id,
    });
}

#[event_handler(emits = [])]
async fn refund(_r: RefundRequested) {}

/// Re-places an order when its payment is captured: a loop.
#[event_handler(emits = [OrderPlaced])]
async fn replace(p: PaymentCaptured, ctx: Context) {
    ctx.emit(OrderPlaced {
        order_id: p.order_id,
    });
}

fn checkout(version: u32) -> PublishedEvent {
    serde_json::from_value(serde_json::json!({
        "source": "checkout",
        "event": {
            "event": "OrderPlaced",
            "version": version,
            "subject": "orders.{order_id}.placed",
            "subject_filter": "orders.*.placed",
            "stream": "ORDERS"
        },
        "first_published_at_ms": 0
    }))
    .unwrap()
}

fn clean() -> Vec<Manifest> {
    vec![
        Service::new("payments").handler(charge).manifest(),
        Service::new("shipping").handler(ship).manifest(),
        Service::new("orders").handler(close).manifest(),
    ]
}

#[test]
fn a_choreography_where_every_event_has_a_producer_and_a_consumer_is_clean() {
    let findings = admin::lint(&clean(), &[checkout(1)]);
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn the_graph_draws_an_arrow_from_each_producer_to_each_consumer() {
    let graph = Graph::new(&clean(), &[checkout(1)]);
    let mermaid = graph.mermaid();
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    for edge in [
        "checkout -->|OrderPlaced| payments.charge",
        "payments.charge -->|PaymentCaptured| shipping.ship",
        "shipping.ship -->|OrderShipped| orders.close",
    ] {
        assert!(mermaid.contains(edge), "{edge} missing:\n{mermaid}");
    }
    let dot = graph.dot();
    assert!(
        dot.contains("\"checkout\" -> \"payments.charge\" [label=\"OrderPlaced\"];"),
        "{dot}"
    );
    // And as JSON for scripts.
    let json = serde_json::to_value(&graph).unwrap();
    assert_eq!(
        json["consumers"]["OrderPlaced"]["payments.charge"],
        serde_json::json!([1])
    );
}

#[test]
fn each_kind_of_problem_is_found_with_its_severity() {
    let mut manifests = clean();
    manifests.push(Service::new("billing").handler(receipt).manifest());
    manifests.push(Service::new("refunds").handler(refund).manifest());
    let findings = admin::lint(&manifests, &[checkout(2)]);
    let of = |k: FindingKind| {
        findings
            .iter()
            .filter(move |f| f.kind == k)
            .collect::<Vec<_>>()
    };
    let unhandled = of(FindingKind::Unhandled);
    assert_eq!(unhandled.len(), 1, "{findings:#?}");
    assert!(
        unhandled[0]
            .message
            .contains("ReceiptIssued is produced by billing.receipt")
    );
    assert_eq!(unhandled[0].severity, Severity::Warning);
    let no_producer = of(FindingKind::NoProducer);
    assert_eq!(no_producer.len(), 1);
    assert!(
        no_producer[0]
            .message
            .contains("refunds.refund consumes RefundRequested")
    );
    let version = of(FindingKind::VersionNotAccepted);
    assert_eq!(version.len(), 1);
    assert!(
        version[0].message.contains(
            "checkout produces OrderPlaced version 2, but payments.charge accepts versions [1]"
        ),
        "{}",
        version[0].message
    );
    assert_eq!(version[0].severity, Severity::Error);
    // Errors come first.
    assert_eq!(findings[0].severity, Severity::Error);
}

#[test]
fn a_loop_of_events_is_an_error() {
    let mut manifests = clean();
    manifests.push(Service::new("retries").handler(replace).manifest());
    let findings = admin::lint(&manifests, &[checkout(1)]);
    let cycles: Vec<_> = findings
        .iter()
        .filter(|f| f.kind == FindingKind::Cycle)
        .collect();
    assert_eq!(cycles.len(), 1, "{findings:#?}");
    assert_eq!(cycles[0].severity, Severity::Error);
    assert!(
        cycles[0]
            .message
            .contains("OrderPlaced → PaymentCaptured → OrderPlaced"),
        "{}",
        cycles[0].message
    );
}
