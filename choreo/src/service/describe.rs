//! A service described as data: its manifest, and the permissions it needs.

use super::Service;
use crate::topology::{Permissions, consumer_name};

impl Service {
    /// This service described as data: its handlers, the event each
    /// consumes (with the versions it accepts), what each declares it
    /// emits, and their options. No server needed: CI can read it offline.
    /// A running instance writes the same into the registry.
    pub fn manifest(&self) -> crate::registry::Manifest {
        use crate::registry::{
            AggregateManifest, ConsumedEvent, EventManifest, HandlerManifest, Manifest,
        };
        Manifest {
            service: self.name.clone(),
            aggregates: self
                .aggregates
                .iter()
                .map(|a| AggregateManifest {
                    name: a.name.to_owned(),
                    filter: a.filter.clone(),
                    stream: a.stream.to_owned(),
                })
                .collect(),
            choreo_version: env!("CARGO_PKG_VERSION").to_owned(),
            handlers: self
                .handlers
                .iter()
                .map(|h| {
                    let consumed = h.consumes();
                    HandlerManifest {
                        name: h.name().to_owned(),
                        durable: consumer_name(&self.name, h.name()),
                        consumes: ConsumedEvent {
                            event: consumed.name.to_owned(),
                            version: consumed.version,
                            accepts_versions: h.accepted_versions(),
                            subject: consumed.subject.to_owned(),
                            // Where it reads: a deadline handler reads A's
                            // fired copies from the deadline stream.
                            subject_filter: h.stream().2.to_owned(),
                            stream: h.stream().0.to_owned(),
                            schema: (consumed.schema)(),
                        },
                        emits: h
                            .emits()
                            .map(|d| d.iter().map(EventManifest::from).collect()),
                        options: (&h.options()).into(),
                        deadline: h.deadline().as_ref().map(Into::into),
                        part_of: h.part_of().map(str::to_owned),
                    }
                })
                .collect(),
        }
    }

    /// The least NATS permissions this service needs for its handlers, its
    /// inbox, its dead letters and the events its handlers declare they emit
    /// (`emits = [..]`). Add those of undeclared emissions with
    /// [`Permissions::publishes`]; `docs/deployment.md` explains each
    /// subject.
    ///
    /// ```
    /// # use choreo::{event, event_handler, Context, Service};
    /// # #[event(subject = "orders.{order_id}.placed")]
    /// # pub struct OrderPlaced { pub order_id: String }
    /// # #[event(subject = "payments.{order_id}.captured")]
    /// # pub struct PaymentCaptured { pub order_id: String }
    /// # #[event_handler]
    /// # async fn charge(order: OrderPlaced, ctx: Context) {
    /// #     ctx.emit(PaymentCaptured { order_id: order.order_id });
    /// # }
    /// let service = Service::new("payments").handler(charge);
    /// let needs = service.permissions().publishes::<PaymentCaptured>(&Default::default());
    /// assert!(needs.publish().contains(&"$JS.API.CONSUMER.MSG.NEXT.ORDERS.payments--charge".to_owned()));
    /// println!("permissions: {}", needs.to_config());
    /// ```
    pub fn permissions(&self) -> Permissions {
        let mut needs = Permissions::service(
            &self.name,
            &self.api,
            self.handlers.iter().map(|h| {
                let o = h.options();
                (
                    h.name(),
                    h.stream().0,
                    o.idempotent,
                    o.ordered.map_or(0, |x| x.partitions),
                )
            }),
        );
        // Answering state requests: the requests, and reading the
        // aggregates' streams.
        if !self.aggregates.is_empty() {
            needs = needs.and(Permissions::answers_state(
                &self.name,
                &self.api,
                self.aggregates.iter().map(|a| a.stream),
            ));
        }
        // What handlers declare they emit (`emits = [..]`).
        for declared in self.handlers.iter().filter_map(|h| h.emits()) {
            for t in declared {
                needs = needs.publishes_type(t, &self.api);
            }
        }
        needs
    }
}
