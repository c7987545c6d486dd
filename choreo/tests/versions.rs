//! `upcast_from`: a handler for the newest type reads every older version.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo::{DecodeError, Envelope, Event, Metadata, event};

#[event(name = "PriceSet", subject = "prices.{sku}.set", key = sku)]
#[derive(Debug, Clone, PartialEq)]
pub struct PriceSetV1 {
    pub sku: String,
    pub cents: u32,
}

#[event(name = "PriceSet", version = 2, subject = "prices.{sku}.set", key = sku, upcast_from = PriceSetV1)]
#[derive(Debug, Clone, PartialEq)]
pub struct PriceSetV2 {
    pub sku: String,
    pub cents: u64,
    pub currency: String,
}

impl From<PriceSetV1> for PriceSetV2 {
    fn from(v1: PriceSetV1) -> Self {
        Self {
            sku: v1.sku,
            cents: u64::from(v1.cents),
            currency: "EUR".into(),
        }
    }
}

#[event(name = "PriceSet", version = 3, subject = "prices.{sku}.set", key = sku, upcast_from = PriceSetV2)]
#[derive(Debug, Clone, PartialEq)]
pub struct PriceSet {
    pub sku: String,
    pub amount: u64,
    pub currency: String,
    pub note: Option<String>,
}

impl From<PriceSetV2> for PriceSet {
    fn from(v2: PriceSetV2) -> Self {
        Self {
            sku: v2.sku,
            amount: v2.cents,
            currency: v2.currency,
            note: None,
        }
    }
}

fn encode<E: Event + Clone>(e: &E) -> (choreo::async_nats::HeaderMap, Vec<u8>) {
    let env = Envelope::new(e.clone(), Metadata::root(e, "pricing").unwrap()).unwrap();
    let (h, p) = env.to_message().unwrap();
    (h, p.to_vec())
}

#[test]
fn every_version_of_one_fact_is_one_event() {
    let v1 = PriceSetV1 {
        sku: "A1".into(),
        cents: 250,
    };
    let v3 = PriceSet {
        sku: "A1".into(),
        amount: 250,
        currency: "EUR".into(),
        note: None,
    };
    assert_eq!(
        Metadata::root(&v1, "p").unwrap().id(),
        Metadata::root(&v3, "p").unwrap().id()
    );
}

#[test]
fn the_newest_type_reads_older_versions_through_the_chain() {
    let (h, p) = encode(&PriceSetV1 {
        sku: "A1".into(),
        cents: 250,
    });
    let got = Envelope::<PriceSet>::decode("prices.A1.set", &h, &p).unwrap();
    assert_eq!(got.meta().version(), 1);
    assert_eq!(
        got.into_event(),
        PriceSet {
            sku: "A1".into(),
            amount: 250,
            currency: "EUR".into(),
            note: None
        }
    );

    let (h, p) = encode(&PriceSetV2 {
        sku: "B".into(),
        cents: 7,
        currency: "USD".into(),
    });
    let got = Envelope::<PriceSet>::decode("prices.B.set", &h, &p).unwrap();
    assert_eq!(got.amount, 7);
    assert_eq!(got.currency, "USD");

    assert!(
        PriceSet::accepts_version(1)
            && PriceSet::accepts_version(2)
            && PriceSet::accepts_version(3)
    );
    assert!(!PriceSet::accepts_version(4) && !PriceSet::accepts_version(0));
    assert!(!PriceSetV2::accepts_version(3));
}

#[test]
fn a_newer_version_is_a_typed_error() {
    let (h, p) = encode(&PriceSet {
        sku: "A1".into(),
        amount: 1,
        currency: "EUR".into(),
        note: None,
    });
    let err = Envelope::<PriceSetV2>::decode("prices.A1.set", &h, &p).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownVersion {
            event: "PriceSet",
            got: 3,
            newest: 2
        }
    );
    assert_eq!(err.code(), "unknown-version");
    assert!(
        err.to_string().contains("newer than this build knows"),
        "{err}"
    );
}

#[test]
fn an_older_version_without_upcast_is_a_typed_error() {
    let (h, p) = encode(&PriceSetV1 {
        sku: "A1".into(),
        cents: 1,
    });
    // PriceSetV2 reads V1, but V1 itself does not read anything but V1.
    let (h2, p2) = encode(&PriceSetV2 {
        sku: "A1".into(),
        cents: 1,
        currency: "X".into(),
    });
    assert!(Envelope::<PriceSetV2>::decode("s", &h, &p).is_ok());
    let err = Envelope::<PriceSetV1>::decode("s", &h2, &p2).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::UnknownVersion {
                got: 2,
                newest: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_payload_of_the_wrong_shape_is_a_typed_error() {
    // Headers say version 3, payload is a V1 body: `amount` is missing.
    let (h, _) = encode(&PriceSet {
        sku: "A1".into(),
        amount: 1,
        currency: "EUR".into(),
        note: None,
    });
    let (_, p_v1) = encode(&PriceSetV1 {
        sku: "A1".into(),
        cents: 1,
    });
    let err = Envelope::<PriceSet>::decode("s", &h, &p_v1).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Payload {
                event: "PriceSet",
                version: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), "undecodable-payload");
}
