//! The wire contract: headers, CBOR payloads, subjects and event ids.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo::__private as subject;
use choreo::HeaderError;
use choreo::async_nats::HeaderMap;
use choreo::headers;
use choreo::{DecodeError, Envelope, Event, EventId, EventKey, Metadata, event};
use proptest::prelude::*;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "payments.{order_id}.captured")]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amounts: Vec<i64>,
    pub note: Option<String>,
    pub ok: bool,
    pub ratio: f64,
}

// ---- golden vectors -------------------------------------------------------

#[derive(serde::Deserialize)]
struct Golden {
    namespace: String,
    keyed: Vec<KeyedCase>,
    emitted: Vec<EmittedCase>,
}
#[derive(serde::Deserialize)]
struct KeyedCase {
    name: String,
    key: Vec<String>,
    id: String,
}
#[derive(serde::Deserialize)]
struct EmittedCase {
    handler: String,
    cause: String,
    name: String,
    index: u32,
    id: String,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("golden/event-ids.json")).expect("golden file parses")
}

#[test]
fn event_ids_match_the_golden_vectors() {
    let g = golden();
    assert_eq!(EventId::NAMESPACE.to_string(), g.namespace);
    for c in &g.keyed {
        let id = EventId::keyed(&c.name, &EventKey::new(c.key.iter().cloned()));
        assert_eq!(
            id.to_string(),
            c.id,
            "keyed id of {} {:?} changed",
            c.name,
            c.key
        );
    }
    for c in &g.emitted {
        let cause: EventId = c.cause.parse().expect("cause is a uuid");
        let id = EventId::emitted(&c.handler, cause, &c.name, c.index);
        assert_eq!(
            id.to_string(),
            c.id,
            "emitted id of {} #{} changed",
            c.name,
            c.index
        );
    }
    assert!(g.keyed.len() >= 5 && g.emitted.len() >= 5);
}

#[test]
fn a_keyed_event_from_the_macro_has_the_golden_id() {
    let g = golden();
    let e = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 4250,
    };
    let meta = Metadata::root(&e, "orders").unwrap();
    assert_eq!(meta.id().to_string(), g.keyed[0].id);
    assert_eq!(meta.correlation_id(), meta.id());
    assert_eq!(meta.causation_id(), None);
}

#[test]
fn the_wire_format_document_shows_the_golden_values() {
    let doc = include_str!("../../docs/wire-format.md");
    let g = golden();
    for id in [
        &g.namespace,
        &g.keyed[0].id,
        &g.emitted[0].id,
        &g.emitted[1].id,
    ] {
        assert!(
            doc.contains(id.as_str()),
            "docs/wire-format.md does not show {id}"
        );
    }
    assert!(
        doc.contains(WORKED_PAYLOAD_HEX),
        "docs/wire-format.md does not show the payload hex"
    );
}

/// `OrderPlaced { order_id: "o-1", total_cents: 4250 }` in CBOR.
const WORKED_PAYLOAD_HEX: &str = "a2686f726465725f6964636f2d316b746f74616c5f63656e747319109a";

#[test]
fn the_payload_is_plain_cbor_of_the_serde_shape() {
    let e = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 4250,
    };
    let bytes = choreo::codec::encode(&e).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, WORKED_PAYLOAD_HEX);
}

// ---- headers --------------------------------------------------------------

fn sample() -> (HeaderMap, Vec<u8>) {
    let root = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 1,
    };
    let root_meta = Metadata::root(&root, "orders").unwrap();
    let e = PaymentCaptured {
        order_id: "o-1".into(),
        amounts: vec![1],
        note: None,
        ok: true,
        ratio: 0.5,
    };
    let meta = Metadata::emitted(&e, "payments", &root_meta, "payments.charge", 0).unwrap();
    let env = Envelope::new(e, meta).unwrap();
    let (h, p) = env.to_message().unwrap();
    (h, p.to_vec())
}

#[test]
fn every_wire_header_is_written() {
    let (h, _) = sample();
    for name in [
        headers::NATS_MSG_ID,
        headers::CE_SPECVERSION,
        headers::CE_ID,
        headers::CE_TYPE,
        headers::CE_SOURCE,
        headers::CE_TIME,
        headers::CE_EVENTVERSION,
        headers::CE_CORRELATIONID,
        headers::CE_CAUSATIONID,
        headers::CONTENT_TYPE,
    ] {
        assert!(h.get(name).is_some(), "{name} missing");
    }
    assert_eq!(h.get(headers::CE_SPECVERSION).unwrap().as_str(), "1.0");
    assert_eq!(
        h.get(headers::CONTENT_TYPE).unwrap().as_str(),
        "application/cbor"
    );
    assert_eq!(h.get(headers::CE_TYPE).unwrap().as_str(), "PaymentCaptured");
    assert_eq!(h.get(headers::CE_SOURCE).unwrap().as_str(), "payments");
    assert_eq!(
        h.get(headers::NATS_MSG_ID).unwrap().as_str(),
        h.get(headers::CE_ID).unwrap().as_str()
    );
    assert!(h.get(headers::TRACEPARENT).is_none());
}

