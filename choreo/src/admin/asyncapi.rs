//! An AsyncAPI 3.0 document of a whole choreography, from its manifests.
//!
//! - One channel per event type; its address is the subject template
//!   (`orders.{order_id}.placed`), each `{field}` a channel parameter.
//! - One message per event version, with the CloudEvents headers choreo
//!   writes (`ce-type` and `ce-eventversion` fixed per message) and, where
//!   the type provides one (`#[event(schema)]`), its payload schema. The
//!   payload is CBOR (`application/cbor`); the schema describes its data.
//! - One `receive` operation per handler, one `send` operation per event a
//!   handler declares it emits, and per root event a publisher recorded.
//!   `x-choreo-*` fields carry the durable, the stream and the options.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::registry::{Manifest, PublishedEvent};
use crate::wire::headers;

/// One event version as the document describes it.
struct Message {
    event: String,
    version: u32,
    subject: String,
    stream: String,
    schema: Option<Value>,
}

/// An AsyncAPI 3.0.0 document of the services in `manifests` and the
/// publishers' root events; `server`, a NATS URL, becomes its one server.
///
/// ```
/// use choreo::{event, event_handler, Service};
///
/// #[event(subject = "orders.{order_id}.placed")]
/// pub struct OrderPlaced { pub order_id: String }
///
/// #[event_handler(emits = [])]
/// async fn charge(_o: OrderPlaced) {}
///
/// let m = Service::new("payments").handler(charge).manifest();
/// let doc = choreo::admin::asyncapi(&[m], &[], Some("nats://127.0.0.1:4222"));
/// assert_eq!(doc["asyncapi"], "3.0.0");
/// assert_eq!(doc["channels"]["OrderPlaced"]["address"], "orders.{order_id}.placed");
/// assert_eq!(doc["operations"]["payments.charge"]["action"], "receive");
/// ```
pub fn asyncapi(
    manifests: &[Manifest],
    publishers: &[PublishedEvent],
    server: Option<&str>,
) -> Value {
    let messages = messages(manifests, publishers);
    let mut channels = Map::new();
    let mut components = Map::new();
    for (event, versions) in &messages {
        let newest = versions.values().next_back();
        let address = newest.map_or_else(String::new, |m| m.subject.clone());
        let mut refs = Map::new();
        for m in versions.values() {
            let id = message_id(&m.event, m.version);
            refs.insert(
                id.clone(),
                json!({ "$ref": format!("#/components/messages/{id}") }),
            );
            components.insert(id, message(m));
        }
        let mut channel = json!({
            "address": address,
            "title": event,
            "messages": refs,
            "x-choreo-stream": newest.map(|m| m.stream.clone()),
        });
        let params = parameters(&address);
        if !params.is_empty() {
            channel["parameters"] = Value::Object(params);
        }
        channels.insert(event.clone(), channel);
    }
    let mut operations = Map::new();
    for m in manifests {
        for h in &m.handlers {
            // A deadline's helpers are described by their deadline
            // handler's `x-choreo-deadline`, not as operations of their own.
            if h.part_of.is_some() {
                continue;
            }
            let event = &h.consumes.event;
            let accepted: Vec<Value> = messages
                .get(event)
                .into_iter()
                .flat_map(|v| v.values())
                .filter(|msg| h.consumes.accepts_versions.contains(&msg.version))
                .map(|msg| channel_message_ref(event, msg.version))
                .collect();
            let mut operation = json!({
                "action": "receive",
                "title": format!("{} handles {event}", h.durable),
                "channel": { "$ref": format!("#/channels/{event}") },
                "messages": accepted,
                "x-choreo-service": m.service,
                "x-choreo-durable": h.durable,
                "x-choreo-subject-filter": h.consumes.subject_filter,
                "x-choreo-options": options(h),
            });
            if let Some(d) = &h.deadline {
                operation["x-choreo-deadline"] = json!({
                    "within_ms": d.within_ms,
                    "unless": d.unless,
                    "matched_by": d.matched_by,
                });
            }
            operations.insert(format!("{}.{}", m.service, h.name), operation);
            for e in h.emits.iter().flatten() {
                operations.insert(
                    format!("{}.{}.emits.{}", m.service, h.name, e.event),
                    json!({
                        "action": "send",
                        "title": format!("{} emits {}", h.durable, e.event),
                        "channel": { "$ref": format!("#/channels/{}", e.event) },
                        "messages": [channel_message_ref(&e.event, e.version)],
                        "x-choreo-service": m.service,
                    }),
                );
            }
        }
    }
    for p in publishers {
        operations.insert(
            format!("{}.publishes.{}", sanitize(&p.source), p.event.event),
            json!({
                "action": "send",
                "title": format!("{} publishes {}", p.source, p.event.event),
                "channel": { "$ref": format!("#/channels/{}", p.event.event) },
                "messages": [channel_message_ref(&p.event.event, p.event.version)],
                "x-choreo-source": p.source,
            }),
        );
    }
    let version = manifests
        .iter()
        .map(|m| m.choreo_version.clone())
        .max()
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    let mut doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "choreography",
            "version": version,
            "description": format!(
                "{} services and {} publishers on NATS JetStream, described by choreo asyncapi. \
                 Every event is CBOR with CloudEvents headers (binary mode).",
                manifests.len(),
                publishers.len()
            ),
        },
        "defaultContentType": crate::wire::codec::CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": { "messages": components },
    });
    if let Some(url) = server {
        let host = url.split(',').next().unwrap_or(url);
        let host = host.split_once("://").map_or(host, |(_, h)| h);
        doc["servers"] = json!({
            "nats": { "host": host, "protocol": "nats", "description": "NATS with JetStream" }
        });
    }
    doc
}

