//! What `#[event]` generates, checked through the public `Event` trait.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo::{DecodeError, Envelope, Event, EventId, EventKey, Metadata, SubjectError, event};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(
    name = "LineAdded",
    subject = "carts.{cart_id}.lines.{line}",
    stream = "CART_EVENTS",
    key = (cart_id, line),
    version = 3
)]
#[derive(Debug, Clone, PartialEq)]
pub struct LineAddedV3 {
    pub cart_id: u64,
    pub line: u32,
    pub sku: String,
}

#[event(subject = "audit.tick")]
#[derive(Debug, Clone, PartialEq)]
pub struct Ticked;

#[event(subject = "audit.status")]
#[derive(Debug, Clone, PartialEq)]
pub enum StatusChanged {
    Up,
    Down { reason: String },
}

#[event(command_name_ok, subject = "legacy.create")]
#[derive(Debug, Clone, PartialEq)]
pub struct CreateAccount {
    pub id: u32,
}

#[test]
fn constants_follow_the_options_and_defaults() {
    assert_eq!(OrderPlaced::NAME, "OrderPlaced");
    assert_eq!(OrderPlaced::VERSION, 1);
    assert_eq!(OrderPlaced::SUBJECT, "orders.{order_id}.placed");
    assert_eq!(OrderPlaced::SUBJECT_FILTER, "orders.*.placed");
    assert_eq!(OrderPlaced::STREAM, "ORDERS");
    assert_eq!(OrderPlaced::STREAM_SUBJECTS, "orders.>");

    assert_eq!(LineAddedV3::NAME, "LineAdded");
    assert_eq!(LineAddedV3::VERSION, 3);
    assert_eq!(LineAddedV3::SUBJECT_FILTER, "carts.*.lines.*");
    assert_eq!(LineAddedV3::STREAM, "CART_EVENTS");
    assert_eq!(LineAddedV3::STREAM_SUBJECTS, "carts.>");

    assert_eq!(CreateAccount::NAME, "CreateAccount");
}

#[test]
fn subjects_are_filled_from_fields() {
    let e = OrderPlaced {
        order_id: "o-17".into(),
        total_cents: 5,
    };
    assert_eq!(e.subject().unwrap(), "orders.o-17.placed");
    let l = LineAddedV3 {
        cart_id: 9,
        line: 2,
        sku: "x".into(),
    };
    assert_eq!(l.subject().unwrap(), "carts.9.lines.2");
    assert_eq!(Ticked.subject().unwrap(), "audit.tick");
    assert_eq!(StatusChanged::Up.subject().unwrap(), "audit.status");
}

#[test]
fn an_illegal_field_value_is_an_error_naming_field_and_value() {
    let e = OrderPlaced {
        order_id: "a.b".into(),
        total_cents: 5,
    };
    let err = e.subject().unwrap_err();
    let SubjectError::InvalidToken {
        event,
        field,
        value,
        ..
    } = &err
    else {
        panic!("unexpected {err:?}")
    };
    assert_eq!(
        (*event, field.as_str(), value.as_str()),
        ("OrderPlaced", "order_id", "a.b")
    );
    let msg = err.to_string();
    assert!(
        msg.contains("`order_id`") && msg.contains("\"a.b\""),
        "{msg}"
    );
}

#[test]
fn keys_fix_the_event_id() {
    let e = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 5,
    };
    assert_eq!(e.key(), Some(EventKey::new(["o-1"])));
    let other_total = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 99,
    };
    let a = Metadata::root(&e, "orders").unwrap();
    let b = Metadata::root(&other_total, "orders").unwrap();
    assert_eq!(a.id(), b.id(), "the same fact is the same event");
    assert_eq!(
        a.id(),
        EventId::keyed("OrderPlaced", &EventKey::new(["o-1"]))
    );
    let l = LineAddedV3 {
        cart_id: 9,
        line: 2,
        sku: "x".into(),
    };
    assert_eq!(l.key(), Some(EventKey::new(["9", "2"])));
    assert_eq!(Ticked.key(), None);
    // Without a key every publish is a new event.
    let t1 = Metadata::root(&Ticked, "clock").unwrap();
    let t2 = Metadata::root(&Ticked, "clock").unwrap();
    assert_ne!(t1.id(), t2.id());
    assert_eq!(t1.id().as_uuid().get_version_num(), 7);
}

#[test]
fn enums_and_unit_structs_round_trip() {
    for e in [
        StatusChanged::Up,
        StatusChanged::Down {
            reason: "disk".into(),
        },
    ] {
        let meta = Metadata::root(&e, "svc").unwrap();
        let env = Envelope::new(e.clone(), meta).unwrap();
        let (headers, payload) = env.to_message().unwrap();
        let back = Envelope::<StatusChanged>::decode(env.subject(), &headers, &payload).unwrap();
        assert_eq!(back, env);
    }
}

#[test]
fn a_message_of_another_type_is_a_typed_error() {
    let e = OrderPlaced {
        order_id: "o-1".into(),
        total_cents: 5,
    };
    let env = Envelope::new(
        e,
        Metadata::root(
            &OrderPlaced {
                order_id: "o-1".into(),
                total_cents: 5,
            },
            "s",
        )
        .unwrap(),
    )
    .unwrap();
    let (headers, payload) = env.to_message().unwrap();
    let err = Envelope::<Ticked>::decode("x", &headers, &payload).unwrap_err();
    assert_eq!(
        err,
        DecodeError::WrongType {
            expected: "Ticked",
            got: "OrderPlaced".into()
        }
    );
}