#[test]
fn emitted_events_carry_correlation_and_causation() {
    let root = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 1,
    };
    let root_meta = Metadata::root(&root, "orders").unwrap();
    let e = PaymentCaptured {
        order_id: "o-1".into(),
        amounts: vec![],
        note: None,
        ok: true,
        ratio: 0.0,
    };
    let m0 = Metadata::emitted(&e, "payments", &root_meta, "payments.charge", 0).unwrap();
    let m0_again = Metadata::emitted(&e, "payments", &root_meta, "payments.charge", 0).unwrap();
    let m1 = Metadata::emitted(&e, "payments", &root_meta, "payments.charge", 1).unwrap();
    assert_eq!(m0.correlation_id(), root_meta.id());
    assert_eq!(m0.causation_id(), Some(root_meta.id()));
    assert_eq!(
        m0.id(),
        m0_again.id(),
        "a retried handler re-emits the same id"
    );
    assert_ne!(m0.id(), m1.id());
    assert_eq!(
        m0.id(),
        EventId::emitted("payments.charge", root_meta.id(), "PaymentCaptured", 0)
    );
    // A grandchild keeps the root's correlation id.
    let m2 = Metadata::emitted(&e, "shipping", &m0, "shipping.ship", 0).unwrap();
    assert_eq!(m2.correlation_id(), root_meta.id());
    assert_eq!(m2.causation_id(), Some(m0.id()));
}

fn with(h: &HeaderMap, name: &str, value: Option<&str>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, vs) in h.iter() {
        if k.as_ref() as &str != name {
            for v in vs {
                out.append(k.clone(), v.clone());
            }
        }
    }
    if let Some(v) = value {
        out.insert(name, v);
    }
    out
}

#[test]
fn each_missing_required_header_is_named() {
    let (h, p) = sample();
    for name in [
        headers::CE_SPECVERSION,
        headers::CE_ID,
        headers::CE_TYPE,
        headers::CE_SOURCE,
        headers::CE_TIME,
        headers::CE_EVENTVERSION,
        headers::CE_CORRELATIONID,
        headers::CONTENT_TYPE,
    ] {
        let err = Envelope::<PaymentCaptured>::decode("s", &with(&h, name, None), &p).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Header(HeaderError::Missing { header: name })
        );
        assert!(err.to_string().contains(name));
        assert_eq!(err.code(), "bad-header");
    }
    // Nats-Msg-Id and ce-causationid are optional.
    assert!(
        Envelope::<PaymentCaptured>::decode("s", &with(&h, headers::NATS_MSG_ID, None), &p).is_ok()
    );
    assert!(
        Envelope::<PaymentCaptured>::decode("s", &with(&h, headers::CE_CAUSATIONID, None), &p)
            .is_ok()
    );
}

#[test]
fn each_malformed_header_is_named_with_its_value() {
    let (h, p) = sample();
    let cases = [
        (headers::CE_SPECVERSION, "0.3"),
        (headers::CE_ID, "not-a-uuid"),
        (headers::CE_TYPE, "Payment Captured"),
        (headers::CE_SOURCE, "pay\tments"),
        (headers::CE_TIME, "yesterday"),
        (headers::CE_EVENTVERSION, "0"),
        (headers::CE_EVENTVERSION, "+1"),
        (headers::CE_EVENTVERSION, "1.5"),
        (headers::CE_CORRELATIONID, "x"),
        (headers::CE_CAUSATIONID, ""),
        (headers::TRACEPARENT, "00-abc-def-01"),
        (headers::CONTENT_TYPE, "application/json"),
    ];
    for (name, value) in cases {
        let err =
            Envelope::<PaymentCaptured>::decode("s", &with(&h, name, Some(value)), &p).unwrap_err();
        let DecodeError::Header(HeaderError::Malformed {
            header, value: got, ..
        }) = &err
        else {
            panic!("{name}={value:?}: unexpected {err:?}")
        };
        assert_eq!((*header, got.as_str()), (name, value));
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains(&format!("{value:?}")),
            "{msg}"
        );
    }
}