/// A handler's options as they apply: an ordered handler runs one event of
/// a key at a time over its partitions, so `concurrency` says nothing of it
/// and is left out.
fn options(h: &crate::registry::HandlerManifest) -> Value {
    let mut o = serde_json::to_value(&h.options).unwrap_or(Value::Null);
    if h.options.partitions > 0
        && let Some(map) = o.as_object_mut()
    {
        map.remove("concurrency");
    }
    o
}

/// Every event version any manifest names, by event then version. A
/// producer's description (template, schema) wins over a consumer's.
fn messages(
    manifests: &[Manifest],
    publishers: &[PublishedEvent],
) -> BTreeMap<String, BTreeMap<u32, Message>> {
    let mut out: BTreeMap<String, BTreeMap<u32, Message>> = BTreeMap::new();
    let mut add = |m: Message| {
        let slot = out.entry(m.event.clone()).or_default();
        match slot.get_mut(&m.version) {
            Some(old) if old.schema.is_none() || old.subject.is_empty() => {
                if old.subject.is_empty() {
                    old.subject = m.subject;
                }
                if old.schema.is_none() {
                    old.schema = m.schema;
                }
            }
            Some(_) => {}
            None => {
                slot.insert(m.version, m);
            }
        }
    };
    for m in manifests {
        for h in &m.handlers {
            let c = &h.consumes;
            add(Message {
                event: c.event.clone(),
                version: c.version,
                subject: if c.subject.is_empty() {
                    c.subject_filter.clone()
                } else {
                    c.subject.clone()
                },
                stream: c.stream.clone(),
                schema: c.schema.clone(),
            });
            for e in h.emits.iter().flatten() {
                add(Message {
                    event: e.event.clone(),
                    version: e.version,
                    subject: e.subject.clone(),
                    stream: e.stream.clone(),
                    schema: e.schema.clone(),
                });
            }
        }
    }
    for p in publishers {
        let e = &p.event;
        add(Message {
            event: e.event.clone(),
            version: e.version,
            subject: e.subject.clone(),
            stream: e.stream.clone(),
            schema: e.schema.clone(),
        });
    }
    out
}

fn message_id(event: &str, version: u32) -> String {
    format!("{event}.v{version}")
}

fn channel_message_ref(event: &str, version: u32) -> Value {
    json!({ "$ref": format!("#/channels/{event}/messages/{}", message_id(event, version)) })
}

/// A name AsyncAPI accepts as a map key: letters, digits, `.`, `-`, `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The `{field}` tokens of a subject template as channel parameters.
fn parameters(address: &str) -> Map<String, Value> {
    address
        .split('.')
        .filter_map(|t| t.strip_prefix('{')?.strip_suffix('}'))
        .map(|field| {
            (
                field.to_owned(),
                json!({ "description": format!("The event's `{field}` field, as text.") }),
            )
        })
        .collect()
}

fn message(m: &Message) -> Value {
    let string = |description: &str| json!({ "type": "string", "description": description });
    let headers = json!({
        "type": "object",
        "required": [
            headers::NATS_MSG_ID, headers::CE_SPECVERSION, headers::CE_ID, headers::CE_TYPE,
            headers::CE_SOURCE, headers::CE_TIME, headers::CE_EVENTVERSION,
            headers::CE_CORRELATIONID, headers::CONTENT_TYPE,
        ],
        "properties": {
            headers::NATS_MSG_ID: string("JetStream's deduplication key: the event id."),
            headers::CE_SPECVERSION: { "const": headers::SPEC_VERSION },
            headers::CE_ID: string("The event id: a UUID, deterministic for an emitted event."),
            headers::CE_TYPE: { "const": m.event },
            headers::CE_SOURCE: string("The service (or publisher) that emitted it."),
            headers::CE_TIME: { "type": "string", "format": "date-time" },
            headers::CE_EVENTVERSION: { "const": m.version.to_string() },
            headers::CE_CORRELATIONID: string("The id every event of one flow shares."),
            headers::CE_CAUSATIONID: string("The id of the event that caused this one; absent on a root event."),
            headers::TRACEPARENT: string("W3C trace context."),
            headers::CONTENT_TYPE: { "const": crate::wire::codec::CONTENT_TYPE },
        },
    });
    let mut msg = json!({
        "name": m.event,
        "title": format!("{} v{}", m.event, m.version),
        "contentType": crate::wire::codec::CONTENT_TYPE,
        "headers": headers,
        "x-choreo-version": m.version,
    });
    if let Some(schema) = &m.schema {
        msg["payload"] = schema.clone();
    }
    msg
}
