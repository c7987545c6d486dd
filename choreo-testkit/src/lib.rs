//! Test choreo services against real NATS servers, and assert whole event
//! flows.
//!
//! - [`NatsServer`] runs a real `nats-server` process for one test: a free
//!   loopback port learned from the server's own ports file (no guessing, no
//!   races between parallel tests), JetStream on, a temp store, readiness
//!   awaited through `/healthz` rather than slept for, the process killed on
//!   drop (its directory kept and printed if the test panicked).
//! - [`NatsCluster`] runs a 3-node (or n-node) JetStream cluster whose nodes a
//!   test can stop, kill and restart, waiting for stream leaders.
//! - [`Recorder`] records every choreo event on the streams and answers
//!   `expect`, `expect_none`, `flow` and `quiescent`; a [`Flow`] asserts its
//!   paths, causes, counts and duplicates, and renders as a causation tree or
//!   a Mermaid sequence diagram. Every failure message shows what arrived.
//! - [`TestService`] starts a service, stops it gracefully, crashes it, and
//!   starts it again.
//! - [`PostgresServer`] runs a real Postgres for one test the same way: a
//!   fresh cluster in a temp dir, a free loopback port, readiness read from
//!   the server's pid file, stopped on drop; as root (CI, containers) it runs
//!   the server as the `postgres` user. [`PostgresServer::psql`] runs SQL
//!   with the server's own `psql`; the binaries come from
//!   `$POSTGRES_BIN_DIR`, `pg_config` or Debian's `/usr/lib/postgresql`.
//! - [`Browser`] runs a real headless Chromium for tests of web pages
//!   (the `choreo console`), driven over the DevTools protocol: open a
//!   [`Page`], evaluate, wait for a condition, click, take a screenshot.
//!
//! The binary comes from `$NATS_SERVER_BIN`, then `PATH`, then the project's
//! local install made by `scripts/test`; when there is none, starting fails
//! with an error that says how to get one.
//!
//! # A complete flow test
//!
//! ```no_run
//! use std::time::Duration;
//! use choreo::{event, event_handler, Context, Publisher, Service};
//! use choreo_testkit::{NatsServer, Recorder, TestService};
//!
//! #[event(subject = "orders.{order_id}.placed", key = order_id)]
//! pub struct OrderPlaced { pub order_id: String }
//!
//! #[event(subject = "payments.{order_id}.captured", key = order_id)]
//! pub struct PaymentCaptured { pub order_id: String }
//!
//! #[event(subject = "shipments.{order_id}.sent", key = order_id)]
//! pub struct OrderShipped { pub order_id: String }
//!
//! #[event_handler]
//! async fn charge(order: OrderPlaced, ctx: Context) {
//!     ctx.emit(PaymentCaptured { order_id: order.order_id });
//! }
//!
//! #[event_handler]
//! async fn ship(payment: PaymentCaptured, ctx: Context) {
//!     ctx.emit(OrderShipped { order_id: payment.order_id });
//! }
//!
//! #[tokio::test]
//! async fn an_order_is_charged_then_shipped() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = NatsServer::start().await?;
//!     let client = server.connect().await?;
//!     let recorder = Recorder::start(&client).await?;
//!     let _payments = TestService::start(client.clone(), || Service::new("payments").handler(charge)).await?;
//!     let _shipping = TestService::start(client.clone(), || Service::new("shipping").handler(ship)).await?;
//!
//!     let root = Publisher::new(client, "checkout")?
//!         .publish(&OrderPlaced { order_id: "o-1".into() })
//!         .await?
//!         .event_id;
//!
//!     let flow = recorder.quiescent(root, Duration::from_millis(200), Duration::from_secs(5)).await?;
//!     flow.assert_path(&["OrderPlaced", "PaymentCaptured", "OrderShipped"])?;
//!     flow.assert_no_duplicates()?;
//!     println!("{}", flow.tree());
//!     Ok(())
//! }
//! ```
//!
//! # Waiting for one event, then asserting causes
//!
//! ```no_run
//! use std::time::Duration;
//! use choreo::{event, event_handler, Context, Publisher, Service};
//! use choreo_testkit::{NatsServer, Recorder, TestService};
//!
//! #[event(subject = "orders.{order_id}.placed", key = order_id)]
//! pub struct OrderPlaced { pub order_id: String }
//!
//! #[event(subject = "payments.{order_id}.captured")]
//! pub struct PaymentCaptured { pub order_id: String }
//!
//! #[event_handler]
//! async fn charge(order: OrderPlaced, ctx: Context) {
//!     ctx.emit(PaymentCaptured { order_id: order.order_id });
//! }
//!
//! #[tokio::test]
//! async fn an_order_is_charged_once() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = NatsServer::start().await?;
//!     let client = server.connect().await?;
//!     let recorder = Recorder::start(&client).await?;
//!     let _payments = TestService::start(client.clone(), || Service::new("payments").handler(charge)).await?;
//!
//!     let root = Publisher::new(client, "checkout")?
//!         .publish(&OrderPlaced { order_id: "o-1".into() })
//!         .await?
//!         .event_id;
//!
//!     let captured = recorder.expect::<PaymentCaptured>().in_flow(root).within(Duration::from_secs(5)).await?;
//!     assert_eq!(captured.event.order_id, "o-1");
//!
//!     let flow = recorder.quiescent(root, Duration::from_millis(200), Duration::from_secs(5)).await?;
//!     flow.assert_path(&["OrderPlaced", "PaymentCaptured"])?;
//!     flow.assert_caused_by::<PaymentCaptured, OrderPlaced>()?;
//!     flow.assert_no_duplicates()?;
//!     println!("{}", flow.tree());
//!     Ok(())
//! }
//! ```
//!
//! `flow.tree()` prints, for a longer flow:
//!
//! ```text
//! flow e4793154: 4 events
//! OrderPlaced [checkout] e4793154 +0ms
//! ├─ PaymentCaptured [payments] 2bf486da +2ms
//! │  └─ OrderShipped [shipping] 3f0c1a9e +5ms
//! └─ ReceiptIssued [payments] 7b2d4c10 +2ms
//! ```
//!
//! and `flow.mermaid()`:
//!
//! ```text
//! sequenceDiagram
//!     participant checkout
//!     participant payments
//!     participant shipping
//!     checkout->>payments: OrderPlaced
//!     payments->>shipping: PaymentCaptured
//!     Note over payments: ReceiptIssued
//!     Note over shipping: OrderShipped
//! ```
//!
//! Each arrow starts at the service that emitted its event and ends at the
//! service that reacted to it. [`Recorder::settled`] waits until every
//! consumer on the server is drained and the recorder has read everything:
//! a steadier end-of-test condition than a quiet period.

mod browser;
mod cluster;
mod deadline;
mod error;
pub mod flow;
mod gauge;
mod postgres;
mod server;
mod service;

pub use browser::{Browser, CHROMIUM_BIN, Page, find_chromium};
pub use cluster::NatsCluster;
pub use deadline::DeadlineIs;
pub use error::{TestkitError, TestkitErrorKind};
pub use flow::{Expect, ExpectNone, Flow, FlowError, Recorded, Recorder, Seen, Wait};
pub use gauge::GaugeProbe;
pub use postgres::{POSTGRES_BIN_DIR, POSTGRES_USER, PostgresServer, find_postgres};
pub use server::{NATS_SERVER_BIN, NatsServer, NatsServerBuilder, find_binary};
pub use service::TestService;