#[test]
fn a_header_given_twice_is_malformed() {
    let (mut h, p) = sample();
    h.append(headers::CE_ID, "0190f5c2-7a4e-7cc0-8a1b-0123456789ab");
    let err = Envelope::<PaymentCaptured>::decode("s", &h, &p).unwrap_err();
    assert!(
        matches!(
            &err,
            DecodeError::Header(HeaderError::Malformed {
                header: "ce-id",
                expected: "exactly one value",
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn a_bad_source_is_refused_before_it_reaches_a_header() {
    let e = OrderPlaced {
        order_id: "o".into(),
        total_cents: 1,
    };
    for bad in ["", "a b", "a\r\nce-type: Evil", &"x".repeat(257)] {
        assert!(matches!(
            Metadata::root(&e, bad),
            Err(HeaderError::Malformed {
                header: "ce-source",
                ..
            })
        ));
    }
}

#[test]
fn trailing_bytes_after_the_payload_are_refused() {
    let (h, mut p) = sample();
    p.push(0);
    let err = Envelope::<PaymentCaptured>::decode("s", &h, &p).unwrap_err();
    assert!(matches!(err, DecodeError::Payload { .. }), "{err:?}");
}

// ---- properties -----------------------------------------------------------

fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_\\-]{1,12}"
}

fn trace() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(("[0-9a-f]{32}", "[0-9a-f]{16}", "0[01]").prop_filter_map(
        "all-zero ids are invalid",
        |(t, s, f)| {
            (t.bytes().any(|b| b != b'0') && s.bytes().any(|b| b != b'0'))
                .then(|| format!("00-{t}-{s}-{f}"))
        },
    ))
}

proptest! {
    #[test]
    fn headers_round_trip(
        order in token(),
        source in "[a-z][a-z0-9_.-]{0,30}",
        nanos in 0i128..4_102_444_800_000_000_000i128,
        depth in 0u32..3,
        index in 0u32..5,
        traceparent in trace(),
    ) {
        let root = OrderPlaced { order_id: order.clone(), total_cents: 1 };
        let mut meta = Metadata::root(&root, &source).unwrap();
        for _ in 0..depth {
            meta = Metadata::emitted(&root, &source, &meta, "h.x", index).unwrap();
        }
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
        let mut meta = meta.with_time(time);
        if let Some(t) = &traceparent {
            meta = meta.with_traceparent(t).unwrap();
        }
        let back = Metadata::from_headers(&meta.to_headers()).unwrap();
        prop_assert_eq!(back, meta);
    }

    #[test]
    fn cbor_round_trips(
        order_id in ".{0,40}",
        amounts in proptest::collection::vec(any::<i64>(), 0..8),
        note in proptest::option::of(".{0,20}"),
        ok in any::<bool>(),
        ratio in any::<f64>().prop_filter("NaN is not equal to itself", |f| !f.is_nan()),
    ) {
        let e = PaymentCaptured { order_id, amounts, note, ok, ratio };
        let bytes = choreo::codec::encode(&e).unwrap();
        let back: PaymentCaptured = choreo::codec::decode(1, &bytes).unwrap();
        prop_assert_eq!(back, e);
    }

    #[test]
    fn subjects_render_legal_values_and_refuse_the_rest(value in "\\PC{0,16}") {
        let e = OrderPlaced { order_id: value.clone(), total_cents: 0 };
        match e.subject() {
            Ok(s) => {
                prop_assert_eq!(s, format!("orders.{value}.placed"));
                prop_assert!(subject::check_token(&value).is_ok());
                let rendered = format!("orders.{value}.placed");
                prop_assert!(subject::covers(OrderPlaced::SUBJECT_FILTER, &rendered));
            }
            Err(choreo::SubjectError::InvalidToken { field, value: got, .. }) => {
                prop_assert_eq!(field, "order_id");
                prop_assert_eq!(&got, &value);
                prop_assert!(value.is_empty() || value.chars().any(|c| ".*>".contains(c) || c.is_whitespace() || c.is_control()));
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn event_ids_are_deterministic_and_input_sensitive(
        name in "[A-Za-z]{1,12}",
        a in proptest::collection::vec(".{0,8}", 0..4),
        b in proptest::collection::vec(".{0,8}", 0..4),
        handler in "[a-z._]{1,20}",
        i in 0u32..1000,
        j in 0u32..1000,
    ) {
        let ka = EventId::keyed(&name, &EventKey::new(a.clone()));
        prop_assert_eq!(ka, EventId::keyed(&name, &EventKey::new(a.clone())));
        prop_assert_eq!(ka == EventId::keyed(&name, &EventKey::new(b.clone())), a == b);
        let cause = EventId::new_random();
        let ea = EventId::emitted(&handler, cause, &name, i);
        prop_assert_eq!(ea, EventId::emitted(&handler, cause, &name, i));
        prop_assert_eq!(ea == EventId::emitted(&handler, cause, &name, j), i == j);
        prop_assert_ne!(ea, EventId::emitted(&handler, EventId::new_random(), &name, i));
        prop_assert_eq!(ka.as_uuid().get_version_num(), 5);
    }
}

/// The wire-format document promises that readers ignore map keys they do not
/// know, so adding an optional field does not need a new version.
#[test]
fn unknown_payload_fields_are_ignored() {
    #[derive(serde::Serialize)]
    struct Wider<'a> {
        order_id: &'a str,
        total_cents: u64,
        coupon: &'a str,
    }
    let mut bytes = Vec::new();
    ciborium::into_writer(
        &Wider {
            order_id: "o-1",
            total_cents: 5,
            coupon: "X",
        },
        &mut bytes,
    )
    .unwrap();
    let e: OrderPlaced = choreo::codec::decode(1, &bytes).unwrap();
    assert_eq!(
        e,
        OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 5
        }
    );
}
